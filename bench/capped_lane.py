"""A capped lane under its cap against an uncapped lane: the cost of asking for slots.

    .venv/bin/python bench/capped_lane.py [--emails 300] [--rounds 3]

Same server, worker, SMTP catcher and method as bench/throughput.py, with two lanes on the
same catcher: ``bench`` (rate 1000/s, no caps) and ``capped`` (the same, plus an hourly and
a daily cap far above what the run sends). Every email of the capped lane asks the lane
workflow for a slot and waits for its grant before it sends; the caps are never reached,
so the difference is only what the slot protocol costs. Rounds alternate the two lanes and
flip the order each round. Target (issue "Fast to the floor"): the capped lane reaches at
least 0.8 of the uncapped lane's throughput.

Results: ``bench/results/capped_lane.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import (  # noqa: E402
    BENCH,
    BODY,
    MAX_CONCURRENT,
    RATE_PER_SECOND,
    SETTLE,
    WARMUP,
    Bench,
    CpuMeter,
    code_digest,
    run_script,
)

from postlane.client import PostlaneClient  # noqa: E402
from postlane.email.models import Email  # noqa: E402

CAP = 1_000_000
"""The capped lane's hourly and daily cap: far above any run, so only the protocol costs."""
SENDERS = {"uncapped": "bench@example.test", "capped": "capped@example.test"}
TARGET = 0.8

Start = Callable[[str], Awaitable[Any]]


class CappedBench(Bench):
    """`Bench` with a second, capped lane on the same catcher."""

    def start_catcher(self) -> Path:
        config = super().start_catcher()
        text = config.read_text().replace('senders = ["*"]', f'senders = ["{SENDERS["uncapped"]}"]')
        assert self.smtp is not None
        config.write_text(
            text
            + "\n".join(
                [
                    "[[lanes]]",
                    'name = "capped"',
                    f'senders = ["{SENDERS["capped"]}"]',
                    f'smtp_host = "{self.smtp.host}"',
                    f"smtp_port = {self.smtp.port}",
                    'smtp_tls = "none"',
                    f"rate_per_second = {RATE_PER_SECOND}",
                    f"max_concurrent = {MAX_CONCURRENT}",
                    f"hourly_cap = {CAP}",
                    f"daily_cap = {CAP}",
                    "",
                ]
            )
        )
        return config


def sender(pl: PostlaneClient, address: str) -> Start:
    async def start(key: str) -> Any:
        email = Email(
            sender=address, to=["inbox@example.test"], subject=f"capped bench {key}", text=BODY
        )
        return await pl.send(email, key=key)

    return start


async def event_names(raw: Client, workflow_id: str) -> list[str]:
    history = await raw.get_workflow_handle(workflow_id).fetch_history()
    return [EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in history.events]


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bench = CappedBench(args, workdir)
    try:
        raw = await bench.start_server()
        bench.start_catcher()
        bench.spawn_postlane_worker()
        pl = await bench.postlane_client()
        starts = {kind: sender(pl, address) for kind, address in SENDERS.items()}
        meter = CpuMeter(
            {"server": bench.procs["server"].pid, "worker": bench.procs["postlane_worker"].pid}
        )
        for kind, start in starts.items():
            await bench.batch(start, WARMUP, f"warm-{kind}", meter)
        await asyncio.sleep(SETTLE)  # quiet between batches, as in throughput.py
        rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in starts}
        for r in range(args.rounds):
            order = list(starts) if r % 2 == 0 else list(reversed(starts))
            for kind in order:
                result = await bench.batch(starts[kind], args.emails, f"r{r + 1}-{kind}", meter)
                result["cpu_ms_per_email_total"] = round(
                    sum(result["cpu_ms_per_email"].values()), 2
                )
                rounds[kind].append(result)
                print(
                    f"round {r + 1} {kind:8s}: {result['n']} in {result['seconds']:.2f} s = "
                    f"{result['per_second']:.1f}/s (CPU {result['cpu_ms_per_email_total']} ms"
                    f" per email; other load {result['other_load_cores']} cores)",
                    flush=True,
                )
                await asyncio.sleep(SETTLE)
        assert bench.smtp is not None
        histories = {
            kind: await event_names(raw, f"email:{bench.run_id}-r1-{kind}-0") for kind in starts
        }
        return {
            "rounds": rounds,
            "histories": histories,
            "emails_sent": 2 * (WARMUP + args.rounds * args.emails),
            "emails_caught": len(bench.smtp.messages),
        }
    finally:
        bench.stop_all()


