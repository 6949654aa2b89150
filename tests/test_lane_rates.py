"""Lane rates and priorities on the real dev server, with real worker processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.resolve import LaneResolver
from postlane import search_attributes as sa
from postlane.binaries import dev_server_path
from postlane.catcher import SmtpCatcher
from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.connection import data_converter
from postlane.ids import WORKFLOW_TASK_QUEUE
from postlane.lanes import start_lane_workflow
from postlane.models import EmailStatus
from tests.conftest import DEV_SERVER_ARGS
from tests.procs import (
    WorkerProcess,
    assert_eventually,
    free_port,
    postlane_env,
    run_postlane,
    wait_for_pollers,
    write_config,
)
from tests.test_integration import address_of, an_email, new_lane
from workflows import WORKFLOWS, workflow_runner

pytestmark = pytest.mark.devserver


def worst_second(times: list[float]) -> int:
    times = sorted(times)
    return max(sum(1 for u in times[i:] if u - t < 1.0) for i, t in enumerate(times))


@pytest.mark.timeout(240)
async def test_lane_rate_holds_across_three_worker_processes(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, rate_per_second=5)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        with (
            WorkerProcess.start(env, tmp_path, "--lanes", lane.name, name="a") as a,
            WorkerProcess.start(env, tmp_path, "--lanes", lane.name, name="b") as b,
            WorkerProcess.start(env, tmp_path, "--lanes", lane.name, name="c") as c,
        ):
            await wait_for_pollers(dev_env.client, lane.task_queue, [a, b, c])
            pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))

            async def rate_on_server() -> bool:
                return (await pl.lane(lane.name)).server_rate == 5

            await assert_eventually(rate_on_server, what="the lane's rate on the server")
            handles = await asyncio.gather(
                *(pl.send(an_email(f"#{n}"), key=f"{key}-{n}") for n in range(40))
            )
            for handle in handles:
                await asyncio.wait_for(handle.result(), 120)
    arrivals = sorted(m.received_at for m in smtp.messages)
    assert len(arrivals) == 40, [round(t - arrivals[0], 2) for t in arrivals]
    # The server allows a burst of one second's worth, then holds the rate.
    # An idle lane's token bucket lets up to about two seconds' worth through at once
    # (measured: 11 at 5/s); from then on no one-second window exceeds the rate + 1.
    start = arrivals[0]
    assert worst_second(arrivals) <= 2 * 5 + 1
    assert worst_second([t for t in arrivals if t - start >= 1.0]) <= 5 + 1
    settled = [t for t in arrivals if t - start >= 1.0]
    steady = (len(settled) - 1) / (settled[-1] - settled[0])
    assert 4.75 <= steady <= 5.25, steady


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
            return (await pl.lane(lane.name)).server_rate == value

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
    status = (await pl.lane(lane)).status
    return status is not None and (status.used_last_hour, status.waiting) == (3, 2)
