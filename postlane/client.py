"""`PostlaneClient`: send emails durably and inspect, retry or cancel them."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.api.workflowservice.v1 import (
    ResetWorkflowExecutionRequest,
)
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import Priority as TemporalPriority
from temporalio.common import (
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, CancelledError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from postlane import search_attributes as sa
from postlane.config import Settings, load_settings
from postlane.connection import connect_temporal
from postlane.contract import SEND_EMAIL_WORKFLOW
from postlane.email.dlq import DeadLetters
from postlane.email.models import (
    MAX_EMAIL_BYTES,
    DeliveryReceipt,
    Email,
    EmailReport,
    EmailStatus,
    Priority,
    RetryRequest,
    SendEmailInput,
    invalid_email_from,
)
from postlane.email.started import decode_started, started_input
from postlane.erasure import FORGET_WAIT, ForgetResult, RecipientHasher, require_hasher
from postlane.erasure import forget as forget_address
from postlane.errors import (
    ActionRefused,
    ConfigurationError,
    EmailCancelled,
    EmailNotFound,
    ErrorType,
    InvalidEmail,
    PermanentDeliveryError,
    PostlaneError,
    RecipientSuppressed,
    UnknownLane,
    UnknownSender,
)
from postlane.idempotency import (
    CONTENT_HASH,
    check_same_content,
    email_digest,
    started_new,
)
from postlane.ids import (
    WORKFLOW_TASK_QUEUE,
    email_workflow_id,
    validate_key,
)
from postlane.lanes.client import Lanes
from postlane.names import EmailMessages
from postlane.sequences.client import Sequences
from postlane.sequences.suppressions import Suppressions
from postlane.stuck import failure_message, workflow_task_failure
from postlane.waiting import workflow_result

NON_RETRYABLE_TYPES = (
    ErrorType.SMTP_PERMANENT,
    ErrorType.SMTP_TLS,
    ErrorType.LANE_UNKNOWN,
    ErrorType.CONFIGURATION,
    ErrorType.SMTPUTF8_UNSUPPORTED,
)
REFUSED_INPUT_TYPES = (ErrorType.INVALID_EMAIL, ErrorType.UNKNOWN_SENDER, ErrorType.UNKNOWN_LANE)
CANCEL_WAIT = timedelta(seconds=60)
"""How long `cancel` waits for the email to stop (a send at DATA finishes first)."""
CLOSED_QUERY_TIMEOUT = timedelta(seconds=10)
"""How long `describe` waits for a worker to answer about a finished email."""
_CLOSED_STATUS = {
    WorkflowExecutionStatus.COMPLETED: EmailStatus.SENT,
    WorkflowExecutionStatus.FAILED: EmailStatus.FAILED,
    WorkflowExecutionStatus.CANCELED: EmailStatus.CANCELLED,
    WorkflowExecutionStatus.TERMINATED: EmailStatus.CANCELLED,
    WorkflowExecutionStatus.TIMED_OUT: EmailStatus.FAILED,
}


class CancelOutcome(StrEnum):
    """How an email ended after `PostlaneClient.cancel`."""

    CANCELLED = "cancelled"
    """Nothing was delivered; the email is ``cancelled`` (now, or it already was)."""
    SENT = "sent"
    """The server had accepted it (already sent, or its transaction at DATA got through)."""
    FAILED = "failed"
    """It had failed for good before the cancel (or failed while the cancel waited)."""
    PENDING = "pending"
    """The cancel is recorded but the email had not stopped within the wait (no worker?)."""


class CancelResult(BaseModel):
    """What `PostlaneClient.cancel` did."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    key: str
    outcome: CancelOutcome
    already: bool = False
    """The email had finished before this cancel (nothing changed)."""
    receipt: DeliveryReceipt | None = None
    """With `CancelOutcome.SENT`: the delivery receipt."""
    reason: str | None = None
    """With `CancelOutcome.FAILED`: the last SMTP reply; with ``PENDING``: why unconfirmed."""

    @property
    def cancelled(self) -> bool:
        """True if the email ends ``cancelled``."""
        return self.outcome == CancelOutcome.CANCELLED


