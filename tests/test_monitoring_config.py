"""The monitoring files docker-compose.yml mounts fit together: Prometheus's config passes
``promtool check config`` and scrapes the ports the worker and exporter serve on, and
Grafana's provisioning loads a dashboard that reads the provisioned datasource and has the
panels the issue asks for."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.sysdeps import require

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "postlane.json"


def test_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(
        [require("promtool", "prometheus"), "check", "config", "prometheus.yml"],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_prometheus_scrapes_the_ports_compose_serves() -> None:
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8")
    exporter_port = re.search(r'"exporter:(\d+)"', config)
    worker_port = re.search(r'names: \["worker"\]\s*\n\s*type: A\s*\n\s*port: (\d+)', config)
    assert exporter_port and worker_port
    assert f'command: ["exporter", "--port", "{exporter_port.group(1)}"]' in COMPOSE
    assert f"- POSTLANE_METRICS_PORT={worker_port.group(1)}" in COMPOSE
    assert "- ./deploy/prometheus:/etc/prometheus:ro" in COMPOSE


def test_grafana_provisioning_matches_dashboard() -> None:
    datasource = (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    provider = (GRAFANA_DIR / "provisioning" / "dashboards" / "postlane.yml").read_text()
    uid = re.search(r"^\s*uid: (\S+)$", datasource, re.M)
    assert uid and "url: http://prometheus:9090" in datasource
    path = re.search(r"^\s*path: (\S+)$", provider, re.M)
    assert path is not None
    assert f"- ./deploy/grafana/dashboards:{path.group(1)}:ro" in COMPOSE
    assert "- ./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in COMPOSE

    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["datasource"]["uid"] == uid.group(1), panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    # What the issue asks to see: queue depth over time, sending rate, errors by type,
    # P50 against P99, dead-letter volume, worker health.
    for needed in (
        "postlane_lane_backlog",
        "rate(postlane_emails_sent",
        "sum by (lane, kind) (rate(postlane_email_failures",
        "histogram_quantile(0.5, sum by (lane, le) (rate(postlane_enqueue_to_accepted_seconds",
        "histogram_quantile(0.99, sum by (lane, le) (rate(postlane_enqueue_to_accepted_seconds",
        "postlane_dead_letters",
        "postlane_lane_pollers",
        'up{job="postlane-worker"}',
    ):
        assert needed in exprs, needed
