"""The Prometheus alert rules in deploy/prometheus/: Debian's ``promtool`` checks them and
runs their unit tests (synthetic series that fire each alert and leave healthy lanes
quiet), and every alert has a runbook line and a section in docs/alerts.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.sysdeps import require

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
ALERTS_DOC = ROOT / "docs" / "alerts.md"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("promtool", "prometheus"), *args],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(encoding="utf-8"), re.M)


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names()) + 8} rules found" in result.stdout  # + 8 records


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a test case where it fires and one where it must not."""
    text = RULE_TESTS.read_text(encoding="utf-8")
    # `alertname: X` followed (same case, block or flow style) by its expected alerts.
    cases = re.findall(r"alertname: (\w+)(?:,|\s*\n)\s*exp_alerts:\s*(\[\])?", text)
    fires = {name for name, empty in cases if not empty}
    quiet = {name for name, empty in cases if empty}
    names = set(alert_names())
    assert len(names) >= 9
    assert names - fires == set(), "never shown firing"
    assert names - quiet == set(), "never shown quiet"
    assert (fires | quiet) - names == set(), "tests for alerts that do not exist"


def test_every_alert_has_a_runbook_line_and_a_doc_section() -> None:
    rules = RULES.read_text(encoding="utf-8")
    blocks = re.split(r"^\s*- (?:alert|record): ", rules, flags=re.M)[1:]
    doc = ALERTS_DOC.read_text(encoding="utf-8")
    for block in blocks:
        name = block.split()[0]
        if ":" in name:  # a recording rule
            continue
        assert re.search(r'^\s*runbook: "[^"]{40,}"', block, re.M), f"{name}: no runbook"
        assert re.search(r"^\s*severity: (page|warning|ticket)$", block, re.M), name
        assert f"### {name}" in doc, f"docs/alerts.md: no section for {name}"
