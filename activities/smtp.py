"""The `send_email` activity: one SMTP transaction over a pooled connection per lane."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiosmtplib
import structlog
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from activities.guard import SendGuard
from activities.mime import render_message
from activities.smtp_errors import (
    StartTlsUnavailable,
    classify,
    config_failure,
    is_throttle,
    reply_failure,
)
from postlane.config import LaneConfig, Settings
from postlane.email.models import (
    AttemptRecord,
    DeliveryReceipt,
    Email,
    SmtpSendRequest,
)
from postlane.errors import ConfigurationError, ErrorType
from postlane.ids import lane_workflow_id
from postlane.lanes.models import (
    DomainReport,
    LaneStatus,
    ProviderReport,
    ThrottleReport,
)
from postlane.metrics import count_failure, count_sent, failure_kind, observe_smtp_transaction
from postlane.names import Activity, EmailMessages, LaneMessages
from postlane.tokens import TokenKeys, fill_unsubscribe_token

log = structlog.get_logger(__name__)

HEARTBEAT_EVERY = 1.0
"""Seconds between heartbeats while a transaction is in flight (timeout is 5 s)."""
IDLE_TIMEOUT = 30.0
"""Pooled connections idle longer than this are closed rather than reused."""
QUIT_TIMEOUT = 5.0
"""Seconds to wait for the server's 221 to QUIT before closing the socket anyway."""
ACCEPTED_SIGNAL = EmailMessages.DELIVERY_ACCEPTED
"""Signal to the email's workflow, sent as soon as the server accepted DATA (the receipt)."""
ACCEPTED_SIGNAL_TIMEOUT = timedelta(seconds=10)
"""How long the signal may take; after that the completion is the acceptance's record."""

_NETWORK_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError)
CIRCUIT_FRESH = 1.0
"""Seconds a worker trusts the circuit state it last read from the lane's workflow."""
CIRCUIT_QUERY_TIMEOUT = timedelta(seconds=2)


