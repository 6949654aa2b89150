"""Headers as they appear on the wire: the raw bytes the SMTP server received, read with
the strict checker in `postlane.dev.wire`, never through a decoding parser."""

from __future__ import annotations

import asyncio
import random
import re
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.utils import getaddresses
from urllib.parse import unquote

import aiosmtplib
import pytest
import pytest_asyncio
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.mime import render_message
from activities.smtp import SmtpActivities
from postlane.client import content_hash
from postlane.config import LaneConfig, Settings
from postlane.dev import wire
from postlane.dev.catcher import CaughtMessage, SmtpCatcher
from postlane.dev.wire import InvalidWireMessage, check_message, list_unsubscribe_uris
from postlane.email.models import Attachment, Email, EmailStatus, SendEmailInput, SmtpSendRequest
from postlane.errors import ErrorType, InvalidEmail, PermanentDeliveryError
from postlane.idempotency import content_digest
from postlane.ids import (
    email_workflow_id,
    message_id,
)
from postlane.sequences.models import references
from postlane.sequences.spec import Recipient, spec_from_dict
from postlane.testing import PostlaneTestEnv
from postlane.tokens import TokenKeys

# The README's own example: sequence "q4-outreach", recipient ann@example.test, so the
# intro's key is "q4-outreach:ann@example.test:intro" and its Message-ID is long.
README_KEY = "q4-outreach:ann@example.test:intro"
LONG_ID = message_id(email_workflow_id(README_KEY), "acme.test")
NOW = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)
MSG_ID_LINE = re.compile(rb"^ <[\x21-\x3b\x3d\x3f-\x7e]+>$")


def email(**fields: object) -> Email:
    base: dict[str, object] = {
        "sender": "ada@acme.test",
        "to": ["ann@example.test"],
        "subject": "Hello",
        "text": "Hi Ann",
    }
    return Email(**(base | fields))  # type: ignore[arg-type]


def rendered(e: Email, mid: str = LONG_ID) -> bytes:
    raw = render_message(e, mid, NOW)
    assert check_message(raw, smtputf8=e.smtputf8_address is not None) == []
    return raw


def field_lines(raw: bytes, name: str) -> list[bytes]:
    (found,) = wire.headers(raw, name)
    return found.lines


def display_names(raw: bytes, name: str) -> list[str]:
    """The decoded display names of an address field, read as RFC 2047 section 6.2 says:
    white space between adjacent encoded-words is dropped. (Python 3.11's
    `policy.default` address parser keeps it, so it is not used here.)"""
    (found,) = wire.headers(raw, name)
    return [str(make_header(decode_header(n))) for n, _ in getaddresses([found.value])]


def decoded(raw: bytes) -> EmailMessage:
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


# -- what Python's email package did, and the checker that catches it ----------------------


def test_checker_catches_what_pythons_email_package_writes() -> None:
    # The old path: headers set on an EmailMessage and serialised with policy.SMTP.
    msg = EmailMessage(policy=policy.default)
    msg["From"] = "ada@acme.test"
    msg["To"] = "ann@example.test"
    msg["Subject"] = "Re: Hello"
    msg["Date"] = "Fri, 27 Nov 2026 09:30:00 +0000"
    msg["Message-ID"] = "<pl.x@acme.test>"
    msg["In-Reply-To"] = LONG_ID
    msg["List-Unsubscribe"] = f"<mailto:ada@acme.test?subject=unsubscribe%20pl-{'a' * 60}>"
    msg.set_content("hi")
    raw = msg.as_bytes(policy=policy.SMTP)
    assert b"In-Reply-To: =?utf-8?q?" in raw  # the bug, as it left
    problems = check_message(raw)
    assert any(p.startswith("In-Reply-To: an encoded-word") for p in problems), problems
    assert any(p.startswith("List-Unsubscribe:") for p in problems), problems


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda r: r.replace(b"\r\n", b"\n", 1), "bare CR or LF"),
        (lambda r: r.replace(b"Subject: Hello", b"Subject: " + b"x" * 1000), "over the limit"),
        (lambda r: b"Date: Fri, 27 Nov 2026 09:31:00 +0000\r\n" + r, "Date: must appear exactly"),
        (lambda r: re.sub(rb"Message-ID: [^\r]*\r\n", b"", r), "Message-ID: must appear"),
        (lambda r: r.replace(b"Fri, 27 Nov", b"Sat, 27 Nov"), "day of the week"),
        (lambda r: r.replace(b"+0000", b"GMT+1"), "not an RFC 5322 date-time"),
        (lambda r: r.replace(b"Message-ID: <", b"Message-ID: <a b"), "not exactly one msg-id"),
        (lambda r: r.replace(b"Hi Ann", "Hï Ann".encode()), "8-bit octets"),
        (lambda r: r.replace(b"Subject: Hello", b"Subject: Hello\r\n \r\n x"), "only white space"),
        (lambda r: r.replace(b"To: ann@example.test", b"To: =?utf-8?q?ann?=@example.test"), "To"),
        (lambda r: r.replace(b"Subject: Hello", b"Subject: =?utf-8?q?caf=C3?="), "does not decode"),
    ],
)
def test_checker_rejects(mutate: object, fragment: str) -> None:
    raw = rendered(email(), mid="<pl.x@acme.test>")
    problems = check_message(mutate(raw))  # type: ignore[operator]
    assert any(fragment.lower() in p.lower() for p in problems), problems


