"""Suppressions: addresses a sender never enrolls again, kept in Temporal itself.

One running workflow per (sender, address), ID ``suppressed:<sender>/<address>`` (see
workflows/suppression.py). Starting one is idempotent; it ends only when lifted.
"""

from __future__ import annotations

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.service import RPCError, RPCStatusCode

from postlane import search_attributes as sa
from postlane.ids import WORKFLOW_TASK_QUEUE, suppression_workflow_id
from postlane.names import SuppressionMessages, WorkflowType
from postlane.sequences.models import Suppression

SUPPRESSED = "suppressed"
"""`PostlaneStatus` of suppression workflows: ``PostlaneStatus="suppressed"`` lists them."""


async def start_suppression(client: Client, suppression: Suppression) -> None:
    """Suppress the address for the sender; a no-op if it already is."""
    await client.start_workflow(
        WorkflowType.SUPPRESSION,
        suppression,
        id=suppression_workflow_id(suppression.sender, suppression.address),
        task_queue=WORKFLOW_TASK_QUEUE,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=TypedSearchAttributes([SearchAttributePair(sa.STATUS, SUPPRESSED)]),
        static_summary=f"{suppression.address} unsubscribed from {suppression.sender}",
        static_details=f"reason: {suppression.reason or '-'}; source: {suppression.source}",
    )


async def is_suppressed(client: Client, sender: str, address: str) -> bool:
    """True while `address` is suppressed for `sender`."""
    handle = client.get_workflow_handle(suppression_workflow_id(sender, address))
    try:
        desc = await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return desc.status == WorkflowExecutionStatus.RUNNING


class Suppressions:
    """``pl.suppressions``: addresses kept out of a sender's sequences, on the client's
    connection."""

    def __init__(self, temporal: Client) -> None:
        self.temporal = temporal

    async def add(
        self, sender: str, address: str, *, reason: str = "", source: str = "operator"
    ) -> None:
        """Keep `address` out of `sender`'s sequences from now on (idempotent)."""
        suppression = Suppression(sender=sender, address=address, reason=reason, source=source)
        await start_suppression(self.temporal, suppression)

    async def is_suppressed(self, sender: str, address: str) -> bool:
        """True while `address` is suppressed for `sender`."""
        return await is_suppressed(self.temporal, sender, address)

    async def lift(self, sender: str, address: str) -> bool:
        """Allow `sender` to enroll `address` again. False if it was not suppressed."""
        if not await self.is_suppressed(sender, address):
            return False
        handle = self.temporal.get_workflow_handle(suppression_workflow_id(sender, address))
        await handle.signal(SuppressionMessages.LIFT, "operator")
        await handle.result()  # ends as soon as its worker sees the signal
        return True
