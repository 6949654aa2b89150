"""Replay of the reputation guard's paths: a lane paused by hard bounces and resumed, an
email that waited through the pause, and an email that ended ``suppressed``.

Record again (only for a deliberate, versioned change) with::

    POSTLANE_RECORD_HISTORIES=1 .venv/bin/pytest tests/test_reputation_replay.py
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from activities import guard as guard_activities
from postlane import Email, EmailStatus, PermanentDeliveryError
from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.connection import data_converter
from postlane.dev.catcher import SmtpCatcher
from postlane.errors import RecipientSuppressed
from postlane.ids import email_workflow_id, lane_workflow_id
from postlane.lanes.guard import GuardSettings, OutcomeReport
from postlane.names import LaneMessages
from postlane.testing import catcher_lane, running_workers
from tests.procs import assert_eventually
from workflows import WORKFLOWS, workflow_runner

HISTORIES = Path(__file__).parent / "histories"
GUARDED = LaneConfig(
    name="guarded",
    senders=["*@guarded.test"],
    smtp_host="127.0.0.1",
    rate_per_second=50,
    guard=GuardSettings(min_sample=2, hard_bounce_rate=0.5),
)
FILES = {
    "lane_guard_paused": lane_workflow_id("guarded"),
    "lane_report_once": lane_workflow_id("guarded"),
    "send_email_lane_paused": email_workflow_id("replay-waited"),
    "send_email_suppressed": email_workflow_id("replay-suppressed"),
}
"""The recorded histories (the IDs are labels: replay does not compare them)."""


def _email(to: str) -> Email:
    return Email(sender="news@guarded.test", to=[to], subject="Replay", text="hello")


async def _replay(history: WorkflowHistory) -> None:
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(history)


@pytest.mark.devserver
@pytest.mark.timeout(180)
async def test_replay_fresh_guard_histories(
    dev_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorded on the dev server (the time-skipping one jumps an idle lane to its run
    timeout while a client waits)."""
    # Every send asks the lane: the good email below is refused, never let through.
    monkeypatch.setattr(guard_activities, "PAUSE_CHECK_EVERY", 0.0)
    # Keys and addresses are the run's own: the dev server lives for the whole session,
    # and a second run must not find the first one's workflows or suppressions.
    run = uuid.uuid4().hex[:6]
    gone = [f"gone{n}-{run}@example.test" for n in range(2)]
    with SmtpCatcher() as smtp:
        lane = catcher_lane(GUARDED.model_copy(update={"name": f"guarded-{run}"}), smtp)
        settings = Settings(lanes=[lane])
        async with running_workers(dev_env, settings):
            pl = PostlaneClient(dev_env.client, settings)
            for n, address in enumerate(gone):
                smtp.reject_recipient(address)
                with pytest.raises(PermanentDeliveryError):
                    handle = await pl.send(_email(address), key=f"{run}-b{n}")
                    await handle.result()

            async def paused() -> bool:
                status = (await pl.lanes.get(lane.name)).status
                return status is not None and status.paused

            await assert_eventually(paused, what="the lane paused")
            waited = await pl.send(_email(f"fine-{run}@example.test"), key=f"{run}-waited")

            async def waiting() -> bool:
                report = await pl.describe(waited.key)
                return report.status == EmailStatus.SCHEDULED and "paused" in (
                    report.last_error or ""
                )

            await assert_eventually(waiting, what="the email waits for the lane")
            assert smtp.messages == []
            await pl.lanes.resume(lane.name)
            await asyncio.wait_for(waited.result(), timeout=60)
            assert len(smtp.messages) == 1
            suppressed = await pl.send(_email(gone[0]), key=f"{run}-suppressed")
            with pytest.raises(RecipientSuppressed):
                await asyncio.wait_for(suppressed.result(), timeout=60)
            ids = {
                "lane_guard_paused": lane_workflow_id(lane.name),
                "send_email_lane_paused": email_workflow_id(waited.key),
                "send_email_suppressed": email_workflow_id(suppressed.key),
            }
            for file, workflow_id in ids.items():
                history = await pl.temporal.get_workflow_handle(workflow_id).fetch_history()
                await _replay(history)
                if os.environ.get("POSTLANE_RECORD_HISTORIES"):
                    (HISTORIES / f"{file}.json").write_text(history.to_json())


@pytest.mark.parametrize("file", sorted(FILES))
async def test_replay_recorded_guard_history(file: str) -> None:
    text = (HISTORIES / f"{file}.json").read_text()
    await _replay(WorkflowHistory.from_json(FILES[file], text))


@pytest.mark.devserver
@pytest.mark.timeout(120)
async def test_replay_fresh_report_once_history(dev_env: WorkflowEnvironment) -> None:
    """An inbound complaint reported twice (a poll retried after it reported) counts once
    (`REPORT_ONCE_PATCH`); another one counts too."""
    run = uuid.uuid4().hex[:6]
    lane = GUARDED.model_copy(update={"name": f"guarded-{run}"})
    settings = Settings(lanes=[lane])
    async with running_workers(dev_env, settings):
        pl = PostlaneClient(dev_env.client, settings)

        async def started() -> bool:
            return (await pl.lanes.get(lane.name)).status is not None

        await assert_eventually(started, what="the lane's workflow running")
        handle = pl.temporal.get_workflow_handle(lane_workflow_id(lane.name))
        for report_id in ("<arf-1@fbl.example>", "<arf-1@fbl.example>", "<arf-2@fbl.example>"):
            await handle.signal(
                LaneMessages.RECORD_OUTCOMES,
                OutcomeReport(complaints=1, detail="complaint abuse", inbound_id=report_id),
            )

        async def complaints() -> int | None:
            status = (await pl.lanes.get(lane.name)).status
            return status.guard.complaints if status and status.guard else None

        await assert_eventually(lambda: _settled(handle), what="the lane took all three")
        assert await complaints() == 2
        history = await handle.fetch_history()
        await _replay(history)
        if os.environ.get("POSTLANE_RECORD_HISTORIES"):
            (HISTORIES / "lane_report_once.json").write_text(history.to_json())


async def _settled(handle: WorkflowHandle[Any, Any]) -> bool:
    """The lane received three reports and has no workflow task in flight."""
    events = (await handle.fetch_history()).events
    reports = sum(
        e.workflow_execution_signaled_event_attributes.signal_name == LaneMessages.RECORD_OUTCOMES
        for e in events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    )
    return reports == 3 and events[-1].event_type not in (
        EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
    )
