"""A paused lane keeps its history bounded while its emails ask again and again.

On the time-skipping server: the lane is paused, emails on it re-ask every few minutes for
hours; the lane must continue as new (a new run ID on the server) with the pause in its
state, hold one request per email, and send nothing until resumed, then each email once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.worker import Replayer

from postlane import Email
from postlane.connection import data_converter
from postlane.ids import lane_workflow_id
from postlane.lanes.guard import PAUSE_MEMO, LanePause
from postlane.lanes.models import LaneState
from postlane.testing import PostlaneTestEnv, postlane_test_env
from tests.conftest import TINY_LANE
from tests.procs import assert_eventually
from workflows import WORKFLOWS, workflow_runner
from workflows import lane as lane_module

SHORT_HISTORY = 60
"""The lane's history limits for the test: re-asks alone pass it within the hour."""


@pytest_asyncio.fixture
async def pl() -> AsyncIterator[PostlaneTestEnv]:
    """A time-skipping environment with the capped lane ``tiny`` (its emails ask for slots)."""
    async with postlane_test_env([TINY_LANE]) as env:
        yield env


def email(n: int) -> Email:
    return Email(sender="news@tiny.test", to=[f"r{n}@example.test"], subject=f"#{n}", text="hi")


async def pause_of(handle: WorkflowHandle[object, object]) -> LanePause:
    """The pause the lane's current run publishes in its memo (what the send path reads)."""
    desc = await handle.describe()
    return await desc.memo_value(PAUSE_MEMO, LanePause(), type_hint=LanePause)


async def started_with(pl: PostlaneTestEnv, handle: WorkflowHandle[object, object]) -> LaneState:
    """The state the lane's current run was started (continued as new) with."""
    history = await handle.fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    [state] = await pl.client.temporal.data_converter.decode(started.input.payloads, [LaneState])
    assert isinstance(state, LaneState)
    return state


async def test_a_paused_lane_continues_as_new_still_paused_and_sends_nothing(
    pl: PostlaneTestEnv, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lane_module, "RUN_HISTORY", SHORT_HISTORY)
    monkeypatch.setattr(lane_module, "MAX_HISTORY", SHORT_HISTORY)
    monkeypatch.setattr(lane_module, "PACED_MAX_HISTORY", SHORT_HISTORY)
    handle = pl.client.temporal.get_workflow_handle(lane_workflow_id("tiny"))
    await pl.client.lanes.pause("tiny", reason="held by the test")

    async def paused() -> bool:
        return (await pause_of(handle)).paused

    await assert_eventually(paused, what="the lane paused")
    first_run = (await handle.describe()).run_id
    handles = [await pl.client.send(email(n), key=f"{key}-{n}") for n in range(3)]

    await pl.sleep(timedelta(hours=2))  # every email asks again every few minutes

    desc = await handle.describe()
    assert desc.run_id != first_run, "the paused lane never continued as new"
    pause = await pause_of(handle)
    assert pause.paused and pause.reason == "held by the test"
    state = await started_with(pl, handle)
    assert state.pause.paused
    asked = [r.workflow_id for r in state.arrived]
    assert sorted(asked) == sorted(h.workflow_id for h in handles), "one request per email"
    assert pl.outbox == []
    # The first run: paused, it recorded the patch and continued as new; it replays.
    first = await pl.client.temporal.get_workflow_handle(
        lane_workflow_id("tiny"), run_id=first_run
    ).fetch_history()
    assert first.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    assert any(
        e.marker_recorded_event_attributes.details["patch-data"]
        .payloads[0]
        .data.find(lane_module.PAUSED_HISTORY_PATCH.encode())
        >= 0
        for e in first.events
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
    )
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(first)

    await pl.client.lanes.resume("tiny")
    receipts = [await h.result() for h in handles]
    assert sorted(m.message_id for m in pl.outbox) == sorted(r.message_id for r in receipts)
