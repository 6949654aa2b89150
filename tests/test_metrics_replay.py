"""Replaying the recorded histories (tests/histories) records none of Postlane's metrics:
the workflows count only through ``workflow.metric_meter()``, which is silent in replay."""

from __future__ import annotations

from temporalio.client import WorkflowHistory
from temporalio.runtime import MetricBuffer, Runtime, TelemetryConfig
from temporalio.worker import Replayer

from postlane.connection import data_converter
from tests.test_replay import HISTORIES, RECORDED, _recorded_workflow_id
from workflows import WORKFLOWS, workflow_runner


async def test_replayed_histories_record_no_postlane_metric() -> None:
    """Histories with sends, dead letters, lane passes and sequence outcomes replay with a
    metric buffer attached; the buffer receives none of Postlane's metrics.

    With the dead-letter count recorded on the workflow meter's underlying (not
    replay-safe) meter instead, this test sees ``postlane_email_failures`` and fails."""
    buffer = MetricBuffer(100_000)
    runtime = Runtime(telemetry=TelemetryConfig(metrics=buffer))
    replayer = Replayer(
        workflows=WORKFLOWS,
        data_converter=data_converter(),
        workflow_runner=workflow_runner(),
        runtime=runtime,
    )
    files = [HISTORIES / f"{name}.json" for name in RECORDED]
    assert any("dead_letter" in f.name for f in files) and any("lane" in f.name for f in files)
    for file in files:
        text = file.read_text()
        history = WorkflowHistory.from_json(_recorded_workflow_id(text), text)
        await replayer.replay_workflow(history)
    # The control: a counter recorded outside any workflow reaches the buffer.
    runtime.metric_meter.create_counter("control").add(1)
    updates = buffer.retrieve_updates()
    names = {u.metric.name for u in updates}
    assert "control" in names, names
    assert not {n for n in names if n.startswith("postlane_")}, names
