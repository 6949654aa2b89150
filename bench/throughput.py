"""Postlane's throughput, idle latency and SMTP connection reuse on the real dev server.

Run from the repository root::

    .venv/bin/python bench/throughput.py [--emails 300] [--quick]

It starts, as subprocesses, the Temporal dev server exactly as `postlane dev` tunes it
(`postlane.dev.stack.SERVER_TUNING`, SQLite file in a temporary directory), a Postlane worker
(``python worker.py``, one lane pointed at an SMTP catcher in this process) and the worker
of a trivial one-workflow-one-activity baseline app (``bench/baseline_worker.py``). This
process only starts workflows and waits for results. See bench/README.md for the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosmtpd.smtp
import temporalio
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from baseline_app import WORKFLOW_QUEUE as BASELINE_QUEUE  # noqa: E402

from postlane.client import PostlaneClient  # noqa: E402
from postlane.config import load_settings  # noqa: E402
from postlane.connection import data_converter  # noqa: E402
from postlane.dev.binaries import dev_server_path  # noqa: E402
from postlane.dev.catcher import SmtpCatcher  # noqa: E402
from postlane.dev.stack import SERVER_TUNING, server_tuning  # noqa: E402
from postlane.email.models import Email  # noqa: E402
from postlane.namespace import ensure_search_attributes  # noqa: E402

NAMESPACE = "default"
TUNING = SERVER_TUNING
"""The server's tuning flags (``--synchronous`` picks the SQLite mode)."""
LANE = "bench"
RATE_PER_SECOND = 1000
MAX_CONCURRENT = 64
WARMUP = 20
STARTUP_TIMEOUT = 60.0
BATCH_TIMEOUT = 300.0
SETTLE = 1.0
"""Seconds of quiet between batches, so one batch's background work does not tax the next."""
LATENCY_GAP = 0.05
"""Seconds between idle-latency samples."""
IDLE_PROBE = 3.0
"""Seconds with nothing to do, to measure the processes' idle CPU use."""
BENCH_TOKEN_SECRET = "postlane-bench-token-secret-not-for-production"
"""The workers' token secret unless ``POSTLANE_TOKEN_SECRET`` is set."""
BODY = ("Postlane benchmark body line, about sixty-four bytes long.....\n" * 32)[:2000]
"""A 2 KB text body, as in the reference measurements (bench/results/throughput.md)."""

TARGETS = {
    "ratio_min": 0.90,
    "postlane_emails_per_s_min": 45.0,
    "postlane_idle_p50_ms_max": 30.0,
}


# -- SMTP connection counting (bench-only monkeypatch of aiosmtpd) ---------------------------


class ConnectionCounter:
    """Counts TCP connections accepted by every aiosmtpd server in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self._original = aiosmtpd.smtp.SMTP.connection_made

    def install(self) -> None:
        counter = self
        original = self._original

        def connection_made(self: aiosmtpd.smtp.SMTP, transport: Any) -> None:
            with counter._lock:
                counter.count += 1
            original(self, transport)

        aiosmtpd.smtp.SMTP.connection_made = connection_made  # type: ignore[method-assign]

    def uninstall(self) -> None:
        aiosmtpd.smtp.SMTP.connection_made = self._original  # type: ignore[method-assign]

    def value(self) -> int:
        with self._lock:
            return self.count


# -- process and CPU accounting -------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid` and its waited-for children."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return (total - idle) / _TICK, total / _TICK


class CpuMeter:
    """CPU seconds spent by the server, the workers, this starter and the rest of the machine."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def snapshot(self) -> dict[str, float]:
        snap = {name: _proc_cpu(pid) for name, pid in self.pids.items()}
        snap["starter"] = _self_cpu()
        snap["machine_busy"], snap["machine_total"] = _machine_busy()
        return snap

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, Any]:
        d = {k: after[k] - before[k] for k in before}
        ours = sum(v for k, v in d.items() if not k.startswith("machine"))
        cores = os.cpu_count() or 1
        return {
            "cpu_seconds": {k: round(v, 3) for k, v in d.items() if not k.startswith("machine")},
            "cpu_ms_per_email": {
                k: round(1000 * v / n, 2) for k, v in d.items() if not k.startswith("machine")
            },
            # The whole machine's CPU use during the batch, and the part not ours (other load).
            "machine_utilisation": round(d["machine_busy"] / max(d["machine_total"], 1e-9), 3),
            "other_load_cores": round(
                max(d["machine_busy"] - ours, 0.0) / max(d["machine_total"], 1e-9) * cores, 2
            ),
        }


