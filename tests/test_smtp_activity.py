"""The `send_email` activity against a real SMTP server on loopback (`SmtpCatcher`).

Every test talks SMTP over a socket: no mocks of aiosmtplib. The catcher is scripted to
misbehave the way providers do, and the activity runs in `ActivityEnvironment`, which gives
it a real `activity.info()` and collects its heartbeats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import trustme
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

import activities.smtp as smtp_module
from activities.smtp import SmtpActivities
from activities.smtp_errors import CONFIGURATION_ERROR
from postlane.config import LaneConfig, Settings, load_settings
from postlane.dev.catcher import CaughtMessage, Phase, SmtpCatcher
from postlane.email.models import Attachment, DeliveryReceipt, Email, SmtpSendRequest
from postlane.errors import ConfigurationError, ErrorType
from postlane.ids import email_workflow_id, message_id
from tests.procs import assert_eventually, free_port

LANE = "test"
SENDER = "app@acme.test"
ANN = "ann@example.test"
BOB = "bob@example.test"

MakeActivities = Callable[[LaneConfig], SmtpActivities]


# -- helpers ---------------------------------------------------------------------------------


def lane_for(port: int, **overrides: Any) -> LaneConfig:
    """A plaintext lane to 127.0.0.1:`port` with a short reply timeout."""
    fields: dict[str, Any] = {
        "name": LANE,
        "senders": ["*"],
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "smtp_tls": "none",
        "smtp_timeout": 2.0,
    }
    return LaneConfig(**(fields | overrides))


def request(**email_fields: Any) -> SmtpSendRequest:
    """A send request on `LANE` with a fresh key and that key's Message-ID."""
    fields: dict[str, Any] = {
        "sender": SENDER,
        "to": [ANN],
        "subject": "Hello",
        "text": "Hi Ann",
    }
    key = f"test-{uuid.uuid4().hex[:12]}"
    return SmtpSendRequest(
        email=Email(**(fields | email_fields)),
        lane=LANE,
        message_id=message_id(email_workflow_id(key), "acme.test"),
        key=key,
    )


async def send(
    acts: SmtpActivities, req: SmtpSendRequest, env: ActivityEnvironment | None = None
) -> DeliveryReceipt:
    return await (env or ActivityEnvironment()).run(acts.send_email, req)


async def send_failure(
    acts: SmtpActivities, req: SmtpSendRequest, env: ActivityEnvironment | None = None
) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        await send(acts, req, env)
    return caught.value


def details(err: ApplicationError) -> dict[str, Any]:
    assert err.details and isinstance(err.details[0], dict)
    return err.details[0]


def only(catcher: SmtpCatcher) -> CaughtMessage:
    """The one message the catcher holds."""
    messages = catcher.messages
    assert len(messages) == 1, messages
    return messages[0]


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def catcher() -> Iterator[SmtpCatcher]:
    with SmtpCatcher() as smtp:
        yield smtp


@pytest_asyncio.fixture
async def make_activities() -> AsyncIterator[MakeActivities]:
    """`SmtpActivities` for one lane; their pooled connections are closed afterwards."""
    made: list[SmtpActivities] = []

    def make(lane: LaneConfig) -> SmtpActivities:
        acts = SmtpActivities(Settings(lanes=[lane]))
        made.append(acts)
        return acts

    yield make
    for acts in made:
        await acts.close()


@pytest.fixture
def acts(catcher: SmtpCatcher, make_activities: MakeActivities) -> SmtpActivities:
    """Activities whose lane delivers to `catcher` in plaintext."""
    return make_activities(lane_for(catcher.port))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *identities: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*identities).configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    return server_context(ca, "127.0.0.1", "localhost")


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def tls_server(mode: str, ctx: ssl.SSLContext) -> SmtpCatcher:
    """A catcher serving implicit TLS (``"tls"``) or offering STARTTLS (``"starttls"``)."""
    if mode == "tls":
        return SmtpCatcher(tls_context=ctx)
    return SmtpCatcher(starttls_context=ctx)


