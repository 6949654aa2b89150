"""SendEmailWorkflow: one email, sent once, through its lane; parked if it cannot go."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import Priority as TemporalPriority
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from postlane import search_attributes as sa
    from postlane.ids import lane_task_queue, lane_workflow_id, message_id
    from postlane.models import (
        MAX_ATTEMPT_HISTORY,
        AttemptRecord,
        DeliveryReceipt,
        EmailReport,
        EmailStatus,
        RetryRequest,
        SendEmailInput,
        SlotGrant,
        SlotRequest,
        SmtpSendRequest,
    )
    from workflows._options import (
        NON_RETRYABLE,
        SMTP_HEARTBEAT,
        SMTP_START_TO_CLOSE,
        smtp_retry,
    )

SEND_EMAIL_ACTIVITY = "send_email"
SLOT_REQUEST_RETRY = timedelta(seconds=30)
DISCARDED = "EmailDiscarded"
PARKED_AT_PATCH = "postlane-parked-at"
"""Workflows that parked before this patch did not upsert `PostlaneParkedAt`."""
DELIVERY_ACCEPTED_PATCH = "postlane-delivery-accepted"
"""Before this patch an attempt that failed after ``delivery_accepted`` was not sent."""


@workflow.defn(name="SendEmail")
class SendEmailWorkflow:
    """Sends one email through its lane's task queue.

    Statuses (search attribute `PostlaneStatus`): ``scheduled`` while waiting for
    ``send_at``, ``queued`` while the lane works on it, then ``sent``, ``failed`` (the server
    refused it for good), ``dead_letter`` (transient failures outlasted the retry policy;
    waits for a ``retry`` or ``discard`` signal) or ``cancelled``.
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
        self._correction = RetryRequest()
        self._scheduled_for: datetime | None = None
        self._parked_at: datetime | None = None
        self._attempt_history: list[AttemptRecord] = []

    @workflow.run
    async def run(self, req: SendEmailInput) -> DeliveryReceipt:
        """Wait for `send_at`, then send until sent, refused or discarded."""
        self._input = req
        self._status = EmailStatus(
            workflow.info().typed_search_attributes.get(sa.STATUS) or EmailStatus.QUEUED
        )
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
            raise

    async def _send_until_done(self, req: SendEmailInput) -> DeliveryReceipt:
        domain = req.email.sender.rsplit("@", 1)[1]
        request = SmtpSendRequest(
            email=req.email,
            lane=req.lane,
            key=req.key,
            message_id=message_id(workflow.info().workflow_id, domain),
        )
        while True:
            self._set_status(EmailStatus.QUEUED)
            dispatched_at = workflow.now()
            try:
                receipt: DeliveryReceipt = await workflow.execute_activity(
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
                )
            except ActivityError as err:
                accepted = self._accepted
                if accepted is not None and workflow.patched(DELIVERY_ACCEPTED_PATCH):
                    # The server accepted DATA and the attempt then died without a retry
                    # left (or was cancelled): the email went out, so it is sent.
                    self._receipt = accepted.model_copy(
                        update={
                            "attempts": self._attempts + accepted.attempts,
                            "dispatched_at": dispatched_at,
                        }
                    )
                    self._set_status(EmailStatus.SENT)
                    return self._receipt
                failure = application_failure(err)
                self._attempts += _attempts_of(failure)
                self._last_error = failure.message if failure else str(err.cause or err)
                if failure is not None and (failure.non_retryable or failure.type in NON_RETRYABLE):
                    self._set_status(EmailStatus.FAILED)
                    raise ApplicationError(
                        self._last_error,
                        *failure.details,
                        type=failure.type,
                        non_retryable=True,
                    ) from err
                correction = await self._park()
                if correction.lane and correction.lane != req.lane:
                    workflow.upsert_search_attributes([sa.LANE.value_set(correction.lane)])
                req = _corrected(req, correction)
                request = request.model_copy(update={"email": req.email, "lane": req.lane})
                self._input = req
                continue
            self._receipt = receipt.model_copy(
                update={
                    "attempts": self._attempts + receipt.attempts,
                    "dispatched_at": dispatched_at,
                }
            )
            self._set_status(EmailStatus.SENT)
            return self._receipt

    async def _wait_for_slot(self, req: SendEmailInput) -> None:
        """Ask the lane's quota workflow for a send slot; wait (``scheduled``) until granted."""
        lane = workflow.get_external_workflow_handle(lane_workflow_id(req.lane))
        request = SlotRequest(workflow_id=workflow.info().workflow_id, priority=req.priority)
        while True:
            try:
                await lane.signal("request_slot", request)
                break
            except Exception:  # the lane's workflow is not running yet: a worker starts it
                self._last_error = f"waiting for lane {req.lane!r} quota workflow"
                self._set_status(EmailStatus.SCHEDULED)
                await workflow.sleep(SLOT_REQUEST_RETRY)
        await workflow.wait_condition(lambda: self._slot_granted)
        self._scheduled_for = None

    @workflow.signal(name="slot_granted")
    def slot_granted(self, grant: SlotGrant) -> None:
        """The lane's answer: go now, or (``planned``) the time a slot is expected."""
        if grant.planned:
            self._scheduled_for = grant.at
            self._set_status(EmailStatus.SCHEDULED)
        else:
            self._slot_granted = True

    async def _park(self) -> RetryRequest:
        """Dead-letter: wait, durably and visibly, for an operator's retry or discard."""
        self._parked_at = workflow.now()
        if workflow.patched(PARKED_AT_PATCH):
            workflow.upsert_search_attributes([sa.PARKED_AT.value_set(self._parked_at)])
        self._set_status(EmailStatus.DEAD_LETTER)
        workflow.logger.warning("email dead-lettered: %s", self._last_error)
        await workflow.wait_condition(lambda: self._retry_requested or self._discard_requested)
        if self._discard_requested:
            self._set_status(EmailStatus.CANCELLED)
            raise ApplicationError(
                f"discarded by an operator after: {self._last_error}",
                type=DISCARDED,
                non_retryable=True,
            )
        self._retry_requested = False
        correction, self._correction = self._correction, RetryRequest()
        return correction

    def _set_status(self, status: EmailStatus) -> None:
        details = f"status: {status}; attempts: {self._attempts}"
        if self._last_error:
            details += f"; last SMTP reply: {self._last_error}"
        if status == EmailStatus.DEAD_LETTER and self._parked_at is not None:
            details += f"; parked since {self._parked_at.isoformat(timespec='seconds')}"
        workflow.set_current_details(details)
        if status != self._status:
            self._status = status
            workflow.upsert_search_attributes([sa.STATUS.value_set(status.value)])

    @workflow.signal(name="retry")
    def retry(self, request: RetryRequest) -> None:
        """Send a dead-lettered email again (ignored in any other state)."""
        if self._status == EmailStatus.DEAD_LETTER:
            self._retry_requested = True
            self._correction = request

    @workflow.signal(name="attempt_failed")
    def attempt_failed(self, record: AttemptRecord) -> None:
        """A send attempt failed (signalled by the activity; history keeps only the last).

        The activity numbers attempts within its invocation; invocations before this one
        (before a dead-letter retry) made `self._attempts` attempts.
        """
        numbered = record.model_copy(update={"attempt": self._attempts + record.attempt})
        self._attempt_history = [*self._attempt_history, numbered][-MAX_ATTEMPT_HISTORY:]

    @workflow.signal(name="delivery_accepted")
    def delivery_accepted(self, receipt: DeliveryReceipt) -> None:
        """The SMTP server accepted DATA (signalled by the activity before it completes).

        It makes the acceptance durable: a retry of the activity finds this signal in the
        history and returns the receipt instead of sending again.
        """
        if self._accepted is None:
            self._accepted = receipt

    @workflow.query(name="accepted_receipt")
    def accepted_receipt(self) -> DeliveryReceipt | None:
        """The receipt of the DATA the server accepted, once the activity signalled it."""
        return self._accepted

    @workflow.signal(name="discard")
    def discard(self, request: RetryRequest) -> None:
        """Give up on a dead-lettered email (ignored in any other state)."""
        if self._status == EmailStatus.DEAD_LETTER:
            self._discard_requested = True

    @workflow.query(name="status")
    def status(self) -> EmailReport:
        """Where this email is: status, attempts, last SMTP reply, receipt."""
        req = self._input
        return EmailReport(
            key=req.key if req else "",
            status=self._status,
            lane=req.lane if req else None,
            subject=req.email.subject if req else "",
            recipients=req.email.recipients if req else [],
            attempts=self._receipt.attempts if self._receipt else self._attempts,
            last_error=self._last_error,
            scheduled_for=self._scheduled_for if self._status == EmailStatus.SCHEDULED else None,
            parked_at=self._parked_at,
            attempt_history=list(self._attempt_history),
            receipt=self._receipt,
        )


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


def _attempts_of(failure: ApplicationError | None) -> int:
    if failure is not None and failure.details and isinstance(failure.details[0], dict):
        attempt = failure.details[0].get("attempt")
        if isinstance(attempt, int):
            return attempt
    return 1