_SPAWNED: dict[str, subprocess.Popen[bytes]] = {}
"""Every subprocess ever started, so that `main` can stop leftovers whatever happened."""


def stop_leftovers() -> None:
    for proc in _SPAWNED.values():
        _stop(proc, timeout=40)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwind through every `finally`, which stop the subprocesses


def _free_port() -> int:
    from tests.procs import free_port  # below the ephemeral range (see there)

    return free_port()


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(math.ceil(pct / 100 * len(ordered)) - 1, 0)]


# -- the benchmark ----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.run_id = datetime.now(UTC).strftime("%H%M%S")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.counter = ConnectionCounter()
        self.smtp: SmtpCatcher | None = None
        self.config = workdir / "postlane.toml"
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.extra_server_flags: list[str] = []
        """More `temporal server start-dev` flags (bench/latency.py: a metrics port)."""
        self.on_disk = True
        """The server's SQLite database is a file in `workdir` (False: in memory)."""

    # processes

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.procs[name] = _SPAWNED[name + str(len(_SPAWNED))] = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only us; we stop them in `finally`
        )

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop_worker(self, name: str) -> None:
        _stop(self.procs.pop(name, None), timeout=40)  # graceful shutdown is 30 s

    def stop_all(self) -> None:
        for name in [n for n in self.procs if n != "server"]:
            self.stop_worker(name)
        _stop(self.procs.get("server"), timeout=15)
        if self.smtp is not None:
            self.smtp.stop()
        self.counter.uninstall()

    @property
    def worker_env(self) -> dict[str, str]:
        return {
            "TEMPORAL_ADDRESS": self.address,
            "TEMPORAL_NAMESPACE": NAMESPACE,
            # Workers refuse to start without one (Message-IDs and tokens are sealed with it).
            "POSTLANE_TOKEN_SECRET": os.environ.get("POSTLANE_TOKEN_SECRET", BENCH_TOKEN_SECRET),
        }

    async def start_server(self) -> Client:
        """The dev server, as `postlane dev` tunes it, with Postlane's search attributes."""
        self._spawn(
            "server",
            [
                dev_server_path(),
                "server",
                "start-dev",
                *TUNING,
                *(["--db-filename", str(self.workdir / "temporal.db")] if self.on_disk else []),
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--headless",
                "--log-level",
                "warn",
                *self.extra_server_flags,
            ],
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT
        while True:
            self._check_alive()
            try:
                raw = await Client.connect(self.address, namespace=NAMESPACE)
                await ensure_search_attributes(raw, NAMESPACE)
                return raw
            except (RuntimeError, RPCError):
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)  # polling a process we just started

    def start_catcher(self) -> Path:
        """The SMTP sink (in this process, connections counted) and a lane config for it."""
        self.counter.install()
        self.smtp = SmtpCatcher().start()
        self.config = self.workdir / "postlane.toml"
        self.config.write_text(
            "\n".join(
                [
                    "[[lanes]]",
                    f'name = "{LANE}"',
                    'senders = ["*"]',
                    f'smtp_host = "{self.smtp.host}"',
                    f"smtp_port = {self.smtp.port}",
                    'smtp_tls = "none"',
                    f"rate_per_second = {RATE_PER_SECOND}",
                    f"max_concurrent = {MAX_CONCURRENT}",
                    "",
                ]
            )
        )
        return self.config

    def spawn_postlane_worker(
        self, name: str = "postlane_worker", argv: list[str] | None = None, **env: str
    ) -> None:
        """``python worker.py`` (or `argv`) serving the bench lane and the workflows."""
        self._spawn(
            name,
            argv or [sys.executable, "worker.py"],
            {**self.worker_env, "POSTLANE_CONFIG": str(self.config), **env},
        )

    def spawn_baseline_worker(self) -> None:
        self._spawn(
            "baseline_worker", [sys.executable, str(BENCH / "baseline_worker.py")], self.worker_env
        )

    async def postlane_client(self) -> PostlaneClient:
        client = await Client.connect(
            self.address, namespace=NAMESPACE, data_converter=data_converter()
        )
        return PostlaneClient(client, load_settings(self.config))

    async def start(self) -> tuple[PostlaneClient, Client]:
        raw = await self.start_server()
        self.start_catcher()
        self.spawn_postlane_worker()
        self.spawn_baseline_worker()
        return await self.postlane_client(), raw

    # one workflow, each kind

    def _email(self, key: str) -> Email:
        return Email(
            sender="bench@example.test",
            to=["inbox@example.test"],
            subject=f"Postlane bench {key}",
            text=BODY,
        )

    def postlane_one(self, pl: PostlaneClient) -> Callable[[str], Awaitable[Any]]:
        async def start(key: str) -> Any:
            return await pl.send(self._email(key), key=key)

        return start

    def baseline_one(self, client: Client) -> Callable[[str], Awaitable[Any]]:
        async def start(key: str) -> Any:
            return await client.start_workflow(
                "BenchTrivial",
                BODY,
                id=f"baseline:{key}",
                task_queue=BASELINE_QUEUE,
                result_type=int,
            )

        return start

    # measurements

    async def guarded(self, work: Awaitable[Any], limit: float) -> Any:
        """Await `work`, but fail fast if a subprocess dies (a worker that crashed at start
        would otherwise leave the starter waiting for results that never come)."""
        task = asyncio.ensure_future(work)
        deadline = time.monotonic() + limit
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=0.5)
                if done:
                    return task.result()
                self._check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no result after {limit} s")
        finally:
            task.cancel()

    async def batch(
        self, start: Callable[[str], Awaitable[Any]], n: int, label: str, meter: CpuMeter
    ) -> dict[str, Any]:
        """Start `n` workflows at once and wait for every result."""
        self._check_alive()
        started_at: list[float] = []
        before = meter.snapshot()
        t0 = time.perf_counter()

        per_email: list[float] = []

        async def one(i: int) -> None:
            called = time.perf_counter()
            handle = await start(f"{self.run_id}-{label}-{i}")
            started_at.append(time.perf_counter())
            await handle.result()
            per_email.append((time.perf_counter() - called) * 1000)

        await self.guarded(asyncio.gather(*(one(i) for i in range(n))), BATCH_TIMEOUT)
        elapsed = time.perf_counter() - t0
        cpu = CpuMeter.delta(before, meter.snapshot(), n)
        return {
            "label": label,
            "n": n,
            "seconds": round(elapsed, 3),
            "per_second": round(n / elapsed, 2),
            "all_started_after_s": round(max(started_at) - t0, 3),
            # Each email, start call to result (ms): a batch's tail shows here first.
            "email_ms": {
                "p50": round(statistics.median(per_email), 1),
                "p95": round(_percentile(per_email, 95), 1),
                "p99": round(_percentile(per_email, 99), 1),
                "max": round(max(per_email), 1),
            },
            **cpu,
        }

    async def latency(
        self, starts: dict[str, Callable[[str], Awaitable[Any]]], samples: int, label: str = "lat"
    ) -> tuple[dict[str, list[float]], dict[str, list[tuple[str, float, float]]]]:
        """Sequential sends, send() to result(), kinds interleaved; milliseconds.

        Also returns, per kind, (workflow ID, wall time sent, wall time of the result) for
        `breakdown`.
        """
        out: dict[str, list[float]] = {kind: [] for kind in starts}
        marks: dict[str, list[tuple[str, float, float]]] = {kind: [] for kind in starts}
        for i in range(samples):
            for kind, start in starts.items():
                await asyncio.sleep(LATENCY_GAP)
                wall, t0 = time.time(), time.perf_counter()
                handle = await start(f"{self.run_id}-{label}-{i}")
                await self.guarded(handle.result(), 30)
                out[kind].append(round((time.perf_counter() - t0) * 1000, 2))
                wf_id = getattr(handle, "workflow_id", None) or handle.id
                marks[kind].append((wf_id, wall, time.time()))
        return out, marks