class EmailHandle:
    """A sent (or scheduled) email: await its receipt, ask its status, cancel it."""

    def __init__(self, client: PostlaneClient, key: str, handle: WorkflowHandle[Any, Any]) -> None:
        self.key = key
        self.workflow_id = handle.id
        self._client = client
        self._handle = handle

    async def result(self) -> DeliveryReceipt:
        """Wait until the email is sent and return the receipt.

        Raises:
            PermanentDeliveryError: the server refused it for good (5xx) or TLS failed.
            EmailCancelled: it was cancelled or discarded.
            InvalidEmail: the workers refused its input (e.g. a lane they do not have, or
                bad input from another client), naming the field.
        """
        try:
            # Bounded polls: a lost close notification costs ~1.5 s, not the server's 20 s.
            result = await workflow_result(self._handle)
        except WorkflowFailureError as err:
            raise _delivery_error(err) from err
        return DeliveryReceipt.model_validate(result)

    @property
    def created(self) -> bool:
        """True if the `PostlaneClient.send` that returned this handle started the email;
        False if the key was already in use (running or finished) or it cannot tell."""
        return started_new(self._handle)

    async def status(self) -> EmailStatus:
        """The current status (see `PostlaneClient.status`)."""
        return await self._client.status(self.key)

    async def cancel(self) -> CancelResult:
        """Cancel the email (see `PostlaneClient.cancel`)."""
        return await self._client.cancel(self.key)