def summarise(raw: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    per_kind: dict[str, Any] = {}
    for kind, rounds in raw["rounds"].items():
        per_kind[kind] = {
            "per_second": [r["per_second"] for r in rounds],
            "median_per_second": statistics.median(r["per_second"] for r in rounds),
            "cpu_ms_per_email": [r["cpu_ms_per_email_total"] for r in rounds],
            "cpu_ms_per_email_by_process": [r["cpu_ms_per_email"] for r in rounds],
            "other_load_cores": [r["other_load_cores"] for r in rounds],
            "history_events": raw["histories"][kind],
        }
    c, u = per_kind["capped"], per_kind["uncapped"]
    paired = [round(a / b, 3) for a, b in zip(c["per_second"], u["per_second"], strict=True) if b]
    return {
        **meta,
        "uncapped": u,
        "capped": c,
        "ratio_of_medians": round(c["median_per_second"] / u["median_per_second"], 3),
        "ratio_paired_median": statistics.median(paired),
        "ratio_by_cpu": round(
            statistics.median(u["cpu_ms_per_email"]) / statistics.median(c["cpu_ms_per_email"]), 3
        ),
        "target": TARGET,
        "emails_sent": raw["emails_sent"],
        "emails_caught": raw["emails_caught"],
    }


def markdown(s: dict[str, Any]) -> str:
    c, u = s["capped"], s["uncapped"]

    def fmt(values: list[float]) -> str:
        return ", ".join(f"{v:.1f}" for v in values)

    def by_process(kind: dict[str, Any], process: str) -> str:
        return f"{statistics.median(r[process] for r in kind['cpu_ms_per_email_by_process']):.1f}"

    met = "met" if s["ratio_of_medians"] >= TARGET else "**not met**"
    return "\n".join(
        [
            f"# Capped lane under its cap ({s['date']})",
            "",
            f"{s['cpu_count']} CPUs, load average at start {s['loadavg_start']}; dev server as"
            f" `postlane dev` runs it; N = {s['emails']} per round, {s['rounds']} rounds each"
            f" after a warm-up of {WARMUP}; production code `{s['code_sha256']}`"
            f"{' (**changed during the run**)' if s['code_changed_during_run'] else ''}."
            f" Both lanes: rate {RATE_PER_SECOND}/s, max_concurrent {MAX_CONCURRENT}, the same"
            f" SMTP catcher; `capped` also has `hourly_cap = daily_cap = {CAP:,}`.",
            "",
            "| figure | uncapped lane | capped lane (under its cap) | target |",
            "|---|---|---|---|",
            f"| emails/s, median (rounds) | {u['median_per_second']:.1f} ({fmt(u['per_second'])})"
            f" | {c['median_per_second']:.1f} ({fmt(c['per_second'])}) | |",
            f"| ratio capped / uncapped, of the medians | | **{s['ratio_of_medians']:.2f}**"
            f" | ≥ {TARGET}: {met} |",
            f"| ratio, median of the per-round ratios | | {s['ratio_paired_median']:.2f} | |",
            f"| ratio from CPU per email | | {s['ratio_by_cpu']:.2f} | |",
            f"| CPU ms per email, total (median) | {statistics.median(u['cpu_ms_per_email']):.1f}"
            f" | {statistics.median(c['cpu_ms_per_email']):.1f} | |",
            f"| · server | {by_process(u, 'server')} | {by_process(c, 'server')} | |",
            f"| · worker | {by_process(u, 'worker')} | {by_process(c, 'worker')} | |",
            f"| · starter (+ SMTP sink) | {by_process(u, 'starter')}"
            f" | {by_process(c, 'starter')} | |",
            f"| history events per email | {len(u['history_events'])}"
            f" | {len(c['history_events'])} | |",
            f"| other load during the rounds, cores | {fmt(u['other_load_cores'])}"
            f" | {fmt(c['other_load_cores'])} | |",
            "",
            f"Emails the SMTP catcher received: {s['emails_caught']:,} of {s['emails_sent']:,}"
            " sent.",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--emails", type=int, default=300, help="N per round (300)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "emails": args.emails,
        "rounds": args.rounds,
        "code_sha256": code_digest(),
    }
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="postlane-capped-") as tmp:
        raw = asyncio.run(run(args, Path(tmp)))
    meta["wall_seconds"] = round(time.perf_counter() - began, 1)
    meta["code_changed_during_run"] = code_digest() != meta["code_sha256"]
    summary = summarise(raw, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capped_lane.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "capped_lane.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    run_script(main)
