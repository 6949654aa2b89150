"""Replay: workflow code changes must not break histories of emails already running.

``tests/histories/*.json`` were recorded from real runs; replaying them against today's
workflow code fails on any non-deterministic change. Record again (only when the change
is deliberately incompatible and versioned) with::

    POSTLANE_RECORD_HISTORIES=1 .venv/bin/pytest tests/test_replay.py
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from postlane import Email, EmailCancelled, EmailStatus, PermanentDeliveryError
from postlane.config import LaneConfig
from postlane.connection import data_converter
from postlane.ids import (
    email_workflow_id,
    inbox_workflow_id,
    lane_workflow_id,
    sequence_workflow_id,
    suppression_workflow_id,
    unsubscribe_token,
)
from postlane.inbound.inboxes import start_inbox_watcher
from postlane.names import EmailMemo
from postlane.sequences.models import SequenceStatus
from postlane.testing import PostlaneTestEnv, postlane_test_env
from tests.conftest import TINY_LANE
from tests.procs import assert_eventually
from tests.test_inbound import unsubscribe_mail
from tests.test_inbox_watcher import FOLLOW_UP, SENDER, FakeImap, enroll, new_inbox, recipient
from tests.test_inbox_watcher import imap as imap  # noqa: F401  (the fixture)
from workflows import WORKFLOWS, workflow_runner
from workflows import lane as lane_module

HISTORIES = Path(__file__).parent / "histories"


def _email(sender: str = "agent@acme.test") -> Email:
    return Email(sender=sender, to=["bob@example.test"], subject="Replay", text="hello")


async def _sent(pl: PostlaneTestEnv, key: str) -> None:
    await (await pl.client.send(_email(), key=key, priority="high")).result()


async def _scheduled(pl: PostlaneTestEnv, key: str) -> None:
    send_at = await pl.now() + timedelta(days=2)
    await (await pl.client.send(_email(), key=key, send_at=send_at)).result()


async def _failed(pl: PostlaneTestEnv, key: str) -> None:
    pl.smtp.fail("data", "550 5.1.1 no such user")
    with pytest.raises(PermanentDeliveryError):
        await (await pl.client.send(_email(), key=key)).result()


async def _cancelled(pl: PostlaneTestEnv, key: str) -> None:
    handle = await pl.client.send(_email(), key=key, send_at=await pl.now() + timedelta(days=1))
    await pl.client.cancel(key)
    with pytest.raises(EmailCancelled):
        await handle.result()


async def _dead_letter_retried(pl: PostlaneTestEnv, key: str) -> None:
    pl.smtp.fail("data", "451 4.3.0 try later", times=3)
    handle = await pl.client.send(_email("ops@fragile.test"), key=key)
    for _ in range(60):
        if await pl.client.status(key) == EmailStatus.DEAD_LETTER:
            break
        await pl.sleep(timedelta(seconds=30))
    assert await pl.client.retry(key)
    await handle.result()


async def _dead_letter_parked_at(pl: PostlaneTestEnv, key: str) -> None:
    """Since the ``postlane-parked-at`` patch: attempt signals, the marker, PostlaneParkedAt."""
    pl.smtp.fail("rcpt", "452 4.2.2 mailbox full", times=3)
    handle = await pl.client.send(_email("ops@fragile.test"), key=key)
    for _ in range(60):
        report = await pl.client.describe(key)
        if report.status == EmailStatus.DEAD_LETTER:
            break
        await pl.sleep(timedelta(seconds=30))
    assert report.parked_at is not None and len(report.attempt_history) == 3
    assert await pl.client.retry(key)
    await handle.result()


async def _dead_letter_memo(pl: PostlaneTestEnv, key: str) -> None:
    """Since the ``postlane-dead-letter-memo`` patch: parking also upserts the listing's memo."""
    await _dead_letter_parked_at(pl, key)
    history = await pl.client.temporal.get_workflow_handle(email_workflow_id(key)).fetch_history()
    modified = [e.workflow_properties_modified_event_attributes for e in history.events]
    assert any(EmailMemo.DEAD_LETTER in m.upserted_memo.fields for m in modified)


