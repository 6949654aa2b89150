"""Starting and inspecting the inbox watchers (one workflow per configured inbox)."""

from __future__ import annotations

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from postlane.config import InboxConfig
from postlane.ids import WORKFLOW_TASK_QUEUE, inbox_workflow_id
from postlane.inbound.models import InboundItem, WatcherConfig, WatcherInput, WatcherReport
from postlane.names import InboxMessages, WorkflowType


def watcher_config(inbox: InboxConfig) -> WatcherConfig:
    """What the watcher needs to know of an inbox (no host, no login: the worker has those)."""
    return WatcherConfig(poll_interval=inbox.poll_interval, max_messages=inbox.max_messages)


async def start_inbox_watcher(
    client: Client, inbox: InboxConfig, *, history_limit: int | None = None
) -> None:
    """Start the inbox's watcher if it is not running, and hand it the inbox's settings.

    Idempotent: every worker that serves inbound mail calls it at start (signal-with-start
    of ``configure``), so one watcher polls each inbox however many hosts run, and a
    restarted worker applies an edited ``poll_interval``.
    """
    config = watcher_config(inbox)
    inp = WatcherInput(inbox=inbox.name, config=config)
    if history_limit is not None:
        inp = inp.model_copy(update={"history_limit": history_limit})
    await client.start_workflow(
        WorkflowType.INBOX_WATCHER,
        inp,
        id=inbox_workflow_id(inbox.name),
        task_queue=WORKFLOW_TASK_QUEUE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        start_signal=InboxMessages.CONFIGURE,
        start_signal_args=[config],
        static_summary=f"Inbox {inbox.name}: replies, bounces and unsubscribes",
        static_details=f"folder {inbox.folder} on {inbox.imap_host}:{inbox.port}",
    )


async def watcher_status(client: Client, inbox: str) -> WatcherReport:
    """The ``status`` query of an inbox's watcher: cursor, polls, deliveries, last error."""
    handle = client.get_workflow_handle(inbox_workflow_id(inbox))
    report = await handle.query(InboxMessages.STATUS, result_type=WatcherReport)
    return WatcherReport.model_validate(report)


async def mark_finished(client: Client, items: list[InboundItem]) -> list[InboundItem]:
    """The items, each marked whether its sequence is running (one describe per sequence)."""
    running: dict[str, bool] = {}
    for target in {item.target for item in items}:
        try:
            desc = await client.get_workflow_handle(target).describe()
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            running[target] = False
        else:
            running[target] = desc.status == WorkflowExecutionStatus.RUNNING
    return [item.model_copy(update={"running": running[item.target]}) for item in items]
