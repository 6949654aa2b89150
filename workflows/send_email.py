"""SendEmailWorkflow: one email, sent once, through its lane; parked if it cannot go."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NoReturn

from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.common import Priority as TemporalPriority
from temporalio.common import RawValue, RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.workflow import ActivityCancellationType, ActivityHandle

with workflow.unsafe.imports_passed_through():
    from postlane import metrics
    from postlane import search_attributes as sa
    from postlane.contract import parse_send_email_input
    from postlane.email.models import (
        MAX_ATTEMPT_HISTORY,
        AttemptRecord,
        DeliveryReceipt,
        EmailReport,
        EmailStatus,
        LaneQuery,
        LaneResolution,
        RetryRequest,
        SendEmailInput,
        SmtpSendRequest,
    )
    from postlane.errors import ErrorType, InvalidEmail
    from postlane.idempotency import CONTENT_HASH, email_digest
    from postlane.ids import lane_task_queue, lane_workflow_id, message_id
    from postlane.lanes.models import (
        SlotGrant,
        SlotRequest,
    )
    from postlane.names import Activity, EmailMemo, EmailMessages, LaneMessages, WorkflowType
    from postlane.webhooks import WebhookEventType
    from workflows._options import (
        NON_RETRYABLE,
        SMTP_HEARTBEAT,
        SMTP_START_TO_CLOSE,
        smtp_retry,
    )
    from workflows.webhook import emit_event

SEND_EMAIL_ACTIVITY = Activity.SEND_EMAIL
SLOT_REQUEST_RETRY = timedelta(seconds=30)
DISCARDED = ErrorType.EMAIL_DISCARDED
PARKED_AT_PATCH = "postlane-parked-at"
"""Workflows that parked before this patch did not upsert `PostlaneParkedAt`."""
WORKER_AUTHORITY_PATCH = "postlane-worker-authority"
"""Since this patch the workflow checks its own input, takes the lane, its retry policy and
caps from the workers (``resolve_lane``), and sets its search attributes and memo itself.
Workflows started before it trusted the caller's `SendEmailInput`."""
RESOLVE_LANE_ACTIVITY = Activity.RESOLVE_LANE
RESOLVE_START_TO_CLOSE = timedelta(seconds=10)
RESOLVE_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=1))
"""Resolution reads the worker's settings in memory; a failure is a bug, retried visibly."""
NO_INPUT = RawValue(Payload())
"""What `run` sees when a client started it with no argument at all."""
_REJECTED_FIELD = {ErrorType.UNKNOWN_SENDER: "email.sender", ErrorType.UNKNOWN_LANE: "lane"}
CANCEL_WAITS_PATCH = "postlane-cancel-waits-for-send"
"""Since this patch a workflow cancel waits for the send in flight, whose receipt wins."""
CANCEL_ENDS_CANCELLED_PATCH = "postlane-cancel-ends-cancelled"
"""Before this patch a cancelled send was taken for a failure and parked the email."""
DELIVERY_ACCEPTED_PATCH = "postlane-delivery-accepted"
"""Before this patch an attempt that failed after ``delivery_accepted`` was not sent."""
SLOT_REASK_PATCH = "postlane-slot-reask"
"""Emails from this patch on ask their lane again until granted (before: once)."""
RETRY_LANE_QUOTA_PATCH = "postlane-retry-lane-quota"
"""From this patch on, a dead-letter retry moved to another lane asks that lane for a slot."""
SEALED_MESSAGE_ID_PATCH = "postlane-sealed-message-id"
"""Emails started from this patch on have the worker seal their Message-ID (authenticated
encryption of the workflow ID, `postlane.tokens`); earlier ones keep the base32 form they
were started with, on every attempt. Decided once, in the first activation."""
DEAD_LETTER_MEMO_PATCH = "postlane-dead-letter-memo"
"""Emails that parked before this patch did not upsert the `EmailMemo.DEAD_LETTER` memo
(what ``dlq list`` shows), so listing them needs one describe each."""
RECIPIENT_HASH_PATCH = "postlane-recipient-hash"
"""Emails started from this patch on without ``PostlaneRecipientHash`` (by a client without
the token secret, or in another language) have the workers hash their recipients
(``resolve_lane``) and upsert it, so ``postlane forget`` finds them. Decided once, in the
first activation, and only for such emails: the others record no marker."""
WEBHOOKS_PATCH = "postlane-webhooks"
"""From this patch on an email emits the ``email.*`` webhook events its workers'
subscriptions want (`LaneResolution.webhook_events`), at its terminal transitions. Asked
for only when there is one to emit: an email nobody subscribed to records nothing."""
FAILOVER_PATCH = "postlane-lane-failover"
"""From this patch on, a send refused because its lane's circuit is open
(`ErrorType.CIRCUIT_OPEN`) moves to the lane's failover lane with the same Message-ID and
key, instead of failing the email."""
FAILOVER_MEMO = "PostlaneFailover"
"""Memo field naming the lane an email failed over from and to (shown in the Web UI)."""
LANE_PAUSED_PATCH = "postlane-lane-paused"
"""From this patch on, a send refused because its lane is paused (``LanePaused``: nothing
was sent) waits ``scheduled`` for the lane to resume, then sends; before, it would fail."""
SUPPRESSED_PATCH = "postlane-suppressed"
"""From this patch on, a send refused because a recipient is suppressed ends ``suppressed``."""
SETTLED_NOTIFY_PATCH = "postlane-settled-notify"
"""From this patch on, a workflow cancel that lands while a ``sent`` or ``failed`` email
emits its webhook event leaves that status: the emit finishes and the email ends as it
settled (before, the cancel overwrote it with ``cancelled`` though the server had the mail).
Asked only when such a cancel lands, so other emails' histories carry no marker."""
CANCEL_BEFORE_REFUSAL_PATCH = "postlane-cancel-before-refusal"
"""From this patch on, a send the cancel waited for that failed or was refused with nothing
sent (paused lane, open circuit, suppressed recipient, a refusal for good) ends the email
``cancelled``; before, a paused lane swallowed the cancel and an open circuit ended it
``failed``."""
SETTLED_ATTEMPTS_PATCH = "postlane-settled-attempts"
"""From this patch on, the failed attempts of a send that ends in a paused lane's wait or
in ``suppressed`` count in the email's attempts (before, they were dropped)."""
SLOT_REASK = timedelta(minutes=3)
"""An email with no answer from its lane asks again after this (plus up to `SLOT_REASK_JITTER`)."""
SLOT_REASK_JITTER = 120
"""Seconds of spread, fixed per email, so a recovering lane is not asked by all at once."""


