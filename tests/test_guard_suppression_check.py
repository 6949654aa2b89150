"""The send path's suppression check fails closed, and fast, when the server cannot answer.

Against the real dev server through a TCP relay the test can stall: while the server's
answers are held back, `SendGuard.check` neither sends nor waits out the whole send; it
fails the attempt with a retryable ``SuppressionUnknown`` once its bounded describe times
out. With the relay flowing, a suppressed recipient is still refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities import guard
from activities.guard import SendGuard
from postlane import Email
from postlane.connection import data_converter
from postlane.email.models import SmtpSendRequest
from postlane.errors import ErrorType
from postlane.sequences.models import Suppression
from postlane.sequences.suppressions import start_suppression

pytestmark = pytest.mark.devserver


class StallingRelay:
    """Relays TCP between clients and `upstream`; while `stalled`, holds every byte back."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[StallingRelay]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            self.flowing.set()


def request(*to: str) -> SmtpSendRequest:
    key = f"guard-{uuid.uuid4().hex[:8]}"
    return SmtpSendRequest(
        email=Email(sender="news@check.test", to=list(to), subject="Hi", text="hello"),
        lane=f"check-{uuid.uuid4().hex[:6]}",
        message_id=f"<{key}@check.test>",
        key=key,
    )


@pytest.mark.timeout(120)
async def test_suppression_check_fails_closed_and_bounded_when_the_server_stalls(
    dev_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guard, "SUPPRESSION_CHECK_TIMEOUT", timedelta(seconds=1))
    upstream = dev_env.client.service_client.config.target_host
    gone = f"gone-{uuid.uuid4().hex[:6]}@example.test"
    await start_suppression(
        dev_env.client,
        Suppression(sender="news@check.test", address=gone, reason="550", source="bounce"),
    )
    async with StallingRelay(upstream).running() as relay:
        client = await Client.connect(
            f"127.0.0.1:{relay.port}",
            namespace=dev_env.client.namespace,
            data_converter=data_converter(),
        )
        checker = SendGuard(client)
        # Flowing: a clean recipient passes, a suppressed one is refused for good.
        await checker.check(request("ann@example.test"))
        with pytest.raises(ApplicationError) as refused:
            await checker.check(request("ann@example.test", gone))
        assert refused.value.type == ErrorType.RECIPIENT_SUPPRESSED

        relay.flowing.clear()  # the server's answers are held from now on
        with pytest.raises(ApplicationError) as unknown:
            # Without the bound this waits for as long as the relay holds (the test's timeout).
            await checker.check(request("bob@example.test", "carol@example.test"))
        assert unknown.value.type == ErrorType.SUPPRESSION_UNKNOWN
        assert not unknown.value.non_retryable  # the attempt is retried, nothing is sent
