"""Duplicates per worker kill: emails that reached the SMTP server twice because the worker
that sent them was SIGKILLed after the server accepted DATA.

Run from the repository root::

    .venv/bin/python bench/duplicate_window.py [--emails 1000] [--kill-every 2]

For each code version ("before": the branch point with main, read from git; "after": this
working tree) it starts a fresh Temporal dev server, an SMTP sink in a process of its own
(the `SmtpCatcher`) and ``--workers`` worker processes (``python worker.py`` of that version,
each hosting the workflows and the one lane). It starts ``--emails`` emails at once and,
while they go out, SIGKILLs a random worker every ``--kill-every`` seconds (jittered
±50 %) and starts a fresh one in its place. When every email's workflow has finished it
counts the copies of each Message-ID the sink received. A copy beyond the first is a
duplicate; the figure is duplicates per kill. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from temporalio.testing import WorkflowEnvironment  # noqa: E402

from postlane import search_attributes as sa  # noqa: E402
from postlane.client import PostlaneClient  # noqa: E402
from postlane.config import LaneConfig, Settings  # noqa: E402
from postlane.connection import data_converter  # noqa: E402
from postlane.dev.binaries import dev_server_path  # noqa: E402
from postlane.dev.stack import SERVER_TUNING  # noqa: E402
from postlane.email.models import Email, RetrySettings  # noqa: E402
from postlane.ids import message_id  # noqa: E402
from tests.procs import activity_pollers, free_port, lanes_toml  # noqa: E402

LANE = "dup"
ACCEPTED_SIGNAL = "delivery_accepted"


def checkout(ref: str, into: Path) -> Path:
    """The tree of git `ref`, extracted into `into` (workers run from there)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref],
        check=True,
        capture_output=True,
    ).stdout
    into.mkdir(parents=True)
    tar = into.parent / f"{into.name}.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into


SINK_SCRIPT = """
import signal, sys, threading
from postlane.dev.catcher import SmtpCatcher
out = open(sys.argv[2], "a", buffering=1)
lock = threading.Lock()
def caught(message):
    with lock:
        out.write(f"M {message.message_id} {message.received_at}\\n")
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
with SmtpCatcher(port=int(sys.argv[1]), on_message=caught) as sink:
    out.write("READY\\n")
    stop.wait()
    with lock:
        out.write(f"S {len(sink.sessions)}\\n")
"""


class Sink:
    """The SMTP sink (`SmtpCatcher`) in a process of its own, so that it answers 250 as
    soon as it has stored a message, however busy this process is."""

    def __init__(self, tree: Path, work: Path) -> None:
        self.port = free_port()
        self._log = work / "sink.log"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", SINK_SCRIPT, str(self.port), str(self._log)],
            cwd=tree,
            stdin=subprocess.DEVNULL,
        )

    def _lines(self) -> list[str]:
        return self._log.read_text().splitlines() if self._log.exists() else []

    async def ready(self) -> None:
        while "READY" not in self._lines():
            if self._proc.poll() is not None:
                raise RuntimeError("the SMTP sink exited")
            await asyncio.sleep(0.1)

    def message_ids(self) -> list[str]:
        return [line.split()[1] for line in self._lines() if line.startswith("M ")]

    def first_accepted(self) -> dict[str, float]:
        """Message-ID → when the sink first stored it (`time.time()`)."""
        first: dict[str, float] = {}
        for line in self._lines():
            if line.startswith("M "):
                _, mid, at = line.split()
                first.setdefault(mid, float(at))
        return first

    def stop(self) -> int:
        """Stop the sink; the number of SMTP sessions it saw."""
        self._proc.terminate()
        self._proc.wait(30)
        counts = [int(line[2:]) for line in self._lines() if line.startswith("S ")]
        return counts[-1] if counts else -1


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


ORCHESTRATION_ONLY = """
import asyncio
from postlane.config import load_settings
from postlane.connection import connect_temporal
from postlane.logs import configure_logging
from postlane.worker import run_workers

async def main():
    configure_logging()
    client = await connect_temporal(None, None)
    await run_workers(client, load_settings(), sends=False, inbound=False)

asyncio.run(main())
"""
"""A worker process that runs only the workflows (``--dedicated-senders``)."""


