"""Enqueue-to-accepted counts from when an email was due, not from when it was scheduled.

On the dev server: the receipt's acceptance time comes from the worker's clock, which the
time-skipping server's virtual clock does not move.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.client import Client
from temporalio.runtime import MetricBuffer, Runtime, TelemetryConfig
from temporalio.testing import WorkflowEnvironment

from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.connection import data_converter
from postlane.dev.catcher import SmtpCatcher
from postlane.metrics import Metric
from postlane.testing import running_workers
from tests.test_integration import address_of, an_email, new_lane

pytestmark = pytest.mark.devserver

AHEAD = timedelta(seconds=20)
"""How far ahead the email is scheduled: from its start it would wait at least this long."""


async def test_a_scheduled_email_on_time_is_not_counted_late(
    dev_env: WorkflowEnvironment, key: str
) -> None:
    buffer = MetricBuffer(10_000)
    client = await Client.connect(
        address_of(dev_env),
        namespace=dev_env.client.namespace,
        data_converter=data_converter(),
        runtime=Runtime(telemetry=TelemetryConfig(metrics=buffer)),
    )
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp)
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(client, settings)
        async with running_workers(WorkflowEnvironment.from_client(client), settings):
            due = datetime.now(UTC) + AHEAD
            handle = await pl.send(an_email(), key=key, send_at=due)
            receipt = await asyncio.wait_for(handle.result(), 90)
        assert [m.message_id for m in smtp.messages] == [receipt.message_id]  # at the server
    assert receipt.sent_at is not None and receipt.sent_at >= due
    waited = [
        u.value
        for u in buffer.retrieve_updates()
        if u.metric.name == Metric.ENQUEUE_TO_ACCEPTED_SECONDS
    ]
    # From its start it waited over AHEAD; from when it was due, the moments a send takes.
    assert len(waited) == 1 and 0 <= waited[0] < AHEAD.total_seconds() / 2, waited
