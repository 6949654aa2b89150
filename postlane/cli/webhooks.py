"""``postlane webhooks list [--failing]``: webhook deliveries in progress, from the server.

Each row is one delivery workflow (one subscription, one email or sequence) that is still
running: its target, how many events wait, and, for the event being delivered, the attempt
count, the last error and the next retry, as the server's pending activity has them.
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict
from temporalio.client import Client
from temporalio.service import RPCError

from postlane.names import WebhookMessages, WorkflowType
from postlane.stuck import failure_message
from postlane.webhooks import WebhookDeliveryReport, split_webhook_workflow_id

if TYPE_CHECKING:
    from postlane.client import PostlaneClient

EXIT_OK = 0
RUNNING_DELIVERIES = f'WorkflowType="{WorkflowType.WEBHOOK_DELIVERY}" AND ExecutionStatus="Running"'
QUERY_TIMEOUT = timedelta(seconds=5)
"""How long a delivery workflow gets to answer its queue length."""


class WebhookDeliveryRow(BaseModel):
    """One running delivery: a subscription's events about one email or sequence."""

    model_config = ConfigDict(frozen=True)

    subscription: str
    subject: str
    """The email's or sequence's workflow ID."""
    workflow_id: str
    target: str
    pending: int | None
    """Events waiting (the one being delivered included); None if no worker answered."""
    delivered: int | None
    attempts: int
    """Attempts at the event being delivered (0: none yet)."""
    last_error: str | None
    next_retry: datetime | None

    @property
    def failing(self) -> bool:
        """The event being delivered has failed at least once."""
        return self.last_error is not None


def add_parser(sub: Any) -> None:
    """Register ``postlane webhooks`` and its subcommands."""
    hooks = sub.add_parser("webhooks", help="webhook deliveries: list, --failing")
    hooks_sub = hooks.add_subparsers(dest="webhooks_command", required=True, metavar="SUBCOMMAND")
    listing = hooks_sub.add_parser(
        "list", help="running deliveries: subscription, target, pending, attempts, last error"
    )
    listing.add_argument(
        "--failing", action="store_true", help="only those whose current event is failing"
    )
    listing.add_argument("--subscription", help="only this subscription's deliveries")
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")


async def run(pl: PostlaneClient, args: argparse.Namespace) -> int:
    """Run one ``postlane webhooks`` subcommand."""
    rows = await list_deliveries(pl.temporal, failing=args.failing, subscription=args.subscription)
    if args.json:
        for row in rows:
            print(row.model_dump_json())
    else:
        print(format_deliveries(rows, datetime.now(UTC)))
    return EXIT_OK


async def list_deliveries(
    client: Client, *, failing: bool = False, subscription: str | None = None
) -> list[WebhookDeliveryRow]:
    """The running delivery workflows, failing ones first.

    Args:
        failing: only deliveries whose current event has failed at least once.
        subscription: only this subscription's.
    """
    ids = [
        execution.id
        async for execution in client.list_workflows(RUNNING_DELIVERIES)
        if subscription is None or split_webhook_workflow_id(execution.id)[0] == subscription
    ]
    limit = asyncio.Semaphore(16)

    async def one(workflow_id: str) -> WebhookDeliveryRow | None:
        async with limit:
            return await _row(client, workflow_id)

    rows = [row for row in await asyncio.gather(*map(one, ids)) if row is not None]
    if failing:
        rows = [row for row in rows if row.failing]
    return sorted(rows, key=lambda r: (not r.failing, r.subscription, r.subject))


async def _row(client: Client, workflow_id: str) -> WebhookDeliveryRow | None:
    handle = client.get_workflow_handle(workflow_id)
    try:
        desc = await handle.describe()
    except RPCError:
        return None  # finished (and gone) meanwhile
    subscription, subject = split_webhook_workflow_id(workflow_id)
    attempts, last_error, next_retry = 0, None, None
    for pending in desc.raw_description.pending_activities:
        attempts = max(attempts, pending.attempt)
        if pending.last_failure.message:
            last_error = await failure_message(client, pending.last_failure)
        if pending.HasField("next_attempt_schedule_time"):
            next_retry = pending.next_attempt_schedule_time.ToDatetime(tzinfo=UTC)
    report: WebhookDeliveryReport | None = None
    try:
        report = await handle.query(
            WebhookMessages.STATUS,
            result_type=WebhookDeliveryReport,
            rpc_timeout=QUERY_TIMEOUT,
        )
    except Exception:  # no worker to answer: the server's view alone
        report = None
    summary = await desc.static_summary() or ""
    target = report.url if report else summary.partition(" → ")[2].partition(" for ")[0]
    return WebhookDeliveryRow(
        subscription=subscription,
        subject=subject,
        workflow_id=workflow_id,
        target=target,
        pending=report.pending if report else None,
        delivered=report.delivered if report else None,
        attempts=attempts,
        last_error=last_error,
        next_retry=next_retry,
    )


def format_deliveries(rows: list[WebhookDeliveryRow], now: datetime) -> str:
    """The ``postlane webhooks list`` table; `now` words when the next retry is."""
    if not rows:
        return "no webhook deliveries in progress"
    table = [("SUBSCRIPTION", "FOR", "TARGET", "PENDING", "ATTEMPTS", "NEXT RETRY", "LAST ERROR")]
    for r in rows:
        next_retry = "-"
        if r.next_retry is not None:
            wait = max(0, int((r.next_retry - now).total_seconds()))
            next_retry = f"{r.next_retry.strftime('%H:%M:%S')}Z (in {wait}s)"
        table.append(
            (
                r.subscription,
                r.subject,
                r.target,
                "?" if r.pending is None else str(r.pending),
                str(r.attempts),
                next_retry,
                (r.last_error or "-")[:80],
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in table
    )