@workflow.defn(name=WorkflowType.SEND_EMAIL)
class SendEmailWorkflow:
    """Sends one email through its lane's task queue.

    Statuses (search attribute `PostlaneStatus`): ``scheduled`` while waiting for
    ``send_at`` (or for its paused lane to resume), ``queued`` while the lane works on it,
    then ``sent``, ``failed`` (the server refused it for good), ``suppressed`` (a
    recipient is on the sender's suppression list: nothing sent), ``dead_letter``
    (transient failures outlasted the retry policy; waits for a ``retry`` or ``discard``)
    or ``cancelled``.

    A workflow cancel ends the email ``cancelled`` wherever it waits (scheduled, for a lane
    slot, between attempts, parked), except that a transaction already at DATA is let
    finish: if the server accepted it the email ends ``sent`` with its receipt. A send the
    cancel waited for that was refused (paused lane, open circuit) or failed ends it
    ``cancelled`` too. A cancel after the email settled ``sent`` or ``failed`` (while it
    emits that webhook event) changes nothing.
    """

    _accepted: DeliveryReceipt | None = None
    """What the SMTP server accepted, as the activity signalled it (``delivery_accepted``)."""

    def __init__(self) -> None:
        self._input: SendEmailInput | None = None
        self._status = EmailStatus.QUEUED
        self._attempts = 0
        self._last_error: str | None = None
        self._receipt: DeliveryReceipt | None = None
        self._retry_requested = False
        self._discard_requested = False
        self._slot_granted = False
        self._slot_plan: SlotGrant | None = None
        self._slot_reasking = False
        self._correction = RetryRequest()
        self._scheduled_for: datetime | None = None
        self._parked_at: datetime | None = None
        self._attempt_history: list[AttemptRecord] = []
        self._headline = ""
        self._domain_attribute = True
        """The workers' `LaneResolution.recipient_domain_attribute` (recorded in history)."""
        self._current = False
        """Started by this release's code (`WORKER_AUTHORITY_PATCH`): see `_patched`."""
        self._failed_in_send = 0
        """Failed attempts reported (``attempt_failed``) by the send activity now running."""
        self._cancelling = False
        self._seal = False
        """Started since `SEALED_MESSAGE_ID_PATCH`: the worker seals the Message-ID."""
        self._hash_recipients = False
        """Started without `sa.RECIPIENT_HASH` since `RECIPIENT_HASH_PATCH`: set it here."""
        self._recipient_hashes: list[str] = []
        self._webhook_events: list[str] = []
        """The ``email.*`` events the workers' webhook subscriptions want (from history)."""
        self._route: str | None = None
        """The ``[[routes]]`` rule that chose the lane (from ``resolve_lane``)."""
        self._failed_over_from: str | None = None

    @workflow.run
    async def run(self, raw: RawValue = NO_INPUT) -> DeliveryReceipt:
        """Check the input, wait for `send_at`, then send until sent, refused or discarded.

        Args:
            raw: a `SendEmailInput` as JSON, from any Temporal client (see docs/contract.md).

        Raises:
            ApplicationError: ``InvalidEmail``, ``UnknownSender`` or ``UnknownLane`` (bad
                input, at once), or the send's own failure.
        """
        self._status = _started_status()
        self._current = workflow.patched(WORKER_AUTHORITY_PATCH)
        # Not `_patched`: an email started by the previous release keeps its Message-ID.
        self._seal = workflow.patched(SEALED_MESSAGE_ID_PATCH)
        self._hash_recipients = (
            self._current
            and not workflow.info().typed_search_attributes.get(sa.RECIPIENT_HASH)
            and workflow.patched(RECIPIENT_HASH_PATCH)
        )
        if self._current:
            req = await self._accept(raw)
        else:
            req = SendEmailInput.model_validate_json(raw.payload.data)
        self._input = req
        try:
            if req.send_at is not None and req.send_at > workflow.now():
                self._scheduled_for = req.send_at
                self._set_status(EmailStatus.SCHEDULED)
                await workflow.sleep(req.send_at - workflow.now())
            if req.quota:
                await self._wait_for_slot(req)
            return await self._send_until_done(req)
        except asyncio.CancelledError:
            self._set_status(EmailStatus.CANCELLED)
            await self._notify(WebhookEventType.EMAIL_CANCELLED)
            raise

    async def _accept(self, raw: RawValue) -> SendEmailInput:
        """The input as the workers' configuration completes it, or a failed workflow.

        Whoever started the email, the lane is resolved (or the named one checked) by the
        workers' ``resolve_lane``, and its retry policy and caps replace the caller's.
        """
        payload = raw.payload
        try:
            req = parse_send_email_input(
                payload.data if payload.metadata else None,
                payload.metadata.get("encoding"),
                workflow.info().workflow_id,
            )
        except InvalidEmail as exc:
            self._reject(ErrorType.INVALID_EMAIL, exc.field, exc.reason)
        self._input = req
        # Known before the lane is resolved: a query answered meanwhile shows it already.
        self._scheduled_for = req.send_at
        req = await self._resolve(req)
        self._input = req
        self._publish_start(req)
        return req

    async def _resolve(self, req: SendEmailInput) -> SendEmailInput:
        """`req` with the lane, retry policy and caps the workers' configuration gives it.

        The sender's lane, or the lane `req` names (at start, or after an operator's retry
        moved it), resolved by the workers' ``resolve_lane``.

        Raises:
            ApplicationError: ``UnknownSender`` or ``UnknownLane`` (the email fails).
        """
        resolution: LaneResolution = await workflow.execute_local_activity(
            RESOLVE_LANE_ACTIVITY,
            LaneQuery(
                sender=req.email.sender,
                lane=req.lane,
                recipients=req.email.recipients if self._hash_recipients else [],
                recipient_domains=req.email.recipient_domains,
                tags=req.email.tags,
                priority=req.priority.value,
            ),
            result_type=LaneResolution,
            start_to_close_timeout=RESOLVE_START_TO_CLOSE,
            retry_policy=RESOLVE_RETRY,
        )
        self._domain_attribute = resolution.recipient_domain_attribute
        self._recipient_hashes = resolution.recipient_hashes
        self._webhook_events = resolution.webhook_events
        if self._route is None:
            self._route = resolution.route
        if resolution.error_type is not None:
            kind = ErrorType(resolution.error_type)
            self._reject(kind, _REJECTED_FIELD.get(kind, "lane"), resolution.error)
        return req.model_copy(
            update={"lane": resolution.lane, "retry": resolution.retry, "quota": resolution.quota}
        )

    def _reject(self, kind: ErrorType, field: str, reason: str) -> NoReturn:
        """End the email at once as ``failed``: its input can never be sent."""
        self._last_error = f"{kind}: {field}: {reason}"
        self._set_status(EmailStatus.FAILED)
        raise ApplicationError(
            f"{field}: {reason}", {"field": field, "reason": reason}, type=kind, non_retryable=True
        )

    def _publish_start(self, req: SendEmailInput) -> None:
        """Search attributes, memo and headline an email started by any client carries.

        What the Python client (or a sequence) already set at start is left alone, so its
        emails get no extra commands; one started elsewhere gets them all here.
        """
        given = workflow.info().typed_search_attributes
        if given.get(sa.STATUS) is None:
            # No Postlane client started it: no static summary either, so say it here.
            self._headline = sa.email_summary(req.email) + "\n"
        # With the workers' recipient_domain_attribute off, a domain some client indexed
        # at start is removed (an empty list); otherwise the same attributes as before.
        wanted = sa.email_attributes(
            req.email, req.lane, self._status.value, recipient_domain=self._domain_attribute
        )
        # An empty keyword list is not stored: absent and [] are the same.
        updates = [
            pair.key.value_set(pair.value)
            for pair in wanted.search_attributes
            if (given.get(pair.key) or None) != (pair.value or None)
        ]
        if self._hash_recipients and self._recipient_hashes:
            updates.append(sa.RECIPIENT_HASH.value_set(self._recipient_hashes))
        if updates:
            workflow.upsert_search_attributes(updates)
        if workflow.memo_value(CONTENT_HASH, None) is None:
            workflow.upsert_memo({CONTENT_HASH: email_digest(req.email, req.send_at)})
        self._set_status(self._status)

    async def _send_until_done(self, req: SendEmailInput) -> DeliveryReceipt:
        domain = req.email.sender.rsplit("@", 1)[1]
        request = SmtpSendRequest(
            email=req.email,
            lane=req.lane,
            key=req.key,
            # Sealed: the worker holds the secret, so it makes the Message-ID from our ID.
            message_id="" if self._seal else message_id(workflow.info().workflow_id, domain),
            seal_message_id=self._seal,
        )
        while True:
            self._set_status(EmailStatus.QUEUED)
            dispatched_at = workflow.now()
            waits = self._patched(CANCEL_WAITS_PATCH)
            send: ActivityHandle[DeliveryReceipt] = workflow.start_activity(
                SEND_EMAIL_ACTIVITY,
                request,
                result_type=DeliveryReceipt,
                task_queue=lane_task_queue(req.lane),
                start_to_close_timeout=SMTP_START_TO_CLOSE,
                schedule_to_close_timeout=req.retry.retry_window,
                heartbeat_timeout=SMTP_HEARTBEAT,
                retry_policy=smtp_retry(req.retry),
                # Every send carries a fairness key: keyless tasks would all share one.
                priority=TemporalPriority(
                    priority_key=req.priority.key,
                    fairness_key=req.email.recipient_domains[0][:64],
                ),
                # Server-side retries within this invocation show as the pending
                # activity's attempt counter; N is the email's first attempt in it.
                summary=f"SMTP send via lane {req.lane}, attempt {self._attempts + 1}",
                cancellation_type=(
                    ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
                    if waits
                    else ActivityCancellationType.TRY_CANCEL
                ),
            )
            try:
                receipt = await (self._outcome(send) if waits else send)
            except ActivityError as err:
                accepted = self._accepted
                if accepted is not None and self._patched(DELIVERY_ACCEPTED_PATCH):
                    # The server accepted DATA and the attempt then died without a retry
                    # left (or was cancelled): the email went out, so it is sent.
                    self._receipt = accepted.model_copy(
                        update={
                            "attempts": self._attempts + accepted.attempts,
                            "dispatched_at": dispatched_at,
                        }
                    )
                    self._set_status(EmailStatus.SENT)
                    _observe_accepted(accepted, due=req.send_at)
                    await self._notify(WebhookEventType.EMAIL_SENT, settled=True)
                    return self._receipt
                failure = application_failure(err)
                if (
                    self._cancelling
                    and not is_cancelled_exception(err)
                    and workflow.patched(CANCEL_BEFORE_REFUSAL_PATCH)
                ):
                    # The cancel waited for this send, which delivered nothing: it wins over
                    # whatever the failure would do next (fail over, wait out a pause, fail).
                    refused = failure is not None and failure.type in _REFUSALS
                    self._settle_attempts(0 if refused else _attempts_of(failure))
                    self._last_error = failure.message if failure else str(err.cause or err)
                    raise asyncio.CancelledError("cancelled while its send was refused") from err
                target = _failover_target(failure) if not request.failover_from else None
                # A cancel that waited for this send ends the email instead (below).
                if target and not self._cancelling and workflow.patched(FAILOVER_PATCH):
                    req, request = self._fail_over(req, request, target)
                    continue
                kind = failure.type if failure is not None else None
                if failure is not None and kind == ErrorType.LANE_PAUSED:
                    if self._patched_since_authority(LANE_PAUSED_PATCH):
                        await self._wait_out_pause(req, failure.message)
                        continue
                if failure is not None and kind == ErrorType.RECIPIENT_SUPPRESSED:
                    if self._patched_since_authority(SUPPRESSED_PATCH):
                        self._end_suppressed(req, failure, err)
                if is_cancelled_exception(err) and self._patched(CANCEL_ENDS_CANCELLED_PATCH):
                    # Cancelled by this workflow's cancel, before anything was delivered.
                    self._settle_attempts()
                    self._set_status(EmailStatus.CANCELLED)
                    await self._notify(WebhookEventType.EMAIL_CANCELLED)
                    raise
                self._attempts += _attempts_of(failure)
                self._failed_in_send = 0
                self._last_error = failure.message if failure else str(err.cause or err)
                if failure is not None and (failure.non_retryable or failure.type in NON_RETRYABLE):
                    self._set_status(EmailStatus.FAILED)
                    await self._notify(WebhookEventType.EMAIL_FAILED, settled=True)
                    raise ApplicationError(
                        self._last_error,
                        *_with_attempts(failure.details, self._attempts),
                        type=failure.type,
                        non_retryable=True,
                    ) from err
                if self._cancelling:
                    # The send failed while the cancel waited for it: stop, do not park.
                    self._set_status(EmailStatus.CANCELLED)
                    raise asyncio.CancelledError("cancelled while its send failed") from err
                correction = await self._park()
                if correction.lane and correction.lane != req.lane:
                    workflow.upsert_search_attributes([sa.LANE.value_set(correction.lane)])
                moved = bool(correction.lane and correction.lane != req.lane)
                req = _corrected(req, correction)
                request = request.model_copy(update={"email": req.email, "lane": req.lane})
                self._input = req
                if moved and self._patched(RETRY_LANE_QUOTA_PATCH):
                    # The new lane's retry policy and caps come from the workers, as at start.
                    req = await self._resolve(req)
                    self._input = req
                    if req.quota:
                        self._slot_granted = False
                        await self._wait_for_slot(req)
                continue
            self._attempts += receipt.attempts
            self._failed_in_send = 0
            self._receipt = receipt.model_copy(
                update={"attempts": self._attempts, "dispatched_at": dispatched_at}
            )
            self._set_status(EmailStatus.SENT)
            _observe_accepted(receipt, due=req.send_at)
            await self._notify(WebhookEventType.EMAIL_SENT, settled=True)
            return self._receipt

    def _fail_over(
        self, req: SendEmailInput, request: SmtpSendRequest, target: str
    ) -> tuple[SendEmailInput, SmtpSendRequest]:
        """Move the email to its lane's failover lane: same Message-ID, key and retries."""
        origin = req.lane
        self._settle_attempts()
        self._failed_over_from = origin
        req = req.model_copy(update={"lane": target})
        self._input = req
        workflow.upsert_search_attributes([sa.LANE.value_set(target)])
        workflow.upsert_memo({FAILOVER_MEMO: f"{origin} -> {target}"})
        metrics.count_failed_over(workflow.metric_meter(), origin, target)
        workflow.logger.warning(
            "email failed over from lane %s to lane %s (circuit open)", origin, target
        )
        return req, request.model_copy(update={"lane": target, "failover_from": origin})

    async def _outcome(self, send: ActivityHandle[DeliveryReceipt]) -> DeliveryReceipt:
        """The send's result; a workflow cancel asks the send to stop and waits for it.

        The send activity lets a transaction already at DATA finish, so a cancel that comes
        too late returns the receipt (the email was delivered) instead of a cancellation.
        """
        try:
            # Shielded: the workflow's cancel must not cancel the send before we look.
            return await asyncio.shield(send)
        except asyncio.CancelledError:
            self._cancelling = True
            # A result that came with the cancel resolves once every ready task has run,
            # which is when conditions are checked: then it is not thrown away.
            await workflow.wait_condition(lambda: True)
            if not send.done():
                send.cancel()
            return await send

    async def _wait_out_pause(self, req: SendEmailInput, reason: str) -> None:
        """The lane was paused before this send began (nothing went out): wait
        ``scheduled``, the pause as its last error, until the lane grants a slot again."""
        if self._failed_in_send and workflow.patched(SETTLED_ATTEMPTS_PATCH):
            self._settle_attempts()
        self._failed_in_send = 0
        self._last_error = reason
        self._set_status(EmailStatus.SCHEDULED)
        workflow.logger.info("email waits for its paused lane: %s", reason)
        self._slot_granted = False
        await self._wait_for_slot(req, regrant=True)

    def _end_suppressed(
        self, req: SendEmailInput, failure: ApplicationError, err: BaseException
    ) -> NoReturn:
        """End ``suppressed``: a recipient is on the sender's suppression list (nothing sent)."""
        if self._failed_in_send and workflow.patched(SETTLED_ATTEMPTS_PATCH):
            self._settle_attempts()
        self._failed_in_send = 0
        self._last_error = failure.message
        self._set_status(EmailStatus.SUPPRESSED)
        metrics.count_suppressed(workflow.metric_meter(), req.lane)
        raise ApplicationError(
            failure.message,
            *failure.details,
            type=ErrorType.RECIPIENT_SUPPRESSED,
            non_retryable=True,
        ) from err

    async def _wait_for_slot(self, req: SendEmailInput, *, regrant: bool = False) -> None:
        """Ask the lane's quota workflow for a send slot; wait (``scheduled``) until granted.

        The email asks again whenever its lane's answer is overdue: `SLOT_REASK` after an
        ask that got no answer, or at the ``recheck_at`` a planned answer named. A lane that
        was reset or terminated (and restarted by a worker) so hears from every waiting
        email within minutes; the lane never grants one email twice.
        """
        lane = workflow.get_external_workflow_handle(lane_workflow_id(req.lane))
        if not self._patched(SLOT_REASK_PATCH):
            request = SlotRequest(workflow_id=workflow.info().workflow_id, priority=req.priority)
            while True:
                try:
                    await lane.signal(LaneMessages.REQUEST_SLOT, request)
                    break
                except Exception:  # the lane's workflow is not running yet: a worker starts it
                    self._last_error = f"waiting for lane {req.lane!r} quota workflow"
                    self._set_status(EmailStatus.SCHEDULED)
                    await workflow.sleep(SLOT_REQUEST_RETRY)
            await workflow.wait_condition(lambda: self._slot_granted)
            self._scheduled_for = None
            return
        workflow_id = workflow.info().workflow_id
        jitter = (
            int.from_bytes(workflow_id.encode()[-4:].rjust(4, b"\0"), "big") % SLOT_REASK_JITTER
        )
        reask = SLOT_REASK + timedelta(seconds=jitter)
        self._slot_granted, self._slot_plan, self._slot_reasking = False, None, True
        since = workflow.now()
        # The last plan told, kept across asks that got no answer: a lane that lost the ask
        # (it continued as new with too many requests to carry) still counts this email
        # under that plan's recheck time, and knows it by it when the email asks again.
        # Only the signal's input changes, which replay does not compare: no patch needed.
        told: SlotGrant | None = None
        while not self._slot_granted:
            told, self._slot_plan = self._slot_plan or told, None
            request = SlotRequest(
                workflow_id=workflow_id,
                priority=req.priority,
                since=since,
                asked_at=workflow.now(),
                recheck_at=told.recheck_at if told else None,
                regrant=regrant,
            )
            try:
                await lane.signal(LaneMessages.REQUEST_SLOT, request)
            except Exception:  # the lane's workflow is not running yet: a worker starts it
                self._last_error = f"waiting for lane {req.lane!r} quota workflow"
                self._set_status(EmailStatus.SCHEDULED)
                await workflow.sleep(SLOT_REQUEST_RETRY)
                continue
            due = workflow.now() + reask
            while not self._slot_granted:
                answered = self._slot_plan

                def news(answered: SlotGrant | None = answered) -> bool:
                    return self._slot_granted or self._slot_plan is not answered

                try:
                    await workflow.wait_condition(
                        news, timeout=max(due - workflow.now(), timedelta(seconds=1))
                    )
                except TimeoutError:
                    break  # overdue: ask again
                plan = self._slot_plan
                if plan is not None and plan is not answered:
                    # A lane from before `recheck_at` tells none: ask again a while after.
                    due = plan.recheck_at or plan.at + reask
        self._scheduled_for = None

    @workflow.signal(name=EmailMessages.SLOT_GRANTED)
    def slot_granted(self, grant: SlotGrant) -> None:
        """The lane's answer: go now, or (``planned``) the time a slot is expected."""
        if self._slot_granted and self._slot_reasking:
            return  # a late plan after the grant changes nothing
        if grant.planned:
            self._scheduled_for = grant.at
            self._slot_plan = grant
            self._set_status(EmailStatus.SCHEDULED)
        else:
            self._slot_granted = True

    async def _park(self) -> RetryRequest:
        """Dead-letter: wait, durably and visibly, for an operator's retry or discard."""
        self._parked_at = workflow.now()
        if self._patched(PARKED_AT_PATCH):
            workflow.upsert_search_attributes([sa.PARKED_AT.value_set(self._parked_at)])
        # Not `_patched`: emails started by the previous release park without this memo, and
        # their histories must replay; `workflow.patched` records a marker for new ones.
        if workflow.patched(DEAD_LETTER_MEMO_PATCH):
            workflow.upsert_memo({EmailMemo.DEAD_LETTER: self._dead_letter_memo()})
        self._set_status(EmailStatus.DEAD_LETTER)
        if self._input is not None:  # replay-safe: the meter is silent while replaying
            metrics.count_failure(
                workflow.metric_meter(), self._input.lane, metrics.FailureKind.DEAD_LETTERED
            )
        workflow.logger.warning("email dead-lettered: %s", self._last_error)
        await self._notify(WebhookEventType.EMAIL_DEAD_LETTERED)
        await workflow.wait_condition(lambda: self._retry_requested or self._discard_requested)
        if self._discard_requested:
            self._set_status(EmailStatus.CANCELLED)
            await self._notify(WebhookEventType.EMAIL_CANCELLED)
            raise ApplicationError(
                f"discarded by an operator after: {self._last_error}",
                type=DISCARDED,
                non_retryable=True,
            )
        self._retry_requested = False
        correction, self._correction = self._correction, RetryRequest()
        return correction

    async def _notify(self, kind: WebhookEventType, *, settled: bool = False) -> None:
        """Emit webhook event `kind` if a subscription wants it (`WEBHOOKS_PATCH`).

        `settled`: the email has reached a status a cancel cannot undo (``sent``,
        ``failed``); a workflow cancel that lands meanwhile lets the emit finish and is
        otherwise ignored (`SETTLED_NOTIFY_PATCH`).
        """
        req = self._input
        if req is None or kind not in self._webhook_events:
            return
        if not workflow.patched(WEBHOOKS_PATCH):
            return
        data: dict[str, Any] = {
            "key": req.key or workflow.info().workflow_id.removeprefix("email:"),
            "status": self._status.value,
            "lane": req.lane,
            "from": req.email.sender,
            "to": list(req.email.recipients),
            "subject": req.email.subject,
            "attempts": self._attempt_count(),
        }
        receipt = self._receipt
        if receipt is not None:
            data["message_id"] = receipt.message_id
            data["accepted"] = list(receipt.accepted)
            data["rejected"] = dict(receipt.rejected)
            data["smtp_reply"] = receipt.smtp_reply
            if receipt.sent_at is not None:
                data["sent_at"] = receipt.sent_at.isoformat()
        elif self._last_error:
            data["reason"] = self._last_error
        if kind == WebhookEventType.EMAIL_DEAD_LETTERED and self._parked_at is not None:
            data["parked_at"] = self._parked_at.isoformat()
        if not settled:
            await emit_event(kind, data)
            return
        emit = asyncio.ensure_future(emit_event(kind, data))
        try:
            # Shielded: the cancel must not abandon the event, nor reach `run`'s handler.
            await asyncio.shield(emit)
        except asyncio.CancelledError:
            # Asked only here, so an email no cancel reached records no marker for it.
            if not workflow.patched(SETTLED_NOTIFY_PATCH):
                # Before the patch the cancel stopped the emit and ended the email cancelled.
                emit.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await emit
                raise
            await emit

    def _dead_letter_memo(self) -> dict[str, Any]:
        """What a dead-letter listing shows, so it needs no query or describe per email."""
        req = self._input
        return {
            "subject": req.email.subject if req else "",
            "recipients": list(req.email.recipients) if req else [],
            "attempts": self._attempt_count(),
            "last_error": self._last_error,
        }

    def _settle_attempts(self, failed: int = 0) -> None:
        """Count the send that just ended in `self._attempts`: the failed attempts it
        signalled, or `failed` (its own count of them) if that is more."""
        self._attempts += max(self._failed_in_send, failed)
        self._failed_in_send = 0

    def _patched_since_authority(self, patch_id: str) -> bool:
        """Whether this email runs `patch_id`, a change newer than `WORKER_AUTHORITY_PATCH`.

        New runs record its marker. A history without one was recorded either by code that
        had the change and used `_patched` for it (such an email may still be waiting on
        the path, so it keeps it) or by code without the change: the two cannot be told
        apart, and breaking the first kind would stall live emails, so `self._current`
        decides for both as before. Once no history without the marker is kept, drop
        ``or self._current``.
        """
        return workflow.patched(patch_id) or self._current

    def _patched(self, patch_id: str) -> bool:
        """Whether this email runs the change `patch_id` names.

        Emails started since `WORKER_AUTHORITY_PATCH` were started by code that has every
        change below it, so they record no marker of their own; only emails started before
        it record one, where they first reach the change. (Besides saving events, this keeps
        `workflow.patched` from being first called in the activation that resolves the
        ``resolve_lane`` local activity: when the original run split the workflow task
        there, for example to answer a query, replay judged such a patch absent and failed
        with a nondeterminism error.)
        """
        return self._current or workflow.patched(patch_id)

    def _set_status(self, status: EmailStatus) -> None:
        self._publish_details(status)
        if status != self._status:
            self._status = status
            workflow.upsert_search_attributes([sa.STATUS.value_set(status.value)])

    def _publish_details(self, status: EmailStatus) -> None:
        """The Web UI's current details; the same attempt count and reply as `status`."""
        details = f"{self._headline}status: {status}; attempts: {self._attempt_count()}"
        if self._route:
            details += f"; route: {self._route}"
        if self._failed_over_from and self._input is not None:
            details += f"; failed over from lane {self._failed_over_from} to {self._input.lane}"
        reply = self._receipt.smtp_reply if self._receipt is not None else self._last_error
        if reply:
            details += f"; last SMTP reply: {reply}"
        if status == EmailStatus.DEAD_LETTER and self._parked_at is not None:
            details += f"; parked since {self._parked_at.isoformat(timespec='seconds')}"
        workflow.set_current_details(details)

    def _attempt_count(self) -> int:
        """Attempts made so far: earlier sends' plus the failed ones of the send running."""
        if self._receipt is not None:
            return self._receipt.attempts
        return self._attempts + self._failed_in_send

    @workflow.signal(name=EmailMessages.RETRY)
    def retry(self, request: RetryRequest) -> None:
        """Send a dead-lettered email again (ignored in any other state).

        Kept for older clients and the Web UI's signal dialog; clients use the update.
        """
        if self._status == EmailStatus.DEAD_LETTER:
            self._retry_requested = True
            self._correction = request

    @workflow.update(name=EmailMessages.RETRY)
    def retry_update(self, request: RetryRequest) -> None:
        """Send a dead-lettered email again, optionally corrected; refused in any other state."""
        self._retry_requested = True
        self._correction = request

    @retry_update.validator
    def _validate_retry(self, request: RetryRequest) -> None:
        self._refuse_unless_parked(EmailMessages.RETRY)

    @workflow.signal(name=EmailMessages.ATTEMPT_FAILED)
    def attempt_failed(self, record: AttemptRecord) -> None:
        """A send attempt failed (signalled by the activity; history keeps only the last).

        The activity numbers attempts within its invocation; invocations before this one
        (before a dead-letter retry) made `self._attempts` attempts.
        """
        numbered = record.model_copy(update={"attempt": self._attempts + record.attempt})
        self._attempt_history = [*self._attempt_history, numbered][-MAX_ATTEMPT_HISTORY:]
        self._failed_in_send = max(self._failed_in_send, record.attempt)
        self._last_error = record.reply
        self._publish_details(self._status)

    @workflow.signal(name=EmailMessages.DELIVERY_ACCEPTED)
    def delivery_accepted(self, receipt: DeliveryReceipt) -> None:
        """The SMTP server accepted DATA (signalled by the activity before it completes).

        It makes the acceptance durable: a retry of the activity finds this signal in the
        history and returns the receipt instead of sending again.
        """
        if self._accepted is None:
            self._accepted = receipt

    @workflow.query(name=EmailMessages.ACCEPTED_RECEIPT)
    def accepted_receipt(self) -> DeliveryReceipt | None:
        """The receipt of the DATA the server accepted, once the activity signalled it."""
        return self._accepted

    @workflow.signal(name=EmailMessages.DISCARD)
    def discard(self, request: RetryRequest) -> None:
        """Give up on a dead-lettered email (ignored in any other state).

        Kept for older clients and the Web UI's signal dialog; clients use the update.
        """
        if self._status == EmailStatus.DEAD_LETTER:
            self._discard_requested = True

    @workflow.update(name=EmailMessages.DISCARD)
    def discard_update(self, request: RetryRequest) -> None:
        """Give up on a dead-lettered email (it ends cancelled); refused in any other state."""
        self._discard_requested = True

    @discard_update.validator
    def _validate_discard(self, request: RetryRequest) -> None:
        self._refuse_unless_parked(EmailMessages.DISCARD)

    def _refuse_unless_parked(self, action: str) -> None:
        """Reject an operator's `action` (update validator) unless the email is parked."""
        if self._retry_requested or self._discard_requested:
            raise ApplicationError(
                "the email is already leaving dead_letter (a retry or discard was taken)",
                type=ErrorType.ACTION_REFUSED,
                non_retryable=True,
            )
        if self._status != EmailStatus.DEAD_LETTER:
            raise ApplicationError(
                f"cannot {action}: the email is {self._status}, not dead_letter",
                type=ErrorType.ACTION_REFUSED,
                non_retryable=True,
            )

    @workflow.query(name=EmailMessages.STATUS)
    def status(self) -> EmailReport:
        """Where this email is: status, attempts, last SMTP reply, receipt."""
        req = self._input
        return EmailReport(
            key=req.key if req else "",
            status=self._status,
            lane=req.lane if req else None,
            subject=req.email.subject if req else "",
            recipients=req.email.recipients if req else [],
            attempts=self._attempt_count(),
            last_error=self._last_error,
            scheduled_for=self._scheduled_for if self._status == EmailStatus.SCHEDULED else None,
            parked_at=self._parked_at,
            attempt_history=list(self._attempt_history),
            receipt=self._receipt,
            route=self._route or None,
            failed_over_from=self._failed_over_from,
        )


