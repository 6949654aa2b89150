"""InboxWatcherWorkflow: one durable poller per inbox, ID ``inbound:<inbox>``.

It loops: run the ``poll_inbox`` activity (on the ``postlane.inbound`` queue, where the
worker holds the IMAP login), signal each event to its sequence, keep the cursor, sleep
the poll interval (a ``poll_now`` signal cuts the sleep short). The cursor lives in this
workflow's state, so a crashed worker or a restarted host resumes where the last poll
ended; a message read twice (a UIDVALIDITY change, a watcher started afresh) is signalled
again with the same Message-ID, which the sequence ignores.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ActivityError, FailureError

with workflow.unsafe.imports_passed_through():
    from postlane.ids import INBOUND_TASK_QUEUE
    from postlane.inbound.models import (
        InboundItem,
        PollRequest,
        PollResult,
        UnsubscribeRequest,
        WatcherConfig,
        WatcherInput,
        WatcherReport,
        WatcherState,
    )
    from postlane.names import Activity, InboxMessages, SequenceMessages, WorkflowType
    from postlane.sequences.models import InboundKind
    from workflows._options import (
        IMAP_HEARTBEAT,
        IMAP_START_TO_CLOSE,
        INBOUND_RETRY,
        INBOUND_START_TO_CLOSE,
    )


@workflow.defn(name=WorkflowType.INBOX_WATCHER)
class InboxWatcherWorkflow:
    """Polls one inbox for ever and routes what it finds to the sequences it answers."""

    @workflow.init
    def __init__(self, inp: WatcherInput) -> None:
        # Set before any handler runs: a ``configure`` sent with the start then replaces
        # the input's settings, as it did when the handler ran first.
        self._inbox = inp.inbox
        self._config = inp.config
        self._s = inp.state if inp.state is not None else WatcherState()
        self._poll_now = False

    @workflow.run
    async def run(self, inp: WatcherInput) -> None:
        """Poll, deliver, sleep; continue as new now and then, carrying the cursor."""
        self._publish()
        while True:
            more = await self._poll()
            if self._should_continue_as_new(inp):
                await workflow.wait_condition(workflow.all_handlers_finished)
                self._s.runs += 1
                workflow.continue_as_new(
                    inp.model_copy(update={"config": self._config, "state": self._s})
                )
            if more:
                continue  # a backlog: read on at once
            try:
                await workflow.wait_condition(
                    lambda: self._poll_now, timeout=self._config.poll_interval
                )
            except TimeoutError:
                pass

    async def _poll(self) -> bool:
        """One poll and its deliveries. Returns True if more mail is waiting."""
        self._poll_now = False
        try:
            result: PollResult = await workflow.execute_activity(
                Activity.POLL_INBOX,
                PollRequest(
                    inbox=self._inbox,
                    cursor=self._s.cursor,
                    max_messages=self._config.max_messages,
                ),
                result_type=PollResult,
                task_queue=INBOUND_TASK_QUEUE,
                start_to_close_timeout=IMAP_START_TO_CLOSE,
                heartbeat_timeout=IMAP_HEARTBEAT,
                retry_policy=INBOUND_RETRY,
                summary=f"poll {self._inbox} after UID {self._s.cursor.last_uid}",
            )
        except ActivityError as err:
            self._s.last_error = str(err.cause or err)
            workflow.logger.warning(
                "inbox %s: poll failed, trying again later: %s", self._inbox, self._s.last_error
            )
            self._publish()
            return False
        # In mailbox order for each sequence (an out-of-office, then the real reply);
        # different sequences at the same time.
        by_target: dict[str, list[InboundItem]] = {}
        for item in result.items:
            by_target.setdefault(item.target, []).append(item)
        delivered = [
            ok
            for oks in await asyncio.gather(*(self._deliver_all(i) for i in by_target.values()))
            for ok in oks
        ]
        # Only now, with every event handed over, does the cursor move past them.
        self._s.cursor = result.cursor
        self._s.polls += 1
        self._s.delivered += sum(delivered)
        self._s.skipped += len(delivered) - sum(delivered)
        self._s.ignored += result.ignored
        self._s.resets += int(result.reset)
        self._s.last_poll_at = workflow.now()
        self._s.last_error = None
        self._publish()
        return result.more

    async def _deliver_all(self, items: list[InboundItem]) -> list[bool]:
        return [await self._deliver(item) for item in items]

    async def _deliver(self, item: InboundItem) -> bool:
        """Signal one event to its sequence. False if it does not exist or has finished."""
        event = item.event
        handle = workflow.get_external_workflow_handle(item.target)
        unsubscribe = event.kind == InboundKind.UNSUBSCRIBE
        reason = f"mail from {event.from_address}".strip()
        try:
            if not item.running:
                raise _NotRunning(item.target)
            if unsubscribe:
                await handle.signal(SequenceMessages.UNSUBSCRIBE, reason)
            else:
                await handle.signal(SequenceMessages.INBOUND, event)
            return True
        except (FailureError, _NotRunning) as err:
            workflow.logger.info(
                "inbox %s: %s for %s not delivered (finished or unknown): %s",
                self._inbox,
                event.kind,
                item.target,
                err,
            )
        if unsubscribe:
            # A finished sequence cannot stop, but its recipient must still be suppressed.
            try:
                await workflow.execute_activity(
                    Activity.RECORD_UNSUBSCRIBE,
                    UnsubscribeRequest(key=item.target.split(":", 1)[1], reason=reason),
                    result_type=bool,
                    task_queue=INBOUND_TASK_QUEUE,
                    start_to_close_timeout=INBOUND_START_TO_CLOSE,
                    retry_policy=INBOUND_RETRY,
                )
            except ActivityError as err:
                workflow.logger.warning(
                    "inbox %s: unsubscribe for %s not recorded: %s", self._inbox, item.target, err
                )
        return False

    def _should_continue_as_new(self, inp: WatcherInput) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= inp.history_limit
        )

    def _publish(self) -> None:
        s = self._s
        details = (
            f"inbox {self._inbox}: {s.polls} polls, {s.delivered} delivered, "
            f"{s.skipped} skipped, {s.ignored} ignored; read up to UID {s.cursor.last_uid}"
        )
        if s.last_error:
            details += f"; last error: {s.last_error}"
        workflow.set_current_details(details)

    @workflow.signal(name=InboxMessages.POLL_NOW)
    def poll_now(self) -> None:
        """Poll at once instead of at the end of the current interval."""
        self._poll_now = True

    @workflow.signal(name=InboxMessages.CONFIGURE)
    def configure(self, config: WatcherConfig) -> None:
        """Take the inbox's current settings (every worker sends them at start)."""
        self._config = config

    @workflow.query(name=InboxMessages.STATUS)
    def status(self) -> WatcherReport:
        """Where the inbox has been read up to, and what was done with what was found."""
        s = self._s
        return WatcherReport(
            inbox=self._inbox,
            config=self._config,
            cursor=s.cursor,
            polls=s.polls,
            delivered=s.delivered,
            skipped=s.skipped,
            ignored=s.ignored,
            resets=s.resets,
            last_poll_at=s.last_poll_at,
            last_error=s.last_error,
            runs=s.runs,
        )


class _NotRunning(Exception):
    """The poll found the target sequence finished or unknown: no signal is sent."""