class PostlaneClient:
    """Postlane's Python API, a thin layer over a Temporal client.

    The client itself sends one email and inspects, retries or cancels it. The other
    parts share its connection: ``pl.sequences`` (enroll, inspect, route replies),
    ``pl.dlq`` (dead letters), ``pl.lanes`` (lane reports and live rates) and
    ``pl.suppressions`` (who never gets a sequence again).

    Use ``async with await PostlaneClient.connect() as pl: ...``.
    """

    def __init__(self, client: Client, settings: Settings) -> None:
        self.temporal = client
        """The underlying Temporal client (Postlane's data converter is set on it)."""
        self.settings = settings
        self.suppressions = Suppressions(client)
        """Addresses a sender never enrolls again: `Suppressions`."""
        self.sequences = Sequences(client, settings, self.suppressions)
        """Enroll recipients in sequences, inspect and steer them: `Sequences`."""
        self.dlq = DeadLetters(self)
        """Emails parked in the dead-letter state: `DeadLetters`."""
        self.lanes = Lanes(client, settings)
        """Lane reports and live rate changes: `Lanes`."""
        self._hasher: RecipientHasher | None | bool = False  # False: not loaded yet

    def _recipient_hasher(self) -> RecipientHasher | None:
        """Keyed hashes of addresses under this process's token secret; None without one
        (the workers then index an email's recipients themselves).

        Raises:
            ConfigurationError: the token secret is malformed or its file unreadable.
        """
        if self._hasher is False:
            self._hasher = RecipientHasher.from_settings(self.settings)
        return self._hasher if isinstance(self._hasher, RecipientHasher) else None

    @classmethod
    async def connect(
        cls,
        address: str | None = None,
        *,
        namespace: str | None = None,
        settings: Settings | None = None,
    ) -> PostlaneClient:
        """Connect to Temporal (``TEMPORAL_*`` variables, default ``localhost:7233``).

        Args:
            address: overrides ``TEMPORAL_ADDRESS``.
            namespace: overrides ``TEMPORAL_NAMESPACE`` (default ``postlane``).
            settings: lanes; default `load_settings()` (``postlane.toml``).

        Raises:
            ConfigurationError: the configuration file is invalid.
        """
        settings = settings or load_settings()
        client = await connect_temporal(address, namespace)
        return cls(client, settings)

    async def __aenter__(self) -> PostlaneClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def send(
        self,
        email: Email,
        *,
        key: str,
        priority: Priority | str = Priority.NORMAL,
        send_at: datetime | None = None,
    ) -> EmailHandle:
        """Send `email` once, durably, through the lane that serves its sender.

        Args:
            email: the email (already validated by its constructor).
            key: idempotency key; the workflow ID is ``email:<key>``. The same key with the
                same content returns the existing email's handle and never sends twice.
            priority: ``high``, ``normal`` or ``bulk``; high overtakes a bulk backlog.
            send_at: timezone-aware time to send at (durable: survives restarts).

        Returns:
            A handle whose `result()` is the `DeliveryReceipt`.

        Raises:
            InvalidEmail: a bad key, priority or send_at; nothing was started.
            UnknownSender: no lane serves ``email.sender``; nothing was started.
            IdempotencyConflict: the key was used for different content.
        """
        request = self._prepare(email, key=key, priority=priority, send_at=send_at)
        hasher = self._recipient_hasher()
        workflow_id = email_workflow_id(key)
        digest = content_hash(request)
        status = (
            EmailStatus.SCHEDULED if send_at and send_at > datetime.now(UTC) else EmailStatus.QUEUED
        )
        try:
            handle = await self.temporal.start_workflow(
                SEND_EMAIL_WORKFLOW,
                request,
                id=workflow_id,
                task_queue=WORKFLOW_TASK_QUEUE,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                memo={CONTENT_HASH: digest},
                search_attributes=sa.email_attributes(
                    email,
                    request.lane,
                    status.value,
                    recipient_domain=self.settings.recipient_domain_attribute,
                    recipient_hashes=hasher.hashes(email.recipients) if hasher else None,
                ),
                static_summary=sa.email_summary(email),
                static_details=f"lane: {request.lane}; priority: {request.priority}; key: {key}",
                priority=TemporalPriority(priority_key=request.priority.key),
                result_type=DeliveryReceipt,
            )
        except WorkflowAlreadyStartedError:
            # A closed email with this key: REJECT_DUPLICATE keeps it from sending again.
            handle = self.temporal.get_workflow_handle(workflow_id, result_type=DeliveryReceipt)
            await self._check_same_email(handle, key, digest)
            return EmailHandle(self, key, handle)
        if not started_new(handle):
            await self._check_same_email(handle, key, digest)
        return EmailHandle(self, key, handle)

    async def _check_same_email(
        self, handle: WorkflowHandle[Any, DeliveryReceipt], key: str, digest: str
    ) -> None:
        """`check_same_content`, also for an email another client started without a memo."""

        async def digest_of_start() -> str | None:
            started = await started_input(self.temporal, handle)
            if started is None:
                return None
            return email_digest(started.email, started.send_at)

        await check_same_content(handle, key, digest, digest_of_start=digest_of_start)

    def _prepare(
        self, email: Email, *, key: str, priority: Priority | str, send_at: datetime | None
    ) -> SendEmailInput:
        if not isinstance(email, Email):
            raise InvalidEmail("email", f"expected an Email, got {type(email).__name__}")
        try:
            validate_key(key)
        except ValueError as exc:
            raise InvalidEmail("key", str(exc)) from None
        try:
            prio = Priority(priority)
        except ValueError:
            raise InvalidEmail(
                "priority", f"{priority!r} is not one of high, normal, bulk"
            ) from None
        if send_at is not None and (send_at.tzinfo is None or send_at.utcoffset() is None):
            raise InvalidEmail("send_at", "must be timezone-aware, e.g. datetime.now(UTC)")
        routed = self.settings.route_for(
            email.sender, email.recipient_domains, email.tags, prio.value
        )
        lane = routed[0] if routed else self.settings.lane_for(email.sender)
        if lane is None:
            raise UnknownSender(email.sender)
        request = SendEmailInput(
            email=email,
            key=key,
            lane=lane.name,
            priority=prio,
            send_at=send_at.astimezone(UTC) if send_at else None,
            retry=lane.retry,
            quota=lane.has_quota,
        )
        size = len(request.model_dump_json())
        if size > MAX_EMAIL_BYTES:
            raise InvalidEmail("attachments", f"the email is {size} bytes, over {MAX_EMAIL_BYTES}")
        return request

    def handle(self, key: str) -> EmailHandle:
        """The handle of an email sent earlier with `key` (not checked to exist)."""
        workflow_id = email_workflow_id(key)
        return EmailHandle(
            self, key, self.temporal.get_workflow_handle(workflow_id, result_type=DeliveryReceipt)
        )

    async def status(self, key: str) -> EmailStatus:
        """Where the email is now: queued, scheduled, sending, retrying, sent, dead_letter, ...

        Raises:
            EmailNotFound: no email has this key.
        """
        return (await self._describe(key, ask_workflow=False)).status

    async def describe(self, key: str, *, wait: timedelta | None = None) -> EmailReport:
        """Status, lane, attempts, last SMTP reply and the recent failed attempts of an email.

        No worker needs to run: without one, the report holds what the server knows (status,
        lane, parked time, the pending attempt's last failure); with one, the email's
        workflow adds recipients, its attempt history and, for a finished email, how it got
        there.

        Args:
            wait: how long to wait for a worker to answer for the email's workflow (default:
                the server's query timeout for a running email, `CLOSED_QUERY_TIMEOUT` for
                a finished one); a live view passes a short one.

        Raises:
            EmailNotFound: no email has this key.
        """
        return await self._describe(key, ask_workflow=True, wait=wait)

    async def _describe(
        self, key: str, *, ask_workflow: bool, wait: timedelta | None = None
    ) -> EmailReport:
        """`describe`; the status alone (`ask_workflow` False) needs only the server."""
        handle = self.handle(key)._handle
        try:
            desc = await handle.describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                raise EmailNotFound(key) from None
            raise
        stored = desc.typed_search_attributes.get(sa.STATUS)
        status = EmailStatus(stored) if stored else EmailStatus.QUEUED
        final = (
            EmailStatus.SENT,
            EmailStatus.FAILED,
            EmailStatus.CANCELLED,
            EmailStatus.SUPPRESSED,
        )
        if desc.status in _CLOSED_STATUS and status not in final:
            # Closed without saying why (terminated, timed out): go by how it closed.
            status = _CLOSED_STATUS[desc.status]
        report = EmailReport(
            key=key,
            status=status,
            lane=desc.typed_search_attributes.get(sa.LANE),
            subject=(await desc.static_summary() or "").split(" → ")[0],
            parked_at=desc.typed_search_attributes.get(sa.PARKED_AT),
        )
        attempts, last_error = 0, None
        for pending in desc.raw_description.pending_activities:
            attempts = max(attempts, pending.attempt - 1)
            if pending.last_failure.message:
                last_error = await failure_message(self.temporal, pending.last_failure)
            if status == EmailStatus.QUEUED:
                if pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
                    status = EmailStatus.SENDING
                elif pending.attempt > 1:
                    status = EmailStatus.RETRYING
        update: dict[str, Any] = {"status": status, "attempts": attempts, "last_error": last_error}
        if desc.status != WorkflowExecutionStatus.RUNNING and ask_workflow:
            # A finished email's workflow still answers (a worker replays it): how it got here.
            finished = await _query_report(handle, rpc_timeout=wait or CLOSED_QUERY_TIMEOUT)
            if finished is not None:
                update.update(
                    attempts=finished.attempts,
                    attempt_history=finished.attempt_history,
                    parked_at=report.parked_at or finished.parked_at,
                    route=finished.route,
                    failed_over_from=finished.failed_over_from,
                )
        if desc.status == WorkflowExecutionStatus.COMPLETED:
            receipt = DeliveryReceipt.model_validate(await handle.result())
            update.update(receipt=receipt, attempts=receipt.attempts, recipients=receipt.accepted)
        elif desc.status == WorkflowExecutionStatus.FAILED:
            try:
                await handle.result()
            except WorkflowFailureError as err:
                # The bare reply, as a dead letter shows it (not the exception's form).
                update["last_error"] = _last_reply(err) or str(_delivery_error(err))
                recorded = _failure_details(err).get("attempts")
                if isinstance(recorded, int):
                    update["attempts"] = recorded
        elif desc.status == WorkflowExecutionStatus.RUNNING and ask_workflow:
            # A workflow whose task keeps failing answers no query: say why, don't wait.
            update["stuck"] = await workflow_task_failure(self.temporal, desc)
            # None: no worker is polling; the search attributes still tell a lot.
            live = None if update["stuck"] else await _query_report(handle, rpc_timeout=wait)
            if live is not None:
                update.update(
                    subject=live.subject,
                    recipients=live.recipients,
                    scheduled_for=live.scheduled_for,
                    attempts=max(attempts, live.attempts),
                    last_error=last_error or live.last_error,
                    # The search attribute is missing for emails parked by older code.
                    parked_at=report.parked_at or live.parked_at,
                    attempt_history=live.attempt_history,
                    route=live.route,
                    failed_over_from=live.failed_over_from,
                )
        return report.model_copy(update=update)

    async def cancel(self, key: str, *, wait: timedelta = CANCEL_WAIT) -> CancelResult:
        """Stop an email that has not been sent, and say how it ended.

        A queued, scheduled, retrying, lane-waiting or dead-lettered email ends
        ``cancelled``. A send already at DATA is let finish: if the server accepts it the
        email ends ``sent`` and the result carries its receipt. Never ``dead_letter``.

        Args:
            wait: how long to wait for the email to stop (a send in flight notices the
                cancel at its next heartbeat; a transaction at DATA finishes first).

        Returns:
            ``cancelled``; ``sent`` with the receipt; ``failed`` with the reply; or
            ``pending`` if the email had not stopped within `wait` (the cancel stands).

        Raises:
            InvalidEmail: `key` is not a valid key.
            EmailNotFound: no email has this key.
        """
        try:
            validate_key(key)
        except ValueError as exc:
            raise InvalidEmail("key", str(exc)) from None
        handle = self.handle(key)._handle
        try:
            desc = await handle.describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                raise EmailNotFound(key) from None
            raise
        already = desc.status != WorkflowExecutionStatus.RUNNING
        if not already:
            try:
                await handle.cancel()
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
                already = True  # it closed meanwhile
        try:
            receipt = DeliveryReceipt.model_validate(
                await asyncio.wait_for(workflow_result(handle), wait.total_seconds())
            )
        except TimeoutError:
            return CancelResult(
                key=key,
                outcome=CancelOutcome.PENDING,
                reason=f"still running after {wait.total_seconds():g} s; is a worker running?",
            )
        except WorkflowFailureError as err:
            error = _delivery_error(err)
            if isinstance(error, EmailCancelled):
                return CancelResult(key=key, outcome=CancelOutcome.CANCELLED, already=already)
            return CancelResult(
                key=key,
                outcome=CancelOutcome.FAILED,
                already=already,
                reason=_last_reply(err) or str(error),
            )
        return CancelResult(key=key, outcome=CancelOutcome.SENT, already=already, receipt=receipt)

    async def forget(
        self,
        address: str,
        *,
        drop_suppression: bool = False,
        wait: timedelta = FORGET_WAIT,
    ) -> ForgetResult:
        """Erase a recipient: delete every email and sequence workflow for `address`.

        Finds them by ``PostlaneRecipientHash`` (and sequences by a default key
        ``<name>:<address>`` in their workflow ID), cancels the running ones, waits up to
        `wait` for them to stop, then deletes their histories (``DeleteWorkflowExecution``).
        An email sent to several people is deleted whole. Safe to run twice: a second run
        finds nothing. Needs visibility (a real server, not the time-skipping one).

        Args:
            address: the recipient address (matched case-insensitively).
            drop_suppression: also delete the address's suppressions, so senders may enroll
                it again; by default they are kept (a lifted one's history is deleted).
            wait: how long to wait for cancelled workflows to stop, and for the deletions
                to take effect.

        Returns:
            What was cancelled, deleted and kept, by workflow ID.

        Raises:
            InvalidInput: `address` is not a valid address (field ``address``).
            ConfigurationError: no token secret in this process's settings (the hash needs
                the workers' secret).
        """
        return await forget_address(
            self.temporal,
            require_hasher(self.settings),
            address,
            drop_suppression=drop_suppression,
            wait=wait,
        )

    async def retry(
        self,
        key: str,
        *,
        reason: str = "",
        to: list[str] | None = None,
        lane: str | None = None,
    ) -> bool:
        """Send a dead-lettered email again, optionally corrected, or a failed one again as is.

        Args:
            to: new To recipients (the old ones are replaced).
            lane: send through this lane instead.

        Returns:
            True: the email is going out again (False only if a failed email's history
            has no workflow task to reset to).

        Raises:
            EmailNotFound: no email has this key.
            InvalidEmail: a correction is invalid (bad address).
            UnknownLane: `lane` names no configured lane.
            ActionRefused: the email is neither dead-lettered nor failed (the reason says
                its status); nothing changed.
        """
        retry = None
        if lane is not None:
            try:
                retry = self.settings.lane(lane).retry
            except ConfigurationError:
                raise UnknownLane(lane, [known.name for known in self.settings.lanes]) from None
        try:
            request = RetryRequest(reason=reason, to=to, lane=lane, retry=retry)
        except ValidationError as exc:
            raise invalid_email_from(exc) from None
        if await self.status(key) == EmailStatus.FAILED:
            if to or lane:
                raise InvalidEmail("to", "a failed email is retried as it was; resend corrected")
            return await self._rerun_failed(key, reason)
        return await self._update_dead_letter(key, EmailMessages.RETRY, request)

    async def _rerun_failed(self, key: str, reason: str) -> bool:
        """Reset a failed email to its first workflow task: same ID, a new run, one more send.

        The workflow ID stays the idempotency key: a later `send` with this key attaches to
        the new run instead of sending once more.
        """
        handle = self.handle(key)._handle
        first_task = None
        started: SendEmailInput | None = None
        async for event in handle.fetch_history_events():
            if event.HasField("workflow_execution_started_event_attributes"):
                payloads = event.workflow_execution_started_event_attributes.input.payloads
                started = await decode_started(self.temporal, payloads, handle.id)
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                first_task = event.event_id
                break
        if first_task is None:
            return False
        if started is not None:
            # The operator fixed the cause: the bounce that failed it no longer suppresses.
            await self.suppressions.lift_bounces(started.email.sender, started.email.recipients)
        await self.temporal.workflow_service.reset_workflow_execution(
            ResetWorkflowExecutionRequest(
                namespace=self.temporal.namespace,
                workflow_execution=WorkflowExecution(workflow_id=handle.id),
                reason=reason or "postlane retry of a failed email",
                workflow_task_finish_event_id=first_task,
                request_id=str(uuid.uuid4()),
            )
        )
        return True

    async def _update_dead_letter(self, key: str, action: str, request: RetryRequest) -> bool:
        """Send the `action` update; its validator refuses it unless the email is parked."""
        status = await self.status(key)
        handle = self.handle(key)._handle
        if status in (
            EmailStatus.SENT,
            EmailStatus.FAILED,
            EmailStatus.CANCELLED,
            EmailStatus.SUPPRESSED,
        ):
            raise ActionRefused(key, action, f"cannot {action}: the email is {status}")
        try:
            await handle.execute_update(action, request)
        except WorkflowUpdateFailedError as err:
            raise ActionRefused(key, action, _refusal(err)) from None
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:  # it ended meanwhile
                raise ActionRefused(
                    key, action, f"cannot {action}: the email is {await self.status(key)}"
                ) from None
            raise
        return True


