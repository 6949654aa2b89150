"""A good SMTP citizen under throttling, end to end: a real worker process (``python
worker.py``), the real Temporal dev server, and an SMTP server that counts sessions and
commands at the socket level and says ``450 4.7.1`` at MAIL, as a throttling Postfix does.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from postlane.catcher import SmtpCatcher
from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.models import Email, RetrySettings
from postlane.testing import catcher_lane
from tests.procs import WorkerProcess, postlane_env, wait_for_pollers, write_config

pytestmark = pytest.mark.devserver

THROTTLE = "450 4.7.1 <app@citizen.test>: Sender address rejected: too many messages"


def throttled_lane(smtp: SmtpCatcher, **fields: Any) -> LaneConfig:
    lane = LaneConfig(
        name=f"citizen-{uuid.uuid4().hex[:6]}",
        senders=["*@citizen.test"],
        smtp_host="127.0.0.1",
        rate_per_second=50,
        retry=RetrySettings(
            initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=2)
        ),
        **fields,
    )
    return catcher_lane(lane, smtp)


def log_events(stderr: str, event: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines (``--json-logs``) for `event`."""
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


async def send_all(
    dev_env: WorkflowEnvironment,
    tmp_path: Path,
    lane: LaneConfig,
    count: int,
    *worker_args: str,
) -> tuple[list[str], str]:
    """Send `count` emails through a worker process for `lane`, then SIGTERM it.

    Returns the emails' keys and the worker's log.
    """
    client = dev_env.client
    address = client.service_client.config.target_host
    env = postlane_env(address, write_config(tmp_path / "postlane.toml", [lane]))
    with WorkerProcess.start(env, tmp_path, "--no-inbound", *worker_args) as worker:
        await wait_for_pollers(client, lane.task_queue, [worker])
        pl = PostlaneClient(client, Settings(lanes=[lane]))
        keys = [f"{lane.name}-{n}" for n in range(count)]
        handles = await asyncio.gather(
            *(
                pl.send(
                    Email(
                        sender="app@citizen.test",
                        to=[f"r{n}@example.test"],
                        subject=f"#{n}",
                        text="x",
                    ),
                    key=key,
                )
                for n, key in enumerate(keys)
            )
        )
        await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 120)
        worker.send_signal(signal.SIGTERM)  # a clean shutdown closes the pooled connections
        assert await worker.wait(60) == 0, worker.describe_exit()
        return keys, worker.stderr


async def test_throttled_at_mail_reuses_sessions_and_quits(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = throttled_lane(smtp, max_concurrent=4)
        smtp.fail("mail", THROTTLE, times=30)

        keys, _ = await send_all(dev_env, tmp_path, lane, 60)

        sessions = smtp.sessions
        copies = [m.message_id for m in smtp.messages]

    assert len(copies) == len(set(copies)) == len(keys)
    refusals = sum(s.count("MAIL") for s in sessions) - len(keys)
    assert refusals == 30
    # Every refusal was reset on its connection instead of costing a new session.
    assert sum(s.count("RSET") for s in sessions) == refusals
    assert len(sessions) <= lane.max_concurrent, [s.commands[:8] for s in sessions]
    assert [s.closed and s.commands[-1] == "QUIT" for s in sessions] == [True] * len(sessions)


@pytest.mark.parametrize("json_logs", [False, True], ids=["console", "json"])
async def test_throttled_attempt_logs_one_line_without_traceback(
    dev_env: WorkflowEnvironment, tmp_path: Path, json_logs: bool
) -> None:
    with SmtpCatcher() as smtp:
        lane = throttled_lane(smtp)
        smtp.fail("mail", THROTTLE, times=2)

        [key], log = await send_all(
            dev_env, tmp_path, lane, 1, *(["--json-logs"] if json_logs else [])
        )

    assert "Traceback" not in log
    assert "Completing activity as failed" not in log
    if json_logs:
        failed = log_events(log, "email.attempt_failed")
        assert [(e["lane"], e["key"], e["attempt"], e["reply"]) for e in failed] == [
            (lane.name, key, 1, THROTTLE),
            (lane.name, key, 2, THROTTLE),
        ]
        assert {e["error_type"] for e in failed} == {"SmtpThrottledError"}
        assert len(log_events(log, "email.sent")) == 1
    else:
        failed_lines = [line for line in log.splitlines() if "email.attempt_failed" in line]
        assert len(failed_lines) == 2, failed_lines
        for attempt, line in enumerate(failed_lines, start=1):
            for field in (f"lane={lane.name}", f"key={key}", f"attempt={attempt}", "reply="):
                assert field in line, (field, line)
            assert THROTTLE in line