def test_checker_mime_structure() -> None:
    raw = rendered(email(html="<p>Hi</p>"), mid="<pl.x@acme.test>")
    boundary = re.search(rb'boundary="([^"]+)"', raw)
    assert boundary is not None
    unclosed = raw.replace(b"--" + boundary.group(1) + b"--", b"")
    assert any("close delimiter" in p for p in check_message(unclosed))
    encoded = rendered(email(text="Grüße " * 30), mid="<pl.x@acme.test>")
    assert encoded.endswith(b"=\r\n") and b"Content-Transfer-Encoding: base64" in encoded
    assert any("base64" in p for p in check_message(encoded[:-6] + b"!" + encoded[-5:]))
    qp = encoded.replace(
        b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: quoted-printable"
    )
    assert any("quoted-printable" in p for p in check_message(qp.replace(b"lIE", b"=Z1")))


async def test_catcher_fails_the_reader_of_an_invalid_message() -> None:
    bad = b"From: a@acme.test\r\nTo: b@example.test\r\nMessage-ID: <x@acme.test>\r\n\r\nhi\r\n"
    arrived = threading.Semaphore(0)
    smtp = SmtpCatcher(on_message=lambda _: arrived.release()).start()
    try:
        await sendmail(smtp, bad)
        with pytest.raises(InvalidWireMessage, match="Date: must appear exactly once"):
            await smtp.wait_for_async(1)
        assert len(smtp.messages) == 1  # reported once, then readable
        assert smtp.messages[0].wire_problems
        await sendmail(smtp, bad)
        assert await asyncio.to_thread(arrived.acquire, timeout=30)
        assert await asyncio.to_thread(arrived.acquire, timeout=30)
    finally:
        with pytest.raises(InvalidWireMessage):  # the unread second one, at teardown
            smtp.stop()
    with SmtpCatcher(strict=False) as lenient:
        await sendmail(lenient, bad)
        assert (await lenient.wait_for_async(1))[0].wire_problems


async def sendmail(smtp: SmtpCatcher, raw: bytes) -> None:
    await aiosmtplib.send(
        raw, sender="a@acme.test", recipients=["b@example.test"], hostname=smtp.host, port=smtp.port
    )


# -- what Postlane writes ----------------------------------------------------------------------


def test_long_message_id_is_plain_and_on_one_line() -> None:
    assert len(LONG_ID) > 78 - len("In-Reply-To: ")  # the case Python's package encoded
    raw = rendered(email(headers={"In-Reply-To": LONG_ID, "References": LONG_ID}))
    assert field_lines(raw, "Message-ID") == [b"Message-ID: " + LONG_ID.encode()]
    assert field_lines(raw, "In-Reply-To") == [b"In-Reply-To: " + LONG_ID.encode()]
    assert field_lines(raw, "References") == [b"References: " + LONG_ID.encode()]


def test_long_references_chain_folds_only_between_ids() -> None:
    ids = [message_id(email_workflow_id(f"{README_KEY}-{n}"), "acme.test") for n in range(30)]
    kept = references(ids)
    raw = rendered(email(headers={"In-Reply-To": ids[-1], "References": " ".join(kept)}))
    first, *rest = field_lines(raw, "References")
    assert first == b"References: " + kept[0].encode()
    assert rest and all(MSG_ID_LINE.match(line) for line in rest), rest
    assert [line.strip() for line in [first.split(b": ", 1)[1], *rest]] == [
        k.encode() for k in kept
    ]
    assert len(kept) > 2 and kept[0] == ids[0] and kept[-1] == ids[-1]


