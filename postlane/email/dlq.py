"""``pl.dlq``: the emails parked in the dead-letter state: list them, discard one, or retry
or discard all of them at once with a server-side batch job.

``pl.retry`` sends a parked email again; it stays on `PostlaneClient` because it also
re-runs failed emails.
"""

from __future__ import annotations

import asyncio
import builtins
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from temporalio.api.batch.v1 import BatchOperationSignal
from temporalio.api.common.v1 import Payloads
from temporalio.api.enums.v1 import BatchOperationState
from temporalio.api.workflowservice.v1 import (
    DescribeBatchOperationRequest,
    StartBatchOperationRequest,
)
from temporalio.client import WorkflowExecution

from postlane import search_attributes as sa
from postlane.email.models import EmailReport, EmailStatus, RetryRequest
from postlane.errors import InvalidEmail
from postlane.ids import key_from_workflow_id
from postlane.names import EmailMemo, EmailMessages, WorkflowType

if TYPE_CHECKING:
    from postlane.client import PostlaneClient

BATCH_POLL_INTERVAL = 0.5
"""Seconds between two looks at a running batch job (its progress)."""


@dataclass(frozen=True)
class BatchProgress:
    """Where a server-side batch job over parked emails stands, as the server counts it.

    Attributes:
        job_id: the batch job's ID (``temporal batch describe --job-id ...`` shows it too).
        action: ``retry`` or ``discard``: the signal the job sends each parked email.
        total: emails the job's visibility query matched (0 until the server counted them).
        done: emails signalled so far (successfully).
        failed: emails the signal could not reach (closed meanwhile, for one).
        finished: the job has ended (completed or failed).
        state: the server's word for the job's state: running, completed, failed.
    """

    job_id: str
    action: str
    total: int
    done: int
    failed: int
    finished: bool
    state: str


