"""The Temporal Web UI, in a real headless browser (Debian's chromium), finds a parked email
through Postlane's search attributes: what an operator does, without writing code."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import urllib.parse

import pytest
from temporalio.testing import WorkflowEnvironment

from postlane import search_attributes as sa
from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.connection import data_converter
from postlane.dev.binaries import dev_server_path
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import RetrySettings
from postlane.testing import running_workers
from tests.conftest import DEV_SERVER_ARGS
from tests.procs import assert_eventually, free_port
from tests.sysdeps import require
from tests.test_integration import an_email, new_lane

pytestmark = pytest.mark.devserver

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
    "--window-size=1440,900",
]


def chromium(*args: str) -> str:
    binary = require("chromium", "chromium")
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=90,
        )
    return out.stdout


@pytest.mark.timeout(240)
async def test_web_ui_lists_dead_lettered_email_by_status(key: str) -> None:
    ui_port = free_port()
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=dev_server_path(),
        data_converter=data_converter(),
        search_attributes=list(sa.ALL),
        dev_server_extra_args=DEV_SERVER_ARGS,
        ui=True,
        ui_port=ui_port,
    )
    try:
        with SmtpCatcher() as smtp:
            lane = new_lane(smtp, retry=RetrySettings(maximum_attempts=1))
            settings = Settings(lanes=[lane])
            smtp.fail("data", "451 4.3.0 mailbox temporarily unavailable")
            async with running_workers(env, settings):
                pl = PostlaneClient(env.client, settings)
                await pl.send(an_email("Quarterly report"), key=key)

                async def parked() -> bool:
                    return [r.key for r in await pl.dlq.list(lane=lane.name)] == [key]

                await assert_eventually(parked, within=60, what="the email dead-lettered")
                query = f'PostlaneStatus="dead_letter" AND PostlaneLane="{lane.name}"'
                url = (
                    f"http://127.0.0.1:{ui_port}/namespaces/default/workflows?query="
                    + urllib.parse.quote(query)
                )
                dom = await asyncio.to_thread(chromium, "--dump-dom", url)
                assert f"email:{key}" in dom
    finally:
        await env.shutdown()