def test_list_unsubscribe_folds_between_uris_and_parses_per_rfc_2369() -> None:
    mailto = f"mailto:ada@acme.test?subject=unsubscribe%20pl-{'a' * 70}"
    https = f"https://acme.test/unsubscribe?t=pl-{'a' * 70}"
    raw = rendered(
        email(
            headers={
                "List-Unsubscribe": f"<{mailto}>, <{https}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            }
        )
    )
    assert field_lines(raw, "List-Unsubscribe") == [
        f"List-Unsubscribe: <{mailto}>,".encode(),
        f" <{https}>".encode(),
    ]
    assert list_unsubscribe_uris(raw) == [mailto, https]
    assert field_lines(raw, "List-Unsubscribe-Post") == [
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click"
    ]


def test_display_names_and_subject_use_encoded_words_only_where_allowed() -> None:
    e = email(
        sender='"Ada Lovelace" <ada@acme.test>',
        to=["Zoë Ünal <zoe@example.test>", '"Stone, Bob" <bob@example.test>', "ann@example.test"],
        cc=["Carol <carol@example.test>"],
        reply_to="Support Desk <help@acme.test>",
        subject="Grüße aus Köln — " + "ein langer Betreff " * 5,
        html="<p>Hi</p>",
        attachments=[Attachment(filename="résumé.pdf", content=b"%PDF" * 50)],
    )
    raw = rendered(e)
    assert field_lines(raw, "From") == [b"From: Ada Lovelace <ada@acme.test>"]
    to = b"\r\n".join(field_lines(raw, "To"))
    assert b"=?utf-8?q?Zo=C3=AB_=C3=9Cnal?= <zoe@example.test>" in to
    assert b'"Stone, Bob" <bob@example.test>' in to
    assert field_lines(raw, "Reply-To") == [b"Reply-To: Support Desk <help@acme.test>"]
    subject = field_lines(raw, "Subject")
    assert len(subject) > 1 and all(len(line) <= 76 for line in subject)
    msg = decoded(raw)  # and a reader decodes them back to what was given
    assert msg["Subject"] == e.subject
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses][:2] == [
        ("Zoë Ünal", "zoe@example.test"),
        ("Stone, Bob", "bob@example.test"),
    ]
    assert max(raw) < 0x80


# -- addresses ------------------------------------------------------------------------------


def test_email_splits_display_names_from_addresses() -> None:
    e = email(sender="Ada Lovelace <ada@acme.test>", to=['"Ann Lee" <ann@example.test>'])
    assert e.sender == "ada@acme.test" and e.to == ["ann@example.test"]
    assert e.display_names == {"ada@acme.test": "Ada Lovelace", "ann@example.test": "Ann Lee"}
    assert Email.model_validate_json(e.model_dump_json()) == e  # workers re-validate it
    plain = email()
    assert plain.display_names == {} and plain.sender == "ada@acme.test"


def test_idna_domains_become_a_labels() -> None:
    e = email(to=["Bob <bob@Bücher.example>"], cc=["carol@例え.テスト"])
    assert e.to == ["bob@xn--bcher-kva.example"]
    assert e.cc == ["carol@xn--r8jz45g.xn--zckzah"]
    assert e.recipient_domains == ["xn--bcher-kva.example", "xn--r8jz45g.xn--zckzah"]
    assert e.smtputf8_address is None
    assert email(to=["zoë@example.test"]).smtputf8_address == "zoë@example.test"


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"to": ["ok@example.test", "Bob <bob@>"]}, "to[1]", "no domain"),
        ({"cc": ["a, b <x@example.test>"]}, "cc[0]", "quote a display name"),
        ({"bcc": ['"Bob <bob@example.test>']}, "bcc[0]", "not closed"),
        ({"sender": "Ada <ada@acme.test"}, "sender", "write a display name"),
        ({"reply_to": "help@exa mple.test"}, "reply_to", "not a valid domain"),
        ({"to": ["bob@-bad.test"]}, "to[0]", "not a valid domain"),
        ({"to": ["A <x@example.test>"], "cc": ["B <x@example.test>"]}, "cc[0]", "already named"),
        ({"headers": {"In-Reply-To": "not-an-id"}}, "headers", "message IDs"),
        ({"headers": {"List-Unsubscribe": "mailto:x@acme.test"}}, "headers", "RFC 2369"),
        ({"headers": {"List-Unsubscribe-Post": "yes"}}, "headers", "RFC 8058"),
    ],
)
def test_bad_addresses_and_headers_name_the_field(
    fields: dict[str, object], field: str, fragment: str
) -> None:
    with pytest.raises(InvalidEmail) as caught:
        email(**fields)
    assert caught.value.field == field
    assert fragment in caught.value.reason


