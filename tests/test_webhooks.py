"""Event webhooks, against a real receiver on a real socket and a real Temporal dev server.

The receiver verifies every request with the ``standardwebhooks`` package (the project's
reference library) and records what it accepted. It is down (its port closed) while emails
are sent, fail, dead-letter and are cancelled and while a sequence is replied to; when it
comes back every event arrives, once per ``webhook-id``, in order per email.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowHistory
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from activities.webhooks import encode_body, signature
from postlane import Email, EmailCancelled, EmailNotFound, EmailStatus, PermanentDeliveryError
from postlane.cli import webhooks as cli_webhooks
from postlane.client import PostlaneClient
from postlane.config import Settings, load_settings
from postlane.connection import data_converter
from postlane.errors import ConfigurationError
from postlane.ids import email_workflow_id, sequence_email_key, sequence_workflow_id
from postlane.names import SequenceMessages, WebhookMessages
from postlane.sequences.models import InboundEvent, InboundKind, SequenceStatus
from postlane.sequences.spec import Recipient, SendStep, SequenceSpec, WaitStep
from postlane.testing import SmtpCatcher, catcher_lane, default_test_lane, running_workers
from postlane.webhooks import (
    WebhookConfig,
    WebhookDeliveryReport,
    WebhookEvent,
    WebhookEventType,
    WebhookRetry,
    decode_secret,
    shown_url,
    webhook_workflow_id,
)
from tests.conftest import FRAGILE_LANE
from tests.procs import assert_eventually, free_port, postlane_env, run_postlane, write_config
from workflows import WORKFLOWS, workflow_runner

HISTORIES = Path(__file__).parent / "histories"
URL_TOKEN = "hush-6d1f"
SECRET = "whsec_" + base64.b64encode(b"postlane-test-webhook-key-32byte").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"another-webhook-key-of-32-bytes!").decode()
SECRET_ENV = "POSTLANE_TEST_WEBHOOK_SECRET"
OTHER_SECRET_ENV = "POSTLANE_TEST_WEBHOOK_OTHER_SECRET"
FAST_RETRY = WebhookRetry(
    initial_interval=timedelta(seconds=1), backoff=1.5, maximum_interval=timedelta(seconds=2)
)
"""Short real-time backoff: the receiver is back within seconds of coming up."""


# -- configuration ------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "postlane.toml"
    path.write_text(text)
    return path


HOOK = """[[webhooks]]
name = "crm"
url = "https://hooks.acme.test/postlane"
events = {events}
secret_env = "CRM_WEBHOOK_SECRET"
retry = {{ initial_interval = "2s", maximum_interval = "1m", give_up_after = "1d" }}
"""


def test_webhooks_config_loads_subscription(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, HOOK.format(events='["email.sent", "email.sent"]')))
    [hook] = settings.webhooks
    assert hook.events == [WebhookEventType.EMAIL_SENT]
    assert hook.retry.initial_interval == timedelta(seconds=2)
    assert hook.retry.give_up_after == timedelta(days=1)
    assert settings.webhook_events() == ["email.sent"]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (HOOK.format(events='["email.opened"]'), ":4: webhooks.0.events: 'email.opened' is not"),
        (HOOK.format(events="[]"), ":4: webhooks.0.events:"),
        (
            HOOK.format(events='["email.sent"]').replace("https://hooks", "ftp://hooks"),
            ":3: webhooks.0.url: 'ftp://",
        ),
        (
            HOOK.format(events='["email.sent"]').replace('"CRM_WEBHOOK_SECRET"', f'"{SECRET}"'),
            ":5: webhooks.0.secret_env: ",
        ),
        (HOOK.format(events='["email.sent"]') * 2, "webhooks: webhook names must be unique"),
    ],
)
def test_webhooks_config_bad_value_names_file_line_field(
    tmp_path: Path, text: str, where: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and where in message, message
    assert SECRET not in message  # a secret pasted by mistake is not echoed


def test_webhooks_shown_url_leaves_out_what_may_hold_a_token() -> None:
    full = "https://user:pw@hooks.acme.test:8443/in?token=x#frag"
    assert shown_url(full) == "https://hooks.acme.test:8443/in?…"
    assert shown_url("https://hooks.acme.test/in") == "https://hooks.acme.test/in"
    assert shown_url("http://[::1]:9000/in?t=1") == "http://[::1]:9000/in?…"


def test_webhooks_secret_read_from_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = WebhookConfig(
        name="crm", url="http://127.0.0.1:1/x", events=["email.sent"], secret_env=SECRET_ENV
    )
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ConfigurationError, match=f"{SECRET_ENV} is not set"):
        hook.secret()
    monkeypatch.setenv(SECRET_ENV, "whsec_not base64!")
    with pytest.raises(ConfigurationError, match="not a whsec_<base64> secret"):
        hook.secret()
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert hook.secret() == b"postlane-test-webhook-key-32byte"
    assert SECRET not in hook.model_dump_json()


def test_webhooks_signature_verifies_with_standardwebhooks() -> None:
    event = WebhookEvent(
        id="msg_1",
        type=WebhookEventType.EMAIL_SENT,
        timestamp=datetime(2026, 11, 27, 10, tzinfo=UTC),
        data={"key": "k1", "status": "sent"},
    )
    body = encode_body(event)
    ts = int(datetime.now(UTC).timestamp())
    headers = {
        "webhook-id": event.id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature(decode_secret(SECRET), event.id, ts, body),
    }
    assert Webhook(SECRET).verify(body, headers) == {
        "type": "email.sent",
        "timestamp": "2026-11-27T10:00:00Z",
        "data": {"key": "k1", "status": "sent"},
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"k1", b"k2"), headers)


# -- the receiver ---------------------------------------------------------------------------


@dataclass
class Received:
    """One request the receiver verified and accepted."""

    webhook_id: str
    path: str
    body: bytes
    headers: dict[str, str]
    payload: dict[str, Any]


@dataclass
class Receiver:
    """A Standard Webhooks receiver on 127.0.0.1:`port`, verifying with `secret`."""

    port: int
    secret: str
    accepted: list[Received] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    payload = Webhook(receiver.secret).verify(body, headers)
                except WebhookVerificationError as exc:
                    with receiver.lock:
                        receiver.refused.append(f"{self.path} {headers.get('webhook-id')}")
                    self.send_response(401)
                    self.end_headers()
                    self.wfile.write(f"bad signature: {exc}".encode())
                    return
                with receiver.lock:
                    receiver.accepted.append(
                        Received(headers["webhook-id"], self.path, body, headers, payload)
                    )
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def events(self, path: str = "/hooks") -> list[Received]:
        with self.lock:
            return [r for r in self.accepted if r.path == path]


@contextlib.contextmanager
def _receiver(port: int) -> Iterator[Receiver]:
    receiver = Receiver(port, SECRET)
    try:
        yield receiver
    finally:
        receiver.stop()


# -- end to end -----------------------------------------------------------------------------

REPLIED_SPEC = SequenceSpec(
    name="hooks",
    sender="agent@acme.test",
    steps=[
        SendStep(id="first", subject="Hello", text="How is it going?"),
        WaitStep(id="pause", duration=timedelta(hours=1)),
        SendStep(id="follow-up", subject="Hello", text="Any thoughts?"),
    ],
)


def _email(sender: str = "agent@acme.test", subject: str = "Hi") -> Email:
    return Email(sender=sender, to=["bob@example.test"], subject=subject, text="hello")


@pytest.mark.devserver
@pytest.mark.timeout(420)
async def test_webhooks_receiver_down_then_back_gets_every_event_once_in_order(
    dev_env: WorkflowEnvironment,
    key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(OTHER_SECRET_ENV, OTHER_SECRET)
    port = free_port()
    crm = WebhookConfig(
        name="crm",
        url=f"http://127.0.0.1:{port}/hooks",
        events=list(WebhookEventType),
        secret_env=SECRET_ENV,
        retry=FAST_RETRY,
    )
    # Signed with a secret the receiver does not hold: every delivery must be refused.
    strict = WebhookConfig(
        name="strict",
        # A token in its query, as receivers often ask: posted to, never shown.
        url=f"http://127.0.0.1:{port}/strict?token={URL_TOKEN}",
        events=[WebhookEventType.EMAIL_SENT],
        secret_env=OTHER_SECRET_ENV,
        retry=FAST_RETRY,
    )
    client = dev_env.client
    with SmtpCatcher() as smtp, _receiver(port) as receiver:
        settings = Settings(
            lanes=[catcher_lane(lane, smtp) for lane in (default_test_lane(), FRAGILE_LANE)],
            webhooks=[crm, strict],
        )
        pl = PostlaneClient(client, settings)
        async with running_workers(dev_env, settings):
            # The receiver is down for all of this.
            sent = await (await pl.send(_email(), key=f"{key}-sent")).result()

            smtp.fail("data", "550 5.1.1 no such user")
            with pytest.raises(PermanentDeliveryError):
                await (await pl.send(_email(), key=f"{key}-failed")).result()

            smtp.fail("data", "451 4.3.0 try later", times=3)
            parked = await pl.send(_email("ops@fragile.test"), key=f"{key}-dlq")
            await assert_eventually(
                lambda: _status_is(pl, f"{key}-dlq", EmailStatus.DEAD_LETTER),
                within=60,
                what="the fragile email dead-lettered",
            )
            assert await pl.retry(f"{key}-dlq")
            await parked.result()

            later = await pl.send(
                _email(), key=f"{key}-cancel", send_at=datetime.now(UTC) + timedelta(days=1)
            )
            await pl.cancel(f"{key}-cancel")
            with pytest.raises(EmailCancelled):
                await later.result()

            seq_key = f"{key}-seq"
            await pl.sequences.start(
                REPLIED_SPEC, Recipient(address="ann@example.test"), key=seq_key
            )
            first = email_workflow_id(sequence_email_key(seq_key, "first"))
            await assert_eventually(
                lambda: _status_is(pl, sequence_email_key(seq_key, "first"), EmailStatus.SENT),
                what="the sequence's first email sent",
            )
            await client.get_workflow_handle(sequence_workflow_id(seq_key)).signal(
                SequenceMessages.INBOUND,
                InboundEvent(
                    kind=InboundKind.REPLY,
                    message_id="<reply-1@example.test>",
                    refers_to_workflow=first,
                    from_address="ann@example.test",
                    subject="Re: Hello",
                ),
            )
            report = await pl.sequences.get(seq_key).result()
            assert report.status == SequenceStatus.REPLIED

            # Failing deliveries are visible: the CLI lists them with their last error.
            async def failing() -> list[cli_webhooks.WebhookDeliveryRow]:
                rows = await cli_webhooks.list_deliveries(client, failing=True)
                mine = [r for r in rows if key in r.subject]
                assert len({r.subject for r in mine if r.subscription == "crm"}) == 6
                assert all(r.attempts >= 2 and r.last_error for r in mine)
                # The server knows the next retry of any not being attempted right now.
                assert any(r.next_retry is not None for r in mine)
                return mine

            rows = await assert_eventually(failing, within=120, what="failing deliveries listed")
            # The Web UI's view of one: the queue in its details, the failing pending activity.
            dlq_delivery = client.get_workflow_handle(
                webhook_workflow_id("crm", f"email:{key}-dlq")
            )
            metadata = await dlq_delivery.query(
                "__temporal_workflow_metadata", result_type=WorkflowMetadata
            )
            assert metadata.current_details.startswith(
                f"webhook crm → http://127.0.0.1:{port}/hooks\nfor email:{key}-dlq; pending: 2;"
            ), metadata.current_details
            [pending] = (await dlq_delivery.describe()).raw_description.pending_activities
            assert pending.activity_type.name == "deliver_webhook" and pending.attempt >= 2
            assert "ConnectError" in pending.last_failure.message
            assert all("ConnectError" in (r.last_error or "") for r in rows)
            await cli_webhooks.run(
                pl, argparse.Namespace(failing=True, subscription="crm", json=False)
            )
            table = capsys.readouterr().out
            assert f"email:{key}-dlq" in table and "ConnectError" in table
            assert f"http://127.0.0.1:{port}/hooks" in table
            # The same through the console script, as an operator runs it.
            config = write_config(tmp_path / "postlane.toml", [default_test_lane()])
            rc, out, err = await run_postlane(
                ["webhooks", "list", "--failing"],
                postlane_env(dev_env.client.service_client.config.target_host, config),
            )
            assert rc == 0, err
            assert f"email:{key}-cancel" in out and f"{port}/strict" in out
            assert "ConnectError" in out and SECRET not in out + err and URL_TOKEN not in out
            assert receiver.accepted == []

            # The receiver comes back on the same port.
            receiver.start()
            expected = {
                f"email:{key}-sent": ["email.sent"],
                f"email:{key}-failed": ["email.failed"],
                f"email:{key}-dlq": ["email.dead_lettered", "email.sent"],
                f"email:{key}-cancel": ["email.cancelled"],
                first: ["email.sent"],
                sequence_workflow_id(seq_key): ["sequence.replied"],
            }

            def arrived() -> dict[str, list[str]]:
                got: dict[str, list[str]] = {}
                for r in receiver.events("/hooks"):
                    subject = _subject(r.payload)
                    if key in subject:
                        got.setdefault(subject, []).append(r.payload["type"])
                assert got == expected
                return got

            await assert_eventually(arrived, within=120, what="every event delivered")

            # Each delivery workflow has nothing left, so nothing can arrive twice later.
            # The receiver holds an event before the workflow records the activity's
            # result, so a workflow's count can trail what arrived by one: poll it.
            async def settled(subject: str, delivered: int) -> bool:
                handle = client.get_workflow_handle(webhook_workflow_id("crm", subject))
                status = await handle.query(
                    WebhookMessages.STATUS, result_type=WebhookDeliveryReport
                )
                counts = (status.pending, status.delivered, status.failed)
                assert counts == (0, delivered, 0), (subject, counts)
                return True

            for subject, types in expected.items():
                await assert_eventually(
                    functools.partial(settled, subject, len(types)),
                    what=f"{subject} delivered and settled",
                )
            mine = [r for r in receiver.events("/hooks") if key in _subject(r.payload)]
            ids = [r.webhook_id for r in mine]
            assert len(ids) == len(set(ids)) == 7

            # The payload agrees with what the SMTP server received.
            [sent_event] = [r for r in mine if _subject(r.payload) == f"email:{key}-sent"]
            data = sent_event.payload["data"]
            assert data["message_id"] == sent.message_id
            assert sent.message_id in {m.message_id for m in smtp.messages}
            assert data["to"] == ["bob@example.test"] and data["status"] == "sent"
            assert "text" not in data and "hello" not in sent_event.body.decode()
            [failed] = [r for r in mine if r.payload["type"] == "email.failed"]
            assert "550 5.1.1" in failed.payload["data"]["reason"]
            [replied] = [r for r in mine if r.payload["type"] == "sequence.replied"]
            assert replied.payload["data"]["reply_message_id"] == "<reply-1@example.test>"

            # A receiver holding another secret refuses them: verification can fail.
            with pytest.raises(WebhookVerificationError):
                Webhook(OTHER_SECRET).verify(sent_event.body, sent_event.headers)

            async def strict_refused() -> list[cli_webhooks.WebhookDeliveryRow]:
                rows = await cli_webhooks.list_deliveries(
                    client, failing=True, subscription="strict"
                )
                mine = [r for r in rows if key in r.subject]
                assert mine and all("HTTP 401" in (r.last_error or "") for r in mine)
                return mine

            await assert_eventually(strict_refused, within=120, what="strict refused, listed")
            assert receiver.events("/strict") == []
            assert any(line.startswith(f"/strict?token={URL_TOKEN} ") for line in receiver.refused)
            strict_delivery = webhook_workflow_id("strict", f"email:{key}-sent")
            strict_history = await client.get_workflow_handle(strict_delivery).fetch_history()
            assert f"127.0.0.1:{port}/strict?…" in _history_text(strict_history)
            assert URL_TOKEN not in _history_text(strict_history)  # nor in its errors

            # No secret in any history the server holds for these workflows.
            histories = {
                "send_email_webhooks": email_workflow_id(f"{key}-dlq"),
                "sequence_webhooks": sequence_workflow_id(seq_key),
                "webhook_delivery": webhook_workflow_id("crm", f"email:{key}-dlq"),
            }
            for name, workflow_id in histories.items():
                history = await client.get_workflow_handle(workflow_id).fetch_history()
                text = _history_text(history)
                assert SECRET not in text and SECRET.removeprefix("whsec_") not in text
                await _replay(history)
                if os.environ.get("POSTLANE_RECORD_HISTORIES"):
                    (HISTORIES / f"{name}.json").write_text(history.to_json())
            for subscription in ("crm", "strict"):
                async for execution in client.list_workflows(cli_webhooks.RUNNING_DELIVERIES):
                    if key in execution.id and subscription in execution.id:
                        await client.get_workflow_handle(execution.id).terminate("test over")


def _history_text(history: WorkflowHistory) -> str:
    """The history as JSON, with every payload's data decoded (JSON holds it in base64)."""
    text = history.to_json()
    return text + "\n" + _decoded(json.loads(text))


