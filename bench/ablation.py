"""Where Postlane's cost over the baseline goes: one Postlane feature at a time.

    .venv/bin/python bench/ablation.py [--emails 200] [--rounds 2]

Same server, catcher and method as bench/throughput.py. Two families of variants:

- the baseline app (`bench/baseline_app.py`, ``BenchVariant``) plus one of Postlane's
  server-side costs: an activity heartbeat, a search-attribute upsert before completing,
  and Postlane's start options (4 search attributes, memo, static summary/details,
  priority);
- Postlane itself (``worker.py``), then with its activity heartbeat and/or its per-email
  INFO log line switched off in the worker process only (`bench/ablation_worker.py`).

The robust figure is CPU milliseconds per email, per process: on a shared 2-core machine
throughput is roughly 2 cores / (total CPU per email), and other load moves emails/s more
than it moves CPU per email.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.common import (
    Priority,
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_app import WORKFLOW_QUEUE, VariantInput  # noqa: E402
from throughput import (
    BENCH,
    BODY,
    WARMUP,
    Bench,
    CpuMeter,
    breakdown,
    code_digest,
    run_script,
)  # noqa: E402

from postlane.idempotency import CONTENT_HASH  # noqa: E402

Start = Callable[[str], Awaitable[Any]]

_SA = TypedSearchAttributes(
    [
        SearchAttributePair(SearchAttributeKey.for_keyword("PostlaneStatus"), "queued"),
        SearchAttributePair(SearchAttributeKey.for_keyword("PostlaneLane"), "bench"),
        SearchAttributePair(
            SearchAttributeKey.for_keyword_list("PostlaneRecipientDomain"), ["example.test"]
        ),
        SearchAttributePair(SearchAttributeKey.for_keyword_list("PostlaneTag"), []),
    ]
)

BASELINE_VARIANTS: dict[str, dict[str, bool]] = {
    "baseline": {},
    "baseline + heartbeat": {"heartbeat": True},
    "baseline + upsert SA": {"upsert": True},
    "baseline + start options": {"options": True},
}
POSTLANE_VARIANTS: dict[str, dict[str, str]] = {
    "postlane (worker.py)": {},
    "postlane, no heartbeat": {"BENCH_NO_HEARTBEAT": "1"},
    "postlane, quiet logs": {"BENCH_QUIET_LOGS": "1"},
    "postlane, no heartbeat, quiet logs": {"BENCH_NO_HEARTBEAT": "1", "BENCH_QUIET_LOGS": "1"},
    "postlane, no patch markers": {"BENCH_NO_PATCH_MARKERS": "1"},
    "postlane, no suppression check": {"BENCH_NO_SUPPRESSION_CHECK": "1"},
    "postlane, no accepted signal": {"BENCH_NO_ACCEPTED_SIGNAL": "1"},
    "postlane, all five off": {
        "BENCH_NO_HEARTBEAT": "1",
        "BENCH_QUIET_LOGS": "1",
        "BENCH_NO_PATCH_MARKERS": "1",
        "BENCH_NO_SUPPRESSION_CHECK": "1",
        "BENCH_NO_ACCEPTED_SIGNAL": "1",
    },
}


def baseline_start(client: Client, variant: dict[str, bool]) -> Start:
    async def start(key: str) -> Any:
        inp = VariantInput(
            BODY, heartbeat=variant.get("heartbeat", False), upsert=variant.get("upsert", False)
        )
        extra: dict[str, Any] = {}
        if variant.get("options"):
            extra = {
                "search_attributes": _SA,
                "memo": {CONTENT_HASH: "0" * 64},
                "static_summary": f"Postlane bench {key} → inbox@example.test",
                "static_details": f"lane: bench; priority: normal; key: {key}",
                "priority": Priority(priority_key=3),
            }
        return await client.start_workflow(
            "BenchVariant",
            inp,
            id=f"variant:{key}",
            task_queue=WORKFLOW_QUEUE,
            result_type=int,
            **extra,
        )

    return start


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bench = Bench(args, workdir)
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        raw = await bench.start_server()
        bench.start_catcher()
        bench.spawn_baseline_worker()
        pl = await bench.postlane_client()
        server = bench.procs["server"].pid

        async def measure(name: str, start: Start, worker: str, r: int) -> None:
            meter = CpuMeter({"server": server, "worker": bench.procs[worker].pid})
            label = f"r{r}-{len(results.get(name, []))}-{abs(hash(name)) % 10000}"
            lat, marks = await bench.latency({name: start}, args.latency_samples, f"{label}-lat")
            legs = await breakdown(raw, marks[name])
            res = await bench.batch(start, args.emails, label, meter)
            res["idle_latency_p50_ms"] = round(statistics.median(lat[name]), 1)
            res["idle_legs_ms"] = legs
            results.setdefault(name, []).append(res)
            cpu = res["cpu_ms_per_email"]
            print(
                f"round {r} {name:36s} {res['per_second']:6.1f}/s  cpu ms/email: server "
                f"{cpu['server']:5.1f} worker {cpu['worker']:5.1f} starter {cpu['starter']:4.1f}"
                f"  (other load {res['other_load_cores']} cores); idle p50 "
                f"{res['idle_latency_p50_ms']} ms, activity run {legs['activity: run']} ms",
                flush=True,
            )
            await asyncio.sleep(1.0)

        baselines = {"baseline": {}} if args.postlane_only else BASELINE_VARIANTS
        for name, variant in baselines.items():
            await bench.batch(
                baseline_start(raw, variant), WARMUP, f"warm-{hash(name)}", CpuMeter({})
            )
        for r in range(1, args.rounds + 1):
            names = list(baselines)
            for name in names if r % 2 else reversed(names):
                await measure(name, baseline_start(raw, baselines[name]), "baseline_worker", r)
            pnames = list(POSTLANE_VARIANTS)
            for name in pnames if r % 2 else reversed(pnames):
                env = POSTLANE_VARIANTS[name]
                argv = [sys.executable, str(BENCH / "ablation_worker.py")] if env else None
                bench.spawn_postlane_worker("ablation_worker", argv, **env)

                async def send(key: str) -> Any:
                    return await pl.send(bench._email(key), key=key)

                await bench.batch(send, WARMUP, f"warm-{r}-{abs(hash(name))}", CpuMeter({}))
                await measure(name, send, "ablation_worker", r)
                bench.stop_worker("ablation_worker")
        return results
    finally:
        bench.stop_all()


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rounds in results.items():
        cpu = {
            k: round(statistics.median(r["cpu_ms_per_email"][k] for r in rounds), 2)
            for k in ("server", "worker", "starter")
        }
        out[name] = {
            "per_second": [r["per_second"] for r in rounds],
            "median_per_second": round(statistics.median(r["per_second"] for r in rounds), 2),
            "cpu_ms_per_email": {**cpu, "total": round(sum(cpu.values()), 2)},
            "other_load_cores": [r["other_load_cores"] for r in rounds],
            "idle_latency_p50_ms": round(
                statistics.median(r["idle_latency_p50_ms"] for r in rounds), 1
            ),
            "idle_activity_run_ms": round(
                statistics.median(r["idle_legs_ms"]["activity: run"] for r in rounds), 1
            ),
            "rounds": rounds,
        }
    return out


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"# Ablation ({meta['date']})",
        "",
        f"N = {meta['n']} per round, {meta['rounds']} rounds; load average at start "
        f"{meta['loadavg_start'][0]:.2f}. CPU ms per email are medians over the rounds.",
        "",
        "| variant | emails/s (rounds) | server | worker | starter | total CPU ms/email "
        "| idle p50 ms | idle activity run ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        c = s["cpu_ms_per_email"]
        rates = ", ".join(f"{v:.1f}" for v in s["per_second"])
        lines.append(
            f"| {name} | {s['median_per_second']:.1f} ({rates}) | {c['server']:.1f} | "
            f"{c['worker']:.1f} | {c['starter']:.1f} | {c['total']:.1f} | "
            f"{s['idle_latency_p50_ms']:.1f} | {s['idle_activity_run_ms']:.1f} |"
        )
    return "\n".join([*lines, ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--emails", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-samples", type=int, default=15)
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--postlane-only",
        action="store_true",
        help="of the baseline's variants, run only the plain baseline",
    )
    args = parser.parse_args()
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "n": args.emails,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "code_sha256": code_digest(),
    }
    with tempfile.TemporaryDirectory(prefix="postlane-ablation-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    meta["code_changed_during_run"] = code_digest() != meta["code_sha256"]
    summary = summarise(results)
    table = markdown(summary, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps({**meta, "variants": summary}, indent=2))
    (args.out / "ablation.md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    run_script(main)
