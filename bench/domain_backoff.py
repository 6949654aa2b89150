"""Per-domain backoff: a domain in backoff slows while another keeps its full rate.

Run from the repository root: ``.venv/bin/python bench/domain_backoff.py [--emails N]``.

One dev server (the settings `postlane dev` uses), Postlane's workers in this process, and a
local SMTP sink whose arrival times are the measurement. The lane sends at 10/s with 2/s
per recipient domain (low, so that a loaded 2-CPU host is not the limit). First the sink
answers ``421 4.7.0`` to one recipient of ``slow.test``: the send reports it, the lane
halves that domain's fairness weight on the server, and the sink then accepts everything.
Then the same number of emails goes to ``slow.test`` and to ``fast.test``, all due at the
same moment (``send_at``), and each domain's steady rate is measured from the arrival
times. A control run does the same on a fresh lane with no throttle.

Results: ``bench/results/domain_backoff.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from postlane import search_attributes as sa
from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.connection import data_converter
from postlane.dev.binaries import dev_server_path
from postlane.dev.catcher import SmtpCatcher
from postlane.dev.stack import SERVER_TUNING
from postlane.email.models import Email, RetrySettings
from postlane.worker import run_workers

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LANE_RATE = 10.0
PER_DOMAIN = 2.0


def steady_rate(times: list[float]) -> float:
    """Arrivals per second after the first second (the server's bucket may start full)."""
    times = sorted(times)
    later = [t for t in times if t - times[0] >= 1.0]
    if len(later) < 2:
        return float("nan")
    return (len(later) - 1) / (later[-1] - later[0])


async def weights(client: Client, lane: LaneConfig) -> dict[str, float]:
    desc = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=lane.task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            report_config=True,
        )
    )
    return dict(desc.config.fairness_weight_overrides)


async def run_case(client: Client, emails: int, *, throttle: bool) -> dict[str, Any]:
    with SmtpCatcher() as smtp:
        lane = LaneConfig(
            name=f"bench-{uuid.uuid4().hex[:6]}",
            senders=["*@bench.test"],
            smtp_host="127.0.0.1",
            smtp_port=smtp.port,
            smtp_tls="none",
            rate_per_second=LANE_RATE,
            per_domain_per_second=PER_DOMAIN,
            max_concurrent=16,
            retry=RetrySettings(
                initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=2)
            ),
        )
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(client, settings)
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(
            run_workers(client, settings, inbound=False, stop=stop, ready=ready)
        )
        await ready.wait()
        try:
            if throttle:
                smtp.reject_recipient("warm@slow.test", "421 4.7.0 too many messages, slow down")
                warm = await pl.send(
                    Email(sender="a@bench.test", to=["warm@slow.test"], subject="w", text="w"),
                    key=f"warm-{lane.name}",
                )
                for _ in range(600):
                    if (await weights(client, lane)).get("slow.test", 1.0) < 1.0:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise SystemExit("the lane never lowered slow.test's weight: no figure")
                smtp.clear_script()
                await warm.result()
            applied = await weights(client, lane)
            smtp.clear()
            # Every email is due at the same moment, after all are started: what the
            # sink sees then is the server's pacing, not how fast this loop starts them.
            due = datetime.now(UTC) + timedelta(seconds=10 + emails * 0.4)
            handles = []
            for n in range(emails):
                batch = [
                    pl.send(
                        Email(sender="a@bench.test", to=[f"u{n}@{d}"], subject=f"#{n}", text="x"),
                        key=f"{lane.name}-{d}-{n}",
                        send_at=due,
                    )
                    for d in ("slow.test", "fast.test")
                ]
                handles += await asyncio.gather(*batch)
            for h in handles:
                await h.result()
            arrivals: dict[str, list[float]] = {"slow.test": [], "fast.test": []}
            for m in smtp.messages:
                arrivals[m.recipients[0].rsplit("@", 1)[1]].append(m.received_at)
        finally:
            stop.set()
            await task
    return {
        "throttled": throttle,
        "weights": applied,
        "emails_per_domain": emails,
        "rate_per_second": {d: round(steady_rate(t), 3) for d, t in arrivals.items()},
        "span_seconds": {d: round(max(t) - min(t), 2) for d, t in arrivals.items()},
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=20, help="emails per domain")
    args = parser.parse_args()
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=dev_server_path(),
        data_converter=data_converter(),
        search_attributes=list(sa.ALL),
        dev_server_extra_args=SERVER_TUNING,
    )
    os.environ.setdefault("POSTLANE_TOKEN_SECRET", "postlane-bench-token-secret-not-for-production")
    try:
        cases = [
            await run_case(env.client, args.emails, throttle=False),
            await run_case(env.client, args.emails, throttle=True),
        ]
    finally:
        await env.shutdown()
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "lane_rate": LANE_RATE,
        "per_domain_rate": PER_DOMAIN,
        "cases": cases,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "domain_backoff.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Per-domain backoff ({result['when']}, {result['cpus']} CPUs, load {result['load']})",
        "",
        f"Lane {LANE_RATE:g}/s, {PER_DOMAIN:g}/s per recipient domain; {args.emails} emails to"
        " each domain at once. Rates are steady arrivals/s at the SMTP sink (after the first"
        " second). `bench/domain_backoff.py`.",
        "",
        "| case | slow.test weight | slow.test rate/s | fast.test rate/s |",
        "|---|---|---|---|",
    ]
    for case in cases:
        lines.append(
            f"| {'slow.test answered 421 4.7.0' if case['throttled'] else 'control'}"
            f" | {case['weights'].get('slow.test', 1.0):g}"
            f" | {case['rate_per_second']['slow.test']}"
            f" | {case['rate_per_second']['fast.test']} |"
        )
    (RESULTS / "domain_backoff.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