async def breakdown(client: Client, marks: list[tuple[str, float, float]]) -> dict[str, float]:
    """Median milliseconds of each leg of an idle send, from the workflows' histories."""
    legs: dict[str, list[float]] = {name: [] for name, _, _ in LEGS}
    for wf_id, sent, done in marks:
        history = await client.get_workflow_handle(wf_id).fetch_history()
        seen: dict[str, int] = {}
        at: dict[str, float] = {"sent": sent, "result": done}
        for event in history.events:
            name = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")
            seen[name] = seen.get(name, 0) + 1
            at.setdefault(f"{name}#{seen[name]}", event.event_time.ToMicroseconds() / 1e6)
        for leg, begin, end in LEGS:
            if begin in at and end in at:
                legs[leg].append((at[end] - at[begin]) * 1000)
    return {leg: round(statistics.median(v), 1) for leg, v in legs.items() if v}


LEGS = [
    ("start call, client to server", "sent", "WORKFLOW_EXECUTION_STARTED#1"),
    ("workflow task 1: dispatch", "WORKFLOW_EXECUTION_STARTED#1", "WORKFLOW_TASK_STARTED#1"),
    ("workflow task 1: worker", "WORKFLOW_TASK_STARTED#1", "WORKFLOW_TASK_COMPLETED#1"),
    ("activity: dispatch", "ACTIVITY_TASK_SCHEDULED#1", "ACTIVITY_TASK_STARTED#1"),
    ("activity: run", "ACTIVITY_TASK_STARTED#1", "ACTIVITY_TASK_COMPLETED#1"),
    ("workflow task 2: dispatch", "ACTIVITY_TASK_COMPLETED#1", "WORKFLOW_TASK_STARTED#2"),
    ("workflow task 2: worker", "WORKFLOW_TASK_STARTED#2", "WORKFLOW_TASK_COMPLETED#2"),
    ("result to client", "WORKFLOW_EXECUTION_COMPLETED#1", "result"),
]
"""Legs of one idle send: (name, from event, to event); event times are the server's, and
the client's clock is the same machine's."""


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bench = Bench(args, workdir)
    try:
        pl, raw = await bench.start()
        baseline_client = raw  # default data converter: nothing of Postlane's
        starts = {
            "postlane": bench.postlane_one(pl),
            "baseline": bench.baseline_one(baseline_client),
        }
        meter = CpuMeter(
            {
                "server": bench.procs["server"].pid,
                "postlane_worker": bench.procs["postlane_worker"].pid,
                "baseline_worker": bench.procs["baseline_worker"].pid,
            }
        )
        assert bench.smtp is not None
        conn_start = bench.counter.value()

        print(f"warm-up: {WARMUP} of each (server {bench.address}, work dir {workdir})", flush=True)
        for kind, start in starts.items():
            # The first workflows wait for the workers to come up and load the sandbox.
            await bench.batch(start, WARMUP, f"warm-{kind}", meter)
        await asyncio.sleep(SETTLE)
        # What the stack burns doing nothing (pollers, timers): part of every batch's CPU.
        before = meter.snapshot()
        await asyncio.sleep(IDLE_PROBE)
        idle = CpuMeter.delta(before, meter.snapshot(), 1)
        idle_cores = {k: round(v / IDLE_PROBE, 3) for k, v in idle["cpu_seconds"].items()}

        print(f"idle latency: {args.latency_samples} sequential sends of each", flush=True)
        before = meter.snapshot()
        lat, marks = await bench.latency(starts, args.latency_samples)
        lat_load = CpuMeter.delta(before, meter.snapshot(), 1)["other_load_cores"]
        await asyncio.sleep(SETTLE)

        rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in starts}
        for r in range(args.rounds):
            order = list(starts) if r % 2 == 0 else list(reversed(starts))
            for kind in order:
                result = await bench.batch(starts[kind], args.emails, f"r{r + 1}-{kind}", meter)
                rounds[kind].append(result)
                print(
                    f"round {r + 1} {kind:8s}: {result['n']} in {result['seconds']:.2f} s = "
                    f"{result['per_second']:.1f}/s (all started after "
                    f"{result['all_started_after_s']:.2f} s; slowest email "
                    f"{result['email_ms']['max'] / 1000:.1f} s; other load "
                    f"{result['other_load_cores']} cores)",
                    flush=True,
                )
                await asyncio.sleep(SETTLE)

        delivered = len(bench.smtp.messages)
        connections = bench.counter.value() - conn_start
        histories = {}
        for kind, wf_id in (
            ("postlane", f"email:{bench.run_id}-r1-postlane-0"),
            ("baseline", f"baseline:{bench.run_id}-r1-baseline-0"),
        ):
            history = await raw.get_workflow_handle(wf_id).fetch_history()
            histories[kind] = [
                EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in history.events
            ]
        sent = WARMUP + args.latency_samples + args.rounds * args.emails
        legs = {kind: await breakdown(raw, marks[kind]) for kind in starts}
        return {
            "latency_other_load_cores": lat_load,
            "latency_legs_ms": legs,
            "idle_cpu_cores": idle_cores,
            "latency_ms": lat,
            "rounds": rounds,
            "smtp": {
                "emails_sent": sent,
                "emails_caught": delivered,
                "connections": connections,
                "emails_per_connection": round(delivered / max(connections, 1), 1),
                "lane_max_concurrent": MAX_CONCURRENT,
            },
            "history_events": histories,
        }
    finally:
        bench.stop_all()


