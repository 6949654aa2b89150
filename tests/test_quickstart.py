"""The README's quickstart, run verbatim against a dev stack of its own, so the front page
cannot rot: its Python block as `hello.py`, its shell block line by line under `bash -e`.
Ground truth is the catcher's maildir and the workflows on the server, not the commands'
own output. The stack is stopped the way the README tells a script to stop `make dev`:
SIGTERM to its process group."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from email import message_from_bytes
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from postlane.connection import DEFAULT_NAMESPACE
from tests.procs import assert_eventually, free_port

pytestmark = pytest.mark.devserver

README = Path(__file__).resolve().parent.parent / "README.md"
VENV = Path(sys.executable).parent.parent


def quickstart_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the README's Quickstart, up to its next
    heading."""
    text = README.read_text()
    start = text.index("\n## Quickstart\n")
    end = re.compile(r"\n##+ ").search(text, start + 1)
    section = text[start : end.start() if end else len(text)]
    return [(m[1], m[2]) for m in re.finditer(r"```(\w+)\n(.*?)```", section, re.S)]


def emails_caught(maildir: Path) -> list[tuple[str, str]]:
    found = []
    for eml in sorted(maildir.glob("*.eml")):
        msg = message_from_bytes(eml.read_bytes())
        found.append((str(msg["Subject"]), str(msg["To"])))
    return found


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.timeout(300)
async def test_readme_quickstart_runs_verbatim(tmp_path: Path) -> None:
    blocks = quickstart_blocks()
    assert [lang for lang, _ in blocks] == ["bash", "python", "bash"], blocks
    assert blocks[0][1].strip() == "make dev"  # the test starts the same stack on free ports
    hello, shell = blocks[1][1], blocks[2][1]

    # The quickstart runs at the repository's root: `.venv/` and `.postlane/` there.
    (tmp_path / ".venv").symlink_to(VENV)
    port, ui_port, smtp_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "POSTLANE_"))}
    env["TEMPORAL_ADDRESS"] = f"127.0.0.1:{port}"
    log = (tmp_path / "dev.log").open("w")
    dev = await asyncio.create_subprocess_exec(
        str(VENV / "bin" / "postlane"),
        "dev",
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--smtp-port",
        str(smtp_port),
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as `set -m` or `setsid` gives it
    )
    maildir = tmp_path / ".postlane" / "mail"
    try:
        await assert_eventually(
            lambda: "Ctrl-C stops everything" in (tmp_path / "dev.log").read_text(),
            within=120,
            what="postlane dev up, demo sent",
        )

        (tmp_path / "hello.py").write_text(hello)
        py = await asyncio.to_thread(run, [".venv/bin/python", "hello.py"], tmp_path, env)
        assert py.returncode == 0, py.stderr
        assert py.stdout.strip().endswith(" sent"), py.stdout
        assert ("Code", "bob@example.test") in emails_caught(maildir)

        sh = await asyncio.to_thread(run, ["bash", "-e", "-x", "-c", shell], tmp_path, env)
        assert sh.returncode == 0, f"{sh.stdout}\n{sh.stderr}"
        assert "cancelled" in sh.stdout
        assert "email:verify-bob-1" in sh.stdout  # the Temporal CLI's list, namespace postlane

        # The demo and verify-bob-1 once: the second send of the key sent nothing, and the
        # cancelled email never reached the server.
        assert sorted(emails_caught(maildir)) == [
            ("Code", "bob@example.test"),
            ("Welcome to Postlane", "you@example.test"),
        ]
        client = await Client.connect(env["TEMPORAL_ADDRESS"], namespace=DEFAULT_NAMESPACE)
        later = await client.get_workflow_handle("email:later-1").describe()
        assert later.status == WorkflowExecutionStatus.CANCELED
        assert later.search_attributes.get("PostlaneStatus") == ["cancelled"]
    finally:
        if dev.returncode is None:
            os.killpg(dev.pid, signal.SIGTERM)
        rc = await asyncio.wait_for(dev.wait(), 60)
        log.close()
    assert rc == 0
    assert "postlane dev: stopped" in (tmp_path / "dev.log").read_text()
    # The server went down with it: its port is free again.
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
