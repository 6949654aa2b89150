"""The send path's side of the reputation guard and of suppression (used by `send_email`).

Before a send opens its SMTP transaction, `SendGuard.check` refuses it when a recipient is
suppressed for the sender (``RecipientSuppressed``: the email ends ``suppressed``) or when
its lane is paused (``LanePaused``: the email waits ``scheduled`` for the lane to resume).
The two fail differently when the server cannot answer: an unknown pause is taken as "not
paused" (the guard must not stop mail on its own failure), but an unknown suppression
stops the attempt (``SuppressionUnknown``, retried like a transient failure), since sending
might mail someone who asked never to be mailed again.
After it, `SendGuard.sent` and `SendGuard.failed` report the outcome to the lane's workflow
(which pauses the lane past a threshold) and suppress hard-bounced recipients.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from postlane import search_attributes as sa
from postlane.email.models import DeliveryReceipt, SmtpSendRequest
from postlane.errors import ErrorType
from postlane.ids import EMAIL_ID_PREFIX, lane_workflow_id
from postlane.lanes.guard import PAUSE_MEMO, LanePause, OutcomeReport
from postlane.names import LaneMessages
from postlane.sequences.models import InboundEvent, InboundKind, Suppression
from postlane.sequences.suppressions import is_suppressed, start_suppression

log = structlog.get_logger(__name__)

PAUSE_CHECK_EVERY = 1.0
"""Seconds a "not paused" answer from the lane is trusted on this host. A "paused" answer
is never cached: each refused send asks again, so a resumed lane sends at once."""
PAUSE_QUERY_TIMEOUT = timedelta(seconds=2)
"""A server that does not describe the lane's workflow this fast leaves it taken as not
paused: the guard is a safety net, it must not stop mail on its own failure."""
MESSAGE_PHASES = frozenset({"mail", "rcpt", "data"})
"""SMTP stages (`activities.smtp` phase names) whose reply is about this mail or its
recipients: a 5xx there is a hard bounce, a 4xx a deferral. A reply at ``connect``
(greeting, EHLO, STARTTLS, AUTH) is about the server or Postlane's own settings, such as a
wrong password (535) or TLS unavailable for now (454): neither."""
SUPPRESSION_CHECK_TIMEOUT = timedelta(seconds=5)
"""How long one recipient's suppression describe may take before the attempt fails
(retryably) instead of waiting on a slow server for the whole send's timeout."""
FLUSH_EVERY = 20
"""Accepted recipients reported to the lane in one signal (bad outcomes go at once)."""
FLUSH_AFTER = 2.0
"""Seconds after which accepted recipients are reported with the next send."""


@dataclass
class _Pending:
    sent: int = 0
    since: float = field(default_factory=time.monotonic)


