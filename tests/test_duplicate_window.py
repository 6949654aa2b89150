"""The duplicate window: once the SMTP server accepted DATA and the activity signalled it,
no retry sends the email again, whatever happens to the attempt that sent it.

Real Temporal dev server, real SMTP server on a socket. The sending worker reaches Temporal
through a TCP proxy that the SMTP server cuts (from its DATA handler, before it replies
250): that worker gets the 250 and signals ``delivery_accepted`` (through its own,
direct connection, as it would just before a crash), but neither its heartbeats nor its
completion ever reach Temporal again. To Temporal this is a worker that died right after
the signal: the attempt's heartbeat lapses and a second worker retries it. The assertions
read the SMTP server's copies and the workflow's history on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from activities.smtp import ACCEPTED_SIGNAL, SmtpActivities
from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.connection import data_converter
from postlane.dev.catcher import CaughtMessage, SmtpCatcher
from postlane.email.models import DeliveryReceipt, Email, RetrySettings
from postlane.ids import WORKFLOW_TASK_QUEUE
from postlane.testing import catcher_lane
from postlane.worker import build_workers
from workflows import WORKFLOWS, workflow_runner

HISTORIES = Path(__file__).parent / "histories"
LOST_AFTER_ACCEPTED = HISTORIES / "send_email_accepted_attempt_lost.json"
"""An attempt that signalled ``delivery_accepted`` and then timed out with no retry left
(record again with ``POSTLANE_RECORD_HISTORIES=1``)."""

pytestmark = pytest.mark.devserver


class TcpProxy:
    """Forwards loopback TCP connections to `target`; `cut` drops them all at once."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._server: asyncio.Server | None = None
        self._transports: list[asyncio.WriteTransport] = []
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Refuse new connections and abort every open one (no bytes get through)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in self._transports:
            transport.abort()
        self._transports.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._transports += [writer.transport, up_writer.transport]
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.shutdown(), 30)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def history_summary(events: list[Any]) -> tuple[list[int], list[str], list[str]]:
    """(attempts started, signal names, completing worker identities) of a history."""
    started, signals, completed = [], [], []
    for event in events:
        if event.HasField("activity_task_started_event_attributes"):
            started.append(event.activity_task_started_event_attributes.attempt)
        elif event.HasField("workflow_execution_signaled_event_attributes"):
            signals.append(event.workflow_execution_signaled_event_attributes.signal_name)
        elif event.HasField("activity_task_completed_event_attributes"):
            completed.append(event.activity_task_completed_event_attributes.identity)
    return started, signals, completed


@pytest.mark.parametrize(
    "maximum_attempts",
    [
        pytest.param(0, id="retried: the retry returns the signalled receipt"),
        pytest.param(1, id="no retry left: the workflow takes the signalled receipt"),
    ],
)
async def test_send_accepted_data_is_never_sent_again(
    dev_env: WorkflowEnvironment, key: str, maximum_attempts: int
) -> None:
    client = dev_env.client
    proxy = TcpProxy(client.service_client.config.target_host)
    await proxy.start()
    loop = asyncio.get_running_loop()

    async def cut() -> None:
        proxy.cut()

    def lose_the_sender(_: CaughtMessage) -> None:
        # Runs in the SMTP server's thread after it took the message, before it says 250;
        # it waits until the proxy is cut.
        asyncio.run_coroutine_threadsafe(cut(), loop).result(10)

    with SmtpCatcher(on_message=lose_the_sender) as smtp:
        lane = catcher_lane(
            LaneConfig(
                name=f"dup-{key[-8:]}",
                senders=["*@dup.test"],
                smtp_host="127.0.0.1",
                retry=RetrySettings(
                    initial_interval=timedelta(seconds=1),
                    maximum_interval=timedelta(seconds=2),
                    maximum_attempts=maximum_attempts,
                ),
            ),
            smtp,
        )
        settings = Settings(lanes=[lane])
        doomed_client = await Client.connect(
            proxy.address, namespace=client.namespace, data_converter=data_converter()
        )
        [orchestration] = build_workers(client, settings, [], SmtpActivities(settings))
        doomed = Worker(
            doomed_client,
            task_queue=lane.task_queue,
            activities=[SmtpActivities(settings, client).send_email],
            identity="doomed",
        )
        async with running(orchestration), running(doomed):
            assert orchestration.task_queue == WORKFLOW_TASK_QUEUE
            pl = PostlaneClient(client, settings)
            handle = await pl.send(
                Email(sender="app@dup.test", to=["bob@example.test"], subject="Once", text="1"),
                key=key,
            )
            await smtp.wait_for_async(1, timeout=60)
            survivor = Worker(
                client,
                task_queue=lane.task_queue,
                activities=[SmtpActivities(settings, client).send_email],
                identity="survivor",
            )
            async with running(survivor):
                try:
                    receipt = await asyncio.wait_for(handle.result(), 90)
                except TimeoutError:
                    pytest.fail(f"the email did not end as sent: {await handle.status()}")
            email_workflow = client.get_workflow_handle(handle.workflow_id)
            history = await email_workflow.fetch_history()
            recorded = await email_workflow.query("accepted_receipt", result_type=DeliveryReceipt)
            await proxy.start()  # let the doomed worker reconnect, to shut down cleanly

    copies = smtp.messages
    assert len(copies) == 1, f"the SMTP server received {len(copies)} copies"
    assert copies[0].message_id == receipt.message_id
    assert receipt.smtp_reply == "250 2.0.0 OK: queued"
    assert receipt.accepted == ["bob@example.test"]
    started, signals, completed = history_summary(list(history.events))
    assert signals.count(ACCEPTED_SIGNAL) == 1, signals
    assert recorded is not None and recorded.smtp_reply == receipt.smtp_reply
    if maximum_attempts == 0:
        assert started[-1] >= 2, started  # the accepted attempt was lost and retried
        assert completed == ["survivor"], completed
    else:
        assert started == [1] and completed == [], (started, completed)
    await replay(history)
    if os.environ.get("POSTLANE_RECORD_HISTORIES") and maximum_attempts == 1:
        LOST_AFTER_ACCEPTED.write_text(history.to_json())


async def replay(history: WorkflowHistory) -> None:
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(history)


async def test_replay_recorded_accepted_attempt_lost() -> None:
    assert LOST_AFTER_ACCEPTED.exists(), f"record {LOST_AFTER_ACCEPTED.name}: see its docstring"
    await replay(WorkflowHistory.from_json("email:recorded", LOST_AFTER_ACCEPTED.read_text()))
