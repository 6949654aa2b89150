"""A good SMTP citizen under throttling, end to end: a real worker process (``python
worker.py``), the real Temporal dev server, and SMTP servers that say ``450 4.7.1`` at
MAIL: the `SmtpCatcher` (counting sessions and commands at the socket level) and a real,
private Postfix throttled by its own client rate limit (read from its log).
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

from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import Email, RetrySettings
from postlane.testing import catcher_lane
from tests.postfix import Postfix
from tests.procs import (
    WorkerProcess,
    assert_eventually,
    postlane_env,
    wait_for_pollers,
    write_config,
)

pytestmark = pytest.mark.devserver

THROTTLE = "450 4.7.1 <app@citizen.test>: Sender address rejected: too many messages"
LOGGED_THROTTLE = THROTTLE.replace("app@", "***@")  # INFO logs keep only the domain


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

        await assert_eventually(
            lambda: all(s.closed for s in smtp.sessions), what="every session ended"
        )
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
            (lane.name, key, 1, LOGGED_THROTTLE),
            (lane.name, key, 2, LOGGED_THROTTLE),
        ]
        assert {e["error_type"] for e in failed} == {"SmtpThrottledError"}
        assert len(log_events(log, "email.sent")) == 1
    else:
        failed_lines = [line for line in log.splitlines() if "email.attempt_failed" in line]
        assert len(failed_lines) == 2, failed_lines
        for attempt, line in enumerate(failed_lines, start=1):
            for field in (f"lane={lane.name}", f"key={key}", f"attempt={attempt}", "reply="):
                assert field in line, (field, line)
            assert LOGGED_THROTTLE in line


async def test_throttling_postfix_sees_few_sessions_each_ending_with_quit(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    # Postfix's own client rate limit: more than 10 messages in 2 s from 127.0.0.1 gets
    # "450 4.7.1 Error: too much mail from 127.0.0.1" at MAIL.
    with Postfix(
        smtpd_client_message_rate_limit="10",
        anvil_rate_time_unit="2s",
        smtpd_client_event_limit_exceptions="",
    ) as postfix:
        lane = LaneConfig(
            name=f"postfix-{uuid.uuid4().hex[:6]}",
            senders=["*@citizen.test"],
            smtp_host="127.0.0.1",
            smtp_port=postfix.port,
            smtp_tls="none",
            rate_per_second=50,
            max_concurrent=4,
            retry=RetrySettings(
                initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=2)
            ),
        )

        keys, _ = await send_all(dev_env, tmp_path, lane, 60)

        await assert_eventually(
            lambda: len(postfix.sessions()) == postfix.connections(),
            what="every session ended in postfix's log",
        )
        sessions = postfix.sessions()
        queued = postfix.queued()
        throttled = postfix.count("Message delivery request rate limit exceeded")

    assert len(queued) == len(keys) and set(queued.values()) == {1}, queued
    assert throttled > 0, "postfix never throttled: the test proves nothing"
    refused = sum(s.refused("mail") for s in sessions)
    assert refused == throttled
    assert sum(s.sent("rset") for s in sessions) == refused
    assert len(sessions) <= lane.max_concurrent, [s.counts for s in sessions]
    assert [s.sent("quit") for s in sessions] == [1] * len(sessions)
