"""The durable embedded default: `postlane dev` fsyncs every commit, and a kill -9 of its
Temporal server mid-batch loses no start the client saw accepted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from postlane.client import PostlaneClient
from postlane.config import Settings, dev_lane
from postlane.connection import DEFAULT_NAMESPACE, data_converter
from postlane.dev.stack import SYNCHRONOUS_ENV, server_command, synchronous_from_environment
from postlane.email.models import Email
from postlane.errors import ConfigurationError
from tests.procs import assert_eventually, free_port

pytestmark = pytest.mark.devserver

POSTLANE = str(Path(sys.executable).parent / "postlane")
BATCH = 240
KILL_AFTER = 60


def test_dev_server_defaults_to_synchronous_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SYNCHRONOUS_ENV, raising=False)
    command = server_command(Path("t.db"), port=1, ui_port=2)
    assert "synchronous=full" in command and "synchronous=normal" not in command
    assert "journal_mode=wal" in command
    assert synchronous_from_environment() == "full"
    monkeypatch.setenv(SYNCHRONOUS_ENV, "normal")
    assert synchronous_from_environment() == "normal"
    assert synchronous_from_environment("full") == "full"  # the flag wins over the variable
    fast = server_command(Path("t.db"), port=1, ui_port=2, synchronous="normal")
    assert "synchronous=normal" in fast
    monkeypatch.setenv(SYNCHRONOUS_ENV, "off")
    with pytest.raises(ConfigurationError, match="synchronous: 'off' is not one of"):
        synchronous_from_environment()


def test_dev_rejects_a_bad_synchronous_mode(tmp_path: Path) -> None:
    env = {**os.environ, SYNCHRONOUS_ENV: "off"}
    done = subprocess.run(
        [POSTLANE, "dev", "--dir", str(tmp_path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "synchronous" in done.stderr and not (tmp_path / "temporal.db").exists()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            # The command name is in parentheses and may hold spaces: split after it.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _server_pid(dev_pid: int) -> int | None:
    for child in _children(dev_pid):
        with contextlib.suppress(OSError):
            cmdline = (Path("/proc") / str(child) / "cmdline").read_bytes().split(b"\0")
            if b"start-dev" in cmdline:
                return child
    return None


class Dev:
    """`postlane dev --no-demo` as a real process on `state`, with fixed ports."""

    def __init__(self, state: Path, ports: tuple[int, int, int]) -> None:
        self.state, self.ports = state, ports
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state.parent / "dev.log"

    async def start(self) -> int:
        port, ui_port, smtp_port = self.ports
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = self._spawn(
            [POSTLANE, "dev", "--no-demo", "--dir", str(self.state), "--port", str(port)]
            + ["--ui-port", str(ui_port), "--smtp-port", str(smtp_port)]
        )
        await assert_eventually(
            lambda: b"postlane dev is up" in self.log.read_bytes()[offset:],
            within=120,
            what="postlane dev up",
        )
        server = _server_pid(self.proc.pid)
        assert server is not None
        return server

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != SYNCHRONOUS_ENV}
        with self.log.open("ab") as log:
            return subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def kill_all(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            server = _server_pid(self.proc.pid)
            if server is not None:
                os.kill(server, signal.SIGKILL)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill_all()


async def _client(port: int) -> Client:
    return await Client.connect(
        f"127.0.0.1:{port}", namespace=DEFAULT_NAMESPACE, data_converter=data_converter()
    )


@pytest.mark.timeout(420)
async def test_kill_9_of_the_dev_server_mid_batch_loses_no_accepted_start(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    ports = (free_port(), free_port(), free_port())
    dev = Dev(state, ports)
    try:
        server = await dev.start()
        cmdline = (Path("/proc") / str(server) / "cmdline").read_bytes().split(b"\0")
        assert b"synchronous=full" in cmdline  # the durable default, as `postlane dev` runs it
        assert b"--db-filename" in cmdline and str(state / "temporal.db").encode() in cmdline
        pl = PostlaneClient(await _client(ports[0]), Settings(lanes=[dev_lane(ports[2])]))
        accepted: dict[str, str] = {}
        killed = asyncio.Event()
        gate = asyncio.Semaphore(16)

        async def one(n: int) -> None:
            async with gate:
                if killed.is_set():
                    return
                email = Email(
                    sender="kill@example.test", to=[f"r{n}@example.test"], subject=f"#{n}", text="x"
                )
                try:
                    handle = await pl.send(email, key=f"kill9-{n}")
                except (RPCError, RuntimeError):
                    return  # not accepted: the server died under this call
                run_id = handle._handle.result_run_id or handle._handle.run_id
                assert run_id
                accepted[f"email:kill9-{n}"] = run_id
                if len(accepted) >= KILL_AFTER and not killed.is_set():
                    killed.set()
                    os.kill(server, signal.SIGKILL)  # mid-batch: other starts are in flight

        await asyncio.gather(*(one(n) for n in range(BATCH)))
        assert killed.is_set() and len(accepted) >= KILL_AFTER
        dev.kill_all()  # the rest of the stack goes the same way

        await dev.start()  # the same state directory, so the same SQLite file
        restarted = await _client(ports[0])
        for workflow_id, run_id in accepted.items():
            desc = await restarted.get_workflow_handle(workflow_id).describe()
            assert desc.run_id == run_id, workflow_id
        # They go on: each accepted email is eventually delivered by the restarted worker.

        async def all_done() -> bool:
            for workflow_id in accepted:
                desc = await restarted.get_workflow_handle(workflow_id).describe()
                if desc.status != WorkflowExecutionStatus.COMPLETED:
                    return False
            return True

        await assert_eventually(all_done, within=240, interval=1, what="accepted emails sent")
        caught = b"".join(p.read_bytes() for p in (state / "mail").glob("*.eml"))
        for workflow_id in accepted:
            n = workflow_id.removeprefix("email:kill9-")
            assert f"Subject: #{n}\r\n".encode() in caught or f"Subject: #{n}\n".encode() in caught
    finally:
        dev.stop()
