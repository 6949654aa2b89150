"""Bulk operations at campaign scale on the real dev server: client time of each.

Run from the repository root::

    .venv/bin/python bench/bulk.py [--n 10000] [--synchronous full|normal]

It starts Temporal's dev server exactly as `postlane dev` does
(`postlane.dev.stack.server_command`, a SQLite file in a temporary directory), an SMTP
catcher and Postlane's workers for one lane in this process, then times, as the ``postlane``
command a user runs (a subprocess; its time includes starting Python):

1. ``postlane send --csv`` of N rows, and again (the rerun sends nothing new);
2. ``postlane sequence start --recipients`` of N rows (the sequence waits a week first,
   so only the enrollment is measured);
3. ``pl.dlq.list()`` and ``postlane dlq retry --all`` over N parked emails;
4. ``postlane dlq discard --all`` over N other parked emails.

Parking N emails (each fails once and dead-letters) and delivering them are timed too, for
context; they are the server's and the worker's work, not the client's. Results go to
bench/results/bulk.json and bulk.md, with the load average next to every figure: on a
shared machine the figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import temporalio  # noqa: E402
from pydantic import SecretStr  # noqa: E402
from temporalio.client import Client  # noqa: E402

from postlane.cli.bulk import bounded  # noqa: E402
from postlane.client import PostlaneClient  # noqa: E402
from postlane.config import LaneConfig, Settings  # noqa: E402
from postlane.connection import DEFAULT_NAMESPACE, data_converter  # noqa: E402
from postlane.dev.binaries import dev_server_path  # noqa: E402
from postlane.dev.catcher import SmtpCatcher  # noqa: E402
from postlane.dev.stack import server_command  # noqa: E402
from postlane.email.models import Email, RetrySettings  # noqa: E402
from postlane.lanes.guard import GuardSettings  # noqa: E402
from postlane.logs import configure_logging  # noqa: E402
from postlane.namespace import ensure_namespace, ensure_search_attributes  # noqa: E402
from postlane.tokens import SECRET_ENV  # noqa: E402
from postlane.worker import run_workers  # noqa: E402
from tests.procs import free_port, write_config  # noqa: E402

POSTLANE = str(Path(sys.executable).parent / "postlane")
SENDER = "campaign@bulk.test"
PARK_SENDER = "park@bulk.test"
PARKED = 'PostlaneLane="park" AND PostlaneStatus="dead_letter" AND ExecutionStatus="Running"'
OUTAGE = "451 4.3.0 mailbox temporarily unavailable"
TARGET_SECONDS = 60.0
SPEC = """
name = "bulk-bench"
sender = "campaign@bulk.test"

[[steps]]
type = "wait"
id = "later"
duration = "7d"

