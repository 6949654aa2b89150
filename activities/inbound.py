"""IMAP: read an inbox past a cursor and say what each new message means.

``poll_inbox`` opens one IMAP session (aioimaplib), EXAMINEs the folder read-only (no flag
changes, nothing deleted or moved), lists the UIDs above the cursor, fetches at most
``max_messages`` of them (``BODY.PEEK[]``, capped in size, heartbeating between chunks)
and classifies each one. It
returns the events with their sequence and the new cursor; the watcher workflow delivers
them and keeps the cursor, so the activity itself holds no state.
"""

from __future__ import annotations

import imaplib
import re
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aioimaplib
import structlog
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from activities.guard import counts_against_lane, record_inbound
from postlane.config import InboxConfig, Settings
from postlane.errors import ConfigurationError, ErrorType, SequenceNotFound
from postlane.inbound.classify import classify, route
from postlane.inbound.inboxes import mark_finished
from postlane.inbound.models import (
    InboundItem,
    InboxCursor,
    PollRequest,
    PollResult,
    UnsubscribeRequest,
)
from postlane.names import Activity
from postlane.sequences.models import InboundEvent
from postlane.tokens import TokenKeys

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 1024 * 1024
"""Bytes of each message fetched: headers, the body's start and a DSN's returned headers
fit easily; a large attachment is not worth downloading to find a reply."""

FETCH_CHUNK = 10
"""Messages per FETCH; the poll heartbeats after each, so a dead worker's poll is retried
elsewhere within the heartbeat timeout however large the batch."""

_UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_FETCH_START_RE = re.compile(rb"^\d+ FETCH \(")
_UID_RE = re.compile(rb"\bUID (\d+)")


class ImapError(Exception):
    """The server answered a command with NO or BAD, or not in a way we understand."""


class ImapLoginRefused(ImapError):
    """LOGIN answered NO."""