def summarise(
    raw: dict[str, Any], args: argparse.Namespace, meta: dict[str, Any]
) -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    for kind in ("postlane", "baseline"):
        own = ("server", f"{kind}_worker", "starter")
        rates = [r["per_second"] for r in raw["rounds"][kind]]
        lat = raw["latency_ms"][kind]
        kinds[kind] = {
            "rounds": raw["rounds"][kind],
            "per_second": rates,
            "median_per_second": round(statistics.median(rates), 2),
            "idle_latency_ms": {
                "samples": lat,
                "p50": round(statistics.median(lat), 1),
                "p95": round(_percentile(lat, 95), 1),
            },
            "idle_latency_legs_ms_median": raw["latency_legs_ms"][kind],
            "history_events": raw["history_events"][kind],
            "cpu_ms_per_email_total": [
                round(sum(v for k, v in r["cpu_ms_per_email"].items() if k in own), 2)
                for r in raw["rounds"][kind]
            ],
            "cpu_ms_per_email_median": {
                name: round(
                    statistics.median(r["cpu_ms_per_email"][name] for r in raw["rounds"][kind]), 2
                )
                for name in raw["rounds"][kind][0]["cpu_ms_per_email"]
            },
        }
    ratio = round(
        kinds["postlane"]["median_per_second"] / kinds["baseline"]["median_per_second"], 3
    )
    paired = round(
        statistics.median(
            p["per_second"] / b["per_second"]
            for p, b in zip(raw["rounds"]["postlane"], raw["rounds"]["baseline"], strict=True)
        ),
        3,
    )
    cpu_ratio = round(
        statistics.median(kinds["baseline"]["cpu_ms_per_email_total"])
        / statistics.median(kinds["postlane"]["cpu_ms_per_email_total"]),
        3,
    )
    smtp = raw["smtp"]
    return {
        **meta,
        "n": args.emails,
        "rounds_per_kind": args.rounds,
        "warmup": WARMUP,
        "latency_samples": args.latency_samples,
        "postlane": kinds["postlane"],
        "baseline": kinds["baseline"],
        "ratio_postlane_to_baseline": ratio,
        "ratio_paired_median": paired,
        "ratio_from_cpu": cpu_ratio,
        "smtp": smtp,
        "idle_cpu_cores": raw["idle_cpu_cores"],
        "latency_other_load_cores": raw["latency_other_load_cores"],
        "targets": {
            **TARGETS,
            "ratio_met": ratio >= TARGETS["ratio_min"],
            "postlane_rate_met": kinds["postlane"]["median_per_second"]
            >= TARGETS["postlane_emails_per_s_min"],
            "postlane_idle_p50_met": kinds["postlane"]["idle_latency_ms"]["p50"]
            <= TARGETS["postlane_idle_p50_ms_max"],
            "smtp_reuse_met": smtp["emails_caught"] == smtp["emails_sent"]
            and smtp["connections"] <= MAX_CONCURRENT,
        },
    }