async def _query_report(
    handle: WorkflowHandle[Any, Any], *, rpc_timeout: timedelta | None = None
) -> EmailReport | None:
    """The email workflow's own report (query ``status``), or None if no worker answered."""
    try:
        report: EmailReport = await handle.query(
            EmailMessages.STATUS, result_type=EmailReport, rpc_timeout=rpc_timeout
        )
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError):
        return None
    return report


def content_hash(request: SendEmailInput) -> str:
    """What makes two sends with one key "the same email": content and schedule."""
    return email_digest(request.email, request.send_at)


def _failure_details(err: BaseException) -> dict[str, Any]:
    """The first details dict of the outermost ApplicationError under `err`, if any."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ApplicationError):
            first = cause.details[0] if cause.details else None
            return first if isinstance(first, dict) else {}
        cause = cause.__cause__ or getattr(cause, "cause", None)
    return {}


def _last_reply(err: BaseException) -> str | None:
    """The SMTP reply (or error) a failed email ended with, bare: ``550 5.1.1 ...``."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ApplicationError):
            return cause.message
        cause = cause.__cause__ or getattr(cause, "cause", None)
    return None


def _refusal(err: WorkflowUpdateFailedError) -> str:
    """The validator's reason for refusing an update."""
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    return str(cause or err)