class SendGuard:
    """One per worker: pause checks (briefly cached per lane) and outcome reports."""

    def __init__(self, client: Client | None) -> None:
        self._client = client
        self._open_until: dict[str, float] = {}
        self._pending: dict[str, _Pending] = {}

    async def check(self, req: SmtpSendRequest) -> None:
        """Refuse the send before anything goes out.

        The recipients' suppressions are read at once, each describe bounded by
        `SUPPRESSION_CHECK_TIMEOUT`.

        Raises:
            ApplicationError: ``RecipientSuppressed`` or ``LanePaused``, not retryable;
                ``SuppressionUnknown``, retryable, when a suppression could not be read
                (nothing is sent without knowing).
        """
        if self._client is None:
            return
        client, sender = self._client, req.email.sender
        addresses = list(req.email.recipients)
        try:
            found = await asyncio.gather(
                *(
                    is_suppressed(client, sender, a, rpc_timeout=SUPPRESSION_CHECK_TIMEOUT)
                    for a in addresses
                )
            )
        except RPCError as exc:
            log.warning("suppression.unknown", lane=req.lane, key=req.key, error=str(exc))
            raise ApplicationError(
                f"could not read the suppression list ({exc.status.name}): nothing was sent",
                {"sender": sender},
                type=ErrorType.SUPPRESSION_UNKNOWN,
            ) from exc
        for address, suppressed in zip(addresses, found, strict=True):
            if suppressed:
                log.info("email.suppressed", lane=req.lane, key=req.key)
                raise ApplicationError(
                    f"{address} is suppressed for {sender}; nothing was sent",
                    {"sender": sender, "address": address},
                    type=ErrorType.RECIPIENT_SUPPRESSED,
                    non_retryable=True,
                )
        pause = await self.pause_state(req.lane)
        if pause.paused:
            log.info("email.held_by_paused_lane", lane=req.lane, key=req.key, reason=pause.reason)
            raise ApplicationError(
                f"lane {req.lane} is paused ({pause.by}): {pause.reason}",
                {"lane": req.lane, "reason": pause.reason},
                type=ErrorType.LANE_PAUSED,
                non_retryable=True,
            )

    async def pause_state(self, lane: str) -> LanePause:
        """The lane's pause, from its workflow's memo (a describe: no worker involved);
        "not paused" is trusted for `PAUSE_CHECK_EVERY` seconds."""
        if self._client is None or time.monotonic() < self._open_until.get(lane, 0.0):
            return LanePause()
        pause: LanePause
        try:
            desc = await self._client.get_workflow_handle(lane_workflow_id(lane)).describe(
                rpc_timeout=PAUSE_QUERY_TIMEOUT
            )
            pause = await desc.memo_value(PAUSE_MEMO, LanePause(), type_hint=LanePause)
        except Exception as exc:  # the lane's workflow is not there (yet), or unreadable
            log.warning("lane.pause_unknown", lane=lane, error=str(exc))
            pause = LanePause()
        if not pause.paused:
            self._open_until[lane] = time.monotonic() + PAUSE_CHECK_EVERY
        return pause

    async def sent(self, req: SmtpSendRequest, receipt: DeliveryReceipt) -> None:
        """Count the accepted recipients; report refused ones (5xx: bounce, suppressed)."""
        pending = self._pending.setdefault(req.lane, _Pending())
        pending.sent += len(receipt.accepted)
        bounced = [a for a, reply in receipt.rejected.items() if reply[:1] == "5"]
        deferred = [a for a, reply in receipt.rejected.items() if reply[:1] == "4"]
        for address in bounced:
            await self._suppress(req.email.sender, address, receipt.rejected[address])
        due = pending.sent >= FLUSH_EVERY or time.monotonic() - pending.since >= FLUSH_AFTER
        if bounced or deferred or due:
            detail = receipt.rejected[(bounced or deferred)[0]] if bounced or deferred else ""
            await self._report(
                req.lane, hard_bounces=len(bounced), deferrals=len(deferred), detail=detail
            )

    async def failed(self, req: SmtpSendRequest, err: ApplicationError) -> None:
        """Report a refused attempt: 5xx at MAIL, RCPT or DATA is a hard bounce for every
        recipient (suppressed if refused at RCPT), 4xx a deferral (not a "slow down", which
        backpressure answers); connection failures, and any reply before MAIL (greeting,
        EHLO, STARTTLS, AUTH), say nothing about the recipients."""
        details: dict[str, Any] = (
            err.details[0] if err.details and isinstance(err.details[0], dict) else {}
        )
        code = details.get("smtp_code")
        if not isinstance(code, int) or details.get("phase") not in MESSAGE_PHASES:
            return
        if code >= 500:
            if details.get("phase") == "rcpt":
                for address in req.email.recipients:
                    await self._suppress(req.email.sender, address, err.message)
            await self._report(req.lane, hard_bounces=len(req.email.recipients), detail=err.message)
        elif code >= 400 and err.type != ErrorType.SMTP_THROTTLED:
            # A "slow down" (421, 4.7.x) is backpressure's: it slows the lane, not pause it.
            await self._report(req.lane, deferrals=1, detail=err.message)

    async def _report(
        self, lane: str, *, hard_bounces: int = 0, deferrals: int = 0, detail: str = ""
    ) -> None:
        pending = self._pending.pop(lane, _Pending())
        report = OutcomeReport(
            sent=pending.sent, hard_bounces=hard_bounces, deferrals=deferrals, detail=detail
        )
        if self._client is None or report == OutcomeReport(detail=detail):
            return
        try:
            await self._client.get_workflow_handle(lane_workflow_id(lane)).signal(
                LaneMessages.RECORD_OUTCOMES, report
            )
        except RPCError as exc:  # best effort: the guard misses these, the email goes on
            log.warning("lane.outcomes_not_reported", lane=lane, error=str(exc))

    async def _suppress(self, sender: str, address: str, reply: str) -> None:
        if self._client is None:
            return
        try:
            await start_suppression(
                self._client,
                Suppression(sender=sender, address=address, reason=reply, source="bounce"),
            )
        except RPCError as exc:
            log.warning("suppression.not_recorded", address=address, error=str(exc))


def counts_against_lane(event: InboundEvent) -> bool:
    """A hard bounce (DSN ``failed``) or a spam complaint about one of our emails."""
    hard_bounce = event.kind == InboundKind.BOUNCE and event.hard
    ours = event.refers_to_workflow.startswith(EMAIL_ID_PREFIX)
    return ours and (hard_bounce or event.kind == InboundKind.COMPLAINT)


async def record_inbound(client: Client, events: list[InboundEvent]) -> None:
    """Count inbound hard bounces and complaints against their emails' lanes, and suppress
    each recipient for the sender (best effort: a failure is logged, the poll goes on).

    The email's lane is read from its workflow (``PostlaneLane``); the sender and
    recipient from the report (the returned message's ``From``; ``Final-Recipient`` or
    ``Original-Rcpt-To``).
    """
    for event in events:
        complaint = event.kind == InboundKind.COMPLAINT
        what = f"{'complaint' if complaint else 'DSN'} {event.status}".strip()
        detail = f"{what} from {event.original_recipient or 'a recipient'}"
        try:
            desc = await client.get_workflow_handle(event.refers_to_workflow).describe()
        except RPCError as exc:
            log.warning(
                "inbound.email_unknown", workflow_id=event.refers_to_workflow, error=str(exc)
            )
            continue
        lane = desc.typed_search_attributes.get(sa.LANE)
        if lane:
            report = OutcomeReport(
                complaints=int(complaint),
                hard_bounces=int(not complaint),
                detail=detail,
                inbound_id=event.message_id or None,
            )
            try:
                await client.get_workflow_handle(lane_workflow_id(lane)).signal(
                    LaneMessages.RECORD_OUTCOMES, report
                )
            except RPCError as exc:
                log.warning("lane.outcomes_not_reported", lane=lane, error=str(exc))
        if event.original_sender and event.original_recipient:
            suppression = Suppression(
                sender=event.original_sender,
                address=event.original_recipient,
                reason=detail,
                source="complaint" if complaint else "dsn",
            )
            try:
                await start_suppression(client, suppression)
            except RPCError as exc:
                log.warning("suppression.not_recorded", error=str(exc))
        log.info(
            "reputation.inbound",
            kind=str(event.kind),
            lane=lane,
            workflow_id=event.refers_to_workflow,
            suppressed=bool(event.original_sender and event.original_recipient),
        )