async def _status_is(pl: PostlaneClient, key: str, status: EmailStatus) -> bool:
    try:
        return (await pl.describe(key)).status == status
    except EmailNotFound:  # a sequence's email not started yet
        return False


def _subject(payload: dict[str, Any]) -> str:
    data = payload["data"]
    prefix = "sequence:" if payload["type"].startswith("sequence.") else "email:"
    return prefix + data["key"]


# -- replay ---------------------------------------------------------------------------------


async def _replay(history: WorkflowHistory) -> None:
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(history)


RECORDED = ["send_email_webhooks", "sequence_webhooks", "webhook_delivery"]


def _recorded_id(name: str, text: str) -> str:
    """The workflow ID a recorded history ran under, from its input."""
    started = json.loads(text)["events"][0]["workflowExecutionStartedEventAttributes"]
    inp = json.loads(base64.b64decode(started["input"]["payloads"][0]["data"]))
    if name == "webhook_delivery":
        return webhook_workflow_id(inp["subscription"], inp["subject"])
    if name == "sequence_webhooks":
        return sequence_workflow_id(inp["key"])
    return email_workflow_id(inp["key"])


def _decoded(node: Any) -> str:
    """Every payload of a history JSON, decoded, concatenated (markers hold the patch IDs)."""
    if isinstance(node, dict):
        parts = [_decoded(v) for v in node.values()]
        data = node.get("data")
        if isinstance(data, str):
            with contextlib.suppress(ValueError):
                parts.append(base64.b64decode(data).decode(errors="replace"))
        return "\n".join(parts)
    if isinstance(node, list):
        return "\n".join(_decoded(v) for v in node)
    return ""