class DeadLetters:
    """``pl.dlq``: the dead-letter part of `PostlaneClient`, on the client's connection."""

    def __init__(self, client: PostlaneClient) -> None:
        self._client = client

    async def discard(self, key: str, *, reason: str = "") -> bool:
        """Give up on a dead-lettered email; it ends cancelled.

        Returns:
            True: the email was dead-lettered and is now discarded.

        Raises:
            EmailNotFound: no email has this key.
            ActionRefused: the email is not dead-lettered (the reason says its status).
        """
        return await self._client._update_dead_letter(
            key, EmailMessages.DISCARD, RetryRequest(reason=reason)
        )

    async def list(
        self, *, lane: str | None = None, since: datetime | None = None
    ) -> builtins.list[EmailReport]:
        """Emails parked in the dead-letter state, the longest parked first.

        One listing call per page of emails: each parked email carries what the listing
        shows (subject, recipients, attempts, last error) in its memo, set when it parked.
        Emails parked by code older than that memo are described one by one.

        Needs a server with visibility (the dev server or a cluster, not the time-skipping
        test server).

        Args:
            lane: only this lane's.
            since: only those parked at or after this aware time.

        Raises:
            ConfigurationError: no lane has this name.
            InvalidEmail: `since` is not timezone-aware.
        """
        reports = [await self._report(execution) for execution in await self._parked(lane, since)]
        far_past = datetime.min.replace(tzinfo=UTC)
        return sorted(reports, key=lambda r: r.parked_at or far_past)

    async def newest(
        self, count: int, *, lane: str | None = None, wait: timedelta | None = None
    ) -> builtins.list[EmailReport]:
        """The `count` most recently parked emails, the newest first: one listing, ordered
        by `PostlaneParkedAt` here (the server's listing has its own order).

        Args:
            wait: how long to wait for a worker's answer about an email parked by code
                older than the dead-letter memo (default: the client's own bound).
        """
        far_past = datetime.min.replace(tzinfo=UTC)
        found = sorted(
            await self._parked(lane, None),
            key=lambda e: e.typed_search_attributes.get(sa.PARKED_AT) or far_past,
            reverse=True,
        )
        return [await self._report(execution, wait) for execution in found[:count]]

    async def keys(
        self, *, lane: str | None = None, since: datetime | None = None
    ) -> builtins.list[str]:
        """Keys of the emails parked in the dead-letter state (see `list`).

        The server filters on `PostlaneParkedAt`. Emails that parked under workflow code
        older than that search attribute lack it; their own workflow tells when they
        parked (they are left out if no worker answers).
        """
        return [key_from_workflow_id(e.id) for e in await self._parked(lane, since)]

    async def retry_all(
        self,
        *,
        lane: str | None = None,
        since: datetime | None = None,
        reason: str = "",
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> BatchProgress:
        """Send every parked email (of `lane`, parked since `since`) again, in one batch job.

        The server runs the job: it signals ``retry`` to each email its visibility query
        matches, so the client makes a handful of calls whatever the number. An email that
        left the dead-letter state meanwhile ignores the signal, so running it twice is safe.

        Args:
            on_progress: called with the job's counts while it runs, and once at the end.

        Returns:
            The finished job's counts.

        Raises:
            ConfigurationError: no lane has this name.
            InvalidEmail: `since` is not timezone-aware.
            RPCError: the server refused the job (for one, another batch job is running in
                the namespace and the server allows one at a time).
        """
        return await self._batch(EmailMessages.RETRY, lane, since, reason, on_progress)

    async def discard_all(
        self,
        *,
        lane: str | None = None,
        since: datetime | None = None,
        reason: str = "",
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> BatchProgress:
        """Give up on every parked email (of `lane`, parked since `since`), in one batch job.

        Like `retry_all`, with the ``discard`` signal: each email ends cancelled.
        """
        return await self._batch(EmailMessages.DISCARD, lane, since, reason, on_progress)

    async def _batch(
        self,
        action: str,
        lane: str | None,
        since: datetime | None,
        reason: str,
        on_progress: Callable[[BatchProgress], None] | None,
    ) -> BatchProgress:
        temporal = self._client.temporal
        query = f'WorkflowType="{WorkflowType.SEND_EMAIL}" AND {self._query(lane)}'
        legacy: builtins.list[str] = []
        if since is not None:
            since = _aware(since, "since")
            legacy = [
                key_from_workflow_id(e.id)
                for e in await self._legacy_since(self._query(lane), since)
            ]
            query += f' AND PostlaneParkedAt >= "{_stamp(since)}"'
        [payload] = await temporal.data_converter.encode([RetryRequest(reason=reason)])
        job_id = f"postlane-dlq-{action}-{uuid.uuid4().hex[:12]}"
        await temporal.workflow_service.start_batch_operation(
            StartBatchOperationRequest(
                namespace=temporal.namespace,
                visibility_query=query,
                job_id=job_id,
                reason=reason or f"postlane dlq {action} --all",
                signal_operation=BatchOperationSignal(
                    signal=action,
                    input=Payloads(payloads=[payload]),
                    identity=temporal.identity,
                ),
            )
        )
        # Emails parked by code older than `PostlaneParkedAt` cannot be selected by time on
        # the server: the few there are get the same signal one by one.
        for key in legacy:
            handle = self._client.handle(key)._handle
            await handle.signal(action, RetryRequest(reason=reason))
        while True:
            progress = await self._describe_batch(job_id, action)
            progress = BatchProgress(
                job_id=job_id,
                action=action,
                total=progress.total + len(legacy),
                done=progress.done + len(legacy),
                failed=progress.failed,
                finished=progress.finished,
                state=progress.state,
            )
            if on_progress is not None:
                on_progress(progress)
            if progress.finished:
                return progress
            await asyncio.sleep(BATCH_POLL_INTERVAL)  # the server has no "wait for the job"

    async def _describe_batch(self, job_id: str, action: str) -> BatchProgress:
        temporal = self._client.temporal
        desc = await temporal.workflow_service.describe_batch_operation(
            DescribeBatchOperationRequest(namespace=temporal.namespace, job_id=job_id)
        )
        state = desc.state
        return BatchProgress(
            job_id=job_id,
            action=action,
            total=desc.total_operation_count,
            done=desc.complete_operation_count,
            failed=desc.failure_operation_count,
            finished=state
            in (
                BatchOperationState.BATCH_OPERATION_STATE_COMPLETED,
                BatchOperationState.BATCH_OPERATION_STATE_FAILED,
            ),
            state=BatchOperationState.Name(state).removeprefix("BATCH_OPERATION_STATE_").lower(),
        )

    def _query(self, lane: str | None) -> str:
        query = 'PostlaneStatus="dead_letter" AND ExecutionStatus="Running"'
        if lane is not None:
            self._client.settings.lane(lane)  # also keeps the name safe inside the query
            query += f' AND PostlaneLane="{lane}"'
        return query

    async def _parked(
        self, lane: str | None, since: datetime | None
    ) -> builtins.list[WorkflowExecution]:
        query = self._query(lane)
        if since is None:
            return await self._listed(query)
        since = _aware(since, "since")
        found = await self._listed(f'{query} AND PostlaneParkedAt >= "{_stamp(since)}"')
        return found + await self._legacy_since(query, since)

    async def _legacy_since(self, query: str, since: datetime) -> builtins.list[WorkflowExecution]:
        """Parked emails without `PostlaneParkedAt` (older code) that parked since `since`."""
        found = []
        for execution in await self._listed(f"{query} AND PostlaneParkedAt IS NULL"):
            key = key_from_workflow_id(execution.id)
            parked_at = (await self._client.describe(key)).parked_at
            if parked_at is not None and parked_at >= since:
                found.append(execution)
        return found

    async def _listed(self, query: str) -> builtins.list[WorkflowExecution]:
        return [execution async for execution in self._client.temporal.list_workflows(query)]

    async def _report(
        self, execution: WorkflowExecution, wait: timedelta | None = None
    ) -> EmailReport:
        key = key_from_workflow_id(execution.id)
        shown: Any = (await execution.memo()).get(EmailMemo.DEAD_LETTER)
        if not isinstance(shown, dict):  # parked by code older than the memo
            return await self._client.describe(key, wait=wait)
        attributes = execution.typed_search_attributes
        return EmailReport(
            key=key,
            status=EmailStatus.DEAD_LETTER,
            lane=attributes.get(sa.LANE),
            subject=shown.get("subject") or "",
            recipients=shown.get("recipients") or [],
            attempts=shown.get("attempts") or 0,
            last_error=shown.get("last_error"),
            parked_at=attributes.get(sa.PARKED_AT),
        )


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _aware(when: datetime, field: str) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidEmail(field, "must be timezone-aware, e.g. datetime.now(UTC)")
    return when
