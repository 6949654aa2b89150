"""`EmailHandle.result()` returns once the server has closed the email's workflow, even when
the server never wakes the long poll that was waiting for that close.

A busy Temporal server can drop the notification that wakes a result poll (each waiter has a
one-slot buffer; bench/results/latency.md): with the SDK's plain ``result()`` the client
then learns of the close only when the server's 20 s long-poll expiry runs out. Here a
wrapper around this test's own client's ``GetWorkflowExecutionHistory`` plays that server:
every long poll that arrives while the workflow is still running is parked and never woken
(only its gRPC deadline ends it, answered with an empty page, as the server answers a poll
that expires). Real dev server, real worker, real SMTP server; the receipt is checked
against the bytes the SMTP server received and the order of events against the server's
own report of the close.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from temporalio.api.workflowservice.v1 import (
    GetWorkflowExecutionHistoryRequest,
    GetWorkflowExecutionHistoryResponse,
)
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.connection import data_converter
from postlane.dev.catcher import SmtpCatcher
from postlane.ids import email_workflow_id
from postlane.testing import catcher_lane, running_workers
from postlane.waiting import workflow_result
from tests.procs import assert_eventually
from tests.test_integration import address_of, an_email, new_lane

pytestmark = pytest.mark.devserver


@dataclass
class LostWakeups:
    """A `GetWorkflowExecutionHistory` that loses every close notification.

    A long poll that arrives while the workflow runs is parked until its deadline (forever
    without one) and then answered with an empty page; any other call goes to the server.
    `log` records, in order, each poll and what the server said about the workflow then.
    """

    client: Client
    real: Any
    log: list[str] = field(default_factory=list)

    async def __call__(
        self,
        req: GetWorkflowExecutionHistoryRequest,
        *,
        retry: bool = False,
        metadata: Any = None,
        timeout: timedelta | None = None,  # noqa: ASYNC109 (the RPC method's own signature)
    ) -> GetWorkflowExecutionHistoryResponse:
        metadata = metadata or {}
        if req.wait_new_event:
            desc = await self.client.get_workflow_handle(req.execution.workflow_id).describe()
            if desc.status == WorkflowExecutionStatus.RUNNING:
                self.log.append("poll parked while running")
                if timeout is None:
                    await asyncio.Event().wait()  # never woken, never expires
                # The server would answer at its own expiry; this one, at the deadline.
                await asyncio.sleep(timeout.total_seconds() if timeout else 0)
                return GetWorkflowExecutionHistoryResponse()
            self.log.append("poll after close")
        return await self.real(req, retry=retry, metadata=metadata, timeout=timeout)


@pytest.mark.timeout(120)
async def test_result_arrives_after_the_close_although_the_waiting_poll_is_never_woken(
    dev_env: WorkflowEnvironment, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await Client.connect(
        address_of(dev_env), namespace=dev_env.client.namespace, data_converter=data_converter()
    )
    service = client.workflow_service
    lost = LostWakeups(client, service.get_workflow_execution_history)
    monkeypatch.setattr(service, "get_workflow_execution_history", lost)
    with SmtpCatcher() as smtp:
        lane = catcher_lane(new_lane(), smtp)
        pl = PostlaneClient(client, Settings(lanes=[lane]))
        handle = await pl.send(an_email(), key=key)
        # The client is waiting before any worker runs, so its poll is parked on a running
        # workflow when the close comes.
        waiting = asyncio.create_task(handle.result())
        await assert_eventually(
            lambda: "poll parked while running" in lost.log, what="a parked result poll"
        )
        async with running_workers(dev_env, pl.settings):
            receipt = await waiting

    desc = await dev_env.client.get_workflow_handle(email_workflow_id(key)).describe()
    assert desc.status == WorkflowExecutionStatus.COMPLETED
    # The parked poll was never answered with the close: the result came from a later poll
    # that started after the server had closed the workflow.
    assert lost.log[0] == "poll parked while running"
    assert lost.log[-1] == "poll after close"
    [message] = smtp.messages
    assert message.header("Message-ID").strip() == receipt.message_id


async def test_result_poll_deadline_must_leave_the_server_time_to_wait(
    dev_env: WorkflowEnvironment,
) -> None:
    handle = dev_env.client.get_workflow_handle("never-started")
    with pytest.raises(ValueError, match="poll_timeout"):
        await workflow_result(handle, poll_timeout=timedelta(seconds=1))