# -- through SMTP ---------------------------------------------------------------------------


@pytest.fixture
def catcher() -> Iterator[SmtpCatcher]:
    with SmtpCatcher() as smtp:
        yield smtp


@pytest.fixture
def utf8_catcher() -> Iterator[SmtpCatcher]:
    with SmtpCatcher(smtputf8=True) as smtp:
        yield smtp


@pytest_asyncio.fixture
async def acts_for() -> AsyncIterator[object]:
    made: list[SmtpActivities] = []

    def make(smtp: SmtpCatcher) -> SmtpActivities:
        lane = LaneConfig(
            name="test",
            senders=["*"],
            smtp_host=smtp.host,
            smtp_port=smtp.port,
            smtp_tls="none",
            smtp_timeout=5.0,
        )
        made.append(SmtpActivities(Settings(lanes=[lane])))
        return made[-1]

    yield make
    for acts in made:
        await acts.close()


def request(e: Email, key: str = README_KEY) -> SmtpSendRequest:
    return SmtpSendRequest(
        email=e, lane="test", key=key, message_id=message_id(email_workflow_id(key), "acme.test")
    )


async def test_envelope_has_bare_addresses_header_has_display_names(
    catcher: SmtpCatcher, acts_for: object
) -> None:
    acts = acts_for(catcher)  # type: ignore[operator]
    e = email(
        sender='"Ada Lovelace" <ada@acme.test>',
        to=["Ann Lee <ann@example.test>", "bob@bücher.example"],
        bcc=["Audit <audit@acme.test>"],
    )
    await ActivityEnvironment().run(acts.send_email, request(e))
    (caught,) = catcher.messages
    assert caught.sender == "ada@acme.test"
    assert caught.recipients == [
        "ann@example.test",
        "bob@xn--bcher-kva.example",
        "audit@acme.test",
    ]
    assert caught.headers("From") == [b" Ada Lovelace <ada@acme.test>"]
    assert caught.headers("To") == [b" Ann Lee <ann@example.test>, bob@xn--bcher-kva.example"]
    assert caught.headers("Bcc") == []
    assert caught.mail_options == ()


async def test_non_ascii_local_part_goes_with_smtputf8(
    utf8_catcher: SmtpCatcher, acts_for: object
) -> None:
    acts = acts_for(utf8_catcher)  # type: ignore[operator]
    e = email(sender="Zoë <zoë@acme.test>", to=["ünal@bücher.example"])
    await ActivityEnvironment().run(acts.send_email, request(e))
    (caught,) = utf8_catcher.messages
    assert caught.mail_options == ("SMTPUTF8", "BODY=8BITMIME")
    assert caught.sender == "zoë@acme.test"
    assert caught.recipients == ["ünal@xn--bcher-kva.example"]
    assert caught.headers("From") == [" =?utf-8?q?Zo=C3=AB?= <zoë@acme.test>".encode()]
    assert caught.headers("To") == [" ünal@xn--bcher-kva.example".encode()]
    assert caught.wire_problems == ()


async def test_non_ascii_local_part_without_smtputf8_fails_naming_the_address(
    catcher: SmtpCatcher, acts_for: object
) -> None:
    acts = acts_for(catcher)  # type: ignore[operator]
    e = email(to=["ann@example.test", "ünal@example.test"])
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(acts.send_email, request(e))
    assert caught.value.type == ErrorType.SMTPUTF8_UNSUPPORTED
    assert caught.value.non_retryable
    assert caught.value.message.startswith("ünal@example.test: ")
    assert "SMTPUTF8" in caught.value.message
    assert catcher.messages == []


async def test_email_needing_smtputf8_ends_failed_not_retried(
    pl: PostlaneTestEnv, key: str
) -> None:
    handle = await pl.client.send(email(to=["ünal@example.test"]), key=key)
    with pytest.raises(PermanentDeliveryError, match="SmtpUtf8UnsupportedError: ünal@example"):
        await handle.result()
    report = await pl.client.describe(key)
    assert report.status == EmailStatus.FAILED
    assert report.last_error is not None and "ünal@example.test" in report.last_error
    assert pl.outbox == []