@pytest.mark.parametrize("name", RECORDED)
async def test_webhooks_recorded_history_replays(name: str) -> None:
    """Histories recorded with the webhook patches (an email dead-lettered, retried and
    sent; a replied sequence; a delivery that failed while its receiver was down)."""
    path = HISTORIES / f"{name}.json"
    assert path.exists(), f"record {path.name}: POSTLANE_RECORD_HISTORIES=1"
    text = path.read_text()
    patch = {
        "send_email_webhooks": "postlane-webhooks",
        "sequence_webhooks": "postlane-sequence-webhooks",
    }
    if name in patch:
        assert patch[name] in _decoded(json.loads(text)), "recorded before the patch"
    await _replay(WorkflowHistory.from_json(_recorded_id(name, text), text))


def _commands(types: list[str]) -> Counter[str]:
    return Counter(t for t in types if not t.startswith("workflow_task_"))


async def _event_types(client: Any, workflow_id: str) -> list[str]:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return [event.WhichOneof("attributes") or "" for event in history.events]


@pytest.mark.devserver
@pytest.mark.timeout(120)
async def test_webhooks_cost_nothing_in_an_emails_history_when_none_is_configured(
    dev_env: WorkflowEnvironment, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 counts events per email: no subscription adds none; one that wants
    ``email.sent`` adds three (the patch marker, its TemporalChangeVersion upsert, and the
    emitting local activity's marker)."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    client = dev_env.client
    hook = WebhookConfig(
        name="cost",
        url=f"http://127.0.0.1:{free_port()}/hooks",
        events=[WebhookEventType.EMAIL_SENT],
        secret_env=SECRET_ENV,
        retry=FAST_RETRY,
    )
    types: dict[str, list[str]] = {}
    with SmtpCatcher() as smtp:
        for name, hooks in (("plain", []), ("hooked", [hook])):
            settings = Settings(lanes=[catcher_lane(default_test_lane(), smtp)], webhooks=hooks)
            async with running_workers(dev_env, settings):
                pl = PostlaneClient(client, settings)
                await (await pl.send(_email(), key=f"{key}-{name}")).result()
            types[name] = await _event_types(client, email_workflow_id(f"{key}-{name}"))
    # Workflow tasks split by timing; everything else is what the workflow did.
    plain, hooked = _commands(types["plain"]), _commands(types["hooked"])
    # Without a subscription: what the history recorded before webhooks existed holds.
    recorded = WorkflowHistory.from_json(
        "email:recorded", (HISTORIES / "send_email_sent.json").read_text()
    )
    assert plain == _commands([e.WhichOneof("attributes") or "" for e in recorded.events])
    # With one: the patch marker, the SDK's TemporalChangeVersion upsert that goes with it,
    # and the emitting local activity's marker.
    assert hooked - plain == Counter(
        {
            "marker_recorded_event_attributes": 2,
            "upsert_workflow_search_attributes_event_attributes": 1,
        }
    )
    assert not plain - hooked
    delivery = client.get_workflow_handle(webhook_workflow_id("cost", f"email:{key}-hooked"))
    await delivery.terminate("test over")


ONE_STEP = SequenceSpec(
    name="one-step",
    sender="agent@acme.test",
    steps=[SendStep(id="only", subject="Hello", text="Just this once.")],
)


@pytest.mark.devserver
@pytest.mark.timeout(300)
async def test_webhooks_discard_completed_and_unsubscribed_events(
    dev_env: WorkflowEnvironment, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other terminal transitions, with the receiver up: a dead letter discarded ends
    ``email.cancelled``; a sequence that ran every step ``sequence.completed``; one
    unsubscribed ``sequence.unsubscribed``. A subscription gets only the events it named."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    port = free_port()
    hook = WebhookConfig(
        name="ops",
        url=f"http://127.0.0.1:{port}/hooks",
        events=[
            WebhookEventType.EMAIL_DEAD_LETTERED,
            WebhookEventType.EMAIL_CANCELLED,
            WebhookEventType.SEQUENCE_COMPLETED,
            WebhookEventType.SEQUENCE_UNSUBSCRIBED,
        ],
        secret_env=SECRET_ENV,
        retry=FAST_RETRY,
    )
    client = dev_env.client
    with SmtpCatcher() as smtp, _receiver(port) as receiver:
        receiver.start()
        settings = Settings(
            lanes=[catcher_lane(lane, smtp) for lane in (default_test_lane(), FRAGILE_LANE)],
            webhooks=[hook],
        )
        pl = PostlaneClient(client, settings)
        async with running_workers(dev_env, settings):
            smtp.fail("data", "451 4.3.0 try later", times=3)
            parked = await pl.send(_email("ops@fragile.test"), key=f"{key}-dlq")
            await assert_eventually(
                lambda: _status_is(pl, f"{key}-dlq", EmailStatus.DEAD_LETTER),
                within=120,
                what="the fragile email dead-lettered",
            )
            assert await pl.dlq.discard(f"{key}-dlq")
            with pytest.raises(EmailCancelled):
                await parked.result()

            done = await pl.sequences.start(
                ONE_STEP, Recipient(address="cy@example.test"), key=f"{key}-done"
            )
            assert (await done.result()).status == SequenceStatus.COMPLETED

            await pl.sequences.start(
                REPLIED_SPEC, Recipient(address="di@example.test"), key=f"{key}-unsub"
            )
            assert await pl.sequences.unsubscribe(f"{key}-unsub", reason="clicked")
            left = await pl.sequences.get(f"{key}-unsub").result()
            assert left.status == SequenceStatus.UNSUBSCRIBED

            expected = {
                f"email:{key}-dlq": ["email.dead_lettered", "email.cancelled"],
                f"sequence:{key}-done": ["sequence.completed"],
                f"sequence:{key}-unsub": ["sequence.unsubscribed"],
            }
            # The unsubscribe races the sequence's first email, which may start, or not,
            # even after the sequence has ended (its start was already on its way). If it
            # did, the stop cancelled it (or, once sent, left it) and it emitted its own
            # event: one that arrives must be the one its real end emits.
            first_id = f"email:{key}-unsub:first"

            def arrived() -> tuple[dict[str, list[str]], list[str] | None]:
                got: dict[str, list[str]] = {}
                for r in receiver.events("/hooks"):
                    if key in _subject(r.payload):
                        got.setdefault(_subject(r.payload), []).append(r.payload["type"])
                first_events = got.pop(first_id, None)
                assert got == expected
                return got, first_events

            _, first_events = await assert_eventually(
                arrived, within=120, what="the events delivered"
            )
            if first_events is not None:
                status = (await pl.describe(f"{key}-unsub:first")).status
                assert first_events == [f"email.{status.value}"]
                assert f"email.{status.value}" in hook.events
            [cancelled] = [
                r
                for r in receiver.events()
                if r.payload["type"] == "email.cancelled"
                and _subject(r.payload) == f"email:{key}-dlq"
            ]
            assert cancelled.payload["data"]["status"] == "cancelled"
            assert "451 4.3.0" in cancelled.payload["data"]["reason"]
            [unsub] = [r for r in receiver.events() if r.payload["type"].endswith("unsubscribed")]
            assert unsub.payload["data"]["recipient"] == "di@example.test"
            # email.sent was not asked for: the sequences' emails made no delivery at all.
            subject = email_workflow_id(sequence_email_key(f"{key}-done", "only"))
            assert await _status_is(pl, sequence_email_key(f"{key}-done", "only"), EmailStatus.SENT)
            with pytest.raises(RPCError) as missing:
                await client.get_workflow_handle(webhook_workflow_id("ops", subject)).describe()
            assert missing.value.status == RPCStatusCode.NOT_FOUND


# -- a subscription a worker lacks, a receiver that trickles ----------------------------------


@pytest.mark.devserver
@pytest.mark.timeout(240)
async def test_webhooks_event_waits_for_a_worker_that_has_the_subscription(
    dev_env: WorkflowEnvironment, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rolling configuration change: the worker that picks the event up lacks the
    subscription. The event is retried, not dropped, and a worker that has it delivers it."""
    from postlane.ids import WORKFLOW_TASK_QUEUE
    from postlane.names import WorkflowType
    from postlane.webhooks import WebhookDeliveryInput

    monkeypatch.setenv(SECRET_ENV, SECRET)
    port = free_port()
    crm = WebhookConfig(
        name=f"crm-{key[-6:]}",
        url=f"http://127.0.0.1:{port}/hooks",
        events=[WebhookEventType.EMAIL_SENT],
        secret_env=SECRET_ENV,
        retry=FAST_RETRY,
    )
    subject = email_workflow_id(key)
    event = WebhookEvent(
        id=f"msg_{key}",
        type=WebhookEventType.EMAIL_SENT,
        timestamp=datetime.now(UTC),
        data={"key": key},
    )
    client = dev_env.client
    with SmtpCatcher() as smtp, _receiver(port) as receiver:
        receiver.start()
        lanes = [catcher_lane(default_test_lane(), smtp)]
        async with running_workers(dev_env, Settings(lanes=lanes)):  # no [[webhooks]]
            handle = await client.start_workflow(
                WorkflowType.WEBHOOK_DELIVERY,
                WebhookDeliveryInput(
                    subscription=crm.name, url=crm.url, subject=subject, retry=crm.retry
                ),
                id=webhook_workflow_id(crm.name, subject),
                task_queue=WORKFLOW_TASK_QUEUE,
                start_signal=WebhookMessages.ENQUEUE,
                start_signal_args=[event],
            )

            async def retried() -> bool:
                pending = (await handle.describe()).raw_description.pending_activities
                return bool(pending) and pending[0].attempt >= 2

            await assert_eventually(retried, within=60, what="the attempt retried")
            assert receiver.events() == []
        async with running_workers(dev_env, Settings(lanes=lanes, webhooks=[crm])):
            [got] = await assert_eventually(
                receiver.events, within=60, what="delivered by a worker that has it"
            )
            assert got.headers["webhook-id"] == event.id
            assert got.payload["data"] == {"key": key}


async def test_webhooks_answer_trickled_past_the_request_timeout_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx's timeout bounds each read: a receiver sending its answer a byte at a time
    never trips it. The whole POST is bounded, so the attempt fails and is retried."""
    from temporalio.exceptions import ApplicationError
    from temporalio.testing import ActivityEnvironment

    from activities.webhooks import WebhookActivities
    from postlane.webhooks import WEBHOOK_FAILED, WebhookRequest

    monkeypatch.setenv(SECRET_ENV, SECRET)
    finished = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n")
        try:
            for _ in range(40):  # 40 bytes over about 8 s: every read well within 1 s
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.2)
            finished.set()
        except ConnectionError:
            pass  # the client gave up: what the test wants
        finally:
            writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hook = WebhookConfig(
        name="slow",
        url=f"http://127.0.0.1:{port}/hooks",
        events=[WebhookEventType.EMAIL_SENT],
        secret_env=SECRET_ENV,
    )
    hooks = WebhookActivities(
        Settings(lanes=[default_test_lane()], webhooks=[hook]),
        None,  # type: ignore[arg-type]  # delivering never uses the Temporal client
        request_timeout=1.0,
    )
    event = WebhookEvent(
        id="msg_slow", type=WebhookEventType.EMAIL_SENT, timestamp=datetime.now(UTC)
    )
    try:
        async with server:
            with pytest.raises(ApplicationError) as failed:
                await ActivityEnvironment().run(
                    hooks.deliver_webhook, WebhookRequest(subscription="slow", event=event)
                )
    finally:
        await hooks.close()
    assert failed.value.type == WEBHOOK_FAILED and not failed.value.non_retryable
    assert "no complete answer within 1 s" in str(failed.value)
    assert not finished.is_set()
