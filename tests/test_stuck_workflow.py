"""A workflow whose task keeps failing: its traceback is logged once, not on every retry,
and `describe` (``postlane status``) answers at once and says why it is stuck.

The workflow is a test-only one that raises in its first task, run by a real worker against
a real server; the server's own count of the task's attempts (or its history) says how many
failures there were.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.email.models import EmailStatus
from postlane.ids import email_workflow_id
from postlane.logs import RepeatedWorkflowTaskFailures
from postlane.testing import PostlaneTestEnv, default_test_lane
from tests.procs import assert_eventually

REPO = Path(__file__).resolve().parents[1]
BROKEN = "deliberately broken for this test"
SDK_LOGGER = "temporalio.worker._workflow_instance"
DESCRIBE_DEADLINE_S = 5.0
"""Far under the 30 s a blocked query waited; describe answers in milliseconds."""


@workflow.defn(name="PostlaneTestBrokenWorkflow")
class BrokenWorkflow:
    @workflow.run
    async def run(self) -> None:
        raise RuntimeError(BROKEN)


async def task_attempt(client: Client, workflow_id: str) -> int:
    """The attempt of the workflow task the server has pending (0 if none)."""
    desc = await client.get_workflow_handle(workflow_id).describe()
    return desc.raw_description.pending_workflow_task.attempt


async def task_failed_in_history(client: Client, workflow_id: str) -> bool:
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
            return True
    return False


@asynccontextmanager
async def broken_workflow(client: Client, workflow_id: str) -> AsyncIterator[WorkflowHandle]:
    """`BrokenWorkflow` started as `workflow_id`, with a worker retrying its task."""
    task_queue = f"broken-{uuid.uuid4().hex[:8]}"
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[BrokenWorkflow],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        handle = await client.start_workflow(
            BrokenWorkflow.run, id=workflow_id, task_queue=task_queue
        )
        try:
            yield handle
        finally:
            await handle.terminate("test over")


def attempt_at_least(client: Client, workflow_id: str, least: int) -> object:
    """A probe for `assert_eventually`: the server has the task's attempt `least` pending."""

    async def probe() -> int:
        attempt = await task_attempt(client, workflow_id)
        assert attempt >= least, f"workflow task attempt {attempt}"
        return attempt

    return probe


