"""SequenceWorkflow: send, wait, follow up, and stop the moment the person answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import NoReturn

from temporalio import workflow
from temporalio.common import Priority as TemporalPriority
from temporalio.common import (
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    WorkflowAlreadyStartedError,
)
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from postlane import metrics
    from postlane import search_attributes as sa
    from postlane.email.models import DeliveryReceipt, Email, EmailStatus, SendEmailInput
    from postlane.errors import ErrorType, InvalidEmail
    from postlane.ids import (
        WORKFLOW_TASK_QUEUE,
        email_workflow_id,
        message_id,
        sequence_email_key,
    )
    from postlane.names import Activity, SequenceMessages, WorkflowType
    from postlane.sequences.models import (
        MAX_THREAD_TEXT,
        Approval,
        ComposeRequest,
        Draft,
        InboundEvent,
        InboundKind,
        RenderedMessage,
        SentMessage,
        SequenceInput,
        SequenceReport,
        SequenceState,
        SequenceStatus,
        Suppression,
        ThreadMessage,
        sequence_email,
    )
    from postlane.sequences.spec import (
        STOP,
        AnyStep,
        ComposeStep,
        SendStep,
        StopStep,
        WaitForReplyStep,
        WaitStep,
        parse_clock,
    )
    from postlane.webhooks import WebhookEventType
    from workflows._calendar import next_local_time, next_opening
    from workflows._options import ADMIN_RETRY, ADMIN_START_TO_CLOSE, COMPOSE_RETRY
    from workflows.send_email import application_failure
    from workflows.webhook import emit_event

SUPPRESS_ACTIVITY = Activity.SUPPRESS_RECIPIENT
MAX_SEEN = 200
UNKNOWN_MESSAGE_ID_PATCH = "postlane-sequence-unknown-message-id"
"""Since this patch an email an earlier run of the sequence sent is recorded without a
Message-ID (emails' Message-IDs are sealed by the worker now; before, it was remade here)."""
CANCEL_STOPS_CHILD_PATCH = "postlane-cancel-stops-child"
"""Since this patch a cancelled sequence cancels its email in flight and waits for how it
ended (before, the email was left to the parent-close policy and its outcome unrecorded)."""

WEBHOOKS_PATCH = "postlane-sequence-webhooks"
"""Since this patch a sequence that ends replied, bounced, unsubscribed or completed emits
the ``sequence.*`` webhook event (`emit_event`), last thing before it returns."""
_WEBHOOK_EVENTS = {
    SequenceStatus.REPLIED: WebhookEventType.SEQUENCE_REPLIED,
    SequenceStatus.BOUNCED: WebhookEventType.SEQUENCE_BOUNCED,
    SequenceStatus.UNSUBSCRIBED: WebhookEventType.SEQUENCE_UNSUBSCRIBED,
    SequenceStatus.COMPLETED: WebhookEventType.SEQUENCE_COMPLETED,
}

RECIPIENT_HASH_PATCH = "postlane-sequence-recipient-hash"
"""Since this patch a sequence's emails start with its ``PostlaneRecipientHash`` (which the
enrolling client set), so ``postlane forget`` finds them; before, they had none."""


@workflow.defn(name=WorkflowType.SEQUENCE)
class SequenceWorkflow:
    """Runs one recipient through a `SequenceSpec`, one step at a time.

    Every send is a child `SendEmail` workflow keyed ``<sequence key>:<step>``, so it has
    the lane's rate limits, retries and dead-letter queue. A reply, an unsubscribe, a hard
    bounce or a cancel stops the sequence before its next send, whatever it waits for:
    every wait is a condition with a deadline, never a bare sleep.
    """

    @workflow.init
    def __init__(self, inp: SequenceInput) -> None:
        # The input is known before any handler runs, so no handler sees a half-built
        # workflow (and none needs to check).
        self._in = inp
        self._s = inp.state if inp.state is not None else SequenceState()
        self._published: str | None = None

    @workflow.run
    async def run(self, inp: SequenceInput) -> SequenceReport:
        """Walk the steps until the end, a ``stop`` step, or a stop condition."""
        self._publish()
        steps = inp.spec.steps
        try:
            while self._s.position < len(steps) and self._s.stop_reason is None:
                step = steps[self._s.position]
                if self._s.entered_at is None:
                    self._s.entered_at = workflow.now()
                target = await self._run_step(step, self._s.entered_at)
                if self._s.stop_reason is not None:
                    break
                self._advance(target)
                if self._should_continue_as_new():
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    self._s.runs += 1
                    workflow.continue_as_new(inp.model_copy(update={"state": self._s}))
        except asyncio.CancelledError:
            self._finish(SequenceStatus.CANCELLED, "cancelled")
            raise
        if self._s.stop_reason is None:
            self._finish(SequenceStatus.COMPLETED, "all steps done")
        if self._s.status == SequenceStatus.UNSUBSCRIBED:
            await self._suppress()
        await self._notify()
        return self.status()

    async def _notify(self) -> None:
        """Emit the ``sequence.*`` webhook event of how it ended (`WEBHOOKS_PATCH`)."""
        kind = _WEBHOOK_EVENTS.get(self._s.status)
        if kind is None or not workflow.patched(WEBHOOKS_PATCH):
            return
        report = self.status()
        data: dict[str, object] = {
            "key": report.key,
            "status": report.status.value,
            "from": self._in.spec.sender,
            "recipient": report.recipient,
            "spec": self._in.spec.name,
            "reason": report.stop_reason,
            "sent": [
                {"step": m.step, "key": m.key, "message_id": m.message_id} for m in report.sent
            ],
        }
        if report.replies:
            data["reply_message_id"] = report.replies[-1].message_id
        await emit_event(kind, data)

    # -- steps -------------------------------------------------------------------------

    async def _run_step(self, step: AnyStep, entered_at: datetime) -> str | None:
        """Run one step; return the step to go to (None: the following one, or ``stop``)."""
        if isinstance(step, SendStep):
            await self._send(step.id, self._in.rendered[step.id], thread=step.thread)
            return step.next
        if isinstance(step, WaitStep):
            await self._wait(self._deadline(step, entered_at))
            return step.next
        if isinstance(step, WaitForReplyStep):
            deadline = self._s.deadline or entered_at + step.timeout
            self._s.deadline = deadline
            replied = await self._wait(deadline, until=lambda: self._s.reply_branch)
            if replied:
                self._s.reply_branch = False
                return step.on_reply
            return step.on_timeout or step.next
        if isinstance(step, ComposeStep):
            draft = await self._compose(step, entered_at)
            if draft is not None:
                await self._send(step.id, RenderedMessage(**draft.model_dump()), thread=step.thread)
            return step.next
        if isinstance(step, StopStep):
            return STOP
        raise ApplicationError(f"unknown step {step!r}", non_retryable=True)

    def _advance(self, target: str | None) -> None:
        if target == STOP:
            self._s.position = len(self._in.spec.steps)
        elif target is None:
            self._s.position += 1
        else:
            self._s.position = self._in.spec.index(target)
        self._s.entered_at = None
        self._s.deadline = None
        self._s.draft = None
        self._s.approval = None
        self._publish()

    def _deadline(self, step: WaitStep, entered_at: datetime) -> datetime:
        if self._s.deadline is None:
            if step.duration is not None:
                deadline = entered_at + step.duration
            elif step.until is not None:
                deadline = next_local_time(
                    entered_at, parse_clock(step.until), self._zone(), step.days
                )
            else:  # the spec's validation forbids it; a hand-made input might not
                raise ApplicationError(
                    f"wait step {step.id!r} has neither duration nor until", non_retryable=True
                )
            if step.within_sending_hours:
                deadline = self._opening(deadline)
            self._s.deadline = deadline
        return self._s.deadline

    def _zone(self) -> str:
        return self._in.recipient.timezone or self._in.spec.timezone

    def _opening(self, at: datetime) -> datetime:
        spec = self._in.spec
        return next_opening(at, spec.window, self._zone(), spec.sending_days)

    async def _wait(
        self, deadline: datetime | None, until: Callable[[], bool] = lambda: False
    ) -> bool:
        """Wait for `until`, the deadline, or a stop; a pause holds everything, deadline too.

        Returns:
            True if `until` became true (and no stop came first).
        """
        while True:
            if self._s.stop_reason is not None:
                return False
            if until():
                return True
            if not self._s.paused and deadline is not None and workflow.now() >= deadline:
                return False
            timeout = None if self._s.paused or deadline is None else deadline - workflow.now()
            try:
                await workflow.wait_condition(_changed(self._s, until), timeout=timeout)
            except TimeoutError:
                pass

    async def _send(self, step: str, content: RenderedMessage, *, thread: bool) -> None:
        """Send one email as a child workflow; cancel it if a stop arrives first."""
        inp = self._in
        while self._s.stop_reason is None:
            opening = self._opening(workflow.now())
            if opening <= workflow.now() and not self._s.paused:
                break
            self._s.deadline = opening
            self._publish()
            await self._wait(opening)
        if self._s.stop_reason is not None:
            return
        key = sequence_email_key(inp.key, step)
        try:
            email = self._email(content, thread=thread)
        except InvalidEmail as exc:
            self._finish(SequenceStatus.FAILED, f"step {step}: {exc}")
            return
        request = SendEmailInput(
            email=email,
            key=key,
            lane=inp.lane,
            priority=inp.priority,
            retry=inp.retry,
            quota=inp.quota,
        )
        # Without one from the enrolling client, the email's own workers index it.
        given = workflow.info().typed_search_attributes.get(sa.RECIPIENT_HASH)
        hashes = list(given) if given and workflow.patched(RECIPIENT_HASH_PATCH) else None
        try:
            child = await workflow.start_child_workflow(
                WorkflowType.SEND_EMAIL,
                request,
                id=email_workflow_id(key),
                task_queue=WORKFLOW_TASK_QUEUE,
                result_type=DeliveryReceipt,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                parent_close_policy=ParentClosePolicy.REQUEST_CANCEL,
                search_attributes=sa.email_attributes(
                    email, inp.lane, EmailStatus.QUEUED.value, recipient_hashes=hashes
                ),
                static_summary=sa.email_summary(email),
                static_details=f"sequence {inp.key}, step {step}; lane: {inp.lane}",
                priority=TemporalPriority(priority_key=inp.priority.key),
            )
        except WorkflowAlreadyStartedError:
            # Sent by an earlier run of this sequence (e.g. before a reset): never twice.
            # Since the patch its Message-ID may be sealed, which only a worker can make:
            # it stays out of the thread rather than showing the key in References.
            mid = ""
            if not workflow.patched(UNKNOWN_MESSAGE_ID_PATCH):
                domain = inp.spec.sender.rsplit("@", 1)[1]
                mid = message_id(email_workflow_id(key), domain)
            self._record(step, key, mid, email)
            return
        self._publish(next_action=f"send {step}")
        cancelled: asyncio.CancelledError | None = None
        try:
            await self._wait(None, until=child.done)
        except asyncio.CancelledError as err:
            if not workflow.patched(CANCEL_STOPS_CHILD_PATCH):
                raise
            cancelled = err
            self._finish(SequenceStatus.CANCELLED, "cancelled")
        if not child.done():
            # A stop came first. The email ends cancelled, or sent if its transaction was
            # already at DATA and got through; never parked in dead_letter.
            child.cancel()
        try:
            receipt = await child
        except (ChildWorkflowError, asyncio.CancelledError) as err:
            if self._s.stop_reason is None:
                self._child_failed(step, err)
            if cancelled is not None:
                raise cancelled from None
            return
        self._record(step, key, receipt.message_id, email)
        if cancelled is not None:
            raise cancelled

    def _child_failed(self, step: str, err: BaseException) -> None:
        failure = application_failure(err)
        if failure is not None and failure.type == ErrorType.SMTP_PERMANENT:
            self._finish(SequenceStatus.BOUNCED, f"step {step}: refused: {failure.message}")
        else:
            self._finish(SequenceStatus.FAILED, f"step {step}: email not sent: {err}")

    def _email(self, content: RenderedMessage, *, thread: bool) -> Email:
        return sequence_email(self._in, content, self._thread_ids() if thread else [])

    def _thread_ids(self) -> list[str]:
        """Message-IDs of the conversation so far, oldest first (ours and their replies)."""
        dated: list[tuple[datetime, str]] = [
            (m.sent_at or workflow.now(), m.message_id) for m in self._s.sent if m.message_id
        ]
        dated += [
            (r.received_at or workflow.now(), r.message_id) for r in self._s.replies if r.message_id
        ]
        return [mid for _, mid in sorted(dated, key=lambda pair: pair[0])]

    def _record(self, step: str, key: str, mid: str, email: Email) -> None:
        # Workflow time, not the worker's clock: it orders the thread and is virtual in tests.
        self._s.sent.append(
            SentMessage(
                step=step,
                key=key,
                message_id=mid,
                subject=email.subject,
                text=(email.text or email.html or "")[:MAX_THREAD_TEXT],
                sent_at=workflow.now(),
            )
        )

    async def _compose(self, step: ComposeStep, entered_at: datetime) -> Draft | None:
        """Ask the agent for a draft until one validates; hold it for approval if asked."""
        inp = self._in
        feedback: str | None = None
        draft: Draft | None = self._s.draft
        for attempt in range(1, step.max_attempts + 1):
            if draft is not None:
                break
            self._publish(next_action=f"compose {step.id}")
            try:
                candidate = await workflow.execute_activity(
                    step.activity,
                    ComposeRequest(
                        sequence_key=inp.key,
                        step=step.id,
                        sender=inp.spec.sender,
                        recipient=inp.recipient,
                        instructions=inp.instructions.get(step.id, ""),
                        thread=self._thread(),
                        feedback=feedback,
                        attempt=attempt,
                    ),
                    result_type=Draft,
                    task_queue=step.task_queue or WORKFLOW_TASK_QUEUE,
                    start_to_close_timeout=step.timeout,
                    retry_policy=COMPOSE_RETRY,
                    summary=f"compose {step.id} for {inp.recipient.address}, attempt {attempt}",
                )
            except ActivityError as err:
                self._finish(SequenceStatus.FAILED, f"step {step.id}: agent failed: {err.cause}")
                return None
            if self._s.stop_reason is not None:
                return None
            try:
                self._email(RenderedMessage(**candidate.model_dump()), thread=step.thread)
            except InvalidEmail as exc:
                feedback = str(exc)
                continue
            draft = candidate
        if draft is None:
            self._finish(SequenceStatus.FAILED, f"step {step.id}: no valid draft: {feedback}")
            return None
        self._s.draft = draft
        if not step.approval:
            return draft
        return await self._approved(step, draft, entered_at)

    async def _approved(
        self, step: ComposeStep, draft: Draft, entered_at: datetime
    ) -> Draft | None:
        self._s.status = SequenceStatus.AWAITING_APPROVAL
        self._publish(next_action=f"approve {step.id}")
        deadline = None
        if step.approval_timeout is not None:
            deadline = entered_at + step.approval_timeout
        decided = await self._wait(deadline, until=lambda: self._s.approval is not None)
        if self._s.stop_reason is not None:
            return None
        if not decided or self._s.approval is None:
            self._finish(SequenceStatus.FAILED, f"step {step.id}: nobody approved the draft")
            return None
        decision = self._s.approval
        if not decision.approved:
            self._finish(SequenceStatus.CANCELLED, f"step {step.id}: draft rejected {decision.by}")
            return None
        self._s.status = SequenceStatus.ACTIVE
        edits = {
            k: v
            for k, v in {
                "subject": decision.subject,
                "text": decision.text,
                "html": decision.html,
            }.items()
            if v is not None
        }
        edited = draft.model_copy(update=edits)
        try:
            self._email(RenderedMessage(**edited.model_dump()), thread=step.thread)
        except InvalidEmail as exc:
            self._finish(SequenceStatus.FAILED, f"step {step.id}: edited draft invalid: {exc}")
            return None
        return edited

    def _thread(self) -> list[ThreadMessage]:
        messages = [
            ThreadMessage(
                direction="out",
                subject=m.subject,
                text=m.text,
                at=m.sent_at,
                message_id=m.message_id,
            )
            for m in self._s.sent
        ] + [
            ThreadMessage(
                direction="in",
                subject=r.subject,
                text=r.text,
                at=r.received_at,
                message_id=r.message_id,
            )
            for r in self._s.replies
        ]
        return sorted(messages, key=lambda m: m.at or workflow.now())

    async def _suppress(self) -> None:
        """Keep this address out of the sender's future sequences."""
        inp = self._in
        await workflow.execute_activity(
            SUPPRESS_ACTIVITY,
            Suppression(
                sender=inp.spec.sender,
                address=inp.recipient.address,
                reason=self._s.stop_reason or "",
                source=workflow.info().workflow_id,
            ),
            task_queue=WORKFLOW_TASK_QUEUE,
            start_to_close_timeout=ADMIN_START_TO_CLOSE,
            retry_policy=ADMIN_RETRY,
            summary=f"suppress {inp.recipient.address} for {inp.spec.sender}",
        )

    # -- state -------------------------------------------------------------------------

    def _finish(self, status: SequenceStatus, reason: str) -> None:
        if self._s.stop_reason is None:
            self._s.stop_reason = reason
            self._s.status = status
            # Replay-safe: the workflow's meter records nothing while replaying.
            metrics.count_sequence_outcome(
                workflow.metric_meter(), self._in.spec.name, status.value
            )
        self._publish()

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        return self._s.position < len(self._in.spec.steps) and (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._in.history_limit
        )

    def _publish(self, next_action: str | None = None) -> None:
        status = self._s.status
        if status in (SequenceStatus.ACTIVE, SequenceStatus.PAUSED):
            status = SequenceStatus.PAUSED if self._s.paused else SequenceStatus.ACTIVE
            self._s.status = status
        report = self.status()
        details = f"status: {status}; step: {report.step}; sent: {len(self._s.sent)}"
        if next_action or report.next_action:
            details += f"; next: {next_action or report.next_action}"
        if report.next_at:
            details += f" at {report.next_at.isoformat()}"
        if self._s.stop_reason:
            details += f"; stopped: {self._s.stop_reason}"
        workflow.set_current_details(details)
        if self._published is None:
            self._published = workflow.info().typed_search_attributes.get(sa.STATUS)
        if self._published != status.value:
            self._published = status.value
            workflow.upsert_search_attributes([sa.STATUS.value_set(status.value)])

    # -- signals and query -------------------------------------------------------------

    @workflow.signal(name=SequenceMessages.INBOUND)
    def inbound(self, event: InboundEvent) -> None:
        """A reply, auto-reply, bounce or unsubscribe for this sequence (idempotent)."""
        if event.message_id and event.message_id in self._s.seen:
            return
        if event.message_id:
            self._s.seen = [*self._s.seen, event.message_id][-MAX_SEEN:]
        if event.kind == InboundKind.AUTO_REPLY:
            self._s.auto_replies += 1
            return
        if event.kind == InboundKind.UNSUBSCRIBE:
            self._finish(SequenceStatus.UNSUBSCRIBED, f"unsubscribed {event.from_address}".strip())
            return
        if event.kind == InboundKind.BOUNCE:
            if event.hard:
                self._finish(SequenceStatus.BOUNCED, f"bounced {event.status}".strip())
            else:
                self._s.soft_bounces += 1
            return
        # Ordered by when the sequence learned of it: the sender's clock may be anything.
        self._s.replies.append(event.model_copy(update={"received_at": workflow.now()}))
        if self._s.status.finished:
            return
        step = self._current_step()
        if self._answers_current_send(step, event):
            # A reply to the email this step is sending (it went out; its child workflow
            # has not reported back yet) belongs to the step that follows.
            position = self._s.position + 1
            steps = self._in.spec.steps
            step = steps[position] if position < len(steps) else None
        if isinstance(step, WaitForReplyStep) and step.on_reply != STOP:
            self._s.reply_branch = True
        else:
            self._finish(SequenceStatus.REPLIED, f"replied {event.from_address}".strip())

    @workflow.signal(name=SequenceMessages.UNSUBSCRIBE)
    def unsubscribe(self, reason: str = "") -> None:
        """Stop, and keep this recipient out of the sender's future sequences."""
        self._finish(SequenceStatus.UNSUBSCRIBED, f"unsubscribed {reason}".strip())

    @workflow.signal(name=SequenceMessages.PAUSE)
    def pause(self) -> None:
        """Hold the sequence where it is: nothing is sent until ``resume``.

        The signal (kept for older clients and the Web UI) ignores what does not apply;
        clients use the update of the same name, which refuses it with a reason.
        """
        if not self._s.status.finished:
            self._s.paused = True
            self._publish()

    @workflow.update(name=SequenceMessages.PAUSE)
    def pause_update(self) -> None:
        """Hold the sequence; refused if it has finished or is paused already."""
        self.pause()

    @pause_update.validator
    def _validate_pause(self) -> None:
        self._refuse_if_finished(SequenceMessages.PAUSE)
        if self._s.paused:
            _refuse("the sequence is already paused")

    @workflow.signal(name=SequenceMessages.RESUME)
    def resume(self) -> None:
        """Go on; a wait whose time passed during the pause ends at once."""
        if self._s.paused:
            self._s.paused = False
            self._publish()

    @workflow.update(name=SequenceMessages.RESUME)
    def resume_update(self) -> None:
        """Go on; refused unless the sequence is paused."""
        self.resume()

    @resume_update.validator
    def _validate_resume(self) -> None:
        self._refuse_if_finished(SequenceMessages.RESUME)
        if not self._s.paused:
            _refuse("the sequence is not paused")

    @workflow.signal(name=SequenceMessages.APPROVE)
    def approve(self, decision: Approval) -> None:
        """Approve (optionally edited) or reject the draft a compose step holds."""
        step = self._current_step()
        if isinstance(step, ComposeStep) and step.id == decision.step and self._s.draft:
            self._s.approval = decision

    @workflow.update(name=SequenceMessages.APPROVE)
    def approve_update(self, decision: Approval) -> None:
        """Approve (optionally edited) or reject the draft awaiting approval; refused for
        any other step, or when no draft waits."""
        self._s.approval = decision

    @approve_update.validator
    def _validate_approve(self, decision: Approval) -> None:
        self._refuse_if_finished(SequenceMessages.APPROVE)
        step = self._current_step()
        current = getattr(step, "id", None)
        if current != decision.step:
            _refuse(
                f"step {decision.step!r} is not the current step"
                f" (the sequence is at {current!r}); only a draft awaiting approval can be"
                " approved"
            )
        if (
            not isinstance(step, ComposeStep)
            or self._s.draft is None
            or self._s.status != SequenceStatus.AWAITING_APPROVAL
        ):
            _refuse(f"step {decision.step!r} has no draft awaiting approval")
        if self._s.approval is not None:
            _refuse(f"the draft of step {decision.step!r} was already decided")

    def _refuse_if_finished(self, action: str) -> None:
        if self._s.status.finished:
            _refuse(f"cannot {action}: the sequence is {self._s.status}")

    def _answers_current_send(self, step: object | None, event: InboundEvent) -> bool:
        if not isinstance(step, SendStep | ComposeStep) or self._in is None:
            return False
        if step.next is not None:
            return False  # the step after it is not simply the following one
        key = sequence_email_key(self._in.key, step.id)
        if event.refers_to_workflow:
            # Opened by the inbound worker: sealed Message-IDs cannot be remade here.
            return event.refers_to_workflow == email_workflow_id(key)
        domain = self._in.spec.sender.rsplit("@", 1)[1]
        return event.refers_to == message_id(email_workflow_id(key), domain)

    def _current_step(self) -> object | None:
        if self._in is None or self._s.position >= len(self._in.spec.steps):
            return None
        return self._in.spec.steps[self._s.position]

    @workflow.query(name=SequenceMessages.STATUS)
    def status(self) -> SequenceReport:
        """The current step, what happens next and when, what was sent so far."""
        inp = self._in
        step = self._current_step()
        next_action, next_at = self._next()
        return SequenceReport(
            key=inp.key if inp else "",
            status=self._s.status,
            recipient=inp.recipient.address if inp else "",
            step=getattr(step, "id", None) if not self._s.status.finished else None,
            next_action=next_action,
            next_at=next_at,
            paused=self._s.paused,
            stop_reason=self._s.stop_reason,
            sent=list(self._s.sent),
            replies=list(self._s.replies),
            auto_replies=self._s.auto_replies,
            draft=self._s.draft,
            runs=self._s.runs,
        )

    def _next(self) -> tuple[str | None, datetime | None]:
        step = self._current_step()
        if step is None or self._s.status.finished:
            return None, None
        deadline = self._s.deadline
        if isinstance(step, WaitStep):
            return "wait", deadline
        if isinstance(step, WaitForReplyStep):
            return "wait for a reply", deadline
        if isinstance(step, ComposeStep):
            if self._s.status == SequenceStatus.AWAITING_APPROVAL:
                return f"approval of {step.id}", None
            return f"compose and send {step.id}", deadline
        if isinstance(step, SendStep):
            return f"send {step.id}", deadline
        return "stop", None


def _refuse(reason: str) -> NoReturn:
    """Reject an operator's update (from its validator) with `reason`."""
    raise ApplicationError(reason, type=ErrorType.ACTION_REFUSED, non_retryable=True)


def _changed(state: SequenceState, until: Callable[[], bool]) -> Callable[[], bool]:
    """Wakes a wait on a stop, on `until`, or when the pause flag flips."""
    paused = state.paused
    return lambda: state.stop_reason is not None or until() or state.paused != paused
