"""The `send_email` activity: one SMTP transaction over a pooled connection per lane."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email import policy
from typing import Any

import aiosmtplib
import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.mime import build_message
from activities.smtp_errors import classify, reply_failure
from postlane.config import LaneConfig, Settings
from postlane.errors import ConfigurationError, ErrorType
from postlane.models import DeliveryReceipt, SmtpSendRequest

log = structlog.get_logger(__name__)

HEARTBEAT_EVERY = 1.0
"""Seconds between heartbeats while a transaction is in flight (timeout is 5 s)."""
IDLE_TIMEOUT = 30.0
"""Pooled connections idle longer than this are closed rather than reused."""

_NETWORK_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError)


class SmtpPool:
    """Open, authenticated SMTP connections to one lane's server, reused across sends.

    A remote provider's TCP + TLS handshake and AUTH are paid once per connection instead of
    once per email. At most `lane.max_concurrent` idle connections are kept.
    """

    def __init__(self, lane: LaneConfig) -> None:
        self._lane = lane
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self.opened = 0
        """Connections opened so far (for tests and benchmarks)."""

    async def acquire(self, *, fresh: bool = False) -> tuple[aiosmtplib.SMTP, bool]:
        """A connection and whether it was reused from the pool."""
        while self._idle and not fresh:
            smtp, since = self._idle.pop()
            if smtp.is_connected and time.monotonic() - since < IDLE_TIMEOUT:
                return smtp, True
            await _close(smtp)
        return await self._connect(), False

    def release(self, smtp: aiosmtplib.SMTP) -> None:
        """Give back a connection whose last transaction completed cleanly."""
        if smtp.is_connected and len(self._idle) < self._lane.max_concurrent:
            self._idle.append((smtp, time.monotonic()))
        else:
            asyncio.ensure_future(_close(smtp))

    async def _connect(self) -> aiosmtplib.SMTP:
        lane = self._lane
        credentials = lane.credentials()
        smtp = aiosmtplib.SMTP(
            hostname=lane.smtp_host,
            port=lane.smtp_port,
            use_tls=lane.smtp_tls == "tls",
            start_tls=True if lane.smtp_tls == "starttls" else False,
            validate_certs=lane.smtp_verify,
            cert_bundle=lane.smtp_ca_file,
            timeout=lane.smtp_timeout,
            username=credentials[0] if credentials else None,
            password=credentials[1] if credentials else None,
        )
        await smtp.connect()
        self.opened += 1
        return smtp

    async def close(self) -> None:
        """Close every idle connection (QUIT)."""
        idle, self._idle = self._idle, []
        for smtp, _ in idle:
            await _close(smtp)


async def _close(smtp: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(*_NETWORK_ERRORS):
        if smtp.is_connected:
            await smtp.quit()
    smtp.close()


class _Progress:
    """The current SMTP phase, heartbeated every second so a dead worker is noticed fast."""

    def __init__(self) -> None:
        self.details: dict[str, Any] = {"phase": "connect"}

    def set(self, phase: str, **extra: Any) -> None:
        self.details = {"phase": phase, **extra}
        activity.heartbeat(self.details)

    @contextlib.asynccontextmanager
    async def beating(self) -> AsyncIterator[None]:
        async def beat() -> None:
            while True:
                activity.heartbeat(self.details)
                await asyncio.sleep(HEARTBEAT_EVERY)

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()


class SmtpActivities:
    """SMTP side effects for the lanes in `settings`; owns one connection pool per lane."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pools: dict[str, SmtpPool] = {}

    def pool(self, lane: str) -> SmtpPool:
        """The connection pool of `lane` (created on first use)."""
        if lane not in self._pools:
            self._pools[lane] = SmtpPool(self._settings.lane(lane))
        return self._pools[lane]

    async def close(self) -> None:
        """Close every pooled connection."""
        for pool in self._pools.values():
            await pool.close()

    @activity.defn(name="send_email")
    async def send_email(self, req: SmtpSendRequest) -> DeliveryReceipt:
        """Deliver one email over SMTP and return what the server accepted.

        A retry whose previous attempt heartbeated "accepted" returns that receipt instead
        of sending again.

        Raises:
            ApplicationError: typed by `ErrorType`; see `activities.smtp_errors`.
        """
        info = activity.info()
        earlier = _accepted_earlier(info.heartbeat_details)
        if earlier is not None:
            log.info("email.already_accepted", key=req.key, message_id=req.message_id)
            return earlier
        try:
            pool = self.pool(req.lane)
        except ConfigurationError as exc:
            raise ApplicationError(str(exc), type=ErrorType.LANE_UNKNOWN, non_retryable=True) from exc
        progress = _Progress()
        data = build_message(req.email, req.message_id, datetime.now(UTC)).as_bytes(
            policy=policy.SMTP
        )
        async with progress.beating():
            transaction = asyncio.create_task(self._deliver(pool, req, data, progress, info.attempt))
            try:
                # Shielded: once DATA is under way a cancel must not cut the dialogue in half.
                receipt = await asyncio.shield(transaction)
            except asyncio.CancelledError:
                if progress.details["phase"] in ("data", "accepted"):
                    receipt = await transaction
                else:
                    transaction.cancel()
                    raise
        log.info(
            "email.sent",
            key=req.key,
            lane=req.lane,
            message_id=req.message_id,
            accepted=len(receipt.accepted),
            rejected=len(receipt.rejected),
            attempt=info.attempt,
        )
        return receipt

    async def _deliver(
        self, pool: SmtpPool, req: SmtpSendRequest, data: bytes, progress: _Progress, attempt: int
    ) -> DeliveryReceipt:
        for fresh in (False, True):
            progress.set("connect")
            try:
                smtp, reused = await pool.acquire(fresh=fresh)
            except _NETWORK_ERRORS as exc:
                raise classify(exc, attempt=attempt, phase="connect") from exc
            try:
                receipt = await self._transaction(smtp, req, data, progress, attempt)
            except _NETWORK_ERRORS as exc:
                smtp.close()
                # A pooled connection the server dropped while idle: nothing was sent yet,
                # so try once more on a new connection instead of waiting for a retry.
                if reused and progress.details["phase"] == "mail" and not isinstance(
                    exc, aiosmtplib.SMTPResponseException
                ):
                    continue
                raise classify(exc, attempt=attempt, phase=progress.details["phase"]) from exc
            except BaseException:
                smtp.close()
                raise
            pool.release(smtp)
            return receipt
        raise AssertionError("unreachable")  # pragma: no cover

    async def _transaction(
        self,
        smtp: aiosmtplib.SMTP,
        req: SmtpSendRequest,
        data: bytes,
        progress: _Progress,
        attempt: int,
    ) -> DeliveryReceipt:
        progress.set("mail")
        await smtp.mail(req.email.sender)
        progress.set("rcpt")
        accepted: list[str] = []
        rejected: dict[str, str] = {}
        for rcpt in req.email.recipients:
            try:
                await smtp.rcpt(rcpt)
                accepted.append(rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                rejected[rcpt] = f"{exc.code} {exc.message}"
        if not accepted:
            await smtp.rset()
            # Temporary refusals (4xx) of every recipient are worth retrying; 5xx are not.
            worst = max(rejected.values(), key=lambda r: int(r[:3]) < 500)
            raise reply_failure(int(worst[:3]), worst[4:], attempt=attempt, phase="rcpt")
        progress.set("data")
        reply = await smtp.data(data)
        receipt = DeliveryReceipt(
            key=req.key,
            message_id=req.message_id,
            lane=req.lane,
            accepted=accepted,
            rejected=rejected,
            attempts=attempt,
            smtp_reply=f"{reply.code} {reply.message}",
            sent_at=datetime.now(UTC),
        )
        progress.set("accepted", receipt=receipt.model_dump(mode="json"))
        return receipt


def _accepted_earlier(details: Any) -> DeliveryReceipt | None:
    """The receipt a previous attempt heartbeated after DATA was accepted, if any."""
    for item in reversed(list(details or [])):
        if isinstance(item, dict) and item.get("phase") == "accepted" and "receipt" in item:
            return DeliveryReceipt.model_validate(item["receipt"])
    return None