SCENARIOS: dict[str, Callable[[PostlaneTestEnv, str], Awaitable[None]]] = {
    "sent": _sent,
    "scheduled": _scheduled,
    "failed": _failed,
    "cancelled": _cancelled,
    "dead_letter_retried": _dead_letter_retried,
    "dead_letter_parked_at": _dead_letter_parked_at,
    "dead_letter_memo": _dead_letter_memo,
}


async def _replay(history: WorkflowHistory) -> None:
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(history)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_replay_fresh_history(pl: PostlaneTestEnv, key: str, name: str) -> None:
    await SCENARIOS[name](pl, key)
    workflow_ids = {f"send_email_{name}": f"email:{key}"}
    if name == "sent":
        workflow_ids["lane"] = "lane:test"  # configured, rate applied, waiting for requests
    for file, workflow_id in workflow_ids.items():
        history = await pl.client.temporal.get_workflow_handle(workflow_id).fetch_history()
        await _replay(history)
        if os.environ.get("POSTLANE_RECORD_HISTORIES"):
            (HISTORIES / f"{file}.json").write_text(history.to_json())


def _record(file: str, history: WorkflowHistory) -> None:
    if os.environ.get("POSTLANE_RECORD_HISTORIES"):
        (HISTORIES / f"{file}.json").write_text(history.to_json())


async def test_replay_fresh_lane_plan_history(key: str) -> None:
    """A capped lane's grant/plan path: two emails take the hour, two wait planned, then go."""
    async with postlane_test_env([TINY_LANE]) as pl:
        for n in range(2):
            await pl.client.send(_email("news@tiny.test"), key=f"{key}-now{n}")
        await assert_eventually(lambda: len(pl.outbox) == 2, what="the hour's two slots used")
        waiting = [
            await pl.client.send(_email("news@tiny.test"), key=f"{key}-next{n}", priority="bulk")
            for n in range(2)
        ]

        async def planned(k: str) -> bool:
            report = await pl.client.describe(k)
            return report.status == EmailStatus.SCHEDULED and report.scheduled_for is not None

        for h in waiting:
            await assert_eventually(lambda h=h: planned(h.key), what=f"{h.key} told its slot")
        await pl.sleep(timedelta(minutes=70))
        await assert_eventually(lambda: len(pl.outbox) == 4, what="both sent in the next hour")
        for file, workflow_id in [
            ("lane_planned", lane_workflow_id("tiny")),
            ("send_email_slot_planned", email_workflow_id(waiting[1].key)),
        ]:
            history = await pl.client.temporal.get_workflow_handle(workflow_id).fetch_history()
            await _replay(history)
            _record(file, history)


PACED_LANE = LaneConfig(
    name="paced", senders=["*@paced.test"], smtp_host="127.0.0.1", rate_per_second=0.1, hourly_cap=2
)
PACED_WINDOW = 1
"""The lane's window in the paced scenario: small, so two of three waiting emails are deferred."""


