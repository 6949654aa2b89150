"""Validation at the edge: bad input raises InvalidEmail naming the field."""

from __future__ import annotations

import pytest

from postlane import Attachment, Email, InvalidEmail
from postlane.email.models import MAX_EMAIL_BYTES, MAX_RECIPIENTS, Priority

GOOD = {
    "sender": "agent@acme.test",
    "to": ["bob@example.test"],
    "subject": "Code",
    "text": "847291",
}


def make(**changes: object) -> Email:
    return Email(**{**GOOD, **changes})  # type: ignore[arg-type]


def test_email_valid_has_recipients_and_domains() -> None:
    email = make(cc=["Carol@Other.test"], bcc=["dan@example.test"])
    assert email.recipients == ["bob@example.test", "Carol@Other.test", "dan@example.test"]
    assert email.recipient_domains == ["example.test", "other.test"]


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"to": ["bob@"]}, "to[0]", "not a valid email address"),
        ({"to": ["bob@example"]}, "to[0]", "not a valid email address"),
        ({"to": []}, "to", "at least 1"),
        ({"cc": ["ok@example.test", "no spaces@example.test"]}, "cc[1]", "not a valid"),
        ({"sender": "agent@acme.test\r\nBcc: x@evil.test"}, "sender", "not a valid"),
        ({"reply_to": "nope"}, "reply_to", "not a valid"),
        ({"subject": "Hi\r\nBcc: x@evil.test"}, "subject", "CR, LF"),
        ({"headers": {"X-Campaign": "a\nb"}}, "headers", "CR, LF"),
        ({"headers": {"Bad Name": "v"}}, "headers", "not a valid header name"),
        ({"headers": {"bcc": "x@evil.test"}}, "headers", "set by Postlane"),
        ({"text": "   ", "html": None}, "text", "non-empty text or html"),
        ({"text": None}, "text", "non-empty text or html"),
        ({"tags": ["has space"]}, "tags", "not a valid tag"),
        ({"tags": [f"t{i}" for i in range(11)]}, "tags", "at most 10"),
    ],
)
def test_email_invalid_names_field(changes: dict[str, object], field: str, fragment: str) -> None:
    with pytest.raises(InvalidEmail) as caught:
        make(**changes)
    assert caught.value.field.split(".")[0] == field
    assert fragment in caught.value.reason


def test_email_too_many_recipients_rejected() -> None:
    many = [f"r{i}@example.test" for i in range(MAX_RECIPIENTS + 1)]
    with pytest.raises(InvalidEmail) as caught:
        make(to=many)
    assert caught.value.field == "to"
    assert str(MAX_RECIPIENTS) in caught.value.reason


def test_email_oversize_payload_rejected() -> None:
    big = Attachment(filename="big.bin", content=b"x" * MAX_EMAIL_BYTES)
    with pytest.raises(InvalidEmail) as caught:
        make(attachments=[big])
    assert caught.value.field == "attachments"


def test_email_html_only_is_valid() -> None:
    assert make(text=None, html="<p>hi</p>").html == "<p>hi</p>"


def test_attachment_round_trips_as_base64_json() -> None:
    email = make(
        attachments=[
            Attachment(filename="a.pdf", content=b"\x00\xff", content_type="application/pdf")
        ]
    )
    again = Email.model_validate_json(email.model_dump_json())
    assert again.attachments[0].content == b"\x00\xff"


def test_attachment_bad_content_type_rejected() -> None:
    with pytest.raises(InvalidEmail) as caught:
        make(attachments=[{"filename": "a", "content": b"x", "content_type": "pdf"}])
    assert caught.value.field.startswith("attachments")


def test_priority_keys_order_high_first() -> None:
    assert [p.key for p in (Priority.HIGH, Priority.NORMAL, Priority.BULK)] == [1, 3, 5]