@pytest.fixture
def tls_catcher(server_ctx: ssl.SSLContext) -> Iterator[SmtpCatcher]:
    with SmtpCatcher(tls_context=server_ctx) as smtp:
        yield smtp


@pytest.fixture
def starttls_catcher(server_ctx: ssl.SSLContext) -> Iterator[SmtpCatcher]:
    with SmtpCatcher(starttls_context=server_ctx) as smtp:
        yield smtp


# -- success ---------------------------------------------------------------------------------


async def test_send_email_delivers_message_with_request_headers(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    req = request(to=[ANN], cc=[BOB], reply_to="support@acme.test", subject="Your order")
    before = datetime.now(UTC).replace(microsecond=0)
    receipt = await send(acts, req)
    after = datetime.now(UTC)

    caught = only(catcher)
    msg = caught.message
    assert caught.sender == SENDER
    assert caught.recipients == [ANN, BOB]
    assert msg["Message-ID"] == req.message_id
    assert msg["From"] == SENDER
    assert msg["To"] == ANN
    assert msg["Cc"] == BOB
    assert msg["Reply-To"] == "support@acme.test"
    assert msg["Subject"] == "Your order"
    date = parsedate_to_datetime(str(msg["Date"]))
    assert date.utcoffset() == timedelta(0)
    assert before <= date <= after
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().strip() == "Hi Ann"

    assert receipt.key == req.key
    assert receipt.message_id == req.message_id
    assert receipt.lane == LANE
    assert receipt.accepted == [ANN, BOB]
    assert receipt.rejected == {}
    assert receipt.attempts == 1
    assert receipt.smtp_reply.startswith("250 ")
    assert receipt.sent_at is not None and before <= receipt.sent_at <= after


async def test_send_email_bcc_is_envelope_only(catcher: SmtpCatcher, acts: SmtpActivities) -> None:
    hidden = "hidden@example.test"
    receipt = await send(acts, request(to=[ANN], bcc=[hidden]))

    caught = only(catcher)
    assert caught.recipients == [ANN, hidden]
    assert receipt.accepted == [ANN, hidden]
    assert "Bcc" not in caught.message
    assert hidden.encode() not in caught.raw


async def test_send_email_html_and_text_is_multipart_alternative(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    await send(acts, request(text="plain body", html="<p>html body</p>"))

    msg = only(catcher).message
    assert msg.get_content_type() == "multipart/alternative"
    parts = [(p.get_content_type(), p.get_content().strip()) for p in msg.iter_parts()]
    assert parts == [("text/plain", "plain body"), ("text/html", "<p>html body</p>")]


async def test_send_email_html_only_is_single_html_part(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    await send(acts, request(text=None, html="<p>only html</p>"))

    msg = only(catcher).message
    assert msg.get_content_type() == "text/html"
    assert msg.get_content().strip() == "<p>only html</p>"


async def test_send_email_attachments_arrive_with_filename(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    pdf = bytes(range(256)) * 4
    await send(
        acts,
        request(
            text="see attached",
            html="<p>see attached</p>",
            attachments=[
                Attachment(filename="invoice.pdf", content=pdf, content_type="application/pdf"),
                Attachment(filename="résumé.txt", content=b"CV", content_type="text/plain"),
            ],
        ),
    )

    msg = only(catcher).message
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_body(("plain",))
    assert body is not None and body.get_content().strip() == "see attached"
    attachments = [
        (a.get_filename(), a.get_content_type(), a.get_payload(decode=True))
        for a in msg.iter_attachments()
    ]
    assert attachments == [
        ("invoice.pdf", "application/pdf", pdf),
        ("résumé.txt", "text/plain", b"CV"),
    ]


async def test_send_email_custom_headers_arrive(catcher: SmtpCatcher, acts: SmtpActivities) -> None:
    headers = {
        "List-Unsubscribe": "<https://acme.test/unsubscribe/42>",
        "X-Campaign": "spring-sale",
    }
    await send(acts, request(headers=headers))

    msg = only(catcher).message
    for name, value in headers.items():
        assert msg[name] == value


async def test_send_email_non_ascii_content_is_7bit_clean(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    # No 8BITMIME negotiation happens, so every byte on the wire must be ASCII (RFC 6152).
    await send(acts, request(subject="Grüße", text="Grüße aus Köln", html="<p>Grüße</p>"))

    caught = only(catcher)
    assert max(caught.raw) < 0x80
    msg = caught.message
    assert msg["Subject"] == "Grüße"
    plain, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert plain is not None and plain.get_content().strip() == "Grüße aus Köln"
    assert html is not None and html.get_content().strip() == "<p>Grüße</p>"


async def test_send_email_repeated_recipient_gets_one_rcpt(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    receipt = await send(acts, request(to=[ANN], cc=[BOB], bcc=["ann@EXAMPLE.test"]))

    assert only(catcher).recipients == [ANN, BOB]
    assert receipt.accepted == [ANN, BOB]


# -- error replies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "reply", "code"),
    [
        ("mail", "451 4.3.0 temporary local problem", 451),
        ("rcpt", "450 4.2.1 mailbox busy", 450),
        ("data", "452 4.3.1 insufficient system storage", 452),
    ],
)
async def test_send_email_4xx_reply_is_transient(
    catcher: SmtpCatcher, acts: SmtpActivities, phase: Phase, reply: str, code: int
) -> None:
    # At RCPT every recipient is refused, so there is no one to send DATA for.
    catcher.fail(phase, reply, times=2)

    err = await send_failure(acts, request(to=[ANN, BOB]))

    assert err.type == ErrorType.SMTP_TRANSIENT
    assert err.non_retryable is False
    assert err.message == reply
    assert details(err)["smtp_code"] == code
    assert details(err)["phase"] == phase
    assert catcher.messages == []


async def test_send_email_421_is_throttled(catcher: SmtpCatcher, acts: SmtpActivities) -> None:
    catcher.fail("mail", "421 4.3.2 service not available, closing channel")

    err = await send_failure(acts, request())

    assert err.type == ErrorType.SMTP_THROTTLED
    assert err.non_retryable is False
    assert err.next_retry_delay is None
    assert err.message == "421 4.3.2 service not available, closing channel"
    assert details(err)["smtp_code"] == 421


@pytest.mark.parametrize("phase", ["mail", "data"])
async def test_send_email_rate_limit_reply_is_throttled_with_hint(
    catcher: SmtpCatcher, acts: SmtpActivities, phase: Phase
) -> None:
    reply = "451 4.7.1 rate limited, try again in 30 seconds"
    catcher.fail(phase, reply)

    err = await send_failure(acts, request())

    assert err.type == ErrorType.SMTP_THROTTLED
    assert err.non_retryable is False
    assert err.next_retry_delay == timedelta(seconds=30)
    assert err.message == reply
    assert details(err)["phase"] == phase
    assert catcher.messages == []


@pytest.mark.parametrize("recipients", [[ANN], [ANN, BOB]])
async def test_send_email_421_at_rcpt_is_throttled(
    catcher: SmtpCatcher, acts: SmtpActivities, recipients: list[str]
) -> None:
    # 421 closes the session: the send must fail as throttled, not as "disconnected".
    catcher.fail("rcpt", "421 4.7.0 too many messages, try again in 2 minutes")

    err = await send_failure(acts, request(to=recipients))

    assert err.type == ErrorType.SMTP_THROTTLED
    assert err.next_retry_delay == timedelta(minutes=2)
    assert details(err)["smtp_code"] == 421
    assert details(err)["phase"] == "rcpt"
    assert catcher.messages == []


@pytest.mark.parametrize(
    ("phase", "reply", "code"),
    [
        ("mail", "550 5.7.1 sender not allowed", 550),
        ("data", "554 5.7.1 message rejected as spam", 554),
    ],
)
async def test_send_email_5xx_reply_is_permanent(
    catcher: SmtpCatcher, acts: SmtpActivities, phase: Phase, reply: str, code: int
) -> None:
    catcher.fail(phase, reply)

    err = await send_failure(acts, request())

    assert err.type == ErrorType.SMTP_PERMANENT
    assert err.non_retryable is True
    assert err.message == reply
    assert details(err)["smtp_code"] == code
    assert details(err)["phase"] == phase
    assert catcher.messages == []


async def test_send_email_partial_rcpt_rejection_delivers_to_accepted(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    catcher.reject_recipient(BOB, "550 5.1.1 no such user")

    receipt = await send(acts, request(to=[ANN, BOB]))

    assert receipt.accepted == [ANN]
    assert receipt.rejected == {BOB: "550 5.1.1 no such user"}
    caught = only(catcher)
    assert caught.recipients == [ANN]
    assert caught.message["Message-ID"] == receipt.message_id


async def test_send_email_all_recipients_5xx_is_permanent(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    catcher.reject_recipient(ANN, "550 5.1.1 no such user")
    catcher.reject_recipient(BOB, "553 5.1.3 bad address syntax")

    err = await send_failure(acts, request(to=[ANN, BOB]))

    assert err.type == ErrorType.SMTP_PERMANENT
    assert err.non_retryable is True
    assert details(err)["smtp_code"] in (550, 553)
    assert details(err)["phase"] == "rcpt"
    assert catcher.messages == []


async def test_send_email_all_recipients_mixed_4xx_5xx_is_transient(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    catcher.reject_recipient(ANN, "550 5.1.1 no such user")
    catcher.reject_recipient(BOB, "450 4.2.1 mailbox busy")

    err = await send_failure(acts, request(to=[ANN, BOB]))

    assert err.type == ErrorType.SMTP_TRANSIENT
    assert err.non_retryable is False
    assert err.message == "450 4.2.1 mailbox busy"
    assert details(err)["smtp_code"] == 450
    assert catcher.messages == []


async def test_send_email_all_recipients_refused_keeps_connection(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    catcher.reject_recipient(ANN)
    await send_failure(acts, request(to=[ANN]))

    await send(acts, request(to=[BOB]))

    assert only(catcher).recipients == [BOB]
    assert acts.pool(LANE).opened == 1


# -- network failures ------------------------------------------------------------------------


async def test_send_email_connection_refused_is_transient(
    make_activities: MakeActivities,
) -> None:
    acts = make_activities(lane_for(free_port()))

    err = await send_failure(acts, request())

    assert err.type == ErrorType.SMTP_TRANSIENT
    assert err.non_retryable is False
    assert details(err)["phase"] == "connect"
    assert "SMTPConnectError" in err.message


async def test_send_email_dropped_at_data_is_transient(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    catcher.drop("data")

    err = await send_failure(acts, request())

    assert err.type == ErrorType.SMTP_TRANSIENT
    assert err.non_retryable is False
    assert details(err)["phase"] == "data"
    assert "SMTPServerDisconnected" in err.message
    assert catcher.messages == []


async def test_send_email_slow_reply_times_out_as_transient(
    catcher: SmtpCatcher, make_activities: MakeActivities
) -> None:
    timeout = 0.2
    acts = make_activities(lane_for(catcher.port, smtp_timeout=timeout))
    catcher.delay("data", timeout + 1)

    err = await send_failure(acts, request())

    assert err.type == ErrorType.SMTP_TRANSIENT
    assert err.non_retryable is False
    assert details(err)["phase"] == "data"
    assert "Timeout" in err.message


# -- TLS -------------------------------------------------------------------------------------


async def test_send_email_plaintext_lane_is_not_encrypted(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    await send(acts, request())

    assert only(catcher).tls is False


async def test_send_email_implicit_tls_with_ca_file_delivers(
    tls_catcher: SmtpCatcher, make_activities: MakeActivities, ca_file: str
) -> None:
    acts = make_activities(lane_for(tls_catcher.port, smtp_tls="tls", smtp_ca_file=ca_file))

    receipt = await send(acts, request())

    caught = only(tls_catcher)
    assert caught.tls is True
    assert caught.message["Message-ID"] == receipt.message_id


async def test_send_email_starttls_with_ca_file_delivers(
    starttls_catcher: SmtpCatcher, make_activities: MakeActivities, ca_file: str
) -> None:
    acts = make_activities(
        lane_for(starttls_catcher.port, smtp_tls="starttls", smtp_ca_file=ca_file)
    )

    receipt = await send(acts, request())

    caught = only(starttls_catcher)
    assert caught.tls is True
    assert caught.message["Message-ID"] == receipt.message_id


@pytest.mark.parametrize("mode", ["tls", "starttls"])
async def test_send_email_untrusted_certificate_is_tls_error(
    server_ctx: ssl.SSLContext, make_activities: MakeActivities, mode: str
) -> None:
    with tls_server(mode, server_ctx) as server:
        acts = make_activities(lane_for(server.port, smtp_tls=mode))  # system CAs only

        err = await send_failure(acts, request())

        assert err.type == ErrorType.SMTP_TLS
        assert err.non_retryable is True
        assert "CERTIFICATE_VERIFY_FAILED" in err.message
        assert server.messages == []


async def test_send_email_certificate_for_other_host_is_tls_error(
    ca: trustme.CA, make_activities: MakeActivities, ca_file: str
) -> None:
    with SmtpCatcher(tls_context=server_context(ca, "mail.elsewhere.test")) as server:
        acts = make_activities(lane_for(server.port, smtp_tls="tls", smtp_ca_file=ca_file))

        err = await send_failure(acts, request())

        assert err.type == ErrorType.SMTP_TLS
        assert err.non_retryable is True
        assert server.messages == []


@pytest.mark.parametrize("mode", ["tls", "starttls"])
async def test_send_email_unverified_tls_delivers(
    server_ctx: ssl.SSLContext, make_activities: MakeActivities, mode: str
) -> None:
    with tls_server(mode, server_ctx) as server:
        acts = make_activities(lane_for(server.port, smtp_tls=mode, smtp_verify=False))

        await send(acts, request())

        assert only(server).tls is True


async def test_send_email_starttls_not_offered_is_tls_error(
    catcher: SmtpCatcher, make_activities: MakeActivities, ca_file: str
) -> None:
    # A lane that requires STARTTLS must never fall back to plaintext.
    acts = make_activities(lane_for(catcher.port, smtp_tls="starttls", smtp_ca_file=ca_file))

    err = await send_failure(acts, request())

    assert err.type == ErrorType.SMTP_TLS
    assert err.non_retryable is True
    assert "STARTTLS" in err.message
    assert catcher.messages == []


# -- heartbeats ------------------------------------------------------------------------------


async def test_send_email_returns_heartbeated_receipt_without_sending(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    req = request()
    earlier = DeliveryReceipt(
        key=req.key,
        message_id=req.message_id,
        lane=LANE,
        accepted=[ANN],
        attempts=1,
        smtp_reply="250 2.0.0 OK: queued as 4F2A",
        sent_at=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info,
        attempt=2,
        heartbeat_details=[{"phase": "accepted", "receipt": earlier.model_dump(mode="json")}],
    )

    receipt = await send(acts, req, env)

    assert receipt == earlier
    assert catcher.messages == []
    assert acts.pool(LANE).opened == 0


async def test_send_email_resends_when_earlier_attempt_was_not_accepted(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    req = request()
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=[{"phase": "data"}])

    receipt = await send(acts, req, env)

    assert receipt.attempts == 2
    assert only(catcher).message["Message-ID"] == req.message_id


async def test_send_email_heartbeats_every_phase(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *args: beats.append(args[0])

    receipt = await send(acts, request(), env)

    phases = [beat["phase"] for beat in beats]
    seen = list(dict.fromkeys(phases))
    assert seen == ["connect", "mail", "rcpt", "data", "accepted"]
    assert phases[-1] == "accepted"
    assert DeliveryReceipt.model_validate(beats[-1]["receipt"]) == receipt


async def test_send_email_cancel_during_data_still_completes(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    env = ActivityEnvironment()

    def cancel_at_data(beat: dict[str, Any]) -> None:
        if beat["phase"] == "data":
            env.cancel()

    env.on_heartbeat = cancel_at_data

    receipt = await send(acts, request(), env)

    assert receipt.accepted == [ANN]
    assert only(catcher).message["Message-ID"] == receipt.message_id


async def test_send_email_cancel_before_data_sends_nothing(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    env = ActivityEnvironment()

    def cancel_at_rcpt(beat: dict[str, Any]) -> None:
        if beat["phase"] == "rcpt":
            env.cancel()

    env.on_heartbeat = cancel_at_rcpt

    with pytest.raises(asyncio.CancelledError):
        await send(acts, request(), env)

    assert catcher.messages == []


# -- connection pool -------------------------------------------------------------------------


async def test_smtp_pool_reuses_connection_across_sends(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    first, second = request(subject="one"), request(subject="two")

    await send(acts, first)
    await send(acts, second)

    assert [m.message_id for m in catcher.messages] == [first.message_id, second.message_id]
    assert acts.pool(LANE).opened == 1


async def test_smtp_pool_concurrent_sends_use_separate_connections(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    reqs = [request(subject="one"), request(subject="two")]

    await asyncio.gather(*(send(acts, req) for req in reqs))
    await send(acts, request(subject="three"))

    assert sorted(m.subject for m in catcher.messages) == ["one", "three", "two"]
    assert acts.pool(LANE).opened == 2


async def test_smtp_pool_reconnects_when_idle_connection_was_dropped(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    await send(acts, request(subject="one"))
    catcher.drop("mail")  # the server closes the reused connection at the next MAIL

    receipt = await send(acts, request(subject="two"))

    assert receipt.attempts == 1
    assert [m.subject for m in catcher.messages] == ["one", "two"]
    assert acts.pool(LANE).opened == 2


async def test_smtp_pool_reconnects_on_421_at_mail_of_idle_connection(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    await send(acts, request(subject="one"))
    catcher.fail("mail", "421 4.4.2 idle timeout, closing connection")

    await send(acts, request(subject="two"))

    assert [m.subject for m in catcher.messages] == ["one", "two"]
    assert acts.pool(LANE).opened == 2


async def test_smtp_pool_reconnects_after_server_restart(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    await send(acts, request(subject="one"))
    catcher.stop()
    catcher.start()  # same port, every old connection gone

    await send(acts, request(subject="two"))

    assert [m.subject for m in catcher.messages] == ["one", "two"]
    assert acts.pool(LANE).opened == 2


async def test_smtp_pool_retries_reused_connection_only_once(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    await send(acts, request(subject="one"))
    catcher.drop("mail", times=2)

    err = await send_failure(acts, request(subject="two"))

    assert err.type == ErrorType.SMTP_TRANSIENT
    assert details(err)["phase"] == "mail"
    assert acts.pool(LANE).opened == 2
    assert [m.subject for m in catcher.messages] == ["one"]


async def test_smtp_pool_does_not_retry_a_fresh_connection(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    catcher.drop("mail")

    err = await send_failure(acts, request())

    assert err.type == ErrorType.SMTP_TRANSIENT
    assert details(err)["phase"] == "mail"
    assert acts.pool(LANE).opened == 1
    assert catcher.messages == []


async def test_smtp_pool_replaces_connection_idle_too_long(
    catcher: SmtpCatcher, acts: SmtpActivities, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smtp_module, "IDLE_TIMEOUT", 0.0)

    await send(acts, request(subject="one"))
    await send(acts, request(subject="two"))

    assert [m.subject for m in catcher.messages] == ["one", "two"]
    assert acts.pool(LANE).opened == 2


# -- lanes and credentials -------------------------------------------------------------------


@pytest.fixture
def login_env(monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """Names of two environment variables, both unset."""
    suffix = uuid.uuid4().hex[:8].upper()
    names = (f"POSTLANE_TEST_SMTP_USER_{suffix}", f"POSTLANE_TEST_SMTP_PASSWORD_{suffix}")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    return names


async def test_send_email_unknown_lane_is_lane_unknown(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    req = request().model_copy(update={"lane": "nowhere"})

    err = await send_failure(acts, req)

    assert err.type == ErrorType.LANE_UNKNOWN
    assert err.non_retryable is True
    assert "nowhere" in err.message
    assert catcher.messages == []


async def test_send_email_missing_credentials_is_configuration_error(
    catcher: SmtpCatcher,
    make_activities: MakeActivities,
    login_env: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user_var, password_var = login_env
    monkeypatch.setenv(user_var, "mailer-user-7f3a")
    acts = make_activities(
        lane_for(catcher.port, smtp_username_env=user_var, smtp_password_env=password_var)
    )

    err = await send_failure(acts, request())

    assert err.type == CONFIGURATION_ERROR
    assert err.type != ErrorType.LANE_UNKNOWN
    assert err.non_retryable is True
    assert password_var in err.message
    assert "mailer-user-7f3a" not in err.message
    assert acts.pool(LANE).opened == 0
    assert catcher.messages == []


async def test_send_email_authenticates_with_credentials_from_env(
    make_activities: MakeActivities,
    login_env: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user_var, password_var = login_env
    monkeypatch.setenv(user_var, "mailer")
    monkeypatch.setenv(password_var, "s3cret")
    with SmtpCatcher(logins={"mailer": "s3cret"}) as server:
        acts = make_activities(
            lane_for(server.port, smtp_username_env=user_var, smtp_password_env=password_var)
        )

        await send(acts, request())

        assert only(server).login == "mailer"


async def test_send_email_wrong_password_is_permanent(
    make_activities: MakeActivities,
    login_env: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user_var, password_var = login_env
    monkeypatch.setenv(user_var, "mailer")
    monkeypatch.setenv(password_var, "wrong")
    with SmtpCatcher(logins={"mailer": "s3cret"}) as server:
        acts = make_activities(
            lane_for(server.port, smtp_username_env=user_var, smtp_password_env=password_var)
        )

        err = await send_failure(acts, request())

        assert err.type == ErrorType.SMTP_PERMANENT
        assert err.non_retryable is True
        assert details(err)["smtp_code"] == 535
        assert "wrong" not in err.message
        assert server.messages == []


async def test_send_email_auth_not_offered_is_configuration_error(
    catcher: SmtpCatcher,
    make_activities: MakeActivities,
    login_env: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user_var, password_var = login_env
    monkeypatch.setenv(user_var, "mailer")
    monkeypatch.setenv(password_var, "s3cret")
    acts = make_activities(
        lane_for(catcher.port, smtp_username_env=user_var, smtp_password_env=password_var)
    )

    err = await send_failure(acts, request())

    assert err.type == CONFIGURATION_ERROR
    assert err.non_retryable is True
    assert "AUTH" in err.message
    assert catcher.messages == []


# -- a good SMTP citizen: RSET, QUIT, EHLO (counted by the server, per connection) ----------


def ended_with_quit(catcher: SmtpCatcher) -> list[bool]:
    """For each session the catcher saw: did it end, with QUIT as the client's last word?"""
    return [s.closed and s.commands[-1:] == ["QUIT"] for s in catcher.sessions]


async def test_send_email_refusal_at_mail_resets_and_keeps_connection(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    catcher.fail("mail", "450 4.7.1 too many messages, slow down")

    err = await send_failure(acts, request(subject="one"))
    await send(acts, request(subject="two"))

    assert err.type == ErrorType.SMTP_THROTTLED
    assert [m.subject for m in catcher.messages] == ["two"]
    [session] = catcher.sessions
    assert session.commands == ["EHLO", "MAIL", "RSET", "MAIL", "RCPT", "DATA"]
    assert acts.pool(LANE).opened == 1


async def test_send_email_permanent_refusal_at_data_keeps_connection(
    catcher: SmtpCatcher, acts: SmtpActivities
) -> None:
    catcher.fail("data", "554 5.7.1 message refused")

    err = await send_failure(acts, request(subject="one"))
    await send(acts, request(subject="two"))

    assert err.type == ErrorType.SMTP_PERMANENT
    [session] = catcher.sessions
    assert session.commands == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"]


async def test_smtp_pool_close_says_quit(catcher: SmtpCatcher, acts: SmtpActivities) -> None:
    await asyncio.gather(send(acts, request(subject="one")), send(acts, request(subject="two")))
    assert len(catcher.sessions) == 2

    await acts.close()  # what the worker does on shutdown

    await assert_eventually(lambda: all(ended_with_quit(catcher)), what="QUIT on every session")


async def test_smtp_pool_overflow_connection_says_quit(
    catcher: SmtpCatcher, make_activities: MakeActivities
) -> None:
    acts = make_activities(lane_for(catcher.port, max_concurrent=1))
    catcher.delay("data", 0.5)  # the two sends overlap, so each needs a connection

    await asyncio.gather(send(acts, request(subject="one")), send(acts, request(subject="two")))

    # The pool keeps one idle connection; the other is closed politely.
    await assert_eventually(
        lambda: sorted(ended_with_quit(catcher)) == [False, True], what="one QUIT"
    )


async def test_smtp_pool_idle_too_long_says_quit(
    catcher: SmtpCatcher, acts: SmtpActivities, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smtp_module, "IDLE_TIMEOUT", 0.0)

    await send(acts, request(subject="one"))
    await send(acts, request(subject="two"))

    await assert_eventually(
        lambda: ended_with_quit(catcher) == [True, False], what="QUIT on the stale session"
    )


async def test_send_email_refused_login_says_quit(
    make_activities: MakeActivities,
    login_env: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user_var, password_var = login_env
    monkeypatch.setenv(user_var, "mailer")
    monkeypatch.setenv(password_var, "wrong")
    with SmtpCatcher(logins={"mailer": "s3cret"}) as server:
        acts = make_activities(
            lane_for(server.port, smtp_username_env=user_var, smtp_password_env=password_var)
        )

        await send_failure(acts, request())

        await assert_eventually(lambda: ended_with_quit(server) == [True], what="QUIT")


async def test_send_email_uses_lane_ehlo_name(
    catcher: SmtpCatcher, make_activities: MakeActivities
) -> None:
    acts = make_activities(lane_for(catcher.port, ehlo_name="mta1.acme.test"))

    await send(acts, request())

    assert [s.hello_names for s in catcher.sessions] == [["mta1.acme.test"]]


@pytest.mark.parametrize(
    ("fqdn", "senders", "expected"),
    [
        ("mx1.postlane.example", ["*@acme.test"], "mx1.postlane.example"),
        ("localhost", ["*@acme.test"], "acme.test"),
        ("localhost.localdomain", ["app@Acme.Test"], "acme.test"),
        ("worker-7f9c", ["*"], "[127.0.0.1]"),
    ],
)
async def test_send_email_default_ehlo_name(
    catcher: SmtpCatcher,
    make_activities: MakeActivities,
    monkeypatch: pytest.MonkeyPatch,
    fqdn: str,
    senders: list[str],
    expected: str,
) -> None:
    monkeypatch.setattr(smtp_module.socket, "getfqdn", lambda *_: fqdn)
    acts = make_activities(lane_for(catcher.port, senders=senders))

    await send(acts, request())

    assert [s.hello_names for s in catcher.sessions] == [[expected]]


@pytest.mark.parametrize("bad", ["localhost", "mail acme.test", "[not-an-ip]"])
def test_lane_ehlo_name_must_be_a_host_name_or_address_literal(tmp_path: Path, bad: str) -> None:
    config = tmp_path / "postlane.toml"
    config.write_text(
        f'[[lanes]]\nname = "x"\nsenders = ["*"]\nsmtp_host = "h"\nehlo_name = "{bad}"\n'
    )

    with pytest.raises(ConfigurationError) as caught:
        load_settings(config)

    assert f"{config}:5: lanes.0.ehlo_name:" in str(caught.value)
