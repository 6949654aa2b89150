"""``postlane top`` in a real terminal (tmux), against the dev server and a real worker."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import uuid
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from postlane.cli.top import sparkline
from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import EmailStatus, RetrySettings
from postlane.testing import running_workers
from tests.procs import POSTLANE_SCRIPT, assert_eventually, postlane_env, write_config
from tests.sysdeps import require
from tests.test_integration import address_of, an_email, new_lane

pytestmark = pytest.mark.devserver

EXIT_MARK = "postlane-top-exited="
DOCS_CAPTURE = Path(__file__).resolve().parent.parent / "docs" / "postlane-top.txt"
"""Where POSTLANE_RECORD_DOCS=1 writes the screen, to paste into docs/operating.md."""


def test_sparkline_scales_to_the_largest_value() -> None:
    assert sparkline([0, 1, 2, 4]) == "▁▂▄█"
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([]) == ""


class Tmux:
    """A detached tmux session of its own (its own server socket), 140×40."""

    def __init__(self, tmp_path: Path) -> None:
        self.binary = require("tmux", "tmux")
        self.socket = str(tmp_path / "tmux.sock")
        self.name = f"top-{uuid.uuid4().hex[:6]}"

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            [self.binary, "-S", self.socket, *args], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self, command: str) -> None:
        # The shell stays after the command, so its last screen and exit status stay readable.
        shell = f"{command}; echo {EXIT_MARK}$?; sleep 600"
        self._run("new-session", "-d", "-s", self.name, "-x", "140", "-y", "40", shell)

    def screen(self) -> str:
        return self._run("capture-pane", "-p", "-t", self.name)

    def keys(self, *keys: str) -> None:
        self._run("send-keys", "-t", self.name, *keys)

    def exit_status(self) -> str | None:
        marks = [line for line in self.screen().splitlines() if line.startswith(EXIT_MARK)]
        return marks[-1].removeprefix(EXIT_MARK) if marks else None

    def close(self) -> None:
        subprocess.run([self.binary, "-S", self.socket, "kill-server"], capture_output=True)


@pytest.mark.timeout(180)
async def test_top_shows_sends_backlog_and_the_newest_dead_letter_live(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    tmux = Tmux(tmp_path)
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, retry=RetrySettings(maximum_attempts=1))
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(dev_env.client, settings)
        env = postlane_env(
            address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]), TERM="xterm"
        )
        # The pane's own size, not the one pytest's terminal left in COLUMNS/LINES.
        kept = {k: v for k, v in env.items() if k not in ("PATH", "COLUMNS", "LINES")}
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in kept.items())
        async with running_workers(dev_env, settings):
            for n in range(3):
                await (await pl.send(an_email(f"#{n}"), key=f"{key}-{n}")).result()
            smtp.fail("data", "451 4.3.0 mailbox temporarily unavailable", times=1)
            await pl.send(an_email("parks"), key=f"{key}-parked")

            async def parked() -> bool:
                return await pl.status(f"{key}-parked") == EmailStatus.DEAD_LETTER

            await assert_eventually(parked, within=60, what="one email dead-lettered")
            try:
                tmux.start(
                    f"env -u COLUMNS -u LINES {exports} {POSTLANE_SCRIPT} top --interval 0.5"
                )

                def lane_row() -> list[str] | None:
                    screen = tmux.screen()
                    if EXIT_MARK in screen:
                        raise RuntimeError(f"postlane top ended:\n{screen}")
                    for line in screen.splitlines():
                        cells = line.replace("│", " ").split()
                        if cells and cells[0] == lane.name:
                            return cells
                    return None

                # LANE RATE/s BACKLOG OLDEST WAITING SENT SENT/min ERRORS/min RETRYING SENDS
                row = await assert_eventually(lane_row, what="the lane's row on screen")
                assert row[1] == "50/50" and row[5] == "3", row
                assert f"{key}-parked" in tmux.screen()
                assert "451 4.3.0 mailbox temporarily unavailable" in tmux.screen()

                # Two more sends show up live: the count, a rate above zero, the sparkline.
                for n in range(3, 5):
                    await (await pl.send(an_email(f"#{n}"), key=f"{key}-{n}")).result()

                def moved() -> list[str] | None:
                    cells = lane_row()
                    return cells if cells and cells[5] == "5" and cells[6] != "0.0" else None

                row = await assert_eventually(moved, what="the two new sends on screen")
                assert len(smtp.messages) == 5  # what the screen says is what the server got
                assert set(row[-1]) - {"▁"}, row  # the sparkline moved
                if os.environ.get("POSTLANE_RECORD_DOCS"):  # docs/postlane-top.txt, retaken
                    DOCS_CAPTURE.write_text(tmux.screen().rstrip() + "\n", encoding="utf-8")

                tmux.keys("C-c")
                status = await assert_eventually(tmux.exit_status, what="top to exit on Ctrl-C")
                assert status == "130"
            finally:
                tmux.close()


async def test_top_once_answers_with_every_worker_gone(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    """Workers down is when an operator looks: a dead letter no worker can answer for still
    shows (from the server), and the frame comes at once instead of waiting on queries."""
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, retry=RetrySettings(maximum_attempts=1))
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(dev_env.client, settings)
        smtp.fail("data", "451 4.3.0 mailbox temporarily unavailable", times=1)
        async with running_workers(dev_env, settings):
            await pl.send(an_email("parks"), key=f"{key}-parked")

            async def parked() -> bool:
                return await pl.status(f"{key}-parked") == EmailStatus.DEAD_LETTER

            await assert_eventually(parked, within=60, what="one email dead-lettered")
    # No worker runs now.
    env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
    proc = await asyncio.create_subprocess_exec(
        str(POSTLANE_SCRIPT),
        "top",
        "--once",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    rows = [line.replace("│", " ").split() for line in out.decode().splitlines()]
    assert any(r[:2] == [lane.name, "-"] for r in rows), out.decode()  # no lane workflow
    assert any(r[:2] == [f"{key}-parked", lane.name] for r in rows), out.decode()