[[steps]]
type = "send"
id = "hello"
subject = "Hello {{ first_name }}"
text = "Hi {{ first_name }}, from {{ company }}."
"""


def load() -> float:
    return round(os.getloadavg()[0], 2)


class Bench:
    def __init__(self, workdir: Path, n: int, synchronous: str) -> None:
        self.workdir, self.n, self.synchronous = workdir, n, synchronous
        self.port, self.ui_port = free_port(), free_port()
        self.figures: list[dict[str, Any]] = []
        self.server: subprocess.Popen[bytes] | None = None

    def record(self, name: str, seconds: float, **extra: Any) -> None:
        figure = {"name": name, "seconds": round(seconds, 2), "load1": load(), **extra}
        self.figures.append(figure)
        print(json.dumps(figure), flush=True)

    def _spawn_server(self) -> None:
        log = (self.workdir / "temporal.log").open("ab")
        self.server = subprocess.Popen(
            server_command(
                self.workdir / "temporal.db",
                port=self.port,
                ui_port=self.ui_port,
                synchronous=self.synchronous,
            )
            + ["--headless"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def start(self) -> Client:
        self._spawn_server()
        address = f"127.0.0.1:{self.port}"
        for _ in range(300):
            try:
                system = await Client.connect(address, namespace="default")
                break
            except RuntimeError:
                await asyncio.sleep(0.2)  # polling a process we just started
        else:
            raise RuntimeError("the dev server did not start")
        await ensure_namespace(system, DEFAULT_NAMESPACE)
        await ensure_search_attributes(system, DEFAULT_NAMESPACE)
        return await Client.connect(
            address, namespace=DEFAULT_NAMESPACE, data_converter=data_converter()
        )

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            self.server.wait(30)

    async def cli(self, args: list[str], env: dict[str, str]) -> tuple[float, str]:
        began = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            POSTLANE,
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,  # the progress bar: one line per row
        )
        out, _ = await proc.communicate()
        took = time.perf_counter() - began
        if proc.returncode != 0:
            raise RuntimeError(f"postlane {' '.join(args)}: exit {proc.returncode}: {out!r}")
        return took, out.decode().strip()


async def until(probe: Callable[[], Awaitable[bool]], within: float) -> float:
    began = time.perf_counter()
    while not await probe():
        if time.perf_counter() - began > within:
            raise RuntimeError(f"not reached within {within}s")
        await asyncio.sleep(0.5)  # a benchmark's poll of the server's counts
    return time.perf_counter() - began


async def count(pl: PostlaneClient, query: str) -> int:
    return (await pl.temporal.count_workflows(query)).count


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n = args.n
    configure_logging(level="WARNING")  # a line per email would cost more than the email
    bench = Bench(workdir, n, args.synchronous)
    client = await bench.start()
    stop = asyncio.Event()
    worker: asyncio.Task[None] | None = None
    try:
        with SmtpCatcher() as smtp:
            # Sends go through `bulk`, which retries; parked emails through `park`, which
            # gives up after one attempt, so each parks at its first failure.
            lane = LaneConfig(
                name="bulk",
                senders=[SENDER],
                smtp_host=smtp.host,
                smtp_port=smtp.port,
                smtp_tls="none",
                rate_per_second=1000,
                retry=RetrySettings(initial_interval=timedelta(seconds=1)),
            )
            park_lane = lane.model_copy(
                update={
                    "name": "park",
                    "senders": [PARK_SENDER],
                    "retry": RetrySettings(
                        maximum_attempts=1, initial_interval=timedelta(seconds=1)
                    ),
                    # A whole batch deferred would pause the lane (the guard's deferral
                    # rate) and the retried emails would wait for a resume.
                    "guard": GuardSettings(enabled=False),
                }
            )
            secret = secrets.token_urlsafe(32)
            settings = Settings(lanes=[lane, park_lane], token_secret=SecretStr(secret))
            pl = PostlaneClient(client, settings)
            env = {
                **{
                    k: v
                    for k, v in os.environ.items()
                    if not k.startswith(("TEMPORAL_", "POSTLANE_"))
                },
                "TEMPORAL_ADDRESS": f"127.0.0.1:{bench.port}",
                "TEMPORAL_NAMESPACE": DEFAULT_NAMESPACE,
                "POSTLANE_CONFIG": str(write_config(workdir / "postlane.toml", [lane, park_lane])),
                SECRET_ENV: secret,
            }
            worker = asyncio.create_task(run_workers(client, settings, stop=stop))

            # 1. send --csv, twice.
            rows = workdir / "rows.csv"
            with rows.open("w", newline="") as out:
                w = csv.writer(out)
                w.writerow(["email", "first_name", "id"])
                w.writerows([f"s{i}@example.test", f"Name{i}", str(i)] for i in range(n))
            send = ["send", "--csv", str(rows), "--from", SENDER, "--key-column", "id"]
            send += ["--subject", "Hello {{ first_name }}", "--text", "Your id is {{ id }}."]
            took, out = await bench.cli(send, env)
            bench.record("send --csv", took, rows=n, output=out)
            drained = await until(lambda: _at_least(smtp, n), within=max(900, n / 3))
            bench.record("send --csv: delivered (server and worker)", took + drained, rows=n)
            took, out = await bench.cli(send, env)
            bench.record("send --csv again (sends nothing new)", took, rows=n, output=out)
            assert len(smtp.messages) == n, len(smtp.messages)

            # 2. enroll from CSV.
            spec = workdir / "spec.toml"
            spec.write_text(SPEC)
            people = workdir / "people.csv"
            with people.open("w", newline="") as out:
                w = csv.writer(out)
                w.writerow(["email", "name", "company"])
                w.writerows([f"q{i}@example.test", f"Q{i} Person", "Acme"] for i in range(n))
            enroll = ["sequence", "start", "--spec", str(spec), "--recipients", str(people)]
            took, out = await bench.cli(enroll, env)
            bench.record("sequence start --recipients", took, rows=n, output=out)

            # 3. park N, list them, retry them all.
            async def park(prefix: str) -> None:
                smtp.fail("data", OUTAGE, times=n)
                began = time.perf_counter()

                async def one(i: int) -> None:
                    email = Email(
                        sender=PARK_SENDER,
                        to=[f"{prefix}{i}@example.test"],
                        subject=f"#{i}",
                        text="x",
                    )
                    await pl.send(email, key=f"{prefix}-{i}")

                await bounded(range(n), one, limit=32)
                await until(lambda: _equals(pl, PARKED, n), within=max(900, n / 3))
                bench.record(
                    f"park {n} ({prefix}): start and dead-letter", time.perf_counter() - began
                )

            await park("p")
            smtp.clear_script()  # the provider is back (faults left by timed-out attempts too)
            before = len(smtp.messages)
            began = time.perf_counter()
            listed = await pl.dlq.list(lane="park")
            bench.record("pl.dlq.list()", time.perf_counter() - began, listed=len(listed))
            retried_at = datetime.now(UTC).isoformat()
            took, out = await bench.cli(["dlq", "retry", "--all", "--lane", "park"], env)
            bench.record("dlq retry --all", took, output=out)
            # Under load an attempt can time out: such an email parks again instead. Only a
            # park after the retry counts; one still parked from before has not run yet.
            sent = 'PostlaneLane="park" AND PostlaneStatus="sent"'
            parked_again = f'{PARKED} AND PostlaneParkedAt > "{retried_at}"'

            async def settled() -> bool:
                return await count(pl, sent) + await count(pl, parked_again) >= n

            drained = await until(settled, within=max(900, n / 3))
            bench.record(
                "dlq retry --all: delivered (server and worker)",
                took + drained,
                delivered=len(smtp.messages) - before,
                parked_again=await count(pl, parked_again),
            )
            if await count(pl, PARKED):
                took, out = await bench.cli(["dlq", "discard", "--all", "--lane", "park"], env)
                await until(lambda: _equals(pl, PARKED, 0), within=600)

            # 4. park N more, discard them all.
            await park("d")
            took, out = await bench.cli(["dlq", "discard", "--all", "--lane", "park"], env)
            bench.record("dlq discard --all", took, output=out)
            closed = await until(lambda: _equals(pl, PARKED, 0), within=max(600, n / 5))
            bench.record("dlq discard --all: all closed (server and worker)", took + closed)
    finally:
        stop.set()
        if worker is not None:
            try:
                await asyncio.wait_for(worker, 60)
            except Exception as exc:  # noqa: BLE001  (the figures are taken; report, go on)
                print(f"worker stop: {exc!r}", file=sys.stderr)
        bench.stop()
    return {"figures": bench.figures}


async def _at_least(smtp: SmtpCatcher, n: int) -> bool:
    return len(smtp.messages) >= n


async def _equals(pl: PostlaneClient, query: str, n: int) -> bool:
    return await count(pl, query) == n


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# Bulk operations at N = {result['n']} ({result['date']})",
        "",
        f"{m['cpu_count']} CPUs; load average at start {m['loadavg_start'][0]:.2f}, at end "
        f"{m['loadavg_end'][0]:.2f} (the load column counts this benchmark's own server and "
        "workers too: compare it with the other figures of the run, not with zero); "
        f"Python {result['versions']['python']}, temporalio {result['versions']['temporalio']}; "
        f"dev server as `postlane dev` starts it, SQLite `synchronous={result['synchronous']}`; "
        "one lane at 1000/s to an in-process SMTP catcher, workers in the benchmark's process. "
        "Client time is the `postlane` command's wall time (it includes starting Python). "
        f"Target: {TARGET_SECONDS:.0f} s of client time for each bulk operation.",
        "",
        "| operation | seconds | per second | load (1 min) | output |",
        "|---|---|---|---|---|",
    ]
    for f in result["figures"]:
        rate = f"{result['n'] / f['seconds']:.0f}" if f["seconds"] else "-"
        output = (f.get("output") or "").replace("\n", "; ").replace("|", "/")
        lines.append(f"| {f['name']} | {f['seconds']} | {rate} | {f['load1']} | {output} |")
    return "\n".join(lines) + "\n"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="rows / parked emails (10000)")
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    cli_version = subprocess.run(
        [dev_server_path(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "n": args.n,
        "synchronous": args.synchronous,
        "machine": {"cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
        "versions": {
            "python": platform.python_version(),
            "temporalio": temporalio.__version__,
            "temporal_cli": cli_version,
        },
    }
    # SIGTERM unwinds like Ctrl-C, so the dev server (in a session of its own) is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="postlane-bulk-") as tmp:
        result.update(asyncio.run(run(args, Path(tmp))))
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bulk" if args.n == 10_000 else f"bulk-{args.n}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
