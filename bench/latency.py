"""Per-email tail latency of Postlane on the real dev server: bursts and steady load.

Run from the repository root::

    .venv/bin/python bench/latency.py [--bursts 6] [--emails 300] [--steady-seconds 30]

Same stack as bench/throughput.py (dev server with `postlane.dev.stack.SERVER_TUNING`, one
``python worker.py``, an SMTP sink in this process), without the baseline app. For every
email it records four clocks of the same machine: the start call, the sink accepting the
message (`CaughtMessage.received_at`), the server closing the workflow (describe:
``close_time``) and the client holding the result. Bursts alternate two ways of waiting:

- ``sdk``: ``WorkflowHandle.result()`` as the SDK does it, one long poll per email that the
  server parks until the close notification or its 20 s ``longPollExpirationInterval``;
- ``postlane``: `EmailHandle.result()`, whose polls have a deadline (`postlane.waiting`).

Then steady load: emails started at a fixed rate of `--steady-fraction` (0.7) of the
capacity the bursts measured, each waited for in the ``postlane`` way (and, with
`--steady-sdk`, a second steady phase in the ``sdk`` way). It also scrapes the server's
``/metrics`` for the count of history-event notifications it dropped. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from temporalio.api.enums.v1 import EventType  # noqa: E402
from throughput import (  # noqa: E402
    MAX_CONCURRENT,
    RATE_PER_SECOND,
    SETTLE,
    WARMUP,
    Bench,
    CpuMeter,
    _free_port,
    _percentile,
    code_digest,
    run_script,
)

from postlane.client import PostlaneClient  # noqa: E402
from postlane.dev.binaries import dev_server_path  # noqa: E402
from postlane.dev.stack import SERVER_TUNING  # noqa: E402
from postlane.waiting import RESULT_POLL_TIMEOUT  # noqa: E402

STALL = 5.0
"""Seconds from the server's close to the client's result that count as a stall (a normal
wait is tens of ms; a lost wake-up with the SDK's wait is ~20 s)."""
NOISY_CORES = 0.3
"""Other processes' CPU (cores) in any phase above which the results carry a load caveat."""
DRAIN_SLACK = 2.0
"""Target: in a burst, no email's latency exceeds the burst's drain time plus this."""
STEADY_P99_OVER_P50 = 3.0
"""Target: under steady load at 70 % of capacity, p99 ≤ this × p50."""
DESCRIBE_CONCURRENCY = 16

LEGS = ("to_sink", "to_close", "to_result", "close_to_result")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def stats(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 (nearest rank) and max, in ms."""
    if not values:
        return {}
    ms = [v * 1000 for v in values]
    return {
        "p50": round(statistics.median(ms), 1),
        "p95": round(_percentile(ms, 95), 1),
        "p99": round(_percentile(ms, 99), 1),
        "max": round(max(ms), 1),
    }


class LatencyBench(Bench):
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.metrics_port = _free_port()
        self.extra_server_flags = ["--metrics-port", str(self.metrics_port)]
        self.seen_messages = 0

    def dropped_notifications(self) -> float | None:
        """The server's count of history-event notifications it could not queue (its
        ``history_event_notification_fail_delivery`` counter), or None if not exported."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
            ) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith("history_event_notification_fail_delivery"):
                found = True
                total += float(line.rsplit(" ", 1)[1])
        return total if found else None

    def arrivals(self) -> dict[str, float]:
        """Sink acceptance time per key, for the messages caught since the last call."""
        assert self.smtp is not None
        messages = self.smtp.messages
        out: dict[str, float] = {}
        for message in messages[self.seen_messages :]:
            subject = message.header("Subject")
            if match := re.search(r"Postlane bench (\S+)", subject):
                out[match.group(1)] = message.received_at
        self.seen_messages = len(messages)
        return out

    async def one(self, pl: PostlaneClient, key: str, mode: str) -> dict[str, Any]:
        t_call = time.time()
        handle = await pl.send(self._email(key), key=key)
        t_started = time.time()
        if mode == "sdk":
            await pl.temporal.get_workflow_handle(handle.workflow_id).result()
        else:
            await handle.result()
        return {
            "key": key,
            "workflow_id": handle.workflow_id,
            "call": t_call,
            "started": t_started,
            "result": time.time(),
        }

    async def close_times(self, pl: PostlaneClient, rows: list[dict[str, Any]]) -> None:
        gate = asyncio.Semaphore(DESCRIBE_CONCURRENCY)

        async def describe(row: dict[str, Any]) -> None:
            async with gate:
                desc = await pl.temporal.get_workflow_handle(row["workflow_id"]).describe()
            row["close"] = desc.close_time.timestamp() if desc.close_time else None

        await asyncio.gather(*(describe(r) for r in rows))

    async def finish(self, pl: PostlaneClient, rows: list[dict[str, Any]]) -> None:
        await self.close_times(pl, rows)
        # The sink's thread may store the last message a moment after the client saw its
        # result; every email is in the sink before its workflow completes, so it is there.
        sink = self.arrivals()
        for row in rows:
            row["sink"] = sink.get(row["key"])
            slow_close = row["close"] is not None and row["sink"] is not None
            if slow_close and row["close"] - row["sink"] > STALL:
                # Where between the SMTP acceptance and the close did the time go?
                history = await pl.temporal.get_workflow_handle(row["workflow_id"]).fetch_history()
                row["events"] = [
                    (
                        EventType.Name(e.event_type).removeprefix("EVENT_TYPE_"),
                        round(e.event_time.ToMicroseconds() / 1e6 - row["call"], 3),
                    )
                    for e in history.events
                ]

    async def burst(self, pl: PostlaneClient, n: int, label: str, mode: str) -> dict[str, Any]:
        def start_all() -> Awaitable[list[dict[str, Any]]]:
            return asyncio.gather(
                *(self.one(pl, f"{self.run_id}-{label}-{i}", mode) for i in range(n))
            )

        return await self.measured(pl, n, start_all, 600, label=label, mode=mode, burst=True)

    async def steady(
        self, pl: PostlaneClient, rate: float, seconds: float, label: str, mode: str
    ) -> dict[str, Any]:
        n = max(int(rate * seconds), 1)

        async def open_loop() -> list[dict[str, Any]]:
            loop = asyncio.get_running_loop()
            start = loop.time()
            tasks = []
            for i in range(n):
                # Open loop: each email starts on schedule, whatever the earlier ones do.
                delay = start + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(
                    asyncio.ensure_future(self.one(pl, f"{self.run_id}-{label}-{i}", mode))
                )
            return await asyncio.gather(*tasks)

        return await self.measured(
            pl,
            n,
            open_loop,
            600 + seconds,
            label=label,
            mode=mode,
            burst=False,
            rate=round(rate, 2),
        )

    async def measured(
        self,
        pl: PostlaneClient,
        n: int,
        run: Callable[[], Awaitable[list[dict[str, Any]]]],
        limit: float,
        **labels: Any,
    ) -> dict[str, Any]:
        """Run `n` emails through `run` (within `limit` seconds) and summarise them with the
        CPU, load and dropped notifications measured around it."""
        meter = CpuMeter({k: p.pid for k, p in self.procs.items()})
        before, load_before = meter.snapshot(), uptime()
        dropped_before = self.dropped_notifications()
        t0 = time.time()
        rows = await self.guarded(run(), limit)
        cpu = CpuMeter.delta(before, meter.snapshot(), n)
        dropped_after = self.dropped_notifications()
        await self.finish(pl, rows)
        return summarise_rows(
            rows,
            t0=t0,
            uptime_before=load_before,
            uptime_after=uptime(),
            other_load_cores=cpu["other_load_cores"],
            cpu_ms_per_email=cpu["cpu_ms_per_email"],
            dropped=None
            if dropped_before is None or dropped_after is None
            else dropped_after - dropped_before,
            **labels,
        )


