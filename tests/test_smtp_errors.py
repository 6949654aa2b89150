"""Classifying SMTP replies and errors into Temporal failures (pure functions, no server)."""

from __future__ import annotations

import ssl
from datetime import timedelta

import aiosmtplib
import pytest

from activities.smtp_errors import (
    CONFIGURATION_ERROR,
    StartTlsUnavailable,
    classify,
    is_throttle,
    reply_failure,
    retry_hint,
)
from postlane.errors import ConfigurationError, ErrorType

# -- retry_hint ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "delay"),
    [
        ("4.7.1 rate limited, try again in 30 seconds", timedelta(seconds=30)),
        ("try again in 1 second", timedelta(seconds=1)),
        ("Please retry in 45s", timedelta(seconds=45)),
        ("4.7.0 Try again in 5 minutes", timedelta(minutes=5)),
        ("slow down: wait 2 min", timedelta(minutes=2)),
        ("Retry after 1 hour", timedelta(hours=1)),
        ("TRY AGAIN IN 10 SECS", timedelta(seconds=10)),
    ],
)
def test_retry_hint_reads_delay(text: str, delay: timedelta) -> None:
    assert retry_hint(text) == delay


@pytest.mark.parametrize(
    "text",
    [
        "4.7.1 rate limited",
        "try again later",
        "4.2.1 mailbox busy (451 4.7.1)",
        "retry in 500 ms",
        "",
    ],
)
def test_retry_hint_none_without_hint(text: str) -> None:
    assert retry_hint(text) is None


# -- is_throttle -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (421, "4.3.2 service not available"),
        (451, "4.7.1 please slow down"),
        (450, "4.7.0 temporarily deferred"),
        (452, "too many recipients this hour"),
        (451, "Rate-limit exceeded"),
        (450, "throttling in effect"),
        (451, "try again later"),
    ],
)
def test_is_throttle_recognises_slow_down(code: int, text: str) -> None:
    assert is_throttle(code, text) is True


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (450, "4.2.1 mailbox busy"),
        (451, "4.3.0 temporary local problem"),
        (452, "4.3.1 insufficient system storage"),
    ],
)
def test_is_throttle_false_for_other_4xx(code: int, text: str) -> None:
    assert is_throttle(code, text) is False


@pytest.mark.parametrize(
    "text", ["5.7.1 rate limited, try again in 30 seconds", "too many messages", "4.7.1 x"]
)
@pytest.mark.parametrize("code", [550, 554, 521])
def test_is_throttle_never_for_5xx(code: int, text: str) -> None:
    assert is_throttle(code, text) is False


# -- reply_failure ---------------------------------------------------------------------------


def test_reply_failure_5xx_is_permanent() -> None:
    err = reply_failure(550, "5.1.1 no such user", attempt=3, phase="rcpt")

    assert err.type == ErrorType.SMTP_PERMANENT
    assert err.non_retryable is True
    assert err.message == "550 5.1.1 no such user"
    assert err.details[0] == {"attempt": 3, "smtp_code": 550, "phase": "rcpt"}


def test_reply_failure_throttle_carries_hint() -> None:
    err = reply_failure(451, "4.7.1 rate limited, try again in 30 seconds", attempt=1, phase="mail")

    assert err.type == ErrorType.SMTP_THROTTLED
    assert err.non_retryable is False
    assert err.next_retry_delay == timedelta(seconds=30)


def test_reply_failure_other_4xx_is_transient() -> None:
    err = reply_failure(452, "4.3.1 insufficient system storage", attempt=1, phase="data")

    assert err.type == ErrorType.SMTP_TRANSIENT
    assert err.non_retryable is False
    assert err.next_retry_delay is None
    assert err.message == "452 4.3.1 insufficient system storage"


# -- classify --------------------------------------------------------------------------------


def test_classify_reply_exception_uses_its_code() -> None:
    err = classify(aiosmtplib.SMTPDataError(554, "5.7.1 spam"), attempt=2, phase="data")

    assert err.type == ErrorType.SMTP_PERMANENT
    assert err.details[0]["smtp_code"] == 554
    assert err.details[0]["phase"] == "data"


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPServerDisconnected("Connection lost"),
        aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"),
        ConnectionResetError("reset by peer"),
        TimeoutError(),
    ],
)
def test_classify_network_error_is_transient(exc: BaseException) -> None:
    err = classify(exc, attempt=1, phase="data")

    assert err.type == ErrorType.SMTP_TRANSIENT
    assert err.non_retryable is False
    assert type(exc).__name__ in err.message


def test_classify_certificate_failure_in_cause_chain_is_tls_error() -> None:
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")
    try:
        try:
            raise cause
        except ssl.SSLError as inner:
            raise aiosmtplib.SMTPConnectError("Error connecting to mx") from inner
    except aiosmtplib.SMTPConnectError as exc:
        err = classify(exc, attempt=1, phase="connect")

    assert err.type == ErrorType.SMTP_TLS
    assert err.non_retryable is True


def test_classify_other_ssl_error_is_transient() -> None:
    exc = aiosmtplib.SMTPConnectError("Error connecting: [SSL: WRONG_VERSION_NUMBER]")

    assert classify(exc, attempt=1, phase="connect").type == ErrorType.SMTP_TRANSIENT


def test_classify_starttls_unavailable_is_tls_error() -> None:
    err = classify(StartTlsUnavailable("no STARTTLS"), attempt=1, phase="connect")

    assert err.type == ErrorType.SMTP_TLS
    assert err.non_retryable is True


def test_classify_configuration_error_is_not_retried() -> None:
    err = classify(ConfigurationError("SMTP_PASSWORD is not set"), attempt=1, phase="connect")

    assert err.type == CONFIGURATION_ERROR
    assert err.non_retryable is True
    assert err.message == "SMTP_PASSWORD is not set"
