"""Suppressions: addresses a sender never enrolls again, kept in Temporal itself.

One running workflow per (sender, address), ID ``suppressed:<sender>/<address>`` (see
workflows/suppression.py). Starting one is idempotent; it ends only when lifted.
"""

from __future__ import annotations

import builtins
import csv
import io
from collections.abc import Iterable
from datetime import timedelta

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.service import RPCError, RPCStatusCode

from postlane import search_attributes as sa
from postlane.email.models import check_address
from postlane.errors import InvalidInput
from postlane.ids import SUPPRESSION_ID_PREFIX, WORKFLOW_TASK_QUEUE, suppression_workflow_id
from postlane.names import SuppressionMessages, WorkflowType
from postlane.sequences.models import Suppression
from postlane.waiting import workflow_result

SUPPRESSED = "suppressed"
"""`PostlaneStatus` of suppression workflows (and of emails that ended suppressed):
``WorkflowType="Suppression" AND PostlaneStatus="suppressed"`` lists the suppressions."""
CSV_COLUMNS = ("sender", "address", "reason", "source")
"""The columns of ``postlane suppressions export`` / ``import``, in this order."""


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
        static_summary=f"{suppression.address} suppressed for {suppression.sender}",
        static_details=f"reason: {suppression.reason or '-'}; source: {suppression.source}",
    )


async def is_suppressed(
    client: Client, sender: str, address: str, *, rpc_timeout: timedelta | None = None
) -> bool:
    """True while `address` is suppressed for `sender` (`rpc_timeout` bounds the describe)."""
    handle = client.get_workflow_handle(suppression_workflow_id(sender, address))
    try:
        desc = await handle.describe(rpc_timeout=rpc_timeout)
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
        await workflow_result(handle)  # ends as soon as its worker sees the signal
        return True

    async def lift_bounces(self, sender: str, addresses: Iterable[str]) -> int:
        """Lift the suppressions a hard bounce at send made (source ``bounce``) for these
        addresses; others (unsubscribes, complaints, operators') stay. Returns how many."""
        lifted = 0
        for address in addresses:
            workflow_id = suppression_workflow_id(sender, address)
            if not await is_suppressed(self.temporal, sender, address):
                continue
            held = await self._describe(workflow_id, sender.lower(), address.lower())
            if held.source != "bounce":
                continue
            handle = self.temporal.get_workflow_handle(workflow_id)
            await handle.signal(SuppressionMessages.LIFT, "operator retry")
            await workflow_result(handle)
            lifted += 1
        return lifted

    async def list(self, sender: str | None = None) -> builtins.list[Suppression]:
        """Every address suppressed now (for `sender` only, if given), sorted.

        Read from the server's visibility store (a dev server or a cluster; the
        time-skipping test server has none). The reason and source come from each
        suppression's workflow; one that cannot answer (no worker) lists them blank.
        """
        query = f'WorkflowType="{WorkflowType.SUPPRESSION}" AND ExecutionStatus="Running"'
        found: builtins.list[Suppression] = []
        async for execution in self.temporal.list_workflows(query):
            parsed = _parse_id(execution.id)
            if parsed is None or (sender is not None and parsed[0] != sender.lower()):
                continue
            found.append(await self._describe(execution.id, *parsed))
        return sorted(found, key=lambda x: (x.sender, x.address))

    async def _describe(self, workflow_id: str, sender: str, address: str) -> Suppression:
        handle = self.temporal.get_workflow_handle(workflow_id)
        held: Suppression | None
        try:
            held = await handle.query(SuppressionMessages.STATUS, result_type=Suppression)
        except RPCError:
            held = None
        if held is None:
            return Suppression(sender=sender, address=address)
        return held

    async def export_csv(self, sender: str | None = None) -> str:
        """The suppression list as CSV (`CSV_COLUMNS`, with a header row)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for item in await self.list(sender):
            writer.writerow([item.sender, item.address, item.reason, item.source])
        return out.getvalue()

    async def import_csv(self, text: str) -> int:
        """Suppress every row of a CSV made by `export_csv` (existing ones are kept).

        Every row is checked before anything starts: one bad row imports nothing.

        Returns:
            How many rows were imported.

        Raises:
            InvalidInput: a missing column or a bad address, naming the line.
        """
        rows = parse_csv(text)
        for row in rows:
            await start_suppression(self.temporal, row)
        return len(rows)


def parse_csv(text: str) -> builtins.list[Suppression]:
    """The suppressions a CSV holds (header ``sender,address[,reason,source]``).

    Raises:
        InvalidInput: a missing column or a bad address, naming the line.
    """
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("sender", "address") if c not in (reader.fieldnames or [])]
    if missing:
        raise InvalidInput("csv: line 1", f"missing column(s): {', '.join(missing)}")
    rows: builtins.list[Suppression] = []
    for row in reader:
        if not any((v or "").strip() for v in row.values()):
            continue  # a row of empty cells: nothing to import
        line = reader.line_num  # the file's line, blank lines included
        for column in ("sender", "address"):
            try:
                check_address((row.get(column) or "").strip())
            except ValueError as exc:
                raise InvalidInput(f"csv: line {line}: {column}", str(exc)) from None
        rows.append(
            Suppression(
                sender=row["sender"].strip().lower(),
                address=row["address"].strip().lower(),
                reason=(row.get("reason") or "").strip(),
                source=(row.get("source") or "import").strip(),
            )
        )
    return rows


def _parse_id(workflow_id: str) -> tuple[str, str] | None:
    """(sender, address) from ``suppressed:<sender>/<address>``."""
    rest = workflow_id.removeprefix(SUPPRESSION_ID_PREFIX)
    if rest == workflow_id or "/" not in rest:
        return None
    sender, address = rest.split("/", 1)
    return sender, address
