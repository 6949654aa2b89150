"""Lane rates and priorities on the real dev server, with real worker processes.

No timing assertions: the rate figures are measured by ``bench/lane_rates.py``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.resolve import LaneResolver
from postlane import search_attributes as sa
from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.connection import data_converter
from postlane.dev.binaries import dev_server_path
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import EmailStatus
from postlane.ids import WORKFLOW_TASK_QUEUE
from postlane.lanes.limits import start_lane_workflow
from postlane.worker import run_workers
from tests.conftest import DEV_SERVER_ARGS
from tests.procs import (
    WorkerProcess,
    assert_eventually,
    describe_lane_queue,
    free_port,
    history_identities,
    postlane_env,
    run_postlane,
    wait_for_pollers,
    write_config,
)
from tests.test_integration import address_of, an_email, new_lane
from workflows import WORKFLOWS, workflow_runner

pytestmark = pytest.mark.devserver


# How exactly the server holds the rate (a per-second figure) is a benchmark's business:
# bench/lane_rates.py, bench/results/lane_rates.md. Here: the rate is the queue's own
# server-side setting, whichever worker processes poll it, and every send goes out once.
@pytest.mark.timeout(240)
async def test_lane_rate_is_the_queues_server_setting_with_three_worker_processes(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, rate_per_second=5, per_domain_per_second=4)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        with (
            WorkerProcess.start(env, tmp_path, "--lanes", lane.name, name="a") as a,
            WorkerProcess.start(env, tmp_path, "--lanes", lane.name, name="b") as b,
            WorkerProcess.start(env, tmp_path, "--lanes", lane.name, name="c") as c,
        ):
            await wait_for_pollers(client, lane.task_queue, [a, b, c])

            async def configured() -> Any:
                desc = await describe_lane_queue(client, lane)
                return desc if desc.config.queue_rate_limit.rate_limit.requests_per_second else None

            desc = await assert_eventually(configured, what="the lane queue's rate on the server")
            pl = PostlaneClient(client, Settings(lanes=[lane]))
            handles = await asyncio.gather(
                *(pl.send(an_email(f"#{n}"), key=f"{key}-{n}") for n in range(20))
            )
            for handle in handles:
                await handle.result()
            polled_by = [
                await history_identities(client.get_workflow_handle(h.workflow_id)) for h in handles
            ]
            desc_after = await describe_lane_queue(client, lane)
    for seen in (desc, desc_after):  # set by the lane, kept through all 20 sends
        assert seen.config.queue_rate_limit.rate_limit.requests_per_second == 5
        assert seen.config.fairness_keys_rate_limit_default.rate_limit.requests_per_second == 4
        assert seen.effective_rate_limit.requests_per_second == 5
    assert seen.config.queue_rate_limit.metadata.reason.startswith(f"postlane lane {lane.name}")
    # Every email once, by one of the three processes.
    assert sorted(m.subject for m in smtp.messages) == sorted(f"#{n}" for n in range(20))
    assert len({m.message_id for m in smtp.messages}) == 20
    for events in polled_by:
        started = [who for kind, who in events if kind == "activity_task_started"]
        assert len(started) == 1 and any(w.owns(started[0]) for w in (a, b, c)), events


@pytest.mark.timeout(180)
async def test_sends_leave_by_priority_then_in_arrival_order(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    client = dev_env.client
    priorities = ["bulk", "normal", "high"] * 4
    with SmtpCatcher() as smtp:
        # One send at a time: the worker takes its next task only when the last one is done,
        # so the order the server hands them out is the order they reach the SMTP server.
        lane = new_lane(smtp, rate_per_second=50, max_concurrent=1)
        await start_lane_workflow(client, lane)
        pl = PostlaneClient(client, Settings(lanes=[lane]))
        # Only the orchestration worker runs: the sends queue up on the lane, one by one.
        async with in_process_workers(client, Settings(lanes=[lane]), sends=False):
            for n, priority in enumerate(priorities):
                handle = await pl.send(
                    an_email(f"{priority} {n}"), key=f"{key}-{n}", priority=priority
                )
                scheduled = client.get_workflow_handle(handle.workflow_id)
                await assert_eventually(
                    lambda h=scheduled: send_scheduled(h), what=f"send {n} on the lane"
                )
            env = postlane_env(
                address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane])
            )
            with WorkerProcess.start(env, tmp_path, "--lanes", lane.name, "--no-workflows"):
                await smtp.wait_for_async(len(priorities), 90)
    arrived = [m.subject for m in sorted(smtp.messages, key=lambda m: m.received_at)]
    rank = {"high": 0, "normal": 1, "bulk": 2}
    expected = [
        f"{p} {n}" for n, p in sorted(enumerate(priorities), key=lambda np: (rank[np[1]], np[0]))
    ]
    assert arrived == expected


@asynccontextmanager
async def in_process_workers(
    client: Client, settings: Settings, **options: Any
) -> AsyncIterator[None]:
    """Postlane's workers for `settings` in this process, without the inbound watchers,
    until the block ends; `options` go to `run_workers` (``sends=False``: the workflow
    worker and the activities it hosts, no lane sender)."""
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_workers(client, settings, inbound=False, stop=stop, ready=ready, **options)
    )
    started = asyncio.create_task(ready.wait())
    await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # it failed to start: say why
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def send_scheduled(handle: WorkflowHandle[Any, Any]) -> bool:
    """Is the email's send activity scheduled (waiting on the lane's queue)?"""
    pending = (await handle.describe()).raw_description.pending_activities
    return any(p.state == PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED for p in pending)


@pytest.mark.timeout(240)
async def test_high_priority_overtakes_bulk_backlog(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, rate_per_second=200)
        await start_lane_workflow(client, lane)
        pl = PostlaneClient(client, Settings(lanes=[lane]))
        # Only the orchestration worker runs, so the bulk sends pile up in the lane's queue.
        async with Worker(
            client,
            task_queue=WORKFLOW_TASK_QUEUE,
            workflows=WORKFLOWS,
            activities=[LaneResolver(Settings(lanes=[lane])).resolve_lane],
            workflow_runner=workflow_runner(),
        ):
            for batch in range(0, 1000, 100):
                await asyncio.gather(
                    *(
                        pl.send(an_email(f"bulk {n}"), key=f"{key}-b{n}", priority="bulk")
                        for n in range(batch, batch + 100)
                    )
                )
            high = await pl.send(an_email("verification code"), key=f"{key}-high", priority="high")
            assert await pl.status(f"{key}-high") == EmailStatus.QUEUED  # no lane worker yet
            env = postlane_env(
                address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane])
            )
            with WorkerProcess.start(env, tmp_path, "--lanes", lane.name, "--no-workflows") as w:
                await wait_for_pollers(client, lane.task_queue, [w])
                await asyncio.wait_for(high.result(), 60)
    # It goes out in the first wave: the worker's first `max_concurrent` sends run at
    # once and may land in any order; the 1,000 bulk ones queued before it wait.
    subjects = [m.subject for m in sorted(smtp.messages, key=lambda m: m.received_at)]
    assert "verification code" in subjects[: lane.max_concurrent], subjects[:10]


@pytest.mark.timeout(180)
async def test_hourly_cap_survives_worker_restart_without_over_sending(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, rate_per_second=3, hourly_cap=3)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        pl = PostlaneClient(client, Settings(lanes=[lane]))
        with WorkerProcess.start(env, tmp_path, "--lanes", lane.name, name="first") as first:
            await wait_for_pollers(client, lane.task_queue, [first])
            await fill_the_hour(pl, smtp, lane.name, key)
            first.kill()
        with WorkerProcess.start(env, tmp_path, "--lanes", lane.name, name="second") as second:
            await wait_for_pollers(client, lane.task_queue, [second])
            # The first query waits out the dead worker's sticky queue; slow on a busy box.
            await assert_eventually(
                lambda: two_waiting(pl, lane.name),
                within=90,
                what="the quota state after the restart",
            )
            statuses = await settled_statuses(pl, key)
            rc, out, err = await run_postlane(["lanes"], env)
    assert len(smtp.messages) == 3
    assert sorted(statuses) == sorted(["sent"] * 3 + ["scheduled"] * 2)
    assert rc == 0, err
    row = next(line for line in out.splitlines() if line.startswith(lane.name))
    assert "3/3" in row.split()  # the hour's window: used/cap


async def test_lanes_set_changes_rate_on_server_live(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client = dev_env.client
    lane = new_lane(rate_per_second=4)
    env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
    pl = PostlaneClient(client, Settings(lanes=[lane]))
    with WorkerProcess.start(env, tmp_path, "--lanes", lane.name) as worker:
        await wait_for_pollers(client, lane.task_queue, [worker])

        async def rate_is(value: float) -> bool:
            return (await pl.lanes.get(lane.name)).server_rate == value

        await assert_eventually(lambda: rate_is(4), what="the configured rate on the server")
        rc, out, err = await run_postlane(["lanes", "set", lane.name, "--rate", "120/m"], env)
        assert (rc, out.strip()) == (0, f"lane {lane.name}: rate set to 2/s"), err
        await assert_eventually(lambda: rate_is(2), what="the new rate on the server")
        rc, _, err = await run_postlane(["lanes", "set", lane.name, "--rate=0/s"], env)
        assert rc == 2 and err.strip().startswith("error: ConfigurationError: rate:")


@pytest.mark.timeout(180)
async def test_hourly_cap_survives_server_restart_without_over_sending(
    key: str, tmp_path: Path
) -> None:
    port, db = free_port(), tmp_path / "temporal.db"

    async def server() -> WorkflowEnvironment:
        return await WorkflowEnvironment.start_local(
            dev_server_existing_path=dev_server_path(),
            dev_server_database_filename=str(db),
            port=port,
            data_converter=data_converter(),
            search_attributes=list(sa.ALL),
            dev_server_extra_args=DEV_SERVER_ARGS,
        )

    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, rate_per_second=3, hourly_cap=3)
        settings = Settings(lanes=[lane])
        env = postlane_env(f"127.0.0.1:{port}", write_config(tmp_path / "postlane.toml", [lane]))
        first = await server()
        with WorkerProcess.start(env, tmp_path, "--lanes", lane.name) as worker:
            try:
                pl = PostlaneClient(first.client, settings)
                await wait_for_pollers(first.client, lane.task_queue, [worker])
                await fill_the_hour(pl, smtp, lane.name, key)
            finally:
                await first.shutdown()
            second = await server()  # same SQLite file: the history is all there is
            try:
                pl = PostlaneClient(second.client, settings)
                await assert_eventually(
                    lambda: two_waiting(pl, lane.name), within=60, what="state after the restart"
                )
                statuses = await settled_statuses(pl, key)
            finally:
                await second.shutdown()
    assert len(smtp.messages) == 3
    assert sorted(statuses) == sorted(["sent"] * 3 + ["scheduled"] * 2)


async def fill_the_hour(pl: PostlaneClient, smtp: SmtpCatcher, lane: str, key: str) -> None:
    """Send five through a lane capped at 3/h: three go out, two wait for the next hour."""
    for n in range(5):
        await pl.send(an_email(f"#{n}"), key=f"{key}-{n}")
    await smtp.wait_for_async(3, 60)
    await assert_eventually(lambda: two_waiting(pl, lane), what="three sent, two waiting")


async def settled_statuses(pl: PostlaneClient, key: str) -> list[str]:
    """The five emails' statuses once the lane has told the two waiting ones their planned
    times (the lane counts them as waiting just before its signals reach them)."""
    expected = sorted(["sent"] * 3 + ["scheduled"] * 2)

    async def statuses() -> list[str] | None:
        seen = sorted([str(await pl.status(f"{key}-{n}")) for n in range(5)])
        return seen if seen == expected else None

    return await assert_eventually(statuses, within=60, what="three sent, two scheduled")


async def two_waiting(pl: PostlaneClient, lane: str) -> bool:
    status = (await pl.lanes.get(lane)).status
    return status is not None and (status.used_last_hour, status.waiting) == (3, 2)
