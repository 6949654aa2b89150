"""A cancel never rewrites what already happened, and is never swallowed: on the real dev
server, with a real SMTP catcher (and a real webhook receiver where events are involved).

- A cancel that lands while a ``sent`` email emits its webhook event leaves it ``sent``
  with its receipt (the server has the mail).
- A cancel that waited for a send the paused lane refused ends the email ``cancelled``;
  nothing goes out after the lane resumes.
- Attempts that failed before a send was held by a paused lane still count.

Each test gates one step of the real code path (the emit, or the guard's check) with an
`asyncio.Event`, so the cancel or pause lands exactly there; the outcome is read from the
workflow's history on the server and the raw bytes the SMTP server received.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

import postlane.worker
from activities import smtp as smtp_module
from activities.guard import SendGuard
from activities.smtp import SmtpActivities
from activities.webhooks import WebhookActivities
from postlane import PermanentDeliveryError
from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.connection import data_converter
from postlane.email.models import EmailStatus, SmtpSendRequest
from postlane.ids import email_workflow_id, lane_workflow_id
from postlane.lanes.models import ProviderReport
from postlane.names import Activity, LaneMessages
from postlane.testing import SmtpCatcher, running_workers
from postlane.webhooks import WebhookConfig, WebhookEmit, WebhookEmitted, WebhookEventType
from tests.procs import assert_eventually, free_port
from tests.test_cancel import closing_event, raw_message_ids, replays
from tests.test_integration import an_email, new_lane
from tests.test_webhooks import FAST_RETRY, SECRET, SECRET_ENV, _receiver
from workflows import WORKFLOWS, workflow_runner

pytestmark = pytest.mark.devserver

OUTAGE = "451 4.3.0 mailbox temporarily unavailable"


async def event_types(client: Client, workflow_id: str) -> list[EventType.ValueType]:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return [e.event_type for e in history.events]


async def patches(client: Client, workflow_id: str) -> list[str]:
    """The patch IDs whose markers the workflow's history holds."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    found = []
    for e in history.events:
        if e.event_type != EventType.EVENT_TYPE_MARKER_RECORDED:
            continue
        attrs = e.marker_recorded_event_attributes
        if attrs.marker_name == "core_patch":
            data = attrs.details["patch-data"].payloads[0].data
            found.append(json.loads(data)["id"])
    return found


async def worker_saw_cancel(client: Client, workflow_id: str) -> bool:
    """Has a worker completed a workflow task after the cancel request was recorded?"""
    types = await event_types(client, workflow_id)
    if EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED not in types:
        return False
    after = types[types.index(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED) :]
    return EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in after