def summarise_rows(
    rows: list[dict[str, Any]], *, label: str, mode: str, t0: float, burst: bool, **extra: Any
) -> dict[str, Any]:
    legs: dict[str, list[float]] = {leg: [] for leg in LEGS}
    for r in rows:
        if r.get("sink") is not None:
            legs["to_sink"].append(r["sink"] - r["call"])
        if r.get("close") is not None:
            legs["to_close"].append(r["close"] - r["call"])
            legs["close_to_result"].append(r["result"] - r["close"])
        legs["to_result"].append(r["result"] - r["call"])
    sinks = [r["sink"] for r in rows if r.get("sink") is not None]
    drain = (max(sinks) - t0) if sinks else None
    stalled = [
        {
            "key": r["key"],
            "sink_s": round(r["sink"] - t0, 3) if r.get("sink") else None,
            "close_s": round(r["close"] - t0, 3) if r.get("close") else None,
            "result_s": round(r["result"] - t0, 3),
        }
        for r in rows
        if r.get("close") is not None and r["result"] - r["close"] > STALL
    ]
    slow_closes = [
        {
            "key": r["key"],
            "sink_s": round(r["sink"] - t0, 3),
            "close_s": round(r["close"] - t0, 3),
            "events_after_call_s": r["events"],
        }
        for r in rows
        if "events" in r
    ]
    out: dict[str, Any] = {
        "label": label,
        "mode": mode,
        "n": len(rows),
        "emails_caught": len(sinks),
        "seconds_to_last_result": round(max(r["result"] for r in rows) - t0, 3),
        "drain_s": round(drain, 3) if drain is not None else None,
        "ms": {leg: stats(v) for leg, v in legs.items()},
        "stalls": stalled,
        "slow_closes": slow_closes,
        **extra,
        # Every email's clocks, seconds after the phase began: call, started, sink, close,
        # result (the evidence behind the percentiles).
        "emails": [
            [
                round(r[k] - t0, 4) if r.get(k) is not None else None
                for k in ("call", "started", "sink", "close", "result")
            ]
            for r in rows
        ],
    }
    worst = max(legs["to_result"])
    if burst and drain is not None:
        out["target_met"] = worst <= drain + DRAIN_SLACK
    elif not burst:
        s = out["ms"]["to_result"]
        out["target_met"] = s["p99"] <= STEADY_P99_OVER_P50 * s["p50"]
    return out


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bench = LatencyBench(args, workdir)
    try:
        await bench.start_server()
        bench.start_catcher()
        bench.spawn_postlane_worker()
        pl = await bench.postlane_client()
        if args.task_timeout:
            # Experiment only: the workflow task timeout Postlane's starts would carry.
            start_workflow = pl.temporal.start_workflow
            timeout = timedelta(seconds=args.task_timeout)

            async def with_task_timeout(*a: Any, **kw: Any) -> Any:
                return await start_workflow(*a, task_timeout=timeout, **kw)

            pl.temporal.start_workflow = with_task_timeout  # type: ignore[method-assign]
        print(
            f"warm-up: {WARMUP} (server {bench.address}, metrics port {bench.metrics_port}, "
            f"work dir {workdir})",
            flush=True,
        )
        warm = await bench.burst(pl, WARMUP, "warm", "postlane")
        del warm
        await asyncio.sleep(SETTLE)
        bursts = []
        for b in range(args.bursts):
            mode = ("sdk", "postlane")[b % 2]
            result = await bench.burst(pl, args.emails, f"b{b + 1}-{mode}", mode)
            bursts.append(result)
            r = result["ms"]["to_result"]
            print(
                f"burst {b + 1} {mode:8s}: drain {result['drain_s']} s, last result "
                f"{result['seconds_to_last_result']} s, to_result p50/p99/max "
                f"{r['p50']}/{r['p99']}/{r['max']} ms, stalls {len(result['stalls'])}, "
                f"dropped notifications {result['dropped']}, other load "
                f"{result['other_load_cores']} cores",
                flush=True,
            )
            await asyncio.sleep(SETTLE)
        drains = [b["drain_s"] for b in bursts if b["mode"] == "postlane" and b["drain_s"]]
        capacity = args.emails / statistics.median(drains)
        rate = args.steady_fraction * capacity
        steady = []
        modes = ["postlane", "sdk"] if args.steady_sdk else ["postlane"]
        for mode in reversed(modes) if args.sdk_first else modes:
            print(f"steady {mode}: {rate:.1f}/s for {args.steady_seconds} s", flush=True)
            result = await bench.steady(pl, rate, args.steady_seconds, f"s-{mode}", mode)
            steady.append(result)
            r = result["ms"]["to_result"]
            print(
                f"steady {mode}: to_result p50/p95/p99/max {r['p50']}/{r['p95']}/{r['p99']}/"
                f"{r['max']} ms, stalls {len(result['stalls'])}, other load "
                f"{result['other_load_cores']} cores",
                flush=True,
            )
            await asyncio.sleep(SETTLE)
        return {"capacity_per_s": round(capacity, 2), "bursts": bursts, "steady": steady}
    finally:
        bench.stop_all()