def markdown(s: dict[str, Any]) -> str:
    p, b, t = s["postlane"], s["baseline"], s["targets"]

    def ok(met: bool) -> str:
        return "met" if met else "**not met**"

    def rounds(k: dict[str, Any]) -> str:
        return ", ".join(f"{v:.1f}" for v in k["per_second"])

    def worst(k: dict[str, Any]) -> str:
        r = max(k["rounds"], key=lambda r: r["email_ms"]["max"])["email_ms"]
        return " / ".join(f"{r[q]:.0f}" for q in ("p50", "p95", "p99", "max"))

    def cpu(k: dict[str, Any], name: str) -> str:
        return f"{k['cpu_ms_per_email_median'][name]:.1f}"

    m = s["machine"]
    lines = [
        f"# Throughput benchmark ({s['date']})",
        "",
        f"{m['cpu_count']} CPUs, Python {s['versions']['python']}, temporalio "
        f"{s['versions']['temporalio']}, {s['versions']['temporal_cli']}; dev server with "
        f"`postlane.dev.stack.server_tuning()` on a SQLite file, "
        f"{next(f for f in s['server_flags'] if f.startswith('synchronous='))}; N = {s['n']}, "
        f"{s['rounds_per_kind']} rounds each after a warm-up of {s['warmup']}; production "
        f"code `{s['code_sha256']}`"
        + (" (**changed during the run**)" if s.get("code_changed_during_run") else "")
        + f"; load average at start {m['loadavg_start'][0]:.2f}"
        + (" (quick run)" if s["quick"] else "")
        + ".",
        "",
    ]
    other = [r["other_load_cores"] for k in ("postlane", "baseline") for r in s[k]["rounds"]]
    if m["loadavg_start"][0] > 1.0 or max(other) > 0.3:
        lines += [
            f"> **Load caveat:** the 1-minute load average was {m['loadavg_start'][0]:.2f} "
            f"when the run started, and other processes used {min(other):.2f} to "
            f"{max(other):.2f} cores during the rounds (work of other sessions on this "
            "machine). Emails/s and latencies are understated and the ratio of medians swings "
            "with the load of the moment; the CPU-based ratio (CPU per email, which moves "
            "much less with foreign load) is the more reliable estimate. `other_load_cores` "
            "in the JSON gives each round's foreign CPU use.",
            "",
        ]
    lines += [
        "| figure | Postlane | baseline (1 wf + 1 no-op activity) | target |",
        "|---|---|---|---|",
        f"| emails/s, median (rounds) | **{p['median_per_second']:.1f}** ({rounds(p)}) | "
        f"{b['median_per_second']:.1f} ({rounds(b)}) | ≥ 45: {ok(t['postlane_rate_met'])} |",
        f"| ratio Postlane / baseline, of the medians | **{s['ratio_postlane_to_baseline']:.2f}**"
        f" | | ≥ 0.90: {ok(t['ratio_met'])} |",
        f"| ratio, median of the per-round ratios | {s['ratio_paired_median']:.2f} | | |",
        f"| ratio from CPU per email (baseline / Postlane) | **{s['ratio_from_cpu']:.2f}** | | "
        f"≥ 0.90: {ok(s['ratio_from_cpu'] >= TARGETS['ratio_min'])} |",
        f"| idle latency p50, ms | **{p['idle_latency_ms']['p50']:.1f}** | "
        f"{b['idle_latency_ms']['p50']:.1f} | ≤ 30: {ok(t['postlane_idle_p50_met'])} |",
        f"| idle latency p95, ms | {p['idle_latency_ms']['p95']:.1f} | "
        f"{b['idle_latency_ms']['p95']:.1f} | |",
        f"| CPU ms per email, total (median) | "
        f"{statistics.median(p['cpu_ms_per_email_total']):.1f} | "
        f"{statistics.median(b['cpu_ms_per_email_total']):.1f} | |",
        f"| · server | {cpu(p, 'server')} | {cpu(b, 'server')} | |",
        f"| · its worker | {cpu(p, 'postlane_worker')} | {cpu(b, 'baseline_worker')} | |",
        f"| · starter (+ SMTP sink for Postlane) | {cpu(p, 'starter')} | {cpu(b, 'starter')} | |",
        f"| per email in the rounds, p50 / p95 / p99 / max ms (worst round) | "
        f"{worst(p)} | {worst(b)} | |",
        f"| history events per workflow | {len(p['history_events'])} | "
        f"{len(b['history_events'])} | |",
        f"| SMTP connections / emails delivered | {s['smtp']['connections']} / "
        f"{s['smtp']['emails_caught']} | | ≤ max_concurrent ({s['smtp']['lane_max_concurrent']}):"
        f" {ok(t['smtp_reuse_met'])} |",
        "",
        "Idle send, median ms per leg (from the histories' event times; other load during "
        f"the latency phase: {s['latency_other_load_cores']:.2f} cores):",
        "",
        "| leg | Postlane | baseline |",
        "|---|---|---|",
    ]
    pl, bl = p["idle_latency_legs_ms_median"], b["idle_latency_legs_ms_median"]
    for leg in pl:
        lines.append(f"| {leg} | {pl[leg]:.1f} | {bl.get(leg, float('nan')):.1f} |")
    lines += [
        "",
        "Idle CPU use of the processes (cores, nothing to do): "
        + ", ".join(f"{k} {v:.3f}" for k, v in s["idle_cpu_cores"].items())
        + ". `bench/ablation.py` shows where Postlane's extra CPU goes.",
        "",
    ]
    return "\n".join(lines)