class SmtpPool:
    """Open, authenticated SMTP connections to one lane's server, reused across sends.

    A remote provider's TCP + TLS handshake and AUTH are paid once per connection instead of
    once per email. At most `lane.max_concurrent` idle connections are kept.
    """

    def __init__(self, lane: LaneConfig) -> None:
        self._lane = lane
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._closing: set[asyncio.Task[None]] = set()  # the loop only keeps weak references
        self._ehlo_name: str | None = lane.ehlo_name
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

    @property
    def server(self) -> str:
        """``host:port`` of the lane's SMTP server."""
        return f"{self._lane.smtp_host}:{self._lane.smtp_port}"

    def release(self, smtp: aiosmtplib.SMTP) -> None:
        """Give back a connection whose last transaction ended (sent, refused or reset)."""
        if smtp.is_connected and len(self._idle) < self._lane.max_concurrent:
            self._idle.append((smtp, time.monotonic()))
        else:
            self.discard(smtp)

    def discard(self, smtp: aiosmtplib.SMTP) -> None:
        """Close `smtp` in the background, with QUIT if it is still connected."""
        task = asyncio.ensure_future(_close(smtp))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _hello_name(self) -> str | None:
        """The name to give in EHLO: the lane's ``ehlo_name``, else this host's FQDN if it
        is a real one, else the lane's sender domain; None means the connection's own
        address literal (decided once per pool: ``getfqdn`` may block on DNS)."""
        if self._ehlo_name is None:
            fqdn = await asyncio.to_thread(socket.getfqdn)
            self._ehlo_name = default_ehlo_name(self._lane, fqdn) or ""
        return self._ehlo_name or None

    async def _connect(self) -> aiosmtplib.SMTP:
        """A new connection: TCP (+ implicit TLS), then STARTTLS and AUTH as the lane says.

        Raises:
            ConfigurationError: the login is missing from the environment, or the server
                does not offer AUTH although the lane has credentials.
            StartTlsUnavailable: the lane requires STARTTLS and the server does not offer it.
        """
        lane = self._lane
        credentials = lane.credentials()  # before connecting: a missing login is not transient
        hello = await self._hello_name()
        smtp = aiosmtplib.SMTP(
            hostname=lane.smtp_host,
            port=lane.smtp_port,
            # A placeholder until connected, when the address literal can be known; without
            # it aiosmtplib would look up getfqdn() (often "localhost") on every connect.
            local_hostname=hello or "localhost",
            use_tls=lane.smtp_tls == "tls",
            # STARTTLS and AUTH are done below, so that a server that does not offer them
            # is a clear error instead of a silently plaintext session or a generic one.
            start_tls=False,
            validate_certs=lane.smtp_verify,
            cert_bundle=lane.smtp_ca_file,
            timeout=lane.smtp_timeout,
        )
        await smtp.connect()
        try:
            if hello is None:
                smtp.local_hostname = _address_literal(smtp)
            if lane.smtp_tls == "starttls":
                await smtp.ehlo()
                if not smtp.supports_extension("starttls"):
                    raise StartTlsUnavailable(
                        f"lane {lane.name!r}: {lane.smtp_host}:{lane.smtp_port} does not offer"
                        " STARTTLS, which smtp_tls = 'starttls' requires"
                    )
                await smtp.starttls()
            if credentials is not None:
                if smtp.is_ehlo_or_helo_needed:
                    await smtp.ehlo()
                if not smtp.supports_extension("auth"):
                    raise ConfigurationError(
                        f"lane {lane.name!r}: {lane.smtp_host}:{lane.smtp_port} does not offer"
                        " AUTH; check smtp_tls and smtp_port"
                    )
                await smtp.login(*credentials)
            if smtp.is_ehlo_or_helo_needed:
                # Greet now, not inside the first MAIL: a refused EHLO is the server's
                # state, and must fail at "connect", not look like a refusal of this mail.
                await _greet(smtp)
        except Exception:
            await _close(smtp)  # a refused login or a missing extension: say goodbye
            raise
        except BaseException:
            smtp.close()
            raise
        self.opened += 1
        return smtp

    async def close(self) -> None:
        """Close every idle connection (QUIT), and wait for those closing already."""
        idle, self._idle = self._idle, []
        for smtp, _ in idle:
            await _close(smtp)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO where the server refuses EHLO (RFC 5321 4.1.4), as aiosmtplib's MAIL
    would do by itself."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


async def _close(smtp: aiosmtplib.SMTP) -> None:
    """QUIT (if the session is still up), then close the socket whatever the answer."""
    with contextlib.suppress(*_NETWORK_ERRORS, RuntimeError):
        if smtp.is_connected:
            await smtp.quit(timeout=QUIT_TIMEOUT)
    smtp.close()


async def _reset(smtp: aiosmtplib.SMTP) -> bool:
    """RSET after a refused transaction; is the session fit to be reused?"""
    if not smtp.is_connected:
        return False
    try:
        await smtp.rset()
    except _NETWORK_ERRORS:
        return False
    return smtp.is_connected


def default_ehlo_name(lane: LaneConfig, fqdn: str) -> str | None:
    """The EHLO name for a lane without ``ehlo_name``.

    This host's `fqdn` if it is fully qualified (has a dot, is no ``localhost``/
    ``localdomain`` name and no IP address); else the domain of the lane's first sender
    (or ``message_id_domain``); else None, meaning the connection's address literal
    (``[192.0.2.1]``, RFC 5321 section 4.1.4).
    """
    name = fqdn.strip().rstrip(".").lower()
    if _is_real_fqdn(name):
        return name
    for pattern in lane.senders:
        domain = pattern.rpartition("@")[2].lower()
        if "@" in pattern and domain and "*" not in domain:
            return domain
    return lane.message_id_domain


def _is_real_fqdn(name: str) -> bool:
    if "." not in name or name.startswith("localhost") or name.endswith(".localdomain"):
        return False
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return False
    return True


