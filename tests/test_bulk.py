"""Bulk operations on the real dev server (batch jobs need it) with a real SMTP catcher:
``send --csv``, ``dlq retry|discard --all`` as server-side batch jobs, ``dlq list`` from the
listing alone."""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import BatchOperationType
from temporalio.api.workflowservice.v1 import DescribeBatchOperationRequest
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from postlane.cli.bulk import row_key
from postlane.client import EmailHandle, PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import EmailStatus, RetrySettings
from postlane.ids import email_workflow_id
from postlane.lanes.guard import GuardSettings
from postlane.names import EmailMemo
from postlane.testing import running_workers
from tests.procs import assert_eventually, postlane_env, run_postlane, write_config
from tests.test_integration import SENDER, address_of, an_email, new_lane

pytestmark = pytest.mark.devserver

ROWS = 200
PARKED = 150
OUTAGE = "451 4.3.0 mailbox temporarily unavailable"


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


async def count(pl: PostlaneClient, query: str) -> int:
    return (await pl.temporal.count_workflows(query)).count


async def run_ids(
    pl: PostlaneClient, workflow_ids: set[str]
) -> dict[str, tuple[str | None, WorkflowExecutionStatus | None]]:
    """Each workflow's latest run ID and status, described by ID (no visibility lag)."""
    found: dict[str, tuple[str | None, WorkflowExecutionStatus | None]] = {}
    for workflow_id in sorted(workflow_ids):
        desc = await pl.temporal.get_workflow_handle(workflow_id).describe()
        found[workflow_id] = (desc.run_id, desc.status)
    return found


async def assert_never_started(pl: PostlaneClient, workflow_ids: set[str]) -> None:
    """None of the workflows exists on the server, described by ID (no visibility lag)."""
    for workflow_id in sorted(workflow_ids):
        try:
            desc = await pl.temporal.get_workflow_handle(workflow_id).describe()
        except RPCError as err:
            assert err.status == RPCStatusCode.NOT_FOUND, (workflow_id, err)
        else:
            raise AssertionError(f"{workflow_id} was started ({desc.status})")


def fast_lane(smtp: SmtpCatcher, **fields: Any) -> LaneConfig:
    return new_lane(smtp, rate_per_second=500, **fields)


def parking_lane(smtp: SmtpCatcher) -> LaneConfig:
    """A lane whose emails park after one failed attempt. Its reputation guard is off: a
    whole batch deferred (the outage `park` plays) would otherwise pause the lane, as it
    should in production, and the retried emails would wait for an operator's resume."""
    return fast_lane(
        smtp, retry=RetrySettings(maximum_attempts=1), guard=GuardSettings(enabled=False)
    )