def hold_emit(
    monkeypatch: pytest.MonkeyPatch, kind: WebhookEventType
) -> tuple[asyncio.Event, asyncio.Event, WebhookConfig]:
    """Workers whose real emit of `kind` waits for the test; a subscription to every event."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    emitting, release = asyncio.Event(), asyncio.Event()

    class HeldEmit(WebhookActivities):
        """The real emit, held while the test cancels the email."""

        @activity.defn(name=Activity.EMIT_WEBHOOK_EVENT)
        async def emit_webhook_event(self, emit: WebhookEmit) -> WebhookEmitted:
            if emit.event.type == kind:
                emitting.set()
                await release.wait()
            return await super().emit_webhook_event(emit)

    monkeypatch.setattr(postlane.worker, "WebhookActivities", HeldEmit)
    hooks = WebhookConfig(
        name="crm",
        url=f"http://127.0.0.1:{free_port()}/hooks",
        events=list(WebhookEventType),
        secret_env=SECRET_ENV,
        retry=FAST_RETRY,
    )
    return emitting, release, hooks


async def cancel_while_held(
    client: Client, workflow_id: str, emitting: asyncio.Event, release: asyncio.Event
) -> None:
    """Cancel the email while its emit is held; let the emit go once the worker has seen it."""
    await asyncio.wait_for(emitting.wait(), timeout=60)
    await client.get_workflow_handle(workflow_id).cancel()
    # The worker holds the emit's workflow task open and hands it the cancel at its next
    # task heartbeat: only then is the emit let finish.
    await assert_eventually(
        lambda: worker_saw_cancel(client, workflow_id),
        within=60,
        what="the worker received the cancel while the emit was held",
    )
    release.set()


def port_of(hooks: WebhookConfig) -> int:
    return int(hooks.url.split(":")[2].split("/")[0])


@pytest.mark.timeout(180)
async def test_cancel_while_the_sent_event_is_emitted_leaves_the_email_sent(
    dev_env: WorkflowEnvironment, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    emitting, release, hooks = hold_emit(monkeypatch, WebhookEventType.EMAIL_SENT)
    with SmtpCatcher() as smtp, _receiver(port_of(hooks)) as receiver:
        receiver.start()
        lane = new_lane(smtp)
        settings = Settings(lanes=[lane], webhooks=[hooks])
        pl = PostlaneClient(dev_env.client, settings)
        async with running_workers(dev_env, settings):
            handle = await pl.send(an_email(), key=key)
            workflow_id = email_workflow_id(key)
            await cancel_while_held(dev_env.client, workflow_id, emitting, release)

            receipt = await handle.result()
            assert await pl.status(key) == EmailStatus.SENT
            assert await closing_event(pl, workflow_id) == (
                EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
            )
            assert raw_message_ids(smtp.messages) == [receipt.message_id]
            assert "postlane-settled-notify" in await patches(dev_env.client, workflow_id)

            def delivered() -> list[str]:
                return [r.payload["type"] for r in receiver.events()]

            await assert_eventually(
                lambda: delivered() == ["email.sent"], within=60, what="email.sent delivered"
            )
            await replays(pl, workflow_id, "send_email_cancel_while_notifying_sent")
    assert raw_message_ids(smtp.messages) == [receipt.message_id]


@pytest.mark.timeout(180)
async def test_cancel_while_the_failed_event_is_emitted_leaves_the_email_failed(
    dev_env: WorkflowEnvironment, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    emitting, release, hooks = hold_emit(monkeypatch, WebhookEventType.EMAIL_FAILED)
    with SmtpCatcher() as smtp, _receiver(port_of(hooks)) as receiver:
        receiver.start()
        smtp.fail("data", "550 5.7.1 message refused")
        lane = new_lane(smtp)
        settings = Settings(lanes=[lane], webhooks=[hooks])
        pl = PostlaneClient(dev_env.client, settings)
        async with running_workers(dev_env, settings):
            handle = await pl.send(an_email(), key=key)
            workflow_id = email_workflow_id(key)
            await cancel_while_held(dev_env.client, workflow_id, emitting, release)

            with pytest.raises(PermanentDeliveryError, match="550"):
                await handle.result()
            assert await pl.status(key) == EmailStatus.FAILED
            assert await closing_event(pl, workflow_id) == (
                EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED
            )
            assert smtp.messages == []
            assert sum(session.count("DATA") for session in smtp.sessions) == 1

            def delivered() -> list[str]:
                return [r.payload["type"] for r in receiver.events()]

            await assert_eventually(
                lambda: delivered() == ["email.failed"], within=60, what="email.failed delivered"
            )


def held_check(
    should_hold: Callable[[], bool],
) -> tuple[asyncio.Event, asyncio.Event, Callable[..., Awaitable[None]]]:
    """A `SendGuard.check` that waits for the test (when `should_hold`) before checking."""
    checking, release = asyncio.Event(), asyncio.Event()
    original = SendGuard.check

    async def check(self: SendGuard, req: SmtpSendRequest) -> None:
        if should_hold():
            checking.set()
            await release.wait()
            # What the guard cached before the test paused the lane must not hide the pause.
            self._open_until.clear()
        await original(self, req)

    return checking, release, check


async def pause_lane(pl: PostlaneClient, lane: str) -> None:
    await pl.lanes.pause(lane, reason="held by the test")

    async def paused() -> bool:
        status = (await pl.lanes.get(lane)).status
        return status is not None and status.paused

    await assert_eventually(paused, within=60, what="the lane paused")


async def cancel_the_held_send(
    client: Client, pl: PostlaneClient, key: str, release: asyncio.Event
) -> list[EventType.ValueType]:
    """Cancel the email whose send is held, release the send once the workflow has asked to
    cancel it, and wait for the email to end cancelled; returns its history's event types.

    The send is then refused (the test's reason), not cancelled: the history shows it failed.
    """
    workflow_id = email_workflow_id(key)
    await client.get_workflow_handle(workflow_id).cancel()

    async def send_cancel_requested() -> bool:
        types = await event_types(client, workflow_id)
        return EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED in types

    await assert_eventually(send_cancel_requested, within=60, what="send cancel asked")
    release.set()

    async def ended() -> bool:
        return await closing_event(pl, workflow_id) == (
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED
        )

    await assert_eventually(ended, within=60, what="the email ended cancelled")
    assert await pl.status(key) == EmailStatus.CANCELLED
    types = await event_types(client, workflow_id)
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED in types  # refused, not cancelled
    return types


@pytest.mark.timeout(180)
async def test_cancel_of_a_send_the_paused_lane_refuses_ends_cancelled(
    dev_env: WorkflowEnvironment, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    checking, release, check = held_check(lambda: True)
    monkeypatch.setattr(SendGuard, "check", check)
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp)
        pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
        async with running_workers(dev_env, pl.settings):
            await pause_lane(pl, lane.name)
            await pl.send(an_email(), key=key)
            await asyncio.wait_for(checking.wait(), timeout=60)
            # The workflow takes the cancel and waits for its send, which the guard refuses
            # (LanePaused).
            await cancel_the_held_send(dev_env.client, pl, key, release)
            workflow_id = email_workflow_id(key)
            assert "postlane-cancel-before-refusal" in await patches(dev_env.client, workflow_id)

            # After the resume, a later email goes; the cancelled one never does.
            await pl.lanes.resume(lane.name)
            later = await (await pl.send(an_email("later"), key=f"{key}-later")).result()
            assert raw_message_ids(smtp.messages) == [later.message_id]
            await replays(pl, workflow_id, "send_email_cancel_refused_by_paused_lane")


@pytest.mark.timeout(180)
async def test_cancel_of_a_send_an_open_circuit_refuses_ends_cancelled(
    dev_env: WorkflowEnvironment, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The send reads the lane's circuit after the cancel landed, finds it open, and is
    refused to move to the failover lane: the email ends cancelled, not failed over, and
    neither provider gets it, nor does a dead-letter retry afterwards."""
    monkeypatch.setattr(smtp_module, "CIRCUIT_FRESH", 0.0)  # read the circuit afresh
    checking, release = asyncio.Event(), asyncio.Event()
    original = SmtpActivities._refuse_if_circuit_open

    async def held(self: SmtpActivities, req: SmtpSendRequest, attempt: int) -> None:
        checking.set()
        await release.wait()
        await original(self, req, attempt)

    monkeypatch.setattr(SmtpActivities, "_refuse_if_circuit_open", held)
    with SmtpCatcher() as primary, SmtpCatcher() as backup:
        backup_lane = new_lane(backup, senders=["*@backup.test"])
        lane = new_lane(primary, failover=backup_lane.name)
        pl = PostlaneClient(dev_env.client, Settings(lanes=[lane, backup_lane]))
        async with running_workers(dev_env, pl.settings):
            await pl.send(an_email(), key=key)
            await asyncio.wait_for(checking.wait(), timeout=60)
            # The provider is reported down (as sends report refused connections).
            await dev_env.client.get_workflow_handle(lane_workflow_id(lane.name)).signal(
                LaneMessages.PROVIDER_DOWN, ProviderReport(reply="Connect call failed")
            )

            async def circuit_open() -> bool:
                status = (await pl.lanes.get(lane.name)).status
                return status is not None and status.circuit == "open"

            await assert_eventually(circuit_open, within=60, what="the circuit open")
            types = await cancel_the_held_send(dev_env.client, pl, key, release)
            # One send, refused (CircuitOpen); none scheduled on the failover lane after it.
            assert types.count(EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED) == 1
            progress = await pl.dlq.retry_all(lane=lane.name)
            assert progress.total == 0
            progress = await pl.dlq.retry_all(lane=backup_lane.name)
            assert progress.total == 0
            assert primary.messages == [] and backup.messages == []
            assert primary.sessions == [] and backup.sessions == []
            # The open circuit would keep the lane probing (and waking on any worker of
            # later tests on this shared server): end it.
            await dev_env.client.get_workflow_handle(lane_workflow_id(lane.name)).terminate(
                reason="test over"
            )


@pytest.mark.timeout(180)
async def test_attempts_failed_before_a_paused_lane_held_the_send_still_count(
    dev_env: WorkflowEnvironment, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def second_attempt() -> bool:
        return activity.in_activity() and activity.info().attempt >= 2

    checking, release, check = held_check(second_attempt)
    monkeypatch.setattr(SendGuard, "check", check)
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp)
        pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
        smtp.fail("data", OUTAGE, times=1)
        async with running_workers(dev_env, pl.settings):
            handle = await pl.send(an_email(), key=key)
            await asyncio.wait_for(checking.wait(), timeout=60)  # attempt 1 failed at DATA
            await pause_lane(pl, lane.name)
            release.set()

            async def held() -> bool:
                report = await pl.describe(key)
                return report.status == EmailStatus.SCHEDULED and "paused" in (
                    report.last_error or ""
                )

            await assert_eventually(held, within=60, what="the email held by the paused lane")
            assert (await pl.describe(key)).attempts == 1
            await pl.lanes.resume(lane.name)
            receipt = await handle.result()
            assert receipt.attempts == 2
            assert (await pl.describe(key)).attempts == 2
            assert raw_message_ids(smtp.messages) == [receipt.message_id]
            # Both attempts reached the server: one DATA refused, one accepted.
            assert sum(session.count("DATA") for session in smtp.sessions) == 2
            found = await patches(dev_env.client, email_workflow_id(key))
            assert "postlane-settled-attempts" in found
            assert "postlane-lane-paused" in found
            await replays(pl, email_workflow_id(key), "send_email_paused_after_failed_attempt")


HISTORIES = Path(__file__).parent / "histories"
RECORDED = [
    "send_email_cancel_while_notifying_sent",
    "send_email_cancel_refused_by_paused_lane",
    "send_email_paused_after_failed_attempt",
    # Recorded by the code before the patches, the bugs and all: the cancel ended the sent
    # email cancelled; the paused lane swallowed the cancel and the email went after the
    # resume; the failed attempt before the pause was not counted.
    "send_email_cancel_while_notifying_sent_v0",
    "send_email_cancel_refused_by_paused_lane_v0",
    "send_email_paused_after_failed_attempt_v0",
]
"""Histories of the tests above (``POSTLANE_RECORD_HISTORIES=1`` records them again)."""


@pytest.mark.parametrize("name", RECORDED)
async def test_recorded_settled_histories_replay(name: str) -> None:
    text = (HISTORIES / f"{name}.json").read_text()
    started = json.loads(text)["events"][0]["workflowExecutionStartedEventAttributes"]
    key = json.loads(base64.b64decode(started["input"]["payloads"][0]["data"]))["key"]
    history = WorkflowHistory.from_json(email_workflow_id(key), text)
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(history)