# -- sequences: the follow-up threads byte for byte -----------------------------------------


async def test_sequence_follow_up_threads_on_the_wire(pl: PostlaneTestEnv) -> None:
    spec = spec_from_dict(
        {
            "name": "q4-outreach",
            "sender": "ada@acme.test",
            "unsubscribe_url": "https://acme.test/unsubscribe?t={{ unsubscribe_token }}",
            "steps": [
                {"type": "send", "id": "intro", "subject": "Durable email", "text": "Hi Ann"},
                {"type": "wait", "id": "pause", "duration": "2d"},
                {
                    "type": "send",
                    "id": "follow",
                    "subject": "Re: Durable email",
                    "text": "Any news?",
                },
                {"type": "wait", "id": "pause2", "duration": "2d"},
                {"type": "send", "id": "last", "subject": "Re: Durable email", "text": "Last one."},
            ],
        }
    )
    key = "q4-outreach:ann@example.test"  # the README's example key
    handle = await pl.client.sequences.start(spec, Recipient(address="ann@example.test"), key=key)
    await handle.result()
    mine = [m for m in pl.outbox if _workflow_of(m, pl.settings).startswith(f"email:{key}:")]
    intro, follow, last = sorted(mine, key=lambda m: m.received_at)
    (intro_id,) = intro.headers("Message-ID")
    assert len(intro_id.strip()) > 78 - len("In-Reply-To: ")  # the README-sized case
    assert MSG_ID_LINE.match(intro_id)
    assert follow.headers("In-Reply-To") == [intro_id]  # byte for byte
    assert follow.headers("References") == [intro_id]
    (follow_id,) = follow.headers("Message-ID")
    assert last.headers("In-Reply-To") == [follow_id]
    assert last.headers("References") == [intro_id + b"\r\n" + follow_id]
    for message in (intro, follow, last):
        assert message.wire_problems == ()
        mailto, https = list_unsubscribe_uris(message.raw)
        assert mailto.startswith("mailto:ada@acme.test?subject=unsubscribe%20pl1-")
        assert https.startswith("https://acme.test/unsubscribe?t=pl1-")
        for uri in (mailto, https):
            opened = TokenKeys.from_settings(pl.settings).open_unsubscribe_token(unquote(uri))
            assert opened == ("ada@acme.test", f"sequence:{key}")
        assert message.headers("List-Unsubscribe-Post") == [b" List-Unsubscribe=One-Click"]


def _workflow_of(message: CaughtMessage, settings: Settings) -> str:
    return TokenKeys.from_settings(settings).open_message_id(message.header("Message-ID")) or ""


# -- every caller sees the bare address -----------------------------------------------------


def test_content_hash_of_an_unnamed_email_is_unchanged_by_the_new_field() -> None:
    request = SendEmailInput(email=email(), key="k", lane="test")
    legacy = request.email.model_dump_json(exclude={"display_names"})
    assert content_hash(request) == content_digest(legacy, "None")
    named = SendEmailInput(email=email(sender="Ada <ada@acme.test>"), key="k", lane="test")
    assert content_hash(named) != content_hash(request)


def test_lane_patterns_with_idna_domains_match_normalised_senders() -> None:
    lane = LaneConfig(name="intl", senders=["*@bücher.example", "zoë@acme.test"], smtp_host="h")
    settings = Settings(lanes=[lane])
    assert lane.senders == ["*@xn--bcher-kva.example", "zoë@acme.test"]
    for sender in ("Ada <ada@Bücher.example>", "zoë@acme.test"):
        assert settings.lane_for(email(sender=sender).sender) == lane


async def test_display_name_sender_picks_its_lane_and_message_id_domain(
    pl: PostlaneTestEnv, key: str
) -> None:
    e = email(sender='"Ops Team" <ops@fragile.test>', to=["Bob Stone <bob@example.test>"])
    receipt = await (await pl.client.send(e, key=key)).result()
    assert receipt.lane == "fragile"
    assert receipt.message_id.endswith("@fragile.test>")
    assert (await pl.client.describe(key)).recipients == ["bob@example.test"]
    (caught,) = [m for m in pl.outbox if m.header("Message-ID") == receipt.message_id]
    assert (caught.sender, caught.recipients) == ("ops@fragile.test", ["bob@example.test"])
    assert caught.headers("From") == [b" Ops Team <ops@fragile.test>"]
    assert caught.headers("To") == [b" Bob Stone <bob@example.test>"]


