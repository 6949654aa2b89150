"""Sealed Message-IDs and unsubscribe tokens (`postlane.tokens`), and what the inbound side
does with genuine, forged and legacy ones. The servers' side is in test_tokens_e2e.py."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from postlane.config import Settings
from postlane.email.models import Email
from postlane.errors import ConfigurationError
from postlane.ids import (
    email_workflow_id,
    message_id,
    sequence_workflow_id,
    unsubscribe_token,
)
from postlane.inbound.classify import classify, route
from postlane.logs import RedactAddresses, configure_logging
from postlane.sequences.models import InboundKind
from postlane.tokens import UNSUBSCRIBE_TOKEN_PLACEHOLDER, TokenKeys, fill_unsubscribe_token
from tests.test_inbound import simple_reply, unsubscribe_mail

SECRET = b"a-test-secret-that-is-long-enough-0123456789"
KEYS = TokenKeys(SECRET)
SENDER = "agent@acme.test"  # the address `unsubscribe_mail` writes to
SEQUENCE = sequence_workflow_id("trial:zoe.private@example.test")
EMAIL = email_workflow_id("trial:zoe.private@example.test:first")


def flip_bit(value: str, at: int) -> str:
    """`value` with one bit of the base32 character at `at` flipped."""
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    flipped = alphabet[alphabet.index(value[at]) ^ 1]
    return value[:at] + flipped + value[at + 1 :]


def b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def unb32(text: str) -> bytes:
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


def rejections(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "tokens.rejected"]


# -- the values themselves -------------------------------------------------------------------


def test_message_id_is_stable_opaque_and_opens() -> None:
    mid = KEYS.message_id(EMAIL, "acme.test")
    assert mid == KEYS.message_id(EMAIL, "acme.test")  # every attempt, the same
    assert mid.startswith("<pl1.") and mid.endswith("@acme.test>")
    legacy = message_id(EMAIL, "acme.test")
    for readable in ("zoe", "private", "trial", legacy[4:-11]):
        assert readable not in mid  # neither the key nor its old base32 form
    assert KEYS.open_message_id(mid) == EMAIL
    assert KEYS.message_id(EMAIL + "x", "acme.test") != mid


def test_unsubscribe_token_names_sender_and_sequence() -> None:
    token = KEYS.unsubscribe_token("Agent@Acme.test", SEQUENCE)
    assert token.startswith("pl1-") and "zoe" not in token
    assert KEYS.open_unsubscribe_token(f"unsubscribe {token}") == (SENDER, SEQUENCE)
    assert KEYS.open_message_id(f"<pl1.{token[4:]}@acme.test>") is None  # keys per purpose


def test_another_secret_or_a_flipped_bit_opens_nothing_and_is_logged() -> None:
    mid = KEYS.message_id(EMAIL, "acme.test")
    token = KEYS.unsubscribe_token(SENDER, SEQUENCE)
    other = TokenKeys(b"another-secret-that-is-long-enough-987654321")
    with capture_logs() as logs:
        assert other.open_message_id(mid) is None
        assert other.open_unsubscribe_token(token) is None
        assert KEYS.open_message_id(flip_bit(mid, 10)) is None
        assert KEYS.open_unsubscribe_token(flip_bit(token, len(token) - 3)) is None
    rejected = rejections(logs)
    assert len(rejected) == 4
    assert all(
        e["log_level"] == "warning" and "not authentic" in str(e["reason"]) for e in rejected
    )
    assert SECRET.decode() not in repr(logs) and "zoe" not in repr(logs)


def test_missing_or_short_secret_is_named() -> None:
    with pytest.raises(ConfigurationError, match="POSTLANE_TOKEN_SECRET"):
        TokenKeys(None).message_id(EMAIL, "acme.test")
    with pytest.raises(ConfigurationError, match="token_secret"):
        TokenKeys.from_settings(Settings(token_secret="short"))
    assert TokenKeys(None).open_message_id(message_id(EMAIL, "acme.test")) == EMAIL


def test_short_secret_in_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTLANE_TOKEN_SECRET", "too-short")
    settings = Settings()
    with pytest.raises(ConfigurationError, match=r"token_secret \(POSTLANE_TOKEN_SECRET\)"):
        TokenKeys.from_settings(settings)


def test_secret_file_is_read_and_a_missing_one_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POSTLANE_TOKEN_SECRET")  # it would win over the file
    path = tmp_path / "token.key"
    path.write_text(SECRET.decode() + "\n")
    keys = TokenKeys.from_settings(Settings(token_secret_file=str(path)))
    assert keys.open_message_id(KEYS.message_id(EMAIL, "acme.test")) == EMAIL
    with pytest.raises(ConfigurationError, match="token_secret_file: cannot read"):
        TokenKeys.from_settings(Settings(token_secret_file=str(tmp_path / "absent")))


def test_placeholder_becomes_the_sequence_token_only_in_sequence_mail() -> None:
    mark = UNSUBSCRIBE_TOKEN_PLACEHOLDER
    email = Email(
        sender=SENDER,
        to=["zoe.private@example.test"],
        subject="Your trial",
        text=f"Leave: https://acme.test/u?t={mark}",
        headers={"List-Unsubscribe": f"<mailto:{SENDER}?subject=unsubscribe%20{mark}>"},
    )
    filled = fill_unsubscribe_token(email, EMAIL, KEYS)
    token = KEYS.unsubscribe_token(SENDER, SEQUENCE)
    assert filled.text == f"Leave: https://acme.test/u?t={token}"
    assert filled.headers["List-Unsubscribe"].endswith(f"unsubscribe%20{token}>")
    assert fill_unsubscribe_token(email, email_workflow_id("standalone"), KEYS) is email


# -- inbound: genuine, forged, legacy --------------------------------------------------------


def test_reply_to_sealed_message_id_routes() -> None:
    mid = KEYS.message_id(EMAIL, "acme.test")
    event = classify(simple_reply(f"In-Reply-To: {mid}"), keys=KEYS)
    assert event is not None and event.kind == InboundKind.REPLY
    assert event.refers_to == mid and event.refers_to_workflow == EMAIL
    assert route(event, KEYS) == SEQUENCE
    assert classify(simple_reply(f"In-Reply-To: {mid}")) is None  # no secret: not ours


def test_forged_in_reply_to_is_ignored_and_logged() -> None:
    mid = KEYS.message_id(EMAIL, "acme.test")
    with capture_logs() as logs:
        assert classify(simple_reply(f"In-Reply-To: {flip_bit(mid, 20)}"), keys=KEYS) is None
    assert [e["kind"] for e in rejections(logs)] == ["message_id"]


def test_forged_unsubscribe_tokens_are_ignored_and_logged() -> None:
    token = KEYS.unsubscribe_token(SENDER, SEQUENCE)
    other = KEYS.unsubscribe_token(SENDER, sequence_workflow_id("trial:someone@example.test"))
    # Another sequence's authentication on this one's name (what an HMAC splice would be).
    spliced = "pl1-" + b32(unb32(other[4:])[:16] + unb32(token[4:])[16:])
    elsewhere = KEYS.unsubscribe_token("billing@acme.test", SEQUENCE)
    with capture_logs() as logs:
        assert classify(unsubscribe_mail(flip_bit(token, 30)), keys=KEYS) is None
        assert classify(unsubscribe_mail(spliced), keys=KEYS) is None
        # A genuine token, replayed to a sender it was not issued for.
        assert classify(unsubscribe_mail(elsewhere), keys=KEYS) is None
    reasons = [str(e["reason"]) for e in rejections(logs)]
    assert len(reasons) == 3 and "another sender" in reasons[2]
    event = classify(unsubscribe_mail(token), keys=KEYS)
    assert event is not None and event.kind == InboundKind.UNSUBSCRIBE
    assert event.refers_to_workflow == SEQUENCE and route(event, KEYS) == SEQUENCE


def test_legacy_forms_route_until_switched_off() -> None:
    old_reply = simple_reply(f"In-Reply-To: {message_id(EMAIL, 'acme.test')}")
    old_unsubscribe = unsubscribe_mail(unsubscribe_token(SEQUENCE))
    for raw in (old_reply, old_unsubscribe):
        event = classify(raw, keys=KEYS)
        assert event is not None and route(event, KEYS) == SEQUENCE
    strict = TokenKeys(SECRET, accept_legacy=False)
    with capture_logs() as logs:
        assert classify(old_reply, keys=strict) is None
        assert classify(old_unsubscribe, keys=strict) is None
    assert all("legacy" in str(e["reason"]) for e in rejections(logs))
    assert len(rejections(logs)) == 2
    assert not Settings(accept_legacy_tokens=False).accept_legacy_tokens


# -- logs ------------------------------------------------------------------------------------


def test_redaction_keeps_domain_and_message_ids() -> None:
    mid = KEYS.message_id(EMAIL, "acme.test")
    event = RedactAddresses()(
        None,
        "info",
        {
            "event": "sent to Zoë <zoe.private@example.test>",
            "to": ["zoe.private@example.test"],
            "key": "trial:zoe.private@example.test:first",
            "message_id": mid,
        },
    )
    assert event == {
        "event": "sent to Zoë <***@example.test>",
        "to": ["***@example.test"],
        "key": "trial:***@example.test:first",
        "message_id": mid,
    }


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("json_logs", [False, True])
def test_a_logged_traceback_shows_no_local_variables(
    capsys: pytest.CaptureFixture[str], json_logs: bool
) -> None:
    """A traceback is logged without its frames' locals: they hold passwords and messages.

    (Rendering locals is also slow enough, on a busy machine, to trip the SDK's deadlock
    detector when a workflow task's failure is logged from the workflow's thread.)
    """
    configure_logging(json=json_logs)

    def login(password: str) -> None:
        raise RuntimeError("535 5.7.8 authentication failed")

    secret = "-".join(["hunter2", "secret"])  # so no source line shown holds it
    try:
        login(secret)
    except RuntimeError:
        structlog.get_logger("t").exception("smtp.failed")
        logging.getLogger("temporalio.t").exception("Failed activation")
    err = capsys.readouterr().err
    # Both tracebacks are there (as JSON, in "exception"), and no frame's locals.
    assert err.count("RuntimeError: 535 5.7.8 authentication failed") == 2, err
    assert err.count("Traceback (most recent call last)") == 2, err
    assert secret not in err
    if json_logs:
        assert all("exception" in json.loads(line) for line in err.splitlines()), err


@pytest.mark.usefixtures("restore_logging")
def test_info_logs_domain_only_debug_logs_full(capsys: pytest.CaptureFixture[str]) -> None:
    for level, shown in (("INFO", "***@example.test"), ("DEBUG", "zoe.private@example.test")):
        configure_logging(level=level)
        structlog.get_logger("t").warning("email.sent", to=["zoe.private@example.test"])
        logging.getLogger("temporalio.t").warning("delivered to zoe.private@example.test")
        err = capsys.readouterr().err
        assert err.count(shown) == 2, err
        if level == "INFO":
            assert "zoe.private" not in err
