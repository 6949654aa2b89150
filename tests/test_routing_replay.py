"""Replay of the routing paths' recorded histories (per-domain backoff, circuit, failover).

Recorded on the dev server by tests/test_routing.py (see its docstring); replaying them
against today's workflow code fails on any non-deterministic change to those paths.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from postlane.connection import data_converter
from workflows import WORKFLOWS, workflow_runner

HISTORIES = Path(__file__).parent / "histories"

RECORDED = {
    # A receiving domain answered 421 4.7.0: the lane set its fairness weight (patched).
    "lane_domain_backoff": "lane:recorded",
    # The provider was reported down (circuit open), then a probe closed the circuit.
    "lane_circuit": "lane:recorded",
    # A send refused for an open circuit moved to the failover lane and was sent there.
    "send_email_failed_over": None,
}


@pytest.mark.parametrize("name", sorted(RECORDED))
async def test_replay_recorded_routing_history(name: str) -> None:
    text = (HISTORIES / f"{name}.json").read_text()
    workflow_id = RECORDED[name] or _email_id(text)
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(WorkflowHistory.from_json(workflow_id, text))


def _email_id(text: str) -> str:
    from tests.test_replay import _recorded_workflow_id

    return _recorded_workflow_id(text)