class Workers:
    """``python worker.py`` processes of one code tree; SIGKILLed and replaced on demand."""

    def __init__(
        self, tree: Path, env: dict[str, str], logs: Path, count: int, *, dedicated: bool
    ) -> None:
        self._tree, self._env, self._logs = tree, env, logs
        self._args = ["--no-inbound", *(["--no-workflows"] if dedicated else [])]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = 0
        # With dedicated senders, the workflows run in one more process, never killed.
        self.orchestration = self._start(ORCHESTRATION_ONLY) if dedicated else None
        for _ in range(count):
            self.procs.append(self._start())

    def _start(self, script: str | None = None) -> subprocess.Popen[bytes]:
        self.started += 1
        command = ["-c", script] if script else ["worker.py", *self._args]
        with (self._logs / f"worker-{self.started}.log").open("wb") as log:
            return subprocess.Popen(
                [sys.executable, *command],
                cwd=self._tree,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill_one(self, rng: random.Random) -> None:
        i = rng.randrange(len(self.procs))
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()
        self.procs[i] = self._start()

    def stop(self) -> None:
        if self.orchestration is not None:
            self.procs.append(self.orchestration)
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def run_version(
    name: str, tree: Path, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """One full run (fresh server, sink and workers) of the code in `tree`, in `work`."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=dev_server_path(),
        data_converter=data_converter(),
        search_attributes=list(sa.ALL),
        dev_server_extra_args=[*SERVER_TUNING, "--db-filename", str(work / "temporal.db")],
    )
    workers: Workers | None = None
    sink = Sink(REPO, work)
    try:
        await sink.ready()
        lane = LaneConfig(
            name=LANE,
            senders=["*"],
            smtp_host="127.0.0.1",
            smtp_port=sink.port,
            smtp_tls="none",
            rate_per_second=1000,
            max_concurrent=args.concurrency,
            retry=RetrySettings(
                initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=5)
            ),
        )
        config = work / "postlane.toml"
        config.write_text(lanes_toml([lane]))
        worker_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "POSTLANE_"))
        }
        worker_env.update(
            TEMPORAL_ADDRESS=env.client.service_client.config.target_host,
            TEMPORAL_NAMESPACE=env.client.namespace,
            POSTLANE_CONFIG=str(config),
            PYTHONUNBUFFERED="1",
        )
        workers = Workers(tree, worker_env, work, args.workers, dedicated=args.dedicated_senders)
        client = env.client
        deadline = time.monotonic() + 120
        while len(await activity_pollers(client, lane.task_queue)) < args.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: workers did not start; see {work}")
            await asyncio.sleep(0.5)

        pl = PostlaneClient(client, Settings(lanes=[lane]))
        rng = random.Random(args.seed)
        started_at = time.monotonic()
        handles = []
        for i in range(0, args.emails, 100):
            batch = range(i, min(i + 100, args.emails))
            handles += await asyncio.gather(
                *(
                    pl.send(
                        Email(
                            sender="app@dup.test",
                            to=[f"r{n}@example.test"],
                            subject=f"#{n}",
                            text="x",
                        ),
                        key=f"{name}-{n}",
                    )
                    for n in batch
                )
            )
        kills = 0
        done = asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
        while not done.done():
            pause = (args.kill_every or 1.0) * rng.uniform(0.5, 1.5)
            try:
                await asyncio.wait_for(asyncio.shield(done), pause)
            except TimeoutError:
                # Kill only while mail is still going out.
                if args.kill_every > 0 and len(set(sink.message_ids())) < args.emails:
                    workers.kill_one(rng)
                    kills += 1
        results = done.result()
        elapsed = time.monotonic() - started_at
        failures = [r for r in results if isinstance(r, BaseException)]
        copies = Counter(sink.message_ids())
        duplicated = {mid: n for mid, n in copies.items() if n > 1}
        # Per email: how many acceptances reached its history as a signal. A duplicate
        # whose every copy was signalled would mean a retry sent after a recorded
        # acceptance (a bug); one copy fewer means the kill fell between the
        # server's 250 and the signal (the window that remains).
        signals: dict[str, int] = {}
        # How long, per email sent once, from the sink storing it to Temporal holding a
        # record of it: the signal (after) and the activity's completion (both).
        to_signal: list[float] = []
        to_completion: list[float] = []
        stored = sink.first_accepted()
        for h in handles:
            history = await client.get_workflow_handle(h.workflow_id).fetch_history()
            mid = message_id(h.workflow_id, "dup.test")
            signalled = [
                e.event_time.ToDatetime(UTC).timestamp()
                for e in history.events
                if e.HasField("workflow_execution_signaled_event_attributes")
                and e.workflow_execution_signaled_event_attributes.signal_name == ACCEPTED_SIGNAL
            ]
            completed = [
                e.event_time.ToDatetime(UTC).timestamp()
                for e in history.events
                if e.HasField("activity_task_completed_event_attributes")
            ]
            if name == "after":
                signals[mid] = len(signalled)
            if copies.get(mid) == 1 and mid in stored:
                if signalled:
                    to_signal.append(signalled[0] - stored[mid])
                if completed:
                    to_completion.append(completed[0] - stored[mid])
    finally:
        if workers is not None:
            workers.stop()
        sessions = sink.stop()
        await env.shutdown()
    duplicates = sum(n - 1 for n in duplicated.values())
    return {
        "version": name,
        "emails": args.emails,
        "kills": kills,
        "worker_processes_started": workers.started if workers else 0,
        "seconds": round(elapsed, 1),
        "emails_per_second": round(args.emails / elapsed, 1),
        "failed_workflows": len(failures),
        "distinct_message_ids_received": len(copies),
        "copies_received": sum(copies.values()),
        "duplicates": duplicates,
        "emails_duplicated": len(duplicated),
        "duplicates_per_kill": round(duplicates / kills, 3) if kills else None,
        "delivery_accepted_signals": sum(signals.values()) if signals else None,
        "duplicates_after_recorded_acceptance": (
            sum(1 for mid, n in duplicated.items() if signals.get(mid, 0) >= n) if signals else None
        ),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "stored_to_signal_ms": percentiles(to_signal),
        "stored_to_completion_ms": percentiles(to_completion),
        "_to_signal": to_signal,
        "_to_completion": to_completion,
        "smtp_sessions": sessions,
    }


def percentiles(seconds: list[float]) -> dict[str, float] | None:
    """p50/p90/p99/max in ms (nearest rank) of `seconds`."""
    if not seconds:
        return None
    ordered = sorted(seconds)

    def rank(p: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1)

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": rank(1.0)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per version, over its rounds: kills, duplicates and the pooled latencies."""
    totals: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["version"] for r in rows):
        mine = [r for r in rows if r["version"] == name]
        kills = sum(r["kills"] for r in mine)
        duplicates = sum(r["duplicates"] for r in mine)
        recorded = [r["duplicates_after_recorded_acceptance"] for r in mine]
        totals[name] = {
            "rounds": len(mine),
            "emails": sum(r["emails"] for r in mine),
            "kills": kills,
            "duplicates": duplicates,
            "duplicates_per_kill": round(duplicates / kills, 3) if kills else None,
            "duplicates_after_recorded_acceptance": (
                None if None in recorded else sum(x for x in recorded if x is not None)
            ),
            "failed_workflows": sum(r["failed_workflows"] for r in mine),
            "emails_per_second_median": sorted(r["emails_per_second"] for r in mine)[
                len(mine) // 2
            ],
            "stored_to_signal_ms": percentiles([x for r in mine for x in r["_to_signal"]]),
            "stored_to_completion_ms": percentiles([x for r in mine for x in r["_to_completion"]]),
        }
    return totals


def markdown(
    rows: list[dict[str, Any]], totals: dict[str, dict[str, Any]], meta: dict[str, Any]
) -> str:
    hosts = (
        "lane only, the workflows in one more process"
        if meta["dedicated_senders"]
        else "workflows + lane"
    )
    lines = [
        "# Duplicates per worker kill",
        "",
        f"{meta['when']}; {meta['machine']}; {meta['rounds']} rounds of {meta['emails']} "
        "emails per version (order alternating), "
        f"{meta['workers']} worker processes ({hosts}, max_concurrent "
        f"{meta['concurrency']}), one SIGKILLed every {meta['kill_every']} s ± 50 % "
        f"(and replaced) while mail was going out. Before = `{meta['before_ref']}`, "
        f"after = `{meta['after_ref']}`. `bench/duplicate_window.py`.",
        "",
        "| version | emails | kills | duplicates | duplicates per kill | of which after a "
        "recorded acceptance | failed | emails/s (median round) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t in totals.items():
        recorded = t["duplicates_after_recorded_acceptance"]
        lines.append(
            f"| {name} | {t['emails']} | {t['kills']} | {t['duplicates']} "
            f"| {t['duplicates_per_kill']} | {'n/a' if recorded is None else recorded} "
            f"| {t['failed_workflows']} | {t['emails_per_second_median']} |"
        )
    lines += [
        "",
        "Each run:",
        "",
        "| version | round | kills | duplicates | duplicates per kill | of which after a recorded "
        "acceptance | emails/s | failed | distinct Message-IDs | SMTP sessions | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        recorded = r["duplicates_after_recorded_acceptance"]
        lines.append(
            f"| {r['version']} | {r['round']} | {r['kills']} | {r['duplicates']} "
            f"| {r['duplicates_per_kill']} "
            f"| {'n/a' if recorded is None else recorded} "
            f"| {r['emails_per_second']} | {r['failed_workflows']} "
            f"| {r['distinct_message_ids_received']} / {r['emails']} | {r['smtp_sessions']} "
            f"| {r['load_average_1m']} |"
        )
    lines += [
        "",
        "Time from the sink storing a message to Temporal holding a record of it (emails "
        "sent once, all rounds; server event time minus sink time, same host), ms:",
        "",
        "| version | record | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in totals.items():
        for label, key in (
            ("signal", "stored_to_signal_ms"),
            ("completion", "stored_to_completion_ms"),
        ):
            p = t.get(key)
            if p:
                cells = " | ".join(str(p[k]) for k in ("p50", "p90", "p99", "max"))
                lines.append(f"| {name} | {label} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emails", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kill-every", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--dedicated-senders",
        action="store_true",
        help="killed workers only send (--no-workflows); the workflows run in one more"
        " process that is never killed",
    )
    parser.add_argument("--before", default=None, help="git ref (default: merge-base with main)")
    parser.add_argument("--only", choices=["before", "after"], default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    args = parser.parse_args()
    before_ref = args.before or git("merge-base", "HEAD", "main")
    after_ref = git("rev-parse", "--short", "HEAD") + (
        " + working tree" if git("status", "--porcelain", "--", "activities", "workflows") else ""
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pl-dup-") as tmp:
        work = Path(tmp)
        versions = [("before", checkout(before_ref, work / "before-tree")), ("after", REPO)]
        versions = [(n, t) for n, t in versions if not args.only or n == args.only]
        for r in range(args.rounds):
            # Alternate the order, so that drifting foreign load hits both versions alike.
            for name, tree in versions if r % 2 == 0 else versions[::-1]:
                (work / f"{name}-{r}").mkdir()
                row = asyncio.run(run_version(name, tree, args, work / f"{name}-{r}"))
                row["round"] = r + 1
                print(json.dumps({k: v for k, v in row.items() if k[0] != "_"}), flush=True)
                rows.append(row)
    totals = summarise(rows)
    meta = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {platform.python_version()}",
        "emails": args.emails,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "kill_every": args.kill_every,
        "rounds": args.rounds,
        "dedicated_senders": args.dedicated_senders,
        "before_ref": before_ref[:10],
        "after_ref": after_ref,
    }
    stem = "-".join(filter(None, ["duplicate_window", args.only, args.tag]))
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [{k: v for k, v in row.items() if k[0] != "_"} for row in rows]
    (args.out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "totals": totals, "runs": runs}, indent=2) + "\n"
    )
    (args.out / f"{stem}.md").write_text(markdown(runs, totals, meta))
    print(markdown(runs, totals, meta))
    return 0


if __name__ == "__main__":
    code = 1
    try:
        code = main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the SDK can abort at interpreter shutdown (sdk-python#300)