def _delivery_error(err: WorkflowFailureError) -> PostlaneError:
    cause: BaseException | None = err.cause
    while cause is not None:
        if isinstance(cause, CancelledError):
            return EmailCancelled("the email was cancelled before it was sent")
        if isinstance(cause, ApplicationError):
            if cause.type == ErrorType.EMAIL_DISCARDED:
                return EmailCancelled(cause.message)
            details = (
                cause.details[0] if cause.details and isinstance(cause.details[0], dict) else {}
            )
            code = details.get("smtp_code")
            if cause.type == ErrorType.RECIPIENT_SUPPRESSED:
                sender, address = details.get("sender"), details.get("address")
                return RecipientSuppressed(str(sender), str(address), cause.message)
            if cause.type in REFUSED_INPUT_TYPES:  # the workers refused what it was started with
                field, reason = details.get("field"), details.get("reason")
                return InvalidEmail(str(field or "input"), str(reason or cause.message))
            if cause.type in NON_RETRYABLE_TYPES:
                return PermanentDeliveryError(
                    f"{cause.type}: {cause.message}",
                    smtp_code=code if isinstance(code, int) else None,
                    smtp_message=cause.message,
                )
        cause = cause.__cause__ or getattr(cause, "cause", None)
    return PermanentDeliveryError(str(err.cause or err))
