"""Replay of sequence histories: a change to SequenceWorkflow must not break running ones.

Record again (only for a deliberate, versioned change) with::

    POSTLANE_RECORD_HISTORIES=1 .venv/bin/pytest tests/test_sequence_replay.py
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from postlane.connection import data_converter
from postlane.ids import sequence_workflow_id
from postlane.testing import PostlaneTestEnv
from tests.procs import assert_eventually
from tests.test_sequences import DAY, at_step, bob, compose_spec, finished, reply_event, report
from tests.test_sequences import three_step_spec as spec
from workflows import WORKFLOWS, workflow_runner

HISTORIES = Path(__file__).parent / "histories"


async def _replied(pl: PostlaneTestEnv, key: str) -> None:
    await pl.client.sequences.start(spec(), bob(), key=key)
    await at_step(pl, key, "wait1", 1)
    await pl.sleep(5 * DAY)
    await pl.client.sequences.record_reply(reply_event(await at_step(pl, key, "wait2", 2)))
    await assert_eventually(lambda: finished(pl, key))


async def _paused_then_continued_as_new(pl: PostlaneTestEnv, key: str) -> None:
    handle = await pl.client.sequences.start(spec(), bob(), key=key, history_limit=10)
    await at_step(pl, key, "wait1", 1)
    await pl.client.sequences.pause(key)
    await assert_eventually(lambda: _paused(pl, key))
    await pl.client.sequences.resume(key)
    await handle.result()


async def _paused(pl: PostlaneTestEnv, key: str) -> bool:
    return (await report(pl, key)).paused


async def _composed_and_approved(pl: PostlaneTestEnv, key: str) -> None:
    await pl.client.sequences.start(compose_spec(approval=True), bob(), key=key)
    await pl.sleep(3 * DAY)

    async def held() -> bool:
        return (await report(pl, key)).draft is not None

    await assert_eventually(held)
    await pl.client.sequences.approve(key, "nudge", subject="Re: Hello again")
    await assert_eventually(lambda: finished(pl, key))


SCENARIOS: dict[str, Callable[[PostlaneTestEnv, str], Awaitable[None]]] = {
    "replied": _replied,
    "continued_as_new": _paused_then_continued_as_new,
    "composed": _composed_and_approved,
}


async def _replay(history: WorkflowHistory) -> None:
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(history)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_replay_fresh_sequence_history(pl: PostlaneTestEnv, key: str, name: str) -> None:
    # `pl` is this test's own server: a query racing continue-as-new that locks the Java
    # test server's clock would fail this test only.
    await SCENARIOS[name](pl, key)
    # The first run: for continue-as-new, the one that carried its state over.
    first_run = (
        await pl.client.temporal.get_workflow_handle(sequence_workflow_id(key)).describe()
    ).raw_description.workflow_execution_info.first_run_id
    history = await pl.client.temporal.get_workflow_handle(
        sequence_workflow_id(key), run_id=first_run or None
    ).fetch_history()
    await _replay(history)
    if os.environ.get("POSTLANE_RECORD_HISTORIES"):
        (HISTORIES / f"sequence_{name}.json").write_text(history.to_json())


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_replay_recorded_sequence_history(name: str) -> None:
    path = HISTORIES / f"sequence_{name}.json"
    assert path.exists(), f"record {path.name}: see this module's docstring"
    await _replay(WorkflowHistory.from_json("sequence:recorded", path.read_text()))
