"""The docker-compose deployment: the file parses, has the services the README promises, and
its Postlane configuration loads.

Needs the ``docker-compose`` command (Debian's ``docker-compose`` package, which CI installs)
or the ``docker compose`` plugin. No Docker engine is needed: ``config`` only parses.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from postlane.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
POSTLANE_TOML = ROOT / "deploy" / "postlane.toml"
DYNAMIC_CONFIG = ROOT / "deploy" / "dynamicconfig" / "development-sql.yaml"
ENV_EXAMPLE = ROOT / ".env.example"

EXPECTED_SERVICES = {
    "postgresql",
    "temporal",
    "temporal-ui",
    "postlane-setup",
    "worker",
    "mailpit",
    "exporter",
    "prometheus",
    "grafana",
}
PARTITION_KEYS = ("matching.numTaskqueueReadPartitions", "matching.numTaskqueueWritePartitions")
# Variables that would change what `config` prints; the test wants the file's own defaults.
_CLEAN_PREFIXES = ("TEMPORAL_", "POSTLANE_", "POSTGRES_", "COMPOSE_", "ACME_SMTP_")


def _compose_command() -> list[str]:
    """``docker-compose`` (Compose v1 or v2), else ``docker compose``; fail if neither."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    pytest.fail(
        "docker-compose is not installed: `apt-get install -y docker-compose` "
        "(Debian package; no Docker engine needed) or install the docker compose plugin"
    )


def _compose(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``<compose> config ...`` on the repo's file, ignoring any local .env and shell
    settings so the output shows the defaults the file itself declares."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEAN_PREFIXES)}
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("", encoding="utf-8")
    cmd = [
        *_compose_command(),
        "--env-file",
        str(empty_env_file),
        "-f",
        str(COMPOSE_FILE),
        "--project-directory",
        str(ROOT),
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _yaml_get(text: str, *path: str) -> str | None:
    """The scalar at `path` in block-style YAML such as ``compose config`` prints.

    Just enough YAML for this test (PyYAML is not a dependency): nested ``key: value``
    mappings found by indentation; sequences and flow style are skipped, not parsed.
    """

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip(" "))

    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    start, end = 0, len(lines)
    for depth, key in enumerate(path):
        level = None
        found = None
        for i in range(start, end):
            if level is None:
                level = indent(lines[i])
            if indent(lines[i]) != level:
                continue
            name, sep, rest = lines[i].strip().partition(":")
            if sep and name.strip("'\"") == key:
                found = i
                break
        if found is None or level is None:
            return None
        if depth == len(path) - 1:
            value = rest.strip()
            return value.strip("'\"") if value else None
        start = found + 1
        block_end = start
        while block_end < end and indent(lines[block_end]) > level:
            block_end += 1
        end = block_end
    return None


def test_yaml_get_reads_nested_scalars() -> None:
    text = (
        "services:\n  worker:\n    deploy:\n      replicas: 3\n    environment:\n"
        "      TEMPORAL_ADDRESS: temporal:7233\n    ports:\n    - '1:1'\n"
        "  other:\n    deploy:\n      replicas: '1'\nversion: '3.9'\n"
    )
    assert _yaml_get(text, "services", "worker", "deploy", "replicas") == "3"
    assert _yaml_get(text, "services", "worker", "environment", "TEMPORAL_ADDRESS") == (
        "temporal:7233"
    )
    assert _yaml_get(text, "services", "other", "deploy", "replicas") == "1"
    assert _yaml_get(text, "services", "worker", "missing") is None
    assert _yaml_get(text, "version") == "3.9"


def test_compose_file_is_valid(tmp_path: Path) -> None:
    result = _compose("config", "-q", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr


def test_compose_services(tmp_path: Path) -> None:
    result = _compose("config", "--services", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert EXPECTED_SERVICES <= services, f"missing: {sorted(EXPECTED_SERVICES - services)}"


def test_compose_worker_scales_and_targets_bundled_temporal(tmp_path: Path) -> None:
    result = _compose("config", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    config = result.stdout

    replicas = _yaml_get(config, "services", "worker", "deploy", "replicas")
    assert replicas is not None and int(replicas) >= 2, f"worker replicas: {replicas!r}"
    worker_env = ("services", "worker", "environment")
    assert _yaml_get(config, *worker_env, "TEMPORAL_ADDRESS") == "temporal:7233"
    assert _yaml_get(config, *worker_env, "TEMPORAL_NAMESPACE") == "postlane"
    assert _yaml_get(config, *worker_env, "POSTLANE_CONFIG") == "/app/deploy/postlane.toml"
    # The workers must not start before the namespace and search attributes exist.
    condition = _yaml_get(config, "services", "worker", "depends_on", "postlane-setup", "condition")
    assert condition == "service_completed_successfully"
    dynamic = _yaml_get(config, "services", "temporal", "environment", "DYNAMIC_CONFIG_FILE_PATH")
    assert dynamic == f"config/dynamicconfig/{DYNAMIC_CONFIG.name}"


def test_compose_variables_are_documented() -> None:
    compose = COMPOSE_FILE.read_text(encoding="utf-8")
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text("utf-8"), re.M))
    interpolated = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", compose))
    passed_through = set(re.findall(r"^\s*-\s*([A-Z][A-Z0-9_]*)\s*$", compose, re.M))
    missing = (interpolated | passed_through) - documented
    assert not missing, f"document in .env.example: {sorted(missing)}"


def test_deploy_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POSTLANE_LANES", raising=False)
    settings = load_settings(POSTLANE_TOML)
    lane = settings.lane_for("anyone@example.test")
    assert lane is not None
    assert (lane.smtp_host, lane.smtp_port, lane.smtp_tls) == ("mailpit", 1025, "none")


def test_every_lane_has_one_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamic config matches task queue names exactly (no prefixes), so each lane in
    deploy/postlane.toml needs its own entry, value 1, under both partition keys."""
    monkeypatch.delenv("POSTLANE_LANES", raising=False)
    sections: dict[str, list[str]] = {}
    current = None
    for line in DYNAMIC_CONFIG.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            current = line.split(":", 1)[0].strip()
            sections[current] = []
        elif current is not None:
            if line.lstrip().startswith("- "):
                sections[current].append("")
            if sections[current]:
                sections[current][-1] += line.strip().removeprefix("- ") + "\n"

    def field(entry: str, name: str) -> str | None:
        match = re.search(rf"^{name}:\s*(.*?)\s*$", entry, re.M)
        return match.group(1).strip("'\"") if match else None

    namespace = "postlane"  # TEMPORAL_NAMESPACE's default in docker-compose.yml
    for key in PARTITION_KEYS:
        assert key in sections, f"{DYNAMIC_CONFIG.name}: no {key}"
        for lane in load_settings(POSTLANE_TOML).lanes:
            entries = [e for e in sections[key] if field(e, "taskQueueName") == lane.task_queue]
            assert entries, f"{key}: no entry for {lane.task_queue}"
            assert [(field(e, "value"), field(e, "namespace")) for e in entries] == [
                ("1", namespace)
            ]