def code_digest() -> str:
    """A fingerprint of the production code measured (it changes under other sessions)."""
    digest = hashlib.sha256()
    files = [REPO / "worker.py"]
    for package in ("postlane", "workflows", "activities"):
        files += sorted((REPO / package).rglob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def wait_for_quiet(limit: float, probe: float = 5.0, cores: float = 0.3) -> dict[str, Any]:
    """Wait (up to `limit` seconds) until the machine used < `cores` CPUs over `probe` s."""
    began = time.monotonic()
    while True:
        b0, t0 = _machine_busy()
        time.sleep(probe)
        b1, t1 = _machine_busy()
        busy = (b1 - b0) / max(t1 - t0, 1e-9) * (os.cpu_count() or 1)
        waited = time.monotonic() - began
        if busy < cores or waited >= limit:
            return {
                "waited_s": round(waited, 1),
                "busy_cores": round(busy, 2),
                "quiet": busy < cores,
            }
        print(f"waiting for a quiet machine: {busy:.2f} cores busy", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--emails", type=int, help="N per round (default 300; 100 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 round, 10 latency samples")
    parser.add_argument(
        "--out", type=Path, default=BENCH / "results", help="directory for the results files"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the server's database and the logs here (default: a temp dir)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the machine to be idle (other load < 0.3 cores)",
    )
    parser.add_argument(
        "--synchronous",
        choices=["full", "normal"],
        help="the server's SQLite synchronous mode (default: postlane dev's, full); when"
        " given, the results files are named throughput[-quick]-<mode>",
    )
    args = parser.parse_args()
    global TUNING
    TUNING = server_tuning(args.synchronous) if args.synchronous else SERVER_TUNING
    args.emails = args.emails or (100 if args.quick else 300)
    args.rounds = 1 if args.quick else 3
    args.latency_samples = 10 if args.quick else 30
    cli_version = subprocess.run(
        [dev_server_path(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()],
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "temporalio": temporalio.__version__,
            "temporal_cli": cli_version,
        },
        "code_sha256": code_digest(),
        "server_flags": [
            *TUNING,
            "--db-filename",
            "<tmpdir>/temporal.db",
            "--ip",
            "127.0.0.1",
            "--port",
            "<free>",
            "--headless",
            "--log-level",
            "warn",
        ],
        "lane": {"rate_per_second": RATE_PER_SECOND, "max_concurrent": MAX_CONCURRENT},
    }
    if args.wait_quiet:
        meta["machine"]["loadavg_at_launch"] = meta["machine"]["loadavg_start"]
        meta["machine"]["quiet_wait"] = wait_for_quiet(args.wait_quiet)
        meta["machine"]["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    began = time.perf_counter()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        raw = asyncio.run(run(args, args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="postlane-bench-") as tmp:
            raw = asyncio.run(run(args, Path(tmp)))
    meta["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    meta["wall_seconds"] = round(time.perf_counter() - began, 1)
    meta["code_changed_during_run"] = code_digest() != meta["code_sha256"]
    summary = summarise(raw, args, meta)
    table = markdown(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "throughput-quick" if args.quick else "throughput"
    if args.synchronous:
        stem += f"-{args.synchronous}"
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    print()
    print(table)
    print(f"written: {args.out / stem}.json and .md ({meta['wall_seconds']} s)")
    return 0


def run_script(main: Callable[[], int]) -> None:
    """Run a benchmark's `main`, always stop its servers and workers, then leave."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = main()
    except BaseException:
        traceback.print_exc()
        rc = 1
    finally:
        stop_leftovers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # the SDK can abort at interpreter shutdown (sdk-python#300)


if __name__ == "__main__":
    run_script(main)
