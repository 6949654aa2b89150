"""WebhookDeliveryWorkflow: one subscription's events about one email or sequence, in order.

Emails and sequences call `emit_event` at their terminal transitions; its local activity
signal-with-starts ``webhook:<subscription>:<workflow ID>`` for each subscription that
wants the event. That workflow posts its events one at a time, each as a
``deliver_webhook`` activity retried with the subscription's backoff, so a receiver that
is down gets every event, in order, once it is back.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from postlane.names import Activity, WebhookMessages, WorkflowType
    from postlane.webhooks import (
        WEBHOOK_UNKNOWN,
        WebhookDeliveryInput,
        WebhookDeliveryReport,
        WebhookEmit,
        WebhookEmitted,
        WebhookEvent,
        WebhookEventType,
        WebhookRequest,
        WebhookResponse,
        WebhookRetry,
    )

EMIT_START_TO_CLOSE = timedelta(seconds=10)
EMIT_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=30))
"""Queuing an event is one signal-with-start; it retries until the server takes it."""
DELIVER_START_TO_CLOSE = timedelta(seconds=30)
"""One POST: connect, send, read the answer (the activity's own timeout is shorter)."""
DELIVERY_LINGER = timedelta(minutes=1)
"""An idle delivery waits this long for another event before it ends, so a repeated
signal (an emitting activity retried after its signal got through) is still recognised."""
MAX_SEEN = 100
CONTINUE_AS_NEW_AFTER = 5000
"""History events after which a busy delivery continues as new, carrying its queue."""


def delivery_retry(retry: WebhookRetry) -> RetryPolicy:
    """The ``deliver_webhook`` retry policy of a subscription: unlimited attempts within
    ``give_up_after`` (the schedule-to-close timeout), exponential backoff."""
    return RetryPolicy(
        initial_interval=retry.initial_interval,
        backoff_coefficient=retry.backoff,
        maximum_interval=retry.maximum_interval,
        maximum_attempts=0,
        non_retryable_error_types=[WEBHOOK_UNKNOWN],
    )


async def emit_event(kind: WebhookEventType, data: dict[str, Any]) -> None:
    """Queue `kind` about the calling workflow for every subscription that wants it.

    Workflow code only. The event ID is derived from the run and the history position, so
    the same call always makes the same ID (a retried or replayed call repeats it, and the
    delivery workflow drops the repeat); the local activity reads the workers' settings.
    """
    info = workflow.info()
    seed = f"{info.workflow_id}\n{info.run_id}\n{info.get_current_history_length()}\n{kind}"
    event = WebhookEvent(
        id="msg_" + hashlib.sha256(seed.encode()).hexdigest()[:32],
        type=kind,
        timestamp=workflow.now(),
        data=data,
    )
    await workflow.execute_local_activity(
        Activity.EMIT_WEBHOOK_EVENT,
        WebhookEmit(subject=info.workflow_id, event=event),
        result_type=WebhookEmitted,
        start_to_close_timeout=EMIT_START_TO_CLOSE,
        retry_policy=EMIT_RETRY,
    )


@workflow.defn(name=WorkflowType.WEBHOOK_DELIVERY)
class WebhookDeliveryWorkflow:
    """Delivers one subscription's events about one email or sequence, strictly in order.

    Each event is a ``deliver_webhook`` activity: while the receiver fails, the Web UI
    shows it as the pending activity with its attempt count, last failure and next retry;
    the current details show the queue. An event not delivered within the subscription's
    ``give_up_after`` is counted failed and the next one goes.
    """

    @workflow.init
    def __init__(self, inp: WebhookDeliveryInput) -> None:
        self._in = inp
        self._pending: list[WebhookEvent] = list(inp.pending)
        self._seen: list[str] = list(inp.seen)
        self._delivered = inp.delivered
        self._failed = inp.failed
        self._last_error = inp.last_error
        self._current: WebhookEvent | None = None

    @workflow.run
    async def run(self, inp: WebhookDeliveryInput) -> WebhookDeliveryReport:
        """Deliver until the queue has been empty for `DELIVERY_LINGER`."""
        while True:
            if not self._pending:
                self._publish()
                try:
                    await workflow.wait_condition(
                        lambda: bool(self._pending), timeout=DELIVERY_LINGER
                    )
                except TimeoutError:
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    if not self._pending:
                        return self.status()
                continue
            await self._deliver(self._pending[0])
            self._pending.pop(0)
            if workflow.info().get_current_history_length() >= CONTINUE_AS_NEW_AFTER:
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._state())

    async def _deliver(self, event: WebhookEvent) -> None:
        inp = self._in
        self._current = event
        self._publish()
        try:
            await workflow.execute_activity(
                Activity.DELIVER_WEBHOOK,
                WebhookRequest(subscription=inp.subscription, event=event),
                result_type=WebhookResponse,
                start_to_close_timeout=DELIVER_START_TO_CLOSE,
                schedule_to_close_timeout=inp.retry.give_up_after,
                retry_policy=delivery_retry(inp.retry),
                summary=f"{event.type} {event.id} to webhook {inp.subscription}",
            )
            self._delivered += 1
        except ActivityError as err:
            self._failed += 1
            self._last_error = f"{event.type} {event.id} given up: {err.cause or err}"
            workflow.logger.warning("webhook event dropped: %s", self._last_error)
        self._current = None

    def _state(self) -> WebhookDeliveryInput:
        return self._in.model_copy(
            update={
                "pending": list(self._pending),
                "seen": list(self._seen),
                "delivered": self._delivered,
                "failed": self._failed,
                "last_error": self._last_error,
            }
        )

    def _publish(self) -> None:
        """The Web UI's current details: the target, the queue, the event going out."""
        inp = self._in
        current = self._current
        details = (
            f"webhook {inp.subscription} → {inp.url}\nfor {inp.subject}; pending:"
            f" {len(self._pending)}; delivered: {self._delivered}; failed: {self._failed}"
        )
        if current is not None:
            details += f"; delivering {current.type} {current.id}"
        if self._last_error:
            details += f"; last given up: {self._last_error}"
        workflow.set_current_details(details)

    @workflow.signal(name=WebhookMessages.ENQUEUE)
    def enqueue(self, event: WebhookEvent) -> None:
        """Queue `event` after the others; one already queued (by its ID) is ignored."""
        if event.id in self._seen:
            return
        self._seen = [*self._seen, event.id][-MAX_SEEN:]
        self._pending.append(event)
        self._publish()

    @workflow.query(name=WebhookMessages.STATUS)
    def status(self) -> WebhookDeliveryReport:
        """The subscription, its target, the queue and what was delivered or given up."""
        inp = self._in
        return WebhookDeliveryReport(
            subscription=inp.subscription,
            subject=inp.subject,
            url=inp.url,
            pending=len(self._pending),
            delivered=self._delivered,
            failed=self._failed,
            next_event=self._pending[0].id if self._pending else None,
            last_error=self._last_error,
        )
