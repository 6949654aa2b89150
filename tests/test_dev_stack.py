"""`postlane dev` on a fresh directory: server, catcher, worker and demo, then a clean stop."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from postlane.dev.stack import dev_token_secret
from postlane.tokens import SECRET_ENV
from tests.procs import free_port

pytestmark = pytest.mark.devserver

POSTLANE = str(Path(sys.executable).parent / "postlane")


def run_dev(state: Path, ports: tuple[int, int, int]) -> subprocess.CompletedProcess[str]:
    port, ui_port, smtp_port = ports
    # As on a fresh machine: no token secret given, so the stack makes and keeps its own.
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    return subprocess.run(
        [
            POSTLANE,
            "dev",
            "--dir",
            str(state),
            "--port",
            str(port),
            "--ui-port",
            str(ui_port),
            "--smtp-port",
            str(smtp_port),
            "--exit-after-demo",
        ],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )


def test_dev_stack_sends_demo_and_keeps_history(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ports = (free_port(), free_port(), free_port())
    first = run_dev(state, ports)
    assert first.returncode == 0, first.stderr
    assert f"Web UI       http://localhost:{ports[1]}/namespaces/postlane/workflows" in first.stdout
    assert "smtp: postlane@example.test -> you@example.test: 'Welcome to Postlane'" in first.stdout
    emls = list((state / "mail").glob("*.eml"))
    assert len(emls) == 1
    assert b"Subject: Welcome to Postlane" in emls[0].read_bytes()
    assert (state / "temporal.db").exists()
    kept = state / "token-secret"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    secret = kept.read_text()

    # Same state directory: the server finds the demo already sent (idempotent key) and
    # the catcher gets nothing new.
    second = run_dev(state, ports)
    assert second.returncode == 0, second.stderr
    assert "demo: <pl1." in second.stdout
    assert "smtp: " not in second.stdout
    assert len(list((state / "mail").glob("*.eml"))) == 1
    assert kept.read_text() == secret  # the same secret: Message-IDs and replies carry over


def test_dev_token_secret_is_kept_unless_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    first = dev_token_secret(tmp_path / "state")
    assert len(first.get_secret_value()) >= 32
    assert dev_token_secret(tmp_path / "state") == first
    assert dev_token_secret(tmp_path / "other") != first
    monkeypatch.setenv(SECRET_ENV, "given-" + "x" * 40)
    assert dev_token_secret(tmp_path / "state").get_secret_value() == "given-" + "x" * 40


def test_dev_stack_port_in_use_is_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = subprocess.run(
            [
                POSTLANE,
                "dev",
                "--dir",
                str(tmp_path),
                "--port",
                str(free_port()),
                "--ui-port",
                str(free_port()),
                "--smtp-port",
                str(taken),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: ConfigurationError: --smtp-port {taken} is in use (another `postlane dev`?); "
        "stop it or pick another port"
    )