@pytest.mark.timeout(300)
async def test_send_csv_sends_each_row_once_and_a_rerun_sends_nothing(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    rows = [{"email": f"r{n}@example.test", "name": f"Name {n}", "id": str(n)} for n in range(ROWS)]
    path = write_csv(tmp_path / "launch.csv", rows)
    with SmtpCatcher() as smtp:
        lane = fast_lane(smtp)
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(dev_env.client, settings)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        argv = ["send", "--csv", str(path), "--from", SENDER, "--campaign", key]
        argv += ["--subject", "Hello {{ name }}", "--text", "Your id is {{ id }}."]
        async with running_workers(dev_env, settings):
            rc, out, err = await run_postlane(argv, env, within=180)
            assert rc == 0, err
            assert f"{ROWS} queued, 0 already queued, 0 failed" in out
            assert f"] {ROWS}/{ROWS}  " in err  # the progress bar, on stderr

            await assert_eventually(
                lambda: len(smtp.messages) >= ROWS, within=180, what="every row delivered"
            )
            by_recipient = Counter(r for m in smtp.messages for r in m.recipients)
            assert by_recipient == Counter(row["email"] for row in rows)  # exactly once each
            for message in smtp.messages:
                n = message.recipients[0].removeprefix("r").removesuffix("@example.test")
                assert message.header("Subject") == f"Hello Name {n}"
                assert f"Your id is {n}.".encode() in message.raw

            # Ground truth on the server before the rerun: one email workflow per row, keyed
            # by the row, with the run that sent it.
            ids = {email_workflow_id(row_key(key, row, None)) for row in rows}

            async def all_completed() -> dict[str, Any] | None:
                # The server has the last message a moment before its workflow completes.
                runs = await run_ids(pl, ids)
                done = all(s == WorkflowExecutionStatus.COMPLETED for _, s in runs.values())
                return runs if done else None

            before = await assert_eventually(all_completed, within=60, what="every row completed")
            assert set(before) == ids

            rc, out, err = await run_postlane(argv, env, within=180)  # the same file again
            assert rc == 0, err
            assert f"0 queued, {ROWS} already queued, 0 failed" in out
            # Each row's workflow, described by ID (not the lagging visibility listing),
            # still has only the run that sent it: the rerun started no run of its own.
            assert await run_ids(pl, ids) == before
            assert len(smtp.messages) == ROWS


@pytest.mark.timeout(120)
async def test_send_csv_with_a_bad_row_sends_nothing(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    rows = [{"email": f"r{n}@example.test", "id": str(n)} for n in range(5)]
    rows.append({"email": "not-an-address", "id": "5"})
    rows.append({"email": "r0@example.test", "id": "0"})  # the same row twice: the same key
    path = write_csv(tmp_path / "bad.csv", rows)
    with SmtpCatcher() as smtp:
        lane = fast_lane(smtp)
        pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        argv = ["send", "--csv", str(path), "--from", SENDER, "--campaign", key]
        rc, _, err = await run_postlane([*argv, "--subject", "Hi", "--text", "{{ id }}"], env)
        assert rc == 2, err
        assert f"{path}:7: to[0]: 'not-an-address'" in err  # the line and the field
        assert f"{path}:8: key:" in err and "also line 2's key" in err
        assert "2 invalid row(s); nothing was sent" in err
        rc, _, err = await run_postlane([*argv, "--subject", "{{ nope }}", "--text", "x"], env)
        assert rc == 2 and "subject: template does not render" in err, err
        # The workflows the valid rows would have started, described by ID: none exists.
        await assert_never_started(pl, {email_workflow_id(row_key(key, r, None)) for r in rows})
        assert smtp.messages == []


@asynccontextmanager
async def parked_lane(
    dev_env: WorkflowEnvironment, tmp_path: Path, key: str
) -> AsyncIterator[
    tuple[PostlaneClient, SmtpCatcher, LaneConfig, dict[str, str], list[EmailHandle]]
]:
    """A parking lane with its workers running and `PARKED` emails dead-lettered on it.

    Yields the client, the catcher, the lane, the CLI's environment and the emails' handles.
    """
    with SmtpCatcher() as smtp:
        lane = parking_lane(smtp)
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(dev_env.client, settings)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        async with running_workers(dev_env, settings):
            yield pl, smtp, lane, env, await park(pl, smtp, lane, key)


async def park(
    pl: PostlaneClient, smtp: SmtpCatcher, lane: LaneConfig, key: str
) -> list[EmailHandle]:
    """`PARKED` emails dead-lettered on `lane` (one transient failure each)."""
    smtp.fail("data", OUTAGE, times=PARKED)
    handles = [
        await pl.send(an_email(f"#{n}", to=f"p{n}@example.test"), key=f"{key}-{n}")
        for n in range(PARKED)
    ]
    query = f'PostlaneLane="{lane.name}" AND PostlaneStatus="dead_letter"'
    await assert_eventually(
        lambda: _parked(pl, query),
        within=240,
        interval=0.5,
        what="every email parked",
    )
    return handles


async def _parked(pl: PostlaneClient, query: str) -> bool:
    return await count(pl, query) == PARKED


async def batch_jobs(pl: PostlaneClient, stderr: str) -> list[str]:
    return sorted({w.rstrip(":") for w in stderr.split() if w.startswith("postlane-dlq-")})


@pytest.mark.timeout(420)
async def test_dlq_retry_all_is_one_batch_job_that_reaches_every_parked_email(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with parked_lane(dev_env, tmp_path, key) as (pl, smtp, lane, env, handles):

        async def no_describe(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("dlq list described an email one by one")

        # The listing alone: no describe (and so no query) per email.
        monkeypatch.setattr(pl, "describe", no_describe)
        reports = await pl.dlq.list(lane=lane.name)
        newest = await pl.dlq.newest(5, lane=lane.name)  # what `postlane top` shows
        monkeypatch.undo()
        stamps = sorted((r.parked_at for r in reports if r.parked_at), reverse=True)
        assert [r.parked_at for r in newest] == stamps[:5]  # the newest first (ties aside)
        assert {r.key for r in newest} <= {r.key for r in reports}
        assert sorted(r.key for r in reports) == sorted(f"{key}-{n}" for n in range(PARKED))
        for r in reports:
            n = r.key.rsplit("-", 1)[1]
            assert r.status == EmailStatus.DEAD_LETTER and r.lane == lane.name
            assert r.recipients == [f"p{n}@example.test"] and r.subject == f"#{n}"
            # Under load an attempt can also end in a heartbeat timeout: any reply will do.
            assert r.attempts == 1 and r.last_error and r.parked_at is not None
            # The same as the email's own report (its workflow answers the query).
            own = await pl.describe(r.key)
            assert (own.recipients, own.attempts, own.last_error, own.parked_at) == (
                r.recipients,
                r.attempts,
                r.last_error,
                r.parked_at,
            )
        memo = await pl.handle(reports[0].key)._handle.describe()
        assert EmailMemo.DEAD_LETTER in await memo.memo()
        assert smtp.messages == []
        smtp.clear_script()  # the provider is back (faults left by timed-out attempts too)

        rc, out, err = await run_postlane(
            ["dlq", "retry", "--all", "--lane", lane.name], env, within=240
        )
        assert rc == 0, err
        assert f"retry: {PARKED} of {PARKED} parked emails signalled (0 errors)" in out
        assert f"] {PARKED}/{PARKED}  batch job postlane-dlq-retry-" in err
        [job] = await batch_jobs(pl, out)
        desc = await pl.temporal.workflow_service.describe_batch_operation(
            DescribeBatchOperationRequest(namespace=pl.temporal.namespace, job_id=job)
        )
        assert desc.operation_type in (
            BatchOperationType.BATCH_OPERATION_TYPE_SIGNAL,
            BatchOperationType.BATCH_OPERATION_TYPE_SIGNAL_WORKFLOW,  # newer servers
        )
        assert desc.total_operation_count == PARKED
        assert desc.complete_operation_count == PARKED

        for handle in handles:
            await handle.result()
        by_recipient = Counter(r for m in smtp.messages for r in m.recipients)
        assert by_recipient == Counter(f"p{n}@example.test" for n in range(PARKED))
        # Each email's history holds the batch job's retry signal.
        history = await handles[0]._handle.fetch_history()
        signals = [
            e.workflow_execution_signaled_event_attributes.signal_name
            for e in history.events
            if e.HasField("workflow_execution_signaled_event_attributes")
        ]
        assert signals.count("retry") == 1

        rc, out, err = await run_postlane(["dlq", "retry", "--all", "--lane", lane.name], env)
        assert rc == 0, err  # nothing left parked: a second run changes nothing
        # Visibility may still list some as parked: those ignore the signal (not parked).
        assert re.search(r"retry: (\d+) of \1 parked emails signalled \(0 errors\)", out)
        assert len(smtp.messages) == PARKED


@pytest.mark.timeout(420)
async def test_dlq_discard_all_is_one_batch_job_that_ends_every_parked_email(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    async with parked_lane(dev_env, tmp_path, key) as (pl, smtp, lane, env, handles):
        rc, out, err = await run_postlane(
            ["dlq", "discard", "--all", "--lane", lane.name], env, within=240
        )
        assert rc == 0, err
        assert f"discard: {PARKED} of {PARKED} parked emails signalled (0 errors)" in out

        async def all_cancelled() -> bool:
            query = f'PostlaneLane="{lane.name}" AND PostlaneStatus="cancelled"'
            if await count(pl, query) != PARKED:
                return False
            closed = [(await h._handle.describe()).status for h in handles]
            return closed == [WorkflowExecutionStatus.FAILED] * PARKED

        await assert_eventually(all_cancelled, within=120, what="every email discarded")
        assert await pl.status(handles[-1].key) == EmailStatus.CANCELLED
        assert await pl.dlq.list(lane=lane.name) == []
        assert smtp.messages == []