@pytest.mark.devserver
async def test_a_failing_workflow_task_logs_its_traceback_once(
    dev_env: WorkflowEnvironment, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    failures = RepeatedWorkflowTaskFailures()
    logger = logging.getLogger(SDK_LOGGER)
    logger.addFilter(failures)
    caplog.set_level(logging.WARNING, logger=SDK_LOGGER)
    workflow_id = f"broken-{key}"
    try:
        async with broken_workflow(dev_env.client, workflow_id):
            # Attempt 4 pending: the worker has failed (and logged) the task 3 times.
            await assert_eventually(
                attempt_at_least(dev_env.client, workflow_id, 4),
                within=90,
                what="a 4th attempt of the workflow task",
            )
    finally:
        logger.removeFilter(failures)
    ours = [r for r in caplog.records if r.name == SDK_LOGGER and workflow_id in r.getMessage()]
    assert len(ours) == 1, [r.getMessage() for r in ours]
    [logged] = ours
    assert logged.exc_info is not None and str(logged.exc_info[1]) == BROKEN


TERMINAL_WORKER = """
import asyncio, sys
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from postlane.logs import configure_logging
from tests.test_stuck_workflow import BrokenWorkflow

async def main(address, task_queue):
    configure_logging()
    client = await Client.connect(address)
    runner = UnsandboxedWorkflowRunner()
    workflows = [BrokenWorkflow]
    async with Worker(client, task_queue=task_queue, workflows=workflows, workflow_runner=runner):
        await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""
"""A worker process logging as `postlane worker` does, serving only `BrokenWorkflow`."""


@pytest.mark.devserver
async def test_a_failing_workflow_task_shows_one_traceback_on_the_terminal(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    task_queue = f"broken-{key}"
    stderr_path = tmp_path / "worker.stderr"
    with stderr_path.open("wb") as stderr:
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            TERMINAL_WORKER,
            dev_env.client.service_client.config.target_host,
            task_queue,
            cwd=REPO,
            stdout=stderr,
            stderr=stderr,
        )
    try:
        handle = await dev_env.client.start_workflow(
            BrokenWorkflow.run, id=f"broken-{key}", task_queue=task_queue
        )
        await assert_eventually(
            attempt_at_least(dev_env.client, handle.id, 4),
            within=90,
            what="a 4th attempt of the workflow task",
        )
        await handle.terminate("test over")
    finally:
        worker.terminate()
        await worker.wait()
    seen = stderr_path.read_text()
    assert seen.count("Traceback (most recent call last)") == 1, seen
    assert seen.count(f"RuntimeError: {BROKEN}") == 1, seen
    assert "Failing workflow task" not in seen, seen  # the core's one-line copy, every retry


def test_repeats_stay_quiet_for_the_window_then_come_back_as_one_line() -> None:
    now = [0.0]
    failures = RepeatedWorkflowTaskFailures(window=timedelta(minutes=10), clock=lambda: now[0])

    def failure(workflow_type: str, exc: Exception) -> logging.LogRecord:
        record = logging.LogRecord(
            SDK_LOGGER,
            logging.WARNING,
            __file__,
            1,
            "Failed activation on workflow %s",
            (workflow_type,),
            (type(exc), exc, None),
        )
        record.__dict__["__temporal_error_identifier"] = "WorkflowTaskFailure"
        record.__dict__["temporal_workflow"] = {"workflow_type": workflow_type}
        return record

    first = failure("A", RuntimeError("boom"))
    assert failures.filter(first) and first.exc_info is not None
    for _ in range(5):
        now[0] += 60
        assert not failures.filter(failure("A", RuntimeError("boom")))
    # Another message, or another workflow type, is another error: its traceback at once.
    assert failures.filter(failure("A", RuntimeError("other")))
    assert failures.filter(failure("B", RuntimeError("boom")))
    now[0] += 300  # 11 minutes after the first
    summary = failure("A", RuntimeError("boom"))
    assert failures.filter(summary)
    assert summary.exc_info is None
    assert summary.getMessage() == (
        "Failed activation on workflow A: still failing with RuntimeError: boom "
        "(5 more failures in the last 10 min not logged; traceback logged with the first)"
    )
    other = logging.LogRecord(SDK_LOGGER, logging.WARNING, __file__, 1, "unrelated", None, None)
    assert failures.filter(other)


async def describe_within_deadline(pl: PostlaneClient, key: str) -> str:
    report = await asyncio.wait_for(pl.describe(key), DESCRIBE_DEADLINE_S)
    assert report.status == EmailStatus.QUEUED
    assert report.stuck is not None
    return report.stuck


@pytest.mark.devserver
async def test_describe_says_a_failing_email_workflow_is_stuck_at_once(
    dev_env: WorkflowEnvironment, key: str
) -> None:
    pl = PostlaneClient(dev_env.client, Settings(lanes=[default_test_lane()]))
    workflow_id = email_workflow_id(key)
    async with broken_workflow(dev_env.client, workflow_id):
        await assert_eventually(
            attempt_at_least(dev_env.client, workflow_id, 2), within=60, what="a retried task"
        )
        stuck = await describe_within_deadline(pl, key)
    assert re.fullmatch(rf"workflow task failing: RuntimeError: {BROKEN} \(attempt \d+\)", stuck)


async def test_describe_says_a_failing_email_workflow_is_stuck_on_the_test_server(
    pl: PostlaneTestEnv, key: str
) -> None:
    # The time-skipping server reports no pending task; its history has the failure.
    workflow_id = email_workflow_id(key)
    async with broken_workflow(pl.env.client, workflow_id):
        await assert_eventually(
            lambda: task_failed_in_history(pl.env.client, workflow_id), what="a failed task"
        )
        stuck = await describe_within_deadline(pl.client, key)
    assert stuck == f"workflow task failing: RuntimeError: {BROKEN}"
