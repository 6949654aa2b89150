"""How exactly a lane holds its rate: 1, 5, 20 and 50 sends/s with 1 and 3 worker processes.

Run from the repository root: ``.venv/bin/python bench/lane_rates.py [--quick | --live]``.
Each case gets a fresh lane (its own task queue) on one dev server started with the
settings `postlane dev` uses, real ``python worker.py`` processes, and a local SMTP sink
whose arrival times are the measurement. Two scenarios:

- ``backlog``: the whole batch is queued first, then the workers start and drain it;
- ``live``: the workers already poll when the sends start (40 at 5/s with 3 workers was
  once a test's wall-clock assertion; the tests now check order, the figure lives here).

Results: ``bench/results/lane_rates.{json,md}`` (``-quick``/``-live`` for the short runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.lanes import LaneAdminActivities
from activities.resolve import LaneResolver
from postlane import search_attributes as sa
from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.connection import data_converter
from postlane.dev.binaries import dev_server_path
from postlane.dev.catcher import SmtpCatcher
from postlane.dev.stack import SERVER_TUNING
from postlane.email.models import Email
from postlane.ids import WORKFLOW_TASK_QUEUE
from postlane.lanes.limits import start_lane_workflow
from workflows import WORKFLOWS, workflow_runner

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def worst_window(times: list[float]) -> int:
    """Most arrivals in any one-second window."""
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u - t < 1.0) for i, t in enumerate(times)), default=0)


def lane_toml(lane: LaneConfig) -> str:
    return (
        f'[[lanes]]\nname = "{lane.name}"\nsenders = ["*@bench.test"]\n'
        f'smtp_host = "{lane.smtp_host}"\nsmtp_port = {lane.smtp_port}\nsmtp_tls = "none"\n'
        f"rate_per_second = {lane.rate_per_second}\nmax_concurrent = 16\n"
    )


async def wait_for_pollers(env: WorkflowEnvironment, task_queue: str, count: int) -> None:
    """Until `count` worker processes poll the lane's queue (each polls with several)."""
    for _ in range(600):
        desc = await env.client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=env.client.namespace,
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            )
        )
        if len({p.identity for p in desc.pollers}) >= count:
            return
        await asyncio.sleep(0.1)  # polling the server's view; there is no event
    raise RuntimeError(f"{count} workers did not poll {task_queue} within 60 s")


async def one_case(
    env: WorkflowEnvironment,
    smtp: SmtpCatcher,
    rate: float,
    workers: int,
    work: Path,
    *,
    live: bool = False,
) -> dict[str, object]:
    lane = LaneConfig(
        name=f"bench-{uuid.uuid4().hex[:6]}",
        senders=["*@bench.test"],
        smtp_host=smtp.host,
        smtp_port=smtp.port,
        smtp_tls="none",
        rate_per_second=rate,
        max_concurrent=16,
    )
    config = work / f"{lane.name}.toml"
    config.write_text(lane_toml(lane))
    address = env.client.service_client.config.target_host
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "POSTLANE_"))}
    proc_env.update(
        TEMPORAL_ADDRESS=address, TEMPORAL_NAMESPACE="default", POSTLANE_CONFIG=str(config)
    )
    pl = PostlaneClient(env.client, Settings(lanes=[lane]))
    await start_lane_workflow(env.client, lane)
    admin = LaneAdminActivities(env.client)
    procs: list[subprocess.Popen[bytes]] = []

    def start_workers() -> list[subprocess.Popen[bytes]]:
        return [
            subprocess.Popen(
                [sys.executable, "worker.py", "--lanes", lane.name, "--no-workflows"],
                cwd=ROOT,
                env=proc_env,
                stdout=subprocess.DEVNULL,
                stderr=(work / f"{lane.name}-{i}.err").open("wb"),
            )
            for i in range(workers)
        ]

    # The orchestration runs here. In the backlog scenario the lane's senders start only
    # once the whole batch is queued, so the measurement is the lane draining a backlog,
    # not the starter's pace; in the live one they poll before the first send.
    async with Worker(
        env.client,
        task_queue=WORKFLOW_TASK_QUEUE,
        workflows=WORKFLOWS,
        activities=[admin.set_lane_rate, LaneResolver(Settings(lanes=[lane])).resolve_lane],
        workflow_runner=workflow_runner(),
    ):
        try:
            for _ in range(300):
                if (await pl.lanes.get(lane.name)).server_rate == rate:
                    break
                await asyncio.sleep(0.1)  # polling the server's view; there is no event
            count = max(40, int(8 * rate)) if live else int(max(12, 8 * rate) + 2 * rate + 1)
            if live:
                procs = start_workers()
                await wait_for_pollers(env, lane.task_queue, workers)
            smtp.clear()
            handles = []
            for start in range(0, count, 50):
                handles += await asyncio.gather(
                    *(
                        pl.send(
                            Email(
                                sender="b@bench.test",
                                to=["r@example.test"],
                                subject=str(n),
                                text="x",
                            ),
                            key=f"{lane.name}-{n}",
                        )
                        for n in range(start, min(count, start + 50))
                    )
                )
            if not live:
                procs = start_workers()
            for handle in handles:
                await handle.result()
            arrivals = sorted(m.received_at for m in smtp.messages)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)
    settled = [t for t in arrivals if t - arrivals[0] >= 1.0]
    steady = (len(settled) - 1) / (settled[-1] - settled[0]) if len(settled) > 1 else 0.0
    return {
        "scenario": "live" if live else "backlog",
        "rate": rate,
        "workers": workers,
        "emails": len(arrivals),
        "steady_rate": round(steady, 3),
        "error_pct": round(100 * (steady - rate) / rate, 1),
        "worst_window": worst_window(arrivals),
        "worst_window_after_1s": worst_window(settled),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="rates 5 and 20 only")
    parser.add_argument("--live", action="store_true", help="only the live scenario")
    args = parser.parse_args()
    rates = [] if args.live else [5.0, 20.0] if args.quick else [1.0, 5.0, 20.0, 50.0]
    cases = [(rate, workers, False) for rate in rates for workers in (1, 3)]
    cases += [(5.0, 3, True)] if args.quick or args.live else [(5.0, 3, True), (20.0, 3, True)]
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, SmtpCatcher() as smtp:
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=dev_server_path(),
            dev_server_database_filename=str(Path(tmp) / "temporal.db"),
            data_converter=data_converter(),
            search_attributes=list(sa.ALL),
            dev_server_extra_args=SERVER_TUNING,
        )
        try:
            for rate, workers, live in cases:
                row = await one_case(env, smtp, rate, workers, Path(tmp), live=live)
                print(row, flush=True)
                rows.append(row)
        finally:
            await env.shutdown()
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_at_start": round(load, 2),
    }
    suffix = "-live" if args.live else "-quick" if args.quick else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"lane_rates{suffix}.json").write_text(json.dumps({**meta, "cases": rows}, indent=2))
    lines = [
        f"# Lane rates ({meta['date']}, {meta['cpus']} CPUs, load {meta['loadavg_at_start']})",
        "",
        "| scenario | rate/s | workers | emails | steady rate/s | error | worst 1-s window"
        " | after the first second |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['rate']:g} | {r['workers']} | {r['emails']} |"
            f" {r['steady_rate']} |"
            f" {r['error_pct']}% | {r['worst_window']} | {r['worst_window_after_1s']} |"
        )
    (RESULTS / f"lane_rates{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
