"""A local SMTP server that catches mail: the dev stack's inbox and the tests' real SMTP peer.

It speaks real SMTP over a socket (aiosmtpd). Besides keeping every message (in memory and,
optionally, as .eml files), it can be scripted to misbehave the way providers do: reply
4xx/5xx at a given phase, refuse some recipients, drop the connection, answer slowly, or
leave a command unanswered until told.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from postlane.dev import wire
from postlane.dev.wire import InvalidWireMessage

Phase = Literal["ehlo", "mail", "rcpt", "data"]


@dataclass
class SmtpSession:
    """One client connection as the catcher saw it: the commands in order.

    Counted at the socket level, so a test can check how a client behaves as an SMTP
    citizen (sessions opened, EHLO name, RSET after a refusal, QUIT before closing).
    """

    peer: str
    commands: list[str] = field(default_factory=list)
    """Verbs received, in order: ``EHLO``, ``HELO``, ``MAIL``, ``RCPT``, ``DATA``,
    ``RSET``, ``QUIT`` (AUTH and STARTTLS are not listed)."""
    hello_names: list[str] = field(default_factory=list)
    """The names the client gave in EHLO or HELO."""
    closed: bool = False
    """The connection has ended (either side closed it)."""

    @property
    def quit(self) -> bool:
        """The client said QUIT."""
        return "QUIT" in self.commands

    def count(self, verb: str) -> int:
        """How many times the client sent `verb`."""
        return self.commands.count(verb.upper())


@dataclass(frozen=True)
class CaughtMessage:
    """One message the catcher accepted."""

    sender: str
    recipients: list[str]
    raw: bytes
    """The bytes the server received after DATA, exactly (only the SMTP dot-stuffing of the
    transfer undone): assert on these, or on `headers`, for what went over the wire."""
    received_at: float
    """`time.time()` when DATA was accepted."""
    tls: bool = False
    """The message came over an encrypted connection (implicit TLS or STARTTLS)."""
    login: str | None = None
    """The user name the client authenticated as (AUTH), if it did."""
    mail_options: tuple[str, ...] = ()
    """The MAIL FROM parameters, e.g. ``("SMTPUTF8",)``."""
    wire_problems: tuple[str, ...] = ()
    """What `postlane.dev.wire.check_message` found wrong with `raw` (empty: valid)."""

    def headers(self, name: str) -> list[bytes]:
        """The raw values of the header fields named `name`, exactly as received: the bytes
        after the colon, folding (CRLF + white space) included."""
        return [f.raw for f in wire.headers(self.raw, name)]

    def header(self, name: str) -> str:
        """The one field named `name`, unfolded (CRLFs removed) but not decoded.

        Raises:
            AssertionError: the message has no such field, or more than one.
        """
        found = wire.headers(self.raw, name)
        assert len(found) == 1, f"{len(found)} {name} fields in {self.message_id}"
        return found[0].value

    @property
    def message(self) -> EmailMessage:
        """The message as Python's email package decodes it (encoded-words decoded,
        folding undone): convenient for content, blind to how the headers were written."""
        parsed = message_from_bytes(self.raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def message_id(self) -> str:
        """The Message-ID header."""
        return str(self.message["Message-ID"])

    @property
    def subject(self) -> str:
        """The Subject header."""
        return str(self.message["Subject"])


@dataclass
class _Fault:
    phase: Phase
    reply: str | None  # None: drop the connection
    delay: float = 0.0
    remaining: int = 1


@dataclass
class _Hold:
    phase: Phase
    after: int  # holds once this many messages were accepted


@dataclass
class _Script:
    faults: list[_Fault] = field(default_factory=list)
    rejected_recipients: dict[str, str] = field(default_factory=dict)
    holds: list[_Hold] = field(default_factory=list)


class _CountingSMTP(SMTP):
    """aiosmtpd's server protocol, telling the catcher when a connection opens and ends."""

    def __init__(self, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._catcher = handler._catcher

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        fresh = self.transport is None  # not the STARTTLS upgrade of an open connection
        super().connection_made(transport)
        if fresh:
            self._catcher._opened(self, str(transport.get_extra_info("peername")))

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._catcher._ended(self)


class _CountingController(Controller):
    def factory(self) -> SMTP:
        return _CountingSMTP(self.handler, **self.SMTP_kwargs)


class _Handler:
    def __init__(self, catcher: SmtpCatcher) -> None:
        self._catcher = catcher

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does itself when there is no hook
        self._catcher._command(server, "EHLO", hostname)
        fault = await self._catcher._fault("ehlo", server)
        return [fault] if fault else responses

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        session.host_name = hostname
        self._catcher._command(server, "HELO", hostname)
        # The "ehlo" phase covers the HELO a client falls back to after a refused EHLO.
        return await self._catcher._fault("ehlo", server) or f"250 {server.hostname}"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._catcher._command(server, "RSET")
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._catcher._command(server, "QUIT")
        return "221 Bye"

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self._catcher._command(server, "MAIL")
        fault = await self._catcher._fault("mail", server)
        if fault:
            return fault
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self._catcher._command(server, "RCPT")
        fault = await self._catcher._fault("rcpt", server)
        if fault:
            return fault
        refusal = self._catcher._script.rejected_recipients.get(address.lower())
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._catcher._command(server, "DATA")
        fault = await self._catcher._fault("data", server)
        if fault:
            return fault
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode()
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        auth = session.auth_data
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        options = tuple(str(o) for o in envelope.mail_options)
        upper = {o.upper() for o in options}
        try:
            problems = wire.check_message(
                raw, smtputf8="SMTPUTF8" in upper, eight_bit="BODY=8BITMIME" in upper
            )
        except Exception as exc:  # a checker bug must not look like a server fault
            problems = [f"the wire checker failed: {exc!r}"]
        self._catcher._accept(
            CaughtMessage(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                raw,
                time.time(),
                tls=tls,
                login=login,
                mail_options=options,
                wire_problems=tuple(problems),
            )
        )
        return "250 2.0.0 OK: queued"


class SmtpCatcher:
    """An SMTP server on loopback that keeps what it is sent.

    Use as a context manager (``with SmtpCatcher() as smtp:``) or call `start`/`stop`.

    Args:
        port: 0 picks a free port.
        maildir: if set, every message is also written there as an .eml file.
        on_message: called (in the server's thread) for every accepted message.
        tls_context: serve implicit TLS (SMTPS) with this context.
        starttls_context: offer STARTTLS with this context.
        logins: if set, offer AUTH (PLAIN, LOGIN; also without TLS) for these
            user name → password pairs; the login is recorded on each `CaughtMessage`.
        smtputf8: offer SMTPUTF8 (RFC 6531); off by default, like a conservative server.
        strict: every accepted message is checked on the wire (`postlane.dev.wire`); reading
            the messages (`messages`, `wait_for`), `clear` and `stop` raise
            `InvalidWireMessage` for each invalid one not reported yet, so the test that
            sent it fails. Off, the problems are only recorded (`wire_problems`).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        maildir: Path | None = None,
        on_message: Callable[[CaughtMessage], None] | None = None,
        tls_context: Any = None,
        starttls_context: Any = None,
        logins: dict[str, str] | None = None,
        smtputf8: bool = False,
        strict: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self._maildir = maildir
        self._on_message = on_message
        self._tls_context = tls_context
        self._starttls_context = starttls_context
        self._logins = dict(logins) if logins is not None else None
        self._messages: list[CaughtMessage] = []
        self._smtputf8 = smtputf8
        self._strict = strict
        self._unreported: list[CaughtMessage] = []
        self._sessions: list[SmtpSession] = []
        self._script = _Script()
        self._held = 0
        self._cond = threading.Condition()
        self._controller: Controller | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> SmtpCatcher:
        """Start serving; `port` then holds the real port."""
        if self.port == 0:
            import socket

            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
        kwargs: dict[str, Any] = {"hostname": self.host, "port": self.port}
        if self._tls_context is not None:
            kwargs["ssl_context"] = self._tls_context
        if self._starttls_context is not None:
            kwargs["tls_context"] = self._starttls_context
            kwargs["require_starttls"] = False
        if self._logins is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_require_tls"] = False
        kwargs["enable_SMTPUTF8"] = self._smtputf8  # aiosmtpd's Controller would say True
        self._controller = _CountingController(_Handler(self), ready_timeout=10, **kwargs)
        self._controller.start()
        with self._cond:
            self._sessions.clear()  # the controller's own readiness probe is no client
        return self

    def stop(self) -> None:
        """Stop serving.

        Raises:
            InvalidWireMessage: (strict) a message broke the wire rules and no read of
                the messages has reported it yet.
        """
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        self._report_invalid()

    def __enter__(self) -> SmtpCatcher:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            with self._cond:
                self._unreported.clear()  # the block's own error says more
        self.stop()

    def _report_invalid(self) -> None:
        with self._cond:
            invalid, self._unreported = self._unreported, []
        if invalid:
            raise InvalidWireMessage(
                "\n".join(
                    f"message {m.message_id!s} to {', '.join(m.recipients)} is invalid on the"
                    f" wire:\n  " + "\n  ".join(m.wire_problems)
                    for m in invalid
                )
            )

    # -- what was caught -------------------------------------------------------------------

    @property
    def messages(self) -> list[CaughtMessage]:
        """Every accepted message so far, oldest first.

        Raises:
            InvalidWireMessage: (strict) one of them broke the wire rules.
        """
        self._report_invalid()
        with self._cond:
            return list(self._messages)

    @property
    def sessions(self) -> list[SmtpSession]:
        """Every connection clients opened so far, oldest first (copies)."""
        with self._cond:
            return [
                dataclasses.replace(s, commands=list(s.commands), hello_names=list(s.hello_names))
                for s in self._sessions
            ]

    def clear(self) -> None:
        """Forget the caught messages, the sessions seen and the script.

        Raises:
            InvalidWireMessage: (strict) one of them broke the wire rules unreported.
        """
        with self._cond:
            self._messages.clear()
            self._sessions.clear()
            self._script = _Script()
        self._report_invalid()

    def clear_script(self) -> None:
        """Forget the script (faults, refused recipients, holds) and keep the caught messages:
        a provider's outage is over."""
        with self._cond:
            self._script = _Script()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[CaughtMessage]:
        """Block until at least `count` messages arrived.

        Raises:
            TimeoutError: they did not arrive within `timeout` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(f"{len(self._messages)} of {count} messages after {timeout}s")
        return self.messages

    async def wait_for_async(
        self,
        count: int,
        timeout: float = 30.0,  # noqa: ASYNC109 (it bounds the waiting thread)
    ) -> list[CaughtMessage]:
        """`wait_for` without blocking the event loop."""
        return await asyncio.to_thread(self.wait_for, count, timeout)

    # -- scripting -------------------------------------------------------------------------

    def fail(self, phase: Phase, reply: str, *, times: int = 1) -> None:
        """Answer the next `times` commands of `phase` with `reply`, e.g. ``"451 4.7.1 slow"``."""
        with self._cond:
            self._script.faults.append(_Fault(phase, reply, remaining=times))

    def drop(self, phase: Phase, *, times: int = 1) -> None:
        """Close the connection instead of answering the next `times` commands of `phase`."""
        with self._cond:
            self._script.faults.append(_Fault(phase, None, remaining=times))

    def delay(self, phase: Phase, seconds: float, *, times: int = 1) -> None:
        """Answer the next `times` commands of `phase` only after `seconds`."""
        with self._cond:
            self._script.faults.append(_Fault(phase, "", delay=seconds, remaining=times))

    def reject_recipient(self, address: str, reply: str = "550 5.1.1 no such user") -> None:
        """Refuse RCPT TO for `address` with `reply` (until `clear`)."""
        with self._cond:
            self._script.rejected_recipients[address.lower()] = reply

    def hold(self, phase: Phase, *, after: int = 0) -> None:
        """Leave every `phase` command unanswered once `after` messages were accepted.

        The commands wait until `clear_script` or `clear` lifts the hold, or until `stop`
        cuts their connections. A test that kills the server while a transaction waits
        at MAIL (see `held`) knows that transaction delivered nothing, unlike a kill that
        may find it inside DATA with the message already kept.
        """
        with self._cond:
            self._script.holds.append(_Hold(phase, after))

    @property
    def held(self) -> int:
        """How many commands a `hold` keeps waiting now."""
        with self._cond:
            return self._held

    # -- internals -------------------------------------------------------------------------

    def _holding(self, phase: Phase) -> bool:
        return any(h.phase == phase and len(self._messages) >= h.after for h in self._script.holds)

    async def _wait_while_held(self, phase: Phase) -> None:
        with self._cond:
            if not self._holding(phase):
                return
            self._held += 1
            self._cond.notify_all()
        try:
            # Polled rather than awaited on an event: `stop` cancels this task (ending the
            # connection), and lifting the hold happens on the caller's thread.
            while True:
                await asyncio.sleep(0.01)
                with self._cond:
                    if not self._holding(phase):
                        return
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    async def _fault(self, phase: Phase, server: SMTP) -> str | None:
        await self._wait_while_held(phase)
        with self._cond:
            fault = next((f for f in self._script.faults if f.phase == phase), None)
            if fault is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._script.faults.remove(fault)
        if fault is None:
            return None
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.reply is None:
            transport = server.transport
            if transport is not None:
                transport.close()
            return "421 closing"  # never reaches the client: the socket is gone
        return fault.reply or None

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        logins = self._logins or {}
        if isinstance(data, LoginPassword):
            login, password = data.login.decode(), data.password.decode()
            if login in logins and logins[login] == password:
                return AuthResult(success=True, auth_data=data)
        return AuthResult(success=False, handled=False)

    def _session_of(self, server: SMTP, peer: str = "?") -> SmtpSession:
        """`server`'s session record; one opened before a `clear` is counted afresh."""
        session: SmtpSession | None = getattr(server, "_postlane_session", None)
        if session is None or not any(s is session for s in self._sessions):
            session = SmtpSession(peer)
            self._sessions.append(session)
            server._postlane_session = session  # type: ignore[attr-defined]
        return session

    def _opened(self, server: SMTP, peer: str) -> None:
        with self._cond:
            self._session_of(server, peer)
            self._cond.notify_all()

    def _ended(self, server: SMTP) -> None:
        with self._cond:
            session = getattr(server, "_postlane_session", None)
            if session is not None:
                session.closed = True
            self._cond.notify_all()

    def _command(self, server: SMTP, verb: str, hello: str | None = None) -> None:
        with self._cond:
            session = self._session_of(server)
            session.commands.append(verb)
            if hello is not None:
                session.hello_names.append(hello)

    def _accept(self, caught: CaughtMessage) -> None:
        if self._maildir is not None:
            self._maildir.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(caught.received_at))
            slug = re.sub(r"[^A-Za-z0-9]+", "-", caught.message_id).strip("-")[:60]
            (self._maildir / f"{stamp}-{slug}.eml").write_bytes(caught.raw)
        with self._cond:
            self._messages.append(caught)
            if caught.wire_problems and self._strict:
                self._unreported.append(caught)
            self._cond.notify_all()
        if self._on_message is not None:
            self._on_message(caught)