def _observe_accepted(receipt: DeliveryReceipt, *, due: datetime | None) -> None:
    """Record the time from when the email was due (its start, or a later ``send_at``) to
    the server's 250 for DATA, so a scheduled email is not counted late by its schedule.

    Through the workflow's meter, which records nothing while replaying; it is no command,
    so no patch is needed."""
    accepted_at = receipt.sent_at or workflow.now()
    started = workflow.info().start_time
    waited = (accepted_at - max(started, due or started)).total_seconds()
    metrics.observe_enqueue_to_accepted(workflow.metric_meter(), receipt.lane, waited)


def _started_status() -> EmailStatus:
    """The status the starter gave (``PostlaneStatus``); ``queued`` if none, or one that no
    Postlane client would set (another client's typo must not fail every workflow task)."""
    given = workflow.info().typed_search_attributes.get(sa.STATUS)
    try:
        return EmailStatus(given or EmailStatus.QUEUED)
    except ValueError:
        return EmailStatus.QUEUED


def _corrected(req: SendEmailInput, correction: RetryRequest) -> SendEmailInput:
    """The email as an operator corrected it on retry (new recipients, another lane)."""
    update: dict[str, object] = {}
    if correction.to:
        update["email"] = req.email.model_copy(update={"to": list(correction.to)})
    if correction.lane:
        update["lane"] = correction.lane
        if correction.retry is not None:
            update["retry"] = correction.retry
    return req.model_copy(update=update) if update else req