def _address_literal(smtp: aiosmtplib.SMTP) -> str:
    """``[ip]`` of this end of the connection (``[IPv6:...]`` for IPv6)."""
    sockname = smtp.transport.get_extra_info("sockname") if smtp.transport else None
    if not sockname:
        return "[127.0.0.1]"
    address = ipaddress.ip_address(str(sockname[0]).split("%")[0])
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


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

    def __init__(self, settings: Settings, client: Client | None = None) -> None:
        """Args:
        settings: the lanes, with their SMTP servers.
        client: if given, a provider's "slow down" is reported to the lane's workflow,
            which then slows the whole lane (not just this email).
        """
        self._settings = settings
        self._client = client
        self._pools: dict[str, SmtpPool] = {}
        self._tokens: TokenKeys | None = None
        self._circuits: dict[str, tuple[str, float]] = {}
        """Lane → (circuit state, when read), for lanes with a failover lane."""
        self._down_streak: dict[str, int] = {}
        """Lane → refused / timed-out connections in a row (this worker)."""
        self._deferral_streak: dict[tuple[str, str], int] = {}
        """(lane, recipient domain) → 4xx replies at RCPT in a row (this worker)."""
        self._guard = SendGuard(client)

    def pool(self, lane: str) -> SmtpPool:
        """The connection pool of `lane` (created on first use)."""
        if lane not in self._pools:
            self._pools[lane] = SmtpPool(self._settings.lane(lane))
        return self._pools[lane]

    async def close(self) -> None:
        """Close every pooled connection."""
        for pool in self._pools.values():
            await pool.close()

    @activity.defn(name=Activity.SEND_EMAIL)
    async def send_email(self, req: SmtpSendRequest) -> DeliveryReceipt:
        """Deliver one email over SMTP and return what the server accepted.

        As soon as the server accepts DATA, the receipt is signalled to the email's
        workflow (``delivery_accepted``), so it is in Temporal before this attempt
        completes. A retry (attempt 2 and later) first looks for that signal in the
        workflow's history, or for an "accepted" heartbeat, and returns that receipt
        instead of sending again.

        Raises:
            ApplicationError: typed by `ErrorType`; see `activities.smtp_errors`.
        """
        info = activity.info()
        try:
            req = self._sealed(req, info.workflow_id or "")
        except ConfigurationError as exc:
            raise ApplicationError(
                str(exc), type=ErrorType.CONFIGURATION, non_retryable=True
            ) from None
        # Every line logged while this attempt runs (the SDK's too) says which email it is.
        with structlog.contextvars.bound_contextvars(
            workflow_id=info.workflow_id,
            run_id=info.workflow_run_id,
            lane=req.lane,
            attempt=info.attempt,
            message_id=req.message_id,
        ):
            return await self._send_email(req, info)

    def _sealed(self, req: SmtpSendRequest, workflow_id: str) -> SmtpSendRequest:
        """`req` with what only the worker can make: the sealed Message-ID (when asked
        for) and the unsubscribe token in place of its placeholder. Both are the same on
        every attempt, and neither enters the workflow's history as input.

        Raises:
            ConfigurationError: they are needed and no token secret is configured.
        """
        if self._tokens is None:
            self._tokens = TokenKeys.from_settings(self._settings)
        update: dict[str, Any] = {}
        if req.seal_message_id:
            domain = req.email.sender.rsplit("@", 1)[1]
            update["message_id"] = self._tokens.message_id(workflow_id, domain)
        email = fill_unsubscribe_token(req.email, workflow_id, self._tokens)
        if email is not req.email:
            update["email"] = email
        return req.model_copy(update=update) if update else req

    async def _send_email(self, req: SmtpSendRequest, info: activity.Info) -> DeliveryReceipt:
        earlier = _accepted_earlier(info.heartbeat_details)
        if earlier is None and info.attempt > 1:
            earlier = await self._recorded_acceptance(req)
        if earlier is not None:
            log.info("email.already_accepted", key=req.key, message_id=req.message_id)
            return earlier
        try:
            pool = self.pool(req.lane)
        except ConfigurationError as exc:
            failure = ApplicationError(str(exc), type=ErrorType.LANE_UNKNOWN, non_retryable=True)
            await self._report_attempt(req, failure, "")
            raise failure from exc
        await self._refuse_if_circuit_open(req, info.attempt)
        # Suppressed recipient or paused lane: refused before any connection is made.
        await self._guard.check(req)
        progress = _Progress()
        data = render_message(req.email, req.message_id, datetime.now(UTC))
        meter = activity.metric_meter()
        async with progress.beating():
            began = time.monotonic()
            transaction = asyncio.create_task(
                self._deliver(pool, req, data, progress, info.attempt)
            )
            try:
                # Shielded: once DATA is under way a cancel must not cut the dialogue in half.
                receipt = await asyncio.shield(transaction)
            except ApplicationError as err:
                observe_smtp_transaction(meter, req.lane, time.monotonic() - began)
                if not await self._report_domain(req, err) and err.type == ErrorType.SMTP_THROTTLED:
                    await self._report_throttle(req.lane, err)
                await self._report_provider(req.lane, err)
                await self._report_attempt(req, err, pool.server)
                await self._guard.failed(req, err)
                raise
            except asyncio.CancelledError:
                if progress.details["phase"] in ("data", "accepted"):
                    receipt = await transaction
                else:
                    transaction.cancel()
                    raise
        observe_smtp_transaction(meter, req.lane, time.monotonic() - began)
        self._down_streak.pop(req.lane, None)
        self._deferral_streak.pop((req.lane, _domain_of(req)), None)
        count_sent(meter, req.lane)
        await self._guard.sent(req, receipt)
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

    async def _record_acceptance(self, req: SmtpSendRequest, receipt: DeliveryReceipt) -> None:
        """Signal the receipt to the email's workflow before the attempt completes.

        A heartbeat would not do: the SDK holds heartbeats back for up to 0.8 x the
        heartbeat timeout, so a worker killed now would take "accepted" with it. A signal
        is in the workflow's history when the call returns; from then on no retry sends.
        """
        info = activity.info()
        if self._client is None or info.workflow_id is None:
            return
        try:
            await self._client.get_workflow_handle(
                info.workflow_id, run_id=info.workflow_run_id
            ).signal(ACCEPTED_SIGNAL, receipt, rpc_timeout=ACCEPTED_SIGNAL_TIMEOUT)
        except RPCError as exc:  # the completion may still get through; a retry would resend
            log.warning("email.acceptance_not_recorded", key=req.key, lane=req.lane, error=str(exc))

    async def _recorded_acceptance(self, req: SmtpSendRequest) -> DeliveryReceipt | None:
        """The receipt an earlier attempt signalled (``delivery_accepted``), if any.

        Read from the workflow's history on the server, so it needs no workflow worker.

        Raises:
            ApplicationError: transient; the history could not be read, and sending
                without knowing could send the email twice.
        """
        info = activity.info()
        if self._client is None or info.workflow_id is None:
            return None
        handle = self._client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
        try:
            async for event in handle.fetch_history_events():
                if not event.HasField("workflow_execution_signaled_event_attributes"):
                    continue
                signaled = event.workflow_execution_signaled_event_attributes
                if signaled.signal_name != ACCEPTED_SIGNAL or not signaled.input.payloads:
                    continue
                decoded = await self._client.data_converter.decode(
                    signaled.input.payloads, [DeliveryReceipt]
                )
                receipt = decoded[0]
                if isinstance(receipt, DeliveryReceipt) and receipt.message_id == req.message_id:
                    return receipt
        except RPCError as exc:
            count_failure(activity.metric_meter(), req.lane, failure_kind(ErrorType.SMTP_TRANSIENT))
            log.warning(
                "email.attempt_failed",
                lane=req.lane,
                key=req.key,
                attempt=info.attempt,
                reply=f"cannot read the workflow's history: {exc}",
                error_type=ErrorType.SMTP_TRANSIENT,
                phase="connect",
                retryable=True,
            )
            raise ApplicationError(
                f"cannot tell whether an earlier attempt was accepted: {exc}",
                {"attempt": info.attempt, "phase": "connect"},
                type=ErrorType.SMTP_TRANSIENT,
            ) from exc
        return None

    async def _report_attempt(
        self, req: SmtpSendRequest, err: ApplicationError, smtp_server: str
    ) -> None:
        """Log this failed attempt as one line and tell the email's workflow (best effort).

        Temporal's history keeps only the last failure of a retried activity; the workflow
        keeps the recent ones for ``postlane status``.
        """
        info = activity.info()
        details = err.details[0] if err.details and isinstance(err.details[0], dict) else {}
        phase = details.get("phase")
        count_failure(activity.metric_meter(), req.lane, failure_kind(err.type))
        log.warning(
            "email.attempt_failed",
            lane=req.lane,
            key=req.key,
            attempt=info.attempt,
            reply=err.message,
            error_type=err.type,
            phase=phase,
            smtp_server=smtp_server,
            retryable=not err.non_retryable,
        )
        if self._client is None or info.workflow_id is None:
            return
        record = AttemptRecord(
            attempt=info.attempt,
            at=datetime.now(UTC),
            reply=err.message,
            smtp_server=smtp_server,
            worker=self._client.identity,
            phase=phase if isinstance(phase, str) else None,
            error_type=err.type,
        )
        try:
            await self._client.get_workflow_handle(
                info.workflow_id, run_id=info.workflow_run_id
            ).signal(EmailMessages.ATTEMPT_FAILED, record)
        except RPCError as exc:  # the email goes on (or has ended) regardless
            log.warning("email.attempt_not_reported", key=req.key, error=str(exc))

    async def _report_throttle(self, lane: str, err: ApplicationError) -> None:
        # The attempt's own line (email.attempt_failed) says it was throttled.
        if self._client is None:
            return
        report = ThrottleReport(reply=err.message, retry_after=err.next_retry_delay)
        try:
            await self._client.get_workflow_handle(lane_workflow_id(lane)).signal(
                LaneMessages.THROTTLED, report
            )
        except RPCError as exc:  # best effort: the email itself is retried regardless
            log.warning("lane.throttle_not_reported", lane=lane, error=str(exc))

    async def _refuse_if_circuit_open(self, req: SmtpSendRequest, attempt: int) -> None:
        """Fail at once, for the workflow to move the email, if the lane's circuit is open.

        Raises:
            ApplicationError: `ErrorType.CIRCUIT_OPEN` (not retryable), naming the lane's
                failover lane in its details.
        """
        lane = self._settings.lane(req.lane)
        if lane.failover is None or req.failover_from:
            return  # a send that failed over already never moves again
        state = await self._circuit(req.lane)
        if state == "closed":
            return
        log.info("email.failing_over", lane=req.lane, failover=lane.failover, circuit=state)
        raise ApplicationError(
            f"lane {req.lane!r}: provider down (circuit {state}); moving to lane {lane.failover!r}",
            {"attempt": attempt, "phase": "connect", "failover": lane.failover},
            type=ErrorType.CIRCUIT_OPEN,
            non_retryable=True,
        )

    async def _circuit(self, lane: str) -> str:
        """The lane's circuit state as its workflow holds it (read at most every second)."""
        cached = self._circuits.get(lane)
        if cached is not None and time.monotonic() - cached[1] < CIRCUIT_FRESH:
            return cached[0]
        state = "closed"
        if self._client is not None:
            try:
                status = await self._client.get_workflow_handle(lane_workflow_id(lane)).query(
                    LaneMessages.STATUS, result_type=LaneStatus, rpc_timeout=CIRCUIT_QUERY_TIMEOUT
                )
                state = status.circuit
            except RPCError as exc:  # no lane workflow answering: send on the lane itself
                log.warning("lane.circuit_unknown", lane=lane, error=str(exc))
        self._circuits[lane] = (state, time.monotonic())
        return state

    async def _report_domain(self, req: SmtpSendRequest, err: ApplicationError) -> bool:
        """Tell the lane a recipient domain throttles or keeps deferring; True if it does.

        Only replies at RCPT are the recipient domain's: one at connect or MAIL is the
        provider's, and slows the whole lane.
        """
        details = err.details[0] if err.details and isinstance(err.details[0], dict) else {}
        if details.get("phase") != "rcpt" or self._client is None:
            return False
        domain = _domain_of(req)
        if err.type == ErrorType.SMTP_THROTTLED:
            reason = "throttled"
        elif err.type == ErrorType.SMTP_TRANSIENT:
            key = (req.lane, domain)
            self._deferral_streak[key] = self._deferral_streak.get(key, 0) + 1
            if self._deferral_streak[key] < self._settings.lane(req.lane).domain_deferrals:
                return False
            self._deferral_streak.pop(key, None)
            reason = "deferrals"
        else:
            return False
        report = DomainReport(domain=domain, reply=err.message, reason=reason)
        try:
            await self._client.get_workflow_handle(lane_workflow_id(req.lane)).signal(
                LaneMessages.DOMAIN_THROTTLED, report
            )
        except RPCError as exc:  # best effort: the email itself is retried regardless
            log.warning("lane.domain_not_reported", lane=req.lane, domain=domain, error=str(exc))
        log.warning("lane.domain_backoff", lane=req.lane, domain=domain, reason=reason)
        return True

    async def _report_provider(self, lane: str, err: ApplicationError) -> None:
        """Count a refused or timed-out connection (a TLS failure counts in full); tell the
        lane its provider is down after ``failover_after`` in a row."""
        config = self._settings.lane(lane)
        details = err.details[0] if err.details and isinstance(err.details[0], dict) else {}
        if config.failover is None or details.get("phase") != "connect":
            return
        if err.type == ErrorType.SMTP_TLS:
            streak = config.failover_after
        elif err.type == ErrorType.SMTP_TRANSIENT:
            streak = self._down_streak.get(lane, 0) + 1
        else:
            return
        if streak < config.failover_after:
            self._down_streak[lane] = streak
            return
        self._down_streak.pop(lane, None)
        self._circuits.pop(lane, None)
        log.warning("lane.provider_down", lane=lane, reply=err.message, failover=config.failover)
        if self._client is None:
            return
        try:
            await self._client.get_workflow_handle(lane_workflow_id(lane)).signal(
                LaneMessages.PROVIDER_DOWN, ProviderReport(reply=err.message)
            )
        except RPCError as exc:
            log.warning("lane.provider_down_not_reported", lane=lane, error=str(exc))

    @activity.defn(name=Activity.PROBE_SMTP)
    async def probe_smtp(self, lane: str) -> str:
        """Open (and QUIT) one connection to the lane's server: is the provider back?

        Returns:
            ``host:port`` of the server that answered.

        Raises:
            ApplicationError: the provider still cannot be reached (typed as a send's).
        """
        pool = SmtpPool(self._settings.lane(lane))
        try:
            smtp = await pool._connect()
        except ConfigurationError as exc:
            raise config_failure(exc, attempt=1, phase="connect") from exc
        except _NETWORK_ERRORS as exc:
            raise classify(exc, attempt=1, phase="connect") from exc
        await _close(smtp)
        log.info("lane.probe_succeeded", lane=lane, smtp_server=pool.server)
        return pool.server

    async def _deliver(
        self, pool: SmtpPool, req: SmtpSendRequest, data: bytes, progress: _Progress, attempt: int
    ) -> DeliveryReceipt:
        for fresh in (False, True):
            progress.set("connect")
            try:
                smtp, reused = await pool.acquire(fresh=fresh)
            except ConfigurationError as exc:
                raise config_failure(exc, attempt=attempt, phase="connect") from exc
            except _NETWORK_ERRORS as exc:
                raise classify(exc, attempt=attempt, phase="connect") from exc
            try:
                receipt = await self._transaction(smtp, req, data, progress, attempt)
            except _NETWORK_ERRORS as exc:
                phase = progress.details["phase"]
                # A pooled connection the server dropped (or said 421 on) while idle: nothing
                # was sent yet, so try once more on a new connection instead of failing the
                # attempt and waiting for a retry.
                if reused and phase == "mail" and _stale(exc):
                    await _close(smtp)
                    continue
                failure = classify(exc, attempt=attempt, phase=phase)
                # A refusal (e.g. "450 4.7.1 slow down" at MAIL) ends the transaction, not
                # the session: reset it and keep the connection, so that a throttled lane
                # does not also open a TCP + TLS + AUTH session per retry.
                if isinstance(exc, aiosmtplib.SMTPResponseException) and await _reset(smtp):
                    pool.release(smtp)
                else:
                    await _close(smtp)
                raise failure from exc
            except ApplicationError:
                # Every recipient was refused; the transaction was reset if it could be.
                if smtp.is_connected:
                    pool.release(smtp)
                else:
                    smtp.close()
                raise
            except BaseException:
                # Cancelled mid-command: the reply is still owed, so the session cannot be
                # reused; QUIT in the background.
                pool.discard(smtp)
                raise
            try:
                await self._record_acceptance(req, receipt)
            finally:
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
        options, encoding = await smtputf8_options(smtp, req.email, attempt=attempt)
        await smtp.mail(req.email.sender, options=options, encoding=encoding)
        progress.set("rcpt")
        accepted: list[str] = []
        rejected: dict[str, str] = {}
        for rcpt in envelope_recipients(req.email.recipients):
            try:
                await smtp.rcpt(rcpt, encoding=encoding)
                accepted.append(rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                if exc.code == 421 or not smtp.is_connected:
                    raise  # the server is closing the session: it refused the transaction
                rejected[rcpt] = f"{exc.code} {exc.message}"
        if not accepted:
            if not await _reset(smtp):
                await _close(smtp)
            # Temporary refusals (4xx) of any recipient are worth retrying; all-5xx are not.
            # Among 4xx a "slow down" wins: its hint says when to come back.
            refusal = min(
                rejected.values(),
                key=lambda r: (int(r[:3]) >= 500, not is_throttle(int(r[:3]), r[4:])),
            )
            raise reply_failure(int(refusal[:3]), refusal[4:], attempt=attempt, phase="rcpt")
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


async def smtputf8_options(
    smtp: aiosmtplib.SMTP, email: Email, *, attempt: int
) -> tuple[list[str], str]:
    """MAIL FROM options and address encoding: ``SMTPUTF8`` (and ``BODY=8BITMIME``) and
    UTF-8 when an address has a non-ASCII local part (RFC 6531), nothing and ASCII otherwise.

    Raises:
        ApplicationError: `ErrorType.SMTPUTF8_UNSUPPORTED`, not retryable, naming the
            address, when the server does not offer SMTPUTF8.
    """
    address = email.smtputf8_address
    if address is None:
        return [], "ascii"
    if smtp.is_ehlo_or_helo_needed:
        await smtp.ehlo()
    if not smtp.supports_extension("smtputf8"):
        raise ApplicationError(
            f"{address}: a non-ASCII local part needs SMTPUTF8, which"
            f" {smtp.hostname}:{smtp.port} does not offer",
            {"attempt": attempt, "phase": "mail"},
            type=ErrorType.SMTPUTF8_UNSUPPORTED,
            non_retryable=True,
        )
    # The UTF-8 octets in the header are 8-bit data: declare them as Python's smtplib does
    # (a server offering SMTPUTF8 must offer 8BITMIME too, RFC 6531 section 3.1).
    body = ["BODY=8BITMIME"] if smtp.supports_extension("8bitmime") else []
    return ["SMTPUTF8", *body], "utf-8"


def envelope_recipients(addresses: list[str]) -> list[str]:
    """`addresses` without repeats (domains compare case-insensitively), in order.

    An address in both To and Bcc must get one RCPT TO, or many servers deliver it twice.
    """
    seen: set[str] = set()
    unique: list[str] = []
    for address in addresses:
        local, _, domain = address.rpartition("@")
        norm = f"{local}@{domain.lower()}"
        if norm not in seen:
            seen.add(norm)
            unique.append(address)
    return unique


def _domain_of(req: SmtpSendRequest) -> str:
    """The recipient domain a send is keyed by (its fairness key on the lane's queue)."""
    return req.email.recipient_domains[0][:64]


def _stale(exc: BaseException) -> bool:
    """Does `exc` at MAIL on a reused connection mean the server had closed it while idle?"""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code == 421
    return True


def _accepted_earlier(details: Any) -> DeliveryReceipt | None:
    """The receipt a previous attempt heartbeated after DATA was accepted, if any."""
    for item in reversed(list(details or [])):
        if isinstance(item, dict) and item.get("phase") == "accepted" and "receipt" in item:
            return DeliveryReceipt.model_validate(item["receipt"])
    return None