@pytest.mark.parametrize("length", [1, 20, 60, 63, 64, 65, 70, 77, 78, 79, 120, 256])
@pytest.mark.parametrize(
    "alphabet", ["Ada Lovelace ", "Lovelace, Ada. ", "Zoë Ünal ", "=?x?q?y?= "]
)
def test_any_display_name_and_subject_is_valid_on_the_wire_and_round_trips(
    length: int, alphabet: str
) -> None:
    name = " ".join((alphabet * 30)[:length].split())
    subject = (alphabet.strip() + "x" * length + " ") * 3
    to = [f'"{name}" <ann{i}@example.test>' for i in range(3)]
    e = email(sender=f'"{name}" <ada@acme.test>', to=to, subject=subject.strip())
    raw = rendered(e)
    assert decoded(raw)["Subject"] == e.subject
    assert display_names(raw, "From") == [name]
    assert display_names(raw, "To") == [name] * 3
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        body = line.split(b":", 1)[1] if line[:1] not in b" " else line
        assert len(line) <= 78 or b" " not in body.strip(), line


@pytest.mark.parametrize(
    "subject", ["x" * 998, "a  b\tc", " leading and trailing ", "=?utf-8?q?not-encoded?="]
)
def test_subjects_no_line_can_hold_still_fit_the_wire(subject: str) -> None:
    raw = rendered(email(subject=subject, headers={"X-Note": "y" * 990}))
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert decoded(raw)["Subject"] in (subject, subject.strip())


def test_many_generated_emails_are_valid_on_the_wire_and_round_trip() -> None:
    rng = random.Random(20261127)
    pool = "abcXYZ09 .,;:@\"'()<>[]\\-_=?!#äöüßéñ中文😀\t"
    for n in range(300):
        names = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 90))) for _ in range(4)]
        names = [" ".join(name.replace('"', "").replace("\\", "").split()) for name in names]
        to = [
            f'"{name}" <r{n}.{i}@example.test>' if name else f"r{n}.{i}@example.test"
            for i, name in enumerate(names[1:])
        ]
        subject = "".join(rng.choice(pool) for _ in range(rng.randint(0, 200))).strip()
        e = email(
            sender=f'"{names[0]}" <ada@acme.test>' if names[0] else "ada@acme.test",
            to=to,
            subject=subject.replace("\t", " "),
        )
        raw = rendered(e)
        assert display_names(raw, "To") == [e.display_names.get(a, "") for a in e.to]
        assert decoded(raw)["Subject"] == e.subject


def test_names_of_addresses_replaced_later_are_ignored_not_invalid() -> None:
    # A dead-letter retry replaces `to` with model_copy; the worker re-validates the email.
    e = email(to=["Ann Lee <ann@example.test>"]).model_copy(update={"to": ["carol@example.test"]})
    again = Email.model_validate_json(e.model_dump_json())
    assert again.to == ["carol@example.test"]
    assert field_lines(rendered(again), "To") == [b"To: carol@example.test"]


async def test_dead_letter_retry_to_a_new_recipient_keeps_the_senders_name(
    pl: PostlaneTestEnv, key: str
) -> None:
    pl.smtp.reject_recipient("bob@example.test", "450 4.2.1 mailbox busy")
    e = email(sender="Ops Team <ops@fragile.test>", to=["Bob Stone <bob@example.test>"])
    handle = await pl.client.send(e, key=key)
    for _ in range(60):  # the fragile lane gives up after 3 attempts, 1 s apart
        if await pl.client.status(key) == EmailStatus.DEAD_LETTER:
            break
        await pl.sleep(timedelta(seconds=30))
    assert await pl.client.status(key) == EmailStatus.DEAD_LETTER
    assert await pl.client.retry(key, to=["carol@example.test"], lane="test") is True
    receipt = await handle.result()
    (caught,) = [m for m in pl.outbox if m.header("Message-ID") == receipt.message_id]
    assert caught.recipients == ["carol@example.test"]
    assert caught.headers("From") == [b" Ops Team <ops@fragile.test>"]
    assert caught.headers("To") == [b" carol@example.test"]


def test_quoted_printable_lines_stay_within_76() -> None:
    # Python's email package wrote 78-character quoted-printable lines under policy.SMTP.
    raw = rendered(email(text="Hi " * 60, html="<p>Any thoughts?</p>" * 20))
    assert b"Content-Transfer-Encoding: quoted-printable" in raw
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