def application_failure(err: BaseException) -> ApplicationError | None:
    """The outermost ApplicationError under an activity failure (a timeout wraps the last one)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ApplicationError):
            return cause
        cause = cause.__cause__ or getattr(cause, "cause", None)
    return None


def _with_attempts(details: Sequence[Any], attempts: int) -> list[Any]:
    """`details` with the email's attempts so far (a client reads them without a worker)."""
    if details and isinstance(details[0], dict):
        return [{**details[0], "attempts": attempts}, *details[1:]]
    return [{"attempts": attempts}, *details]


_REFUSALS = (
    ErrorType.LANE_PAUSED,
    ErrorType.RECIPIENT_SUPPRESSED,
    ErrorType.SUPPRESSION_UNKNOWN,
    ErrorType.CIRCUIT_OPEN,
)
"""Failures by which the send was refused before any SMTP transaction: no attempt made."""


def _failover_target(failure: ApplicationError | None) -> str | None:
    """The failover lane a send refused for an open circuit names, or None."""
    if failure is None or failure.type != ErrorType.CIRCUIT_OPEN or not failure.details:
        return None
    details = failure.details[0]
    target = details.get("failover") if isinstance(details, dict) else None
    return target if isinstance(target, str) and target else None


def _attempts_of(failure: ApplicationError | None) -> int:
    if failure is not None and failure.details and isinstance(failure.details[0], dict):
        attempt = failure.details[0].get("attempt")
        if isinstance(attempt, int):
            return attempt
    return 1