async def test_replay_fresh_lane_paced_history(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind the lane's window, deferred emails are told k / rate apart (`PACED_PATCH`)."""
    monkeypatch.setattr(lane_module, "WINDOW", PACED_WINDOW)
    async with postlane_test_env([PACED_LANE]) as pl:
        for n in range(2):
            await pl.client.send(_email("news@paced.test"), key=f"{key}-now{n}")
        await assert_eventually(lambda: len(pl.outbox) == 2, what="the hour's two slots used")
        waiting = [
            await pl.client.send(_email("news@paced.test"), key=f"{key}-next{n}", priority="bulk")
            for n in range(3)
        ]
        for h in waiting:
            await assert_eventually(lambda h=h: _planned(pl, h.key), what=f"{h.key} told its slot")
        await pl.sleep(timedelta(hours=2, minutes=10))
        await assert_eventually(lambda: len(pl.outbox) == 5, what="all three sent")
        history = await pl.client.temporal.get_workflow_handle(
            lane_workflow_id("paced")
        ).fetch_history()
        await _replay(history)
        _record("lane_paced", history)


@pytest.mark.parametrize("name", ["lane_paced_v1", "lane_paced"])
async def test_replay_recorded_lane_paced_history(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Recorded before the send hold and count-on-take patches (_v1), and under today's code."""
    monkeypatch.setattr(lane_module, "WINDOW", PACED_WINDOW)
    text = (HISTORIES / f"{name}.json").read_text()
    await _replay(WorkflowHistory.from_json(lane_workflow_id("paced"), text))


async def _planned(pl: PostlaneTestEnv, key: str) -> bool:
    report = await pl.client.describe(key)
    return report.status == EmailStatus.SCHEDULED and report.scheduled_for is not None


async def test_replay_fresh_inbox_and_suppression_history(
    pl: PostlaneTestEnv,
    imap: FakeImap,  # noqa: F811  (the fixture imported above)
    key: str,
) -> None:
    """The inbox watcher reads an unsubscribe; the sequence stops and suppresses; lifted."""
    await enroll(pl, FOLLOW_UP, key)
    inbox = new_inbox(imap)
    imap.mailboxes[inbox.name].append(
        unsubscribe_mail(unsubscribe_token(sequence_workflow_id(key)))
    )
    await start_inbox_watcher(pl.env.client, inbox)
    report = await pl.client.sequences.get(key).result()
    assert report.status == SequenceStatus.UNSUBSCRIBED
    address = recipient(key).address
    assert await pl.client.suppressions.lift(SENDER, address)
    suppression = pl.client.temporal.get_workflow_handle(suppression_workflow_id(SENDER, address))
    with pl.env.auto_time_skipping_disabled():
        await suppression.result()
    for file, workflow_id in [
        ("inbox_watcher", inbox_workflow_id(inbox.name)),
        ("suppression", suppression_workflow_id(SENDER, address)),
    ]:
        history = await pl.client.temporal.get_workflow_handle(workflow_id).fetch_history()
        await _replay(history)
        _record(file, history)


RECORDED = [
    *(f"send_email_{n}" for n in sorted(SCENARIOS)),
    "lane",
    # Recorded under the code before the lane's bounded window (_v1), before its send hold
    # and count-on-take patches (_v2): they must replay as they ran; and under today's code.
    *(f"{n}{v}" for n in ("lane_planned", "send_email_slot_planned") for v in ("_v1", "_v2", "")),
    *(f"{n}{v}" for n in ("inbox_watcher", "suppression") for v in ("_v1", "")),
    # Sent with the base32 Message-ID, before the worker sealed it (`send_email_sent` now
    # carries the sealed-message-id patch).
    "send_email_sent_v1",
    # A query during start split the workflow task right after `resolve_lane` returned; a
    # patch first asked for in the activation that resolved it used to fail this replay.
    "send_email_task_split_after_resolve",
]


@pytest.mark.parametrize("name", RECORDED)
async def test_replay_recorded_history(name: str) -> None:
    path = HISTORIES / f"{name}.json"
    assert path.exists(), f"record {path.name}: see this module's docstring"
    text = path.read_text()
    await _replay(WorkflowHistory.from_json(_recorded_workflow_id(text), text))


def _recorded_workflow_id(history_json: str) -> str:
    """The ID an email's recorded history ran under (its input's key), else a stand-in.

    Emails since the worker-authority patch check that their key matches their workflow
    ID, so they must replay under the ID they ran with.
    """
    started = json.loads(history_json)["events"][0]["workflowExecutionStartedEventAttributes"]
    payloads = started.get("input", {}).get("payloads", [])
    if payloads:
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            key = json.loads(base64.b64decode(payloads[0]["data"]))["key"]
            if isinstance(key, str) and key:
                return email_workflow_id(key)
    return "email:recorded"
