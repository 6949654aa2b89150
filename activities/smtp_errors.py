"""Classifying SMTP outcomes (RFC 5321 reply codes, RFC 3463 enhanced codes) for retries.

This is the only place library errors become Temporal failures: 4xx, dropped connections
and timeouts are transient; a provider's "slow down" is throttling and honours its hint;
5xx is permanent; a certificate that does not verify, or a server that does not offer the
STARTTLS the lane requires, is a TLS error; a lane whose settings cannot work (credentials
missing from the environment, AUTH not offered) is a configuration error. TLS and
configuration errors are never retried: they need a person, not time.
"""

from __future__ import annotations

import re
import ssl
from datetime import timedelta
from typing import Any

import aiosmtplib
from temporalio.exceptions import ApplicationError

from postlane.errors import ConfigurationError, ErrorType

CONFIGURATION_ERROR = ErrorType.CONFIGURATION
"""`ApplicationError.type` for a lane whose configuration cannot work (never retried).

Not (yet) an `ErrorType` member; `non_retryable` is what stops the retries.
"""


class StartTlsUnavailable(aiosmtplib.SMTPException):
    """The lane requires STARTTLS but the server did not offer it (or stripped it)."""


_ENHANCED_THROTTLE = re.compile(r"\b4\.7\.\d{1,3}\b")
_THROTTLE_WORDS = re.compile(r"rate.?limit|too many|throttl|slow down|try again (?:in|later)", re.I)
_HINT = re.compile(
    r"(?:try again|retry|wait)\D{0,20}?(\d+)\s*"
    r"(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)\b",
    re.I,
)


def retry_hint(text: str) -> timedelta | None:
    """The delay a reply asks for, e.g. "try again in 30 seconds" → 30 s."""
    match = _HINT.search(text)
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2).lower()
    if unit.startswith("h"):
        return timedelta(hours=value)
    if unit.startswith("m"):
        return timedelta(minutes=value)
    return timedelta(seconds=value)


def is_throttle(code: int, text: str) -> bool:
    """Does this reply mean "you are sending too fast" rather than "this message failed"?"""
    if code >= 500:
        return False
    return (
        code == 421 or bool(_ENHANCED_THROTTLE.search(text)) or bool(_THROTTLE_WORDS.search(text))
    )


def reply_failure(code: int, text: str, *, attempt: int, phase: str) -> ApplicationError:
    """The failure for an SMTP error reply `code text` received during `phase`."""
    reply = f"{code} {text}".strip()
    details: dict[str, Any] = {"attempt": attempt, "smtp_code": code, "phase": phase}
    if code >= 500:
        return ApplicationError(reply, details, type=ErrorType.SMTP_PERMANENT, non_retryable=True)
    if is_throttle(code, text):
        return ApplicationError(
            reply, details, type=ErrorType.SMTP_THROTTLED, next_retry_delay=retry_hint(text)
        )
    return ApplicationError(
        reply, details, type=ErrorType.SMTP_TRANSIENT, next_retry_delay=retry_hint(text)
    )


def config_failure(exc: ConfigurationError, *, attempt: int, phase: str) -> ApplicationError:
    """The non-retryable failure for a lane configuration that cannot work."""
    return ApplicationError(
        str(exc),
        {"attempt": attempt, "phase": phase},
        type=CONFIGURATION_ERROR,
        non_retryable=True,
    )


def classify(exc: BaseException, *, attempt: int, phase: str) -> ApplicationError:
    """Translate an aiosmtplib / network error raised during `phase` into a Temporal failure."""
    if isinstance(exc, ConfigurationError):
        return config_failure(exc, attempt=attempt, phase=phase)
    if isinstance(exc, StartTlsUnavailable):
        return ApplicationError(
            str(exc),
            {"attempt": attempt, "phase": phase},
            type=ErrorType.SMTP_TLS,
            non_retryable=True,
        )
    if _cert_failure(exc):
        return ApplicationError(
            f"TLS certificate verification failed: {exc}",
            {"attempt": attempt, "phase": phase},
            type=ErrorType.SMTP_TLS,
            non_retryable=True,
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return reply_failure(exc.code, exc.message, attempt=attempt, phase=phase)
    kind = type(exc).__name__
    return ApplicationError(
        f"{kind} during {phase}: {exc}",
        {"attempt": attempt, "phase": phase},
        type=ErrorType.SMTP_TRANSIENT,
    )


def _cert_failure(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False