def markdown(s: dict[str, Any]) -> str:
    m = s["machine"]

    def row(r: dict[str, Any], kind: str) -> str:
        cells = []
        for leg in LEGS:
            st = r["ms"].get(leg) or {}
            cells.append(
                " / ".join(f"{st[k]:.0f}" for k in ("p50", "p95", "p99", "max")) if st else "–"
            )
        met = r.get("target_met")
        return (
            f"| {r['label']} | {r['mode']} | {r['n']} | "
            f"{r['drain_s'] if kind == 'burst' else r['rate']} | "
            + " | ".join(cells)
            + f" | {len(r['stalls'])} | {r['dropped'] if r['dropped'] is not None else '–'} | "
            f"{r['other_load_cores']} | {'met' if met else '**not met**'} |"
        )

    lines = [
        f"# Tail latency benchmark ({s['date']})",
        "",
        f"{m['cpu_count']} CPUs, Python {s['versions']['python']}, {s['versions']['temporal_cli']};"
        f" dev server with `postlane.dev.stack.SERVER_TUNING`; lane `rate_per_second` "
        f"{RATE_PER_SECOND}, `max_concurrent` {MAX_CONCURRENT}; result poll deadline "
        f"{RESULT_POLL_TIMEOUT.total_seconds():g} s; production code `{s['code_sha256']}`.",
        "",
        f"`uptime` at start: `{m['uptime_start']}`; at the end: `{m['uptime_end']}`.",
        "",
    ]
    if s.get("task_timeout_s"):
        lines += [
            f"**Experiment:** emails started with a workflow task timeout of "
            f"{s['task_timeout_s']:g} s (`--task-timeout`), not Temporal's 10 s.",
            "",
        ]
    other = max(r["other_load_cores"] for r in [*s["bursts"], *s["steady"]])
    if other > NOISY_CORES:
        lines += [
            "> **Noisy machine:** other processes used up to "
            f"{other:g} cores during a phase (each phase's other-load column says how much)."
            " Absolute milliseconds and the capacity are understated; the targets are for a"
            " quiet machine. The stalls and the leg they sit in do not depend on the load's"
            " size.",
            "",
        ]
    else:
        lines += [
            f"Quiet machine: other processes used at most {other:g} cores during any phase.",
            "",
        ]
    lines += [
        "Per email, ms as p50 / p95 / p99 / max, from its start call to: the SMTP sink "
        "accepting it (`to_sink`), the server closing its workflow (`to_close`), the client "
        "holding the result (`to_result`); and from that close to the result "
        f"(`close_to_result`). A stall is an email whose result came > {STALL:g} s after its "
        "workflow closed. `dropped` is the server's count of history-event notifications "
        "it could not queue during the phase.",
        "",
        f"Bursts of {s['n']} (target: max `to_result` ≤ drain time + {DRAIN_SLACK:g} s; drain "
        "= first start call to the last SMTP acceptance):",
        "",
        "| burst | wait | n | drain s | to_sink | to_close | to_result | close_to_result | "
        "stalls | dropped | other load (cores) | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(r, "burst") for r in s["bursts"]]
    lines += [
        "",
        f"Steady load at {s['steady_fraction']:.0%} of the capacity the `postlane` bursts "
        f"measured ({s['capacity_per_s']:.1f} emails/s), {s['steady_seconds']:g} s, open loop "
        f"(target: p99 ≤ {STEADY_P99_OVER_P50:g} × p50 of `to_result`):",
        "",
        "| phase | wait | n | rate /s | to_sink | to_close | to_result | close_to_result | "
        "stalls | dropped | other load (cores) | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(r, "steady") for r in s["steady"]]
    stalls = [(r["label"], st) for r in s["bursts"] + s["steady"] for st in r["stalls"]]
    if stalls:
        lines += [
            "",
            "Stalled emails (seconds after the phase began: sink, close, result):",
            "",
        ]
        lines += [
            f"- {label} `{st['key']}`: {st['sink_s']}, {st['close_s']}, {st['result_s']}"
            for label, st in stalls[:20]
        ]
    slow = [(r["label"], sc) for r in s["bursts"] + s["steady"] for sc in r["slow_closes"]]
    if slow:
        lines += [
            "",
            f"Emails whose workflow closed > {STALL:g} s after the sink accepted them "
            f"({len(slow)}; the first 10, with their history events from the SMTP acceptance "
            "on, seconds after the email's start call; all in the JSON's `slow_closes`):",
            "",
        ]
        for label, sc in slow[:10]:
            after = [
                f"{name} {at}" for name, at in sc["events_after_call_s"] if at >= sc["sink_s"] - 1.0
            ]
            lines.append(
                f"- {label} `{sc['key']}` (sink {sc['sink_s']} s, close {sc['close_s']} s after "
                f"the phase began): " + ", ".join(after)
            )
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--emails", type=int, default=300, help="emails per burst (300)")
    parser.add_argument(
        "--bursts", type=int, default=6, help="bursts, alternating sdk/postlane (at least 2)"
    )
    parser.add_argument("--steady-seconds", type=float, default=30.0)
    parser.add_argument("--steady-fraction", type=float, default=0.7)
    parser.add_argument("--steady-sdk", action="store_true", help="also a steady phase, sdk wait")
    parser.add_argument(
        "--sdk-first", action="store_true", help="with --steady-sdk: run the sdk phase first"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--task-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="experiment: start emails with this workflow task timeout (default: Temporal's 10 s)",
    )
    parser.add_argument("--tag", default="", help="results file suffix: latency-<tag>.*")
    parser.add_argument("--workdir", type=Path, help="keep the database and logs here")
    args = parser.parse_args()
    if args.bursts < 2:
        parser.error("--bursts: at least 2 (the postlane bursts size the steady phase)")
    cli_version = subprocess.run(
        [dev_server_path(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "uptime_start": uptime(),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()],
            "platform": platform.platform(),
        },
        "versions": {"python": platform.python_version(), "temporal_cli": cli_version},
        "code_sha256": code_digest(),
        "server_tuning": SERVER_TUNING,
        "n": args.emails,
        "steady_fraction": args.steady_fraction,
        "steady_seconds": args.steady_seconds,
        "result_poll_timeout_s": RESULT_POLL_TIMEOUT.total_seconds(),
        "stall_s": STALL,
        "task_timeout_s": args.task_timeout or None,
    }
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        raw = asyncio.run(run(args, args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="postlane-latency-") as tmp:
            raw = asyncio.run(run(args, Path(tmp)))
    meta["machine"]["uptime_end"] = uptime()
    meta["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    meta["code_changed_during_run"] = code_digest() != meta["code_sha256"]
    summary = {**meta, **raw}
    table = markdown(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"latency-{args.tag}" if args.tag else "latency"
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    print()
    print(table)
    print(f"written: {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    run_script(main)
