"""``postlane exporter`` on the real dev server: a parked dead letter, a backlog on a lane no
worker serves, scraped over HTTP as Prometheus would, and checked by ``promtool``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from postlane import exporter as exporter_module
from postlane import search_attributes as sa
from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.dev.binaries import dev_server_path
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import Email, EmailStatus, RetrySettings
from postlane.exporter import Exporter, render
from postlane.testing import running_workers
from tests.procs import (
    POSTLANE_SCRIPT,
    assert_eventually,
    free_port,
    postlane_env,
    run_postlane,
    write_config,
)
from tests.sysdeps import require
from tests.test_integration import address_of, an_email, new_lane

pytestmark = pytest.mark.devserver

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"

Samples = dict[tuple[str, str], float]
"""(metric name, lane label) -> value."""


@contextlib.contextmanager
def exporter_process(address: str, lanes: list[LaneConfig], tmp_path: Path) -> Iterator[str]:
    """``postlane exporter`` for `lanes` against the Temporal server at `address`, as an OS
    process; yields its ``/metrics`` URL."""
    config = write_config(tmp_path / "exporter.toml", lanes)
    port = free_port()
    err = (tmp_path / "exporter.err").open("wb")
    proc = subprocess.Popen(
        [str(POSTLANE_SCRIPT), "exporter", "--host", "127.0.0.1", "--port", str(port)]
        + ["--interval", "0.5"],
        env=postlane_env(address, config),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    err.close()
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        proc.kill()
        proc.wait(30)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, off the event loop; a refused connection is an
    AssertionError, so `assert_eventually` waits through the process's start."""
    try:
        return await asyncio.to_thread(_get, url)
    except urllib.error.URLError as exc:
        raise AssertionError(f"GET {url}: {exc.reason}") from None


async def scrape(url: str) -> str:
    """The exporter's ``/metrics`` text once a collection has succeeded."""

    async def ready() -> str | None:
        status, body = await get(url)
        assert status == 200, (status, body)
        return body if "postlane_exporter_collect_success 1" in body else None

    return await assert_eventually(ready, within=60, what="a successful collection")


def samples(text: str) -> Samples:
    """The exporter's lane samples (it only ever labels by ``lane``)."""
    found: Samples = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        name, _, rest = line.partition('{lane="')
        lane, _, value = rest.partition('"} ')
        found[(name, lane)] = float(value)
    return found


