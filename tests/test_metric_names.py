"""Every metric an alert rule or a dashboard panel uses is one that is really served: by a
real ``postlane exporter`` or a real worker, both scraped over HTTP here on the dev server.

A typo in a PromQL expression makes an alert that never fires and a panel that stays
empty, and nothing else notices. A worker serves a metric only once it has recorded it, so
the known set is what the worker served plus what it declares (`postlane.metrics.Metric`).
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
import uuid
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import Email, EmailStatus, RetrySettings
from postlane.exporter import METRICS as EXPORTER_METRICS
from postlane.metrics import Metric
from tests.procs import (
    WorkerProcess,
    assert_eventually,
    free_port,
    postlane_env,
    wait_for_pollers,
    write_config,
)
from tests.test_exporter import exporter_process, metric_names, scrape
from tests.test_integration import address_of, new_lane

pytestmark = pytest.mark.devserver

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))

# Every metric the worker declares; a scrape shows only those something has recorded.
WORKER_POSTLANE_METRICS = {str(m.value) for m in Metric}

PROMETHEUS_METRICS = {"up"}
"""Series Prometheus makes itself for every target."""

_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan"}
_SUFFIXES = ("_bucket", "_sum", "_count")


def metrics_in(expr: str) -> set[str]:
    """The metric (and recording rule) names a PromQL expression reads."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, regexes
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"label_values\(\s*([^,()]*?)\s*,[^)]*\)", r" \1 ", e)  # Grafana's
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", e):
        if not m.group(2) and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def test_metrics_in_reads_promql() -> None:
    expr = (
        '1 - sum by (lane) (rate(a_bucket{le=~"300(\\\\.0)?"}[5m])) / on (lane) group_left ()'
        " max without (instance) (b offset 1h) > 2 * 0.01 and lane:c:rate5m or vector(1e-9)"
        ' + label_values(d, lane) + e{lane=~"$lane"}[$__rate_interval]'
    )
    assert metrics_in(expr) == {"a_bucket", "b", "lane:c:rate5m", "d", "e"}


def rule_expressions() -> list[str]:
    """Every ``expr`` in alerts.yml (inline or a ``|`` block)."""
    exprs: list[str] = []
    lines = RULES.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        if m.group(2).strip() != "|":
            exprs.append(m.group(2))
            continue
        block = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= len(m.group(1)):
                break
            block.append(nxt)
        exprs.append("\n".join(block))
    return exprs


def recording_rules() -> set[str]:
    return set(re.findall(r"^\s*- record: (\S+)\s*$", RULES.read_text(encoding="utf-8"), re.M))


def dashboard_expressions() -> list[str]:
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "expr" and isinstance(v, str):
                    exprs.append(v)
                elif k == "query" and isinstance(v, str | dict):
                    exprs.append(v if isinstance(v, str) else str(v.get("query", "")))
                else:
                    walk(v)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for path in DASHBOARDS:
        walk(json.loads(path.read_text(encoding="utf-8")))
    return exprs


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


async def worker_metric_names(
    dev_env: WorkflowEnvironment, smtp: SmtpCatcher, tmp_path: Path
) -> set[str]:
    """Names a real worker process serves on ``POSTLANE_METRICS_PORT`` once it has sent an
    email on a capped lane and dead-lettered another."""
    lane = new_lane(smtp, hourly_cap=100, retry=RetrySettings(maximum_attempts=1))
    port = free_port()
    env = postlane_env(
        address_of(dev_env),
        write_config(tmp_path / "worker.toml", [lane]),
        POSTLANE_METRICS_PORT=str(port),
        POSTLANE_METRICS_ADDRESS="127.0.0.1",
    )
    pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
    with WorkerProcess.start(env, tmp_path) as worker:
        await wait_for_pollers(dev_env.client, lane.task_queue, [worker])
        email = Email(sender="agent@it.test", to=["bob@example.test"], subject="m", text="x")
        await asyncio.wait_for((await pl.send(email, key=uuid.uuid4().hex)).result(), 60)
        smtp.fail("data", "451 4.3.0 mailbox temporarily unavailable", times=1)
        parked = await pl.send(email, key=uuid.uuid4().hex)

        async def dead_lettered() -> bool:
            return await pl.status(parked.key) == EmailStatus.DEAD_LETTER

        await assert_eventually(dead_lettered, within=60, what="the email dead-lettered")

        async def served() -> set[str]:
            text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
            names = metric_names(text)
            return names if "postlane_lane_cap_used" in names else set()

        return await assert_eventually(served, within=30, what="the worker's metrics")


@pytest.mark.timeout(180)
async def test_alerts_and_dashboards_use_only_served_metrics(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    assert DASHBOARDS, "no dashboard in deploy/grafana/dashboards"
    with SmtpCatcher() as smtp:
        worker = await worker_metric_names(dev_env, smtp, tmp_path)
    with exporter_process(address_of(dev_env), [new_lane()], tmp_path) as url:
        exporter = metric_names(await scrape(url))
    assert exporter == set(EXPORTER_METRICS)
    assert "temporal_worker_task_slots_used" in worker
    # What the worker recorded is what it declares (nothing undeclared is served).
    assert {n for n in worker if n.startswith("postlane_")} <= WORKER_POSTLANE_METRICS
    assert {"postlane_emails_sent", "postlane_email_failures"} <= worker

    known = exporter | worker | WORKER_POSTLANE_METRICS | PROMETHEUS_METRICS | recording_rules()
    used: dict[str, set[str]] = {
        RULES.name: set().union(*map(metrics_in, rule_expressions())),
        "dashboards": set().union(*map(metrics_in, dashboard_expressions())),
    }
    for where, names in used.items():
        assert names, f"{where}: no metric found (is the parser broken?)"
        unknown = {n for n in names if n not in known and n.removesuffix(_suffix(n)) not in known}
        assert not unknown, f"{where} uses metrics nothing serves: {sorted(unknown)}"
    # Every cluster-wide gauge is put to use somewhere.
    assert set(EXPORTER_METRICS) <= used[RULES.name] | used["dashboards"]


def _suffix(name: str) -> str:
    return next((s for s in _SUFFIXES if name.endswith(s)), "")