class InboundActivities:
    """The IMAP side of inbound mail, for the inboxes in this worker's configuration."""

    def __init__(self, settings: Settings, client: Client | None = None) -> None:
        self._settings = settings
        self._client = client
        self._keys: TokenKeys | None = None

    @activity.defn(name=Activity.POLL_INBOX)
    async def poll_inbox(self, req: PollRequest) -> PollResult:
        """Read the messages above the cursor (at most ``req.max_messages``).

        A UIDVALIDITY other than the cursor's means the folder's UIDs were renumbered: it
        is read again from the start (sequences ignore events they already applied).

        Raises:
            ApplicationError: ``InboxUnknownError`` (retried: another host may serve it),
                ``ConfigurationError`` or ``ImapAuthError`` (not retried),
                ``ImapTransientError`` (retried).
        """
        inbox = self._inbox(req.inbox)
        try:
            username, password = inbox.credentials()
            if self._keys is None:
                self._keys = TokenKeys.from_settings(self._settings)
        except ConfigurationError as exc:
            raise ApplicationError(
                str(exc), type=ErrorType.CONFIGURATION, non_retryable=True
            ) from None
        bound = log.bind(inbox=inbox.name, folder=inbox.folder)
        verdicts: list[InboundEvent] = []
        try:
            async with _session(inbox, username, password) as imap:
                result = await _poll(imap, inbox, req, bound, self._keys, verdicts)
        except ImapLoginRefused:
            raise ApplicationError(
                f"inbox {inbox.name}: the IMAP server refused the login of ${inbox.username_env}",
                type=ErrorType.IMAP_AUTH,
                non_retryable=True,
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise ApplicationError(
                f"inbox {inbox.name}: {exc.verify_message or exc}",
                type=ErrorType.CONFIGURATION,
                non_retryable=True,
            ) from None
        except (OSError, TimeoutError, ImapError, aioimaplib.AioImapException) as exc:
            raise ApplicationError(
                f"inbox {inbox.name}: {type(exc).__name__}: {exc}", type=ErrorType.IMAP_TRANSIENT
            ) from None
        if self._client is None:
            return result
        # Hard bounces and complaints of any email (one-off or a sequence's): the lane's
        # reputation guard counts them and the recipient is suppressed for the sender.
        await record_inbound(self._client, verdicts)
        return result.model_copy(update={"items": await mark_finished(self._client, result.items)})

    @activity.defn(name=Activity.RECORD_UNSUBSCRIBE)
    async def record_unsubscribe(self, req: UnsubscribeRequest) -> bool:
        """Unsubscribe for a sequence the watcher could not signal (it has finished):
        its recipient is still suppressed for the sender's future sequences.

        Returns:
            False if no sequence has this key.
        """
        from postlane.client import PostlaneClient

        if self._client is None:
            raise ApplicationError(
                "record_unsubscribe needs a Temporal client", type=ErrorType.CONFIGURATION
            )
        try:
            await PostlaneClient(self._client, self._settings).sequences.unsubscribe(
                req.key, reason=req.reason
            )
        except SequenceNotFound:
            return False
        return True

    def _inbox(self, name: str) -> InboxConfig:
        for inbox in self._settings.inboxes:
            if inbox.name == name:
                return inbox
        raise ApplicationError(
            f"this worker has no inbox named {name!r}", type=ErrorType.INBOX_UNKNOWN
        )


async def _poll(
    imap: _Imap,
    inbox: InboxConfig,
    req: PollRequest,
    bound: Any,
    keys: TokenKeys,
    verdicts: list[InboundEvent] | None = None,
) -> PollResult:
    validity = await imap.examine(inbox.folder)
    cursor = req.cursor
    reset = cursor.uidvalidity is not None and cursor.uidvalidity != validity
    after = 0 if cursor.uidvalidity != validity else cursor.last_uid
    if reset:
        bound.warning("inbound.uidvalidity_changed", was=cursor.uidvalidity, now=validity)
    uids = await imap.uids_after(after)
    batch = uids[: req.max_messages]
    activity.heartbeat(after)
    fetched: list[tuple[int, bytes, datetime | None]] = []
    for start in range(0, len(batch), FETCH_CHUNK):
        fetched += await imap.fetch(batch[start : start + FETCH_CHUNK])
        activity.heartbeat(fetched[-1][0] if fetched else after)
    items: list[InboundItem] = []
    ignored = 0
    for uid, raw, received_at in fetched:
        try:
            event = classify(raw, received_at=received_at, keys=keys)
        except Exception:  # one unreadable message must not stop the inbox
            bound.exception("inbound.unreadable", uid=uid)
            event = None
        if verdicts is not None and event is not None and counts_against_lane(event):
            verdicts.append(event)
        target = route(event, keys) if event is not None else None
        if event is None or target is None:
            ignored += 1
            continue
        bound.info(
            "inbound.classified",
            uid=uid,
            kind=str(event.kind),
            target=target,
            message_id=event.message_id,
        )
        items.append(InboundItem(uid=uid, event=event, target=target))
    last = batch[-1] if batch else after
    return PollResult(
        cursor=InboxCursor(uidvalidity=validity, last_uid=last),
        items=items,
        fetched=len(batch),
        ignored=ignored,
        more=len(uids) > len(batch),
        reset=reset,
    )


# -- the IMAP session ------------------------------------------------------------------------


class _Imap:
    """The few IMAP commands a poll needs, on top of an aioimaplib client."""

    def __init__(self, client: Any, timeout: float) -> None:
        self._client = client
        self._timeout = timeout

    async def examine(self, folder: str) -> int:
        """Open `folder` read-only; return its UIDVALIDITY."""
        protocol = self._client.protocol
        command = aioimaplib.Command(
            "EXAMINE", protocol.new_tag(), _quote(folder), loop=protocol.loop, timeout=self._timeout
        )
        response = await protocol.execute(command)
        _check(response, f"EXAMINE {folder}")
        # aioimaplib only knows SELECT as the way into the selected state; EXAMINE is the
        # same state, read-only (RFC 3501 6.3.2), which is what lets UID commands run.
        protocol.state = aioimaplib.SELECTED
        for line in response.lines:
            match = _UIDVALIDITY_RE.search(bytes(line))
            if match:
                return int(match.group(1))
        raise ImapError(f"EXAMINE {folder}: the server sent no UIDVALIDITY")

    async def uids_after(self, after: int) -> list[int]:
        """UIDs above `after`, ascending (``n:*`` also matches the highest UID when it is
        below n, so the list is filtered here)."""
        response = await self._client.uid_search(f"UID {after + 1}:*", charset=None)
        _check(response, "UID SEARCH")
        found: set[int] = set()
        for line in response.lines[:-1]:
            text = bytes(line).removeprefix(b"SEARCH").strip()
            if re.fullmatch(rb"[\d ]*", text):
                found.update(int(n) for n in text.split())
        return sorted(uid for uid in found if uid > after)

    async def fetch(self, uids: list[int]) -> list[tuple[int, bytes, datetime | None]]:
        """(UID, raw message, INTERNALDATE) of each of `uids`, ascending by UID."""
        if not uids:
            return []
        response = await self._client.uid(
            "fetch",
            ",".join(str(u) for u in uids),
            f"(UID INTERNALDATE BODY.PEEK[]<0.{MAX_MESSAGE_BYTES}>)",
        )
        _check(response, "UID FETCH")
        found: dict[int, tuple[bytes, datetime | None]] = {}
        meta, body = b"", None

        def flush() -> None:
            uid = _UID_RE.search(meta)
            if uid and body is not None:
                found[int(uid.group(1))] = (body, _internaldate(meta))

        for line in response.lines[:-1]:
            if isinstance(line, bytearray):
                body = bytes(line)
            elif _FETCH_START_RE.match(line):
                flush()
                meta, body = line, None
            else:
                meta += b" " + line
        flush()
        return [(uid, *found[uid]) for uid in sorted(found)]


@asynccontextmanager
async def _session(inbox: InboxConfig, username: str, password: str) -> AsyncIterator[_Imap]:
    """Connect (TLS as configured), log in, and log out at the end."""
    context = _ssl_context(inbox) if inbox.imap_tls != "none" else None
    if inbox.imap_tls == "tls":
        client = aioimaplib.IMAP4_SSL(
            host=inbox.imap_host, port=inbox.port, timeout=inbox.imap_timeout, ssl_context=context
        )
    else:
        client = aioimaplib.IMAP4(host=inbox.imap_host, port=inbox.port, timeout=inbox.imap_timeout)
    try:
        await client.wait_hello_from_server()
        if inbox.imap_tls == "starttls":
            assert context is not None
            await _starttls(client, inbox, context)
        response = await client.login(username, password)
        if response.result != "OK":
            raise ImapLoginRefused(_text(response))
        yield _Imap(client, inbox.imap_timeout)
    except BaseException:
        _close(client)  # the connection may be unusable: no LOGOUT to wait for
        raise
    await _logout(client)


async def _starttls(client: Any, inbox: InboxConfig, context: ssl.SSLContext) -> None:
    """RFC 3501 6.2.1: STARTTLS, then the TLS handshake on the same connection, then the
    capabilities again (the ones sent before TLS must not be trusted)."""
    protocol = client.protocol
    if "STARTTLS" not in protocol.capabilities:
        raise ImapError("the server does not offer STARTTLS")
    command = aioimaplib.Command(
        "STARTTLS", protocol.new_tag(), loop=protocol.loop, timeout=inbox.imap_timeout
    )
    _check(await protocol.execute(command), "STARTTLS")
    transport = await protocol.loop.start_tls(
        protocol.transport, protocol, context, server_hostname=inbox.imap_host
    )
    protocol.transport = transport
    await protocol.capability()


async def _logout(client: Any) -> None:
    try:
        await client.logout()
    except (OSError, TimeoutError, aioimaplib.AioImapException):
        pass  # the session is over either way
    _close(client)


def _close(client: Any) -> None:
    transport = getattr(client.protocol, "transport", None)
    if transport is not None:
        transport.close()


def _ssl_context(inbox: InboxConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=inbox.imap_ca_file)
    if not inbox.imap_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _check(response: Any, what: str) -> None:
    if response.result != "OK":
        raise ImapError(f"{what}: {response.result} {_text(response)}")


def _text(response: Any) -> str:
    lines = [bytes(line) for line in response.lines if isinstance(line, bytes | bytearray)]
    return lines[-1].decode(errors="replace")[:200] if lines else ""


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _internaldate(fetch_line: bytes) -> datetime | None:
    """The INTERNALDATE of a FETCH response line, as an aware UTC datetime (or None)."""
    parsed = imaplib.Internaldate2tuple(fetch_line)  # local time, with its DST flag
    return None if parsed is None else datetime.fromtimestamp(time.mktime(parsed), UTC)