def metric_names(text: str) -> set[str]:
    """The names a scrape declares (``# TYPE`` lines): present even with no samples."""
    return {ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")}


def promtool_check_metrics(text: str) -> None:
    """``promtool check metrics``: the text parses as Prometheus's format, and lints clean."""
    promtool = require("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(180)
async def test_exporter_serves_backlog_pollers_and_dead_letters(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        served = new_lane(smtp, retry=RetrySettings(maximum_attempts=1))
        idle = new_lane(smtp, senders=["*@idle.test"])
        settings = Settings(lanes=[served, idle])
        pl = PostlaneClient(dev_env.client, settings)
        smtp.fail("data", "451 4.3.0 mailbox temporarily unavailable", times=1)
        # A worker for `served` only: `idle`'s sends wait on its queue with no poller.
        async with running_workers(dev_env, settings, lanes=[served.name]):
            await pl.send(an_email("parks"), key=f"{key}-dlq")
            for n in range(3):
                email = Email(
                    sender="agent@idle.test", to=["bob@example.test"], subject=f"#{n}", text="x"
                )
                await pl.send(email, key=f"{key}-idle-{n}")

            async def parked() -> bool:
                return await pl.status(f"{key}-dlq") == EmailStatus.DEAD_LETTER

            await assert_eventually(parked, within=60, what="the email dead-lettered")

            with exporter_process(address_of(dev_env), [served, idle], tmp_path) as url:

                async def settled() -> Samples:
                    got = samples(await scrape(url))
                    assert got.get(("postlane_lane_backlog", idle.name)) == 3, got
                    assert got.get(("postlane_dead_letters", served.name)) == 1, got
                    assert got.get(("postlane_lane_pollers", served.name), 0) >= 1, got
                    return got

                got = await assert_eventually(settled, within=60, what="the exporter's gauges")
                text = await scrape(url)
                status, health = await get(url.replace("/metrics", "/healthz"))
                ready_status, _ = await get(url.replace("/metrics", "/readyz"))
    assert smtp.messages == []  # nothing was accepted: one refusal, three never tried
    assert got[("postlane_lane_pollers", idle.name)] == 0
    assert got[("postlane_lane_backlog_age_seconds", idle.name)] > 0
    assert got[("postlane_lane_backlog", served.name)] == 0
    assert got[("postlane_dead_letters", idle.name)] == 0
    # The rate the lane's send worker set on the server; no worker has set `idle`'s.
    assert ("postlane_lane_rate_limit_per_second", idle.name) not in got
    assert got[("postlane_lane_rate_limit_per_second", served.name)] == 50
    assert (status, health, ready_status) == (200, "ok\n", 200)
    promtool_check_metrics(text)


async def test_exporter_not_ready_while_temporal_unreachable(tmp_path: Path) -> None:
    """No server: /metrics says the collection failed and serves no lane series; /readyz
    is 503 so Kubernetes keeps the pod out of the Service."""
    with exporter_process(f"127.0.0.1:{free_port()}", [new_lane()], tmp_path) as url:
        base = url.removesuffix("/metrics")

        async def served() -> tuple[int, str]:
            return await get(f"{base}/healthz")

        await assert_eventually(served, within=60, what="the exporter listening")
        status, _ = await get(f"{base}/readyz")
        _, text = await get(url)
    assert status == 503
    assert "postlane_exporter_collect_success 0" in text
    assert 'lane="' not in text


@pytest.mark.timeout(180)
async def test_real_prometheus_scrapes_the_exporter_and_evaluates_the_rules(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    """Debian's Prometheus, with deploy/prometheus/alerts.yml, scrapes the exporter: its
    query API returns the backlog, every rule evaluates without error on real series, and
    the lane nobody polls has its alert pending."""
    prometheus = require("prometheus", "prometheus")
    with SmtpCatcher() as smtp:
        served = new_lane(smtp)
        idle = new_lane(smtp, senders=["*@idle.test"])
        settings = Settings(lanes=[served, idle])
        pl = PostlaneClient(dev_env.client, settings)
        async with running_workers(dev_env, settings, lanes=[served.name]):
            for n in range(2):
                email = Email(
                    sender="agent@idle.test", to=["bob@example.test"], subject=f"#{n}", text="x"
                )
                await pl.send(email, key=f"{key}-{n}")

            with exporter_process(address_of(dev_env), [idle], tmp_path) as url:
                await scrape(url)
                with prometheus_process(prometheus, url, tmp_path) as api:

                    async def backlog() -> float:
                        body = await query(api, f'postlane_lane_backlog{{lane="{idle.name}"}}')
                        assert body["data"]["result"], body
                        return float(body["data"]["result"][0]["value"][1])

                    assert await assert_eventually(backlog, within=60, what="the backlog") == 2

                    async def evaluated() -> list[dict[str, Any]]:
                        status, text = await get(f"{api}/api/v1/rules")
                        assert status == 200, text
                        rules = [r for g in json.loads(text)["data"]["groups"] for r in g["rules"]]
                        # Not yet evaluated: "0001-01-01T00:00:00Z".
                        assert rules and all(r["lastEvaluation"] > "2000" for r in rules), rules
                        return rules

                    rules = await assert_eventually(evaluated, within=60, what="rules evaluated")

                    async def pending() -> list[dict[str, Any]]:
                        status, text = await get(f"{api}/api/v1/alerts")
                        alerts = json.loads(text)["data"]["alerts"]
                        return [
                            a
                            for a in alerts
                            if a["labels"]["alertname"] == "PostlaneLaneNoPollers"
                            and a["labels"].get("lane") == idle.name
                        ]

                    (alert,) = await assert_eventually(pending, within=60, what="NoPollers pending")
    assert [r["name"] for r in rules if r["health"] != "ok"] == [], rules
    assert len(rules) == 17
    assert alert["state"] == "pending"  # `for: 5m` has not passed yet
    assert alert["labels"]["severity"] == "page"


@contextlib.contextmanager
def prometheus_process(binary: str, target: str, tmp_path: Path) -> Iterator[str]:
    """Prometheus scraping `target` every second with the repository's alert rules;
    yields its base URL."""
    host_port = target.removeprefix("http://").removesuffix("/metrics")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{str(RULES)!r}]\n"
        "scrape_configs:\n"
        f"  - {{job_name: postlane-exporter, static_configs: [{{targets: ['{host_port}']}}]}}\n",
        encoding="utf-8",
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
        + [f"--web.listen-address=127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    log.close()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(30)


async def query(api: str, promql: str) -> dict[str, Any]:
    status, text = await get(f"{api}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    assert status == 200, text
    body: dict[str, Any] = json.loads(text)
    return body


@pytest.mark.timeout(120)
async def test_a_failed_round_serves_the_last_figures_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that stops answering: the next rounds fail (collect_success 0) but keep the
    last good lane figures for `KEEP_LAST_GOOD` seconds, then serve none."""
    server = await WorkflowEnvironment.start_local(
        dev_server_existing_path=dev_server_path(), search_attributes=list(sa.ALL)
    )
    lane = new_lane()
    exp = Exporter(server.client, Settings(lanes=[lane]))
    try:
        await exp.collect_once()
        first = render(exp.snapshot)
    finally:
        await server.shutdown()
    monkeypatch.setattr(exporter_module, "COLLECT_TIMEOUT", 3.0)  # the client retries longer
    await exp.collect_once()
    kept = render(exp.snapshot)
    monkeypatch.setattr(exporter_module, "KEEP_LAST_GOOD", 0.0)
    await exp.collect_once()
    dropped = render(exp.snapshot)

    assert "postlane_exporter_collect_success 1" in first
    assert f'postlane_lane_backlog{{lane="{lane.name}"}} 0' in first
    assert "postlane_exporter_collect_success 0" in kept
    assert samples(kept) == samples(first)
    assert "postlane_exporter_collect_success 0" in dropped
    assert samples(dropped) == {}


async def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "exporter.toml", [new_lane()])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, out, err = await run_postlane(
            ["exporter", "--host", "127.0.0.1", "--port", str(port)],
            postlane_env(f"127.0.0.1:{free_port()}", config),
            within=60,
        )
    assert rc == 2, err
    assert err.startswith(f"error: ConfigurationError: port: cannot serve on 127.0.0.1:{port}")
