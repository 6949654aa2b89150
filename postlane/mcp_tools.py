"""Postlane as MCP tools, for agents: ``postlane mcp`` (docs/mcp.md).

Eight tools mirror the client API: `send_email`, `email_status`, `list_dead_letters`,
`retry_email`, `cancel_email`, `start_sequence`, `sequence_status` and `list_replies`.
Each has a JSON input schema, a description written for the model that calls it, and a
typed output schema. Every anticipated failure (bad input, an unknown key, a refused
action, Temporal unreachable) comes back as a tool error (``isError``) whose text names
the field, ``to[0]: 'x' is not a valid email address``, and whose structured content
says the same as ``{"error", "field", "reason"}``; nothing was started.

The server holds no state of its own: every answer comes from Temporal, and the
idempotency key is the workflow ID, so a tool called twice with one key sends once.
"""

from __future__ import annotations

import asyncio
import difflib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.context import Context
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp_types import CallToolResult, InputRequiredResult, TextContent, ToolAnnotations
from mcp_types import Tool as MCPTool
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.service import RPCError

from postlane.client import CancelResult, PostlaneClient
from postlane.config import Settings
from postlane.email.models import Email, EmailReport, EmailStatus
from postlane.errors import (
    ActionRefused,
    ConfigurationError,
    EmailNotFound,
    IdempotencyConflict,
    InvalidInput,
    PostlaneError,
    RecipientSuppressed,
    SequenceNotFound,
)
from postlane.ids import MAX_KEY_LENGTH, email_workflow_id, sequence_workflow_id, validate_key
from postlane.senders import SenderScope, sender_of
from postlane.sequences.directory import SpecDirectory
from postlane.sequences.models import InboundEvent, SequenceReport, SequenceStatus
from postlane.sequences.spec import Recipient

_T = TypeVar("_T")

SERVER_NAME = "postlane"
TOOL_NAMES = (
    "send_email",
    "email_status",
    "list_dead_letters",
    "retry_email",
    "cancel_email",
    "start_sequence",
    "sequence_status",
    "list_replies",
)
"""Every tool `build_server` registers, in the order they are listed."""
DEFAULT_CANCEL_WAIT = 20.0
"""Seconds `cancel_email` waits for the email to stop, unless told otherwise."""

_INSTRUCTIONS = """\
Postlane sends email durably: each email is a workflow keyed by your idempotency key, sent \
once, retried on temporary failures, and dead-lettered if it keeps failing. Pick a key that \
names the email (e.g. "welcome-user-42"); repeat the same key when you are unsure whether a \
previous call went through: it never sends twice. Use email_status to follow an email, \
list_dead_letters / retry_email / cancel_email to handle trouble, and start_sequence / \
sequence_status / list_replies for multi-step sequences that stop when the recipient replies."""

_STATUSES = """\
Statuses: queued (waiting for its lane), scheduled (waits for send_at), sending (an SMTP \
attempt is under way), retrying (a temporary failure; it will try again), sent (the SMTP \
server accepted it: final), dead_letter (retries ran out; waits for retry_email or \
cancel_email), failed (refused for good, e.g. a 5xx reply: final), cancelled (final)."""


# -- results ---------------------------------------------------------------------------------


class SendEmailResult(BaseModel):
    """What `send_email` did."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    key: str = Field(description="The idempotency key the email is known by.")
    workflow_id: str = Field(description="The Temporal workflow ID: email:<key>.")
    status: EmailStatus = Field(description="The email's status right after the call.")
    duplicate: bool = Field(
        description="True: an email with this key already existed (the same content), so "
        "nothing new was sent; status is that email's."
    )
    send_at: datetime | None = Field(
        default=None, description="When it is scheduled to go out (UTC), if it was scheduled."
    )


class DeadLetterList(BaseModel):
    """The emails parked in the dead-letter state."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    count: int = Field(description="How many emails are dead-lettered (with these filters).")
    emails: list[EmailReport] = Field(
        description="Up to `limit` of them in detail, the longest parked first."
    )


class RetryEmailResult(BaseModel):
    """What `retry_email` did."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    key: str
    retried: bool = Field(description="True: the email is going out again.")
    status: EmailStatus = Field(description="The email's status after the retry.")


class StartSequenceResult(BaseModel):
    """What `start_sequence` did."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    key: str = Field(
        description="The sequence's key: use it with sequence_status and list_replies."
    )
    workflow_id: str = Field(description="The Temporal workflow ID: sequence:<key>.")
    spec: str = Field(description="The name of the spec the recipient was enrolled in.")
    created: bool = Field(
        description="True: this call enrolled the recipient; false: the key was already "
        "enrolled (the same spec and recipient), so nothing new was started."
    )


class RepliesResult(BaseModel):
    """The replies a sequence received."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    key: str
    status: SequenceStatus = Field(description="The sequence's status (replied once it stopped).")
    replies: list[InboundEvent] = Field(
        description="Human replies, oldest first: from_address, subject, text (its start), "
        "received_at, message_id."
    )
    auto_replies: int = Field(description="Out-of-office and other automatic answers (ignored).")


class ToolProblem(BaseModel):
    """The structured content of a tool error."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    error: str = Field(description="The kind of error, e.g. InvalidEmail or EmailNotFound.")
    field: str = Field(description="The offending input field, e.g. to[0], key or sender.")
    reason: str = Field(description="What is wrong with it.")


class _Problem(ToolError):
    """An anticipated tool failure naming the field; nothing was started or changed."""

    def __init__(self, error: str, field: str, reason: str) -> None:
        self.problem = ToolProblem(error=error, field=field, reason=reason)
        super().__init__(f"{field}: {reason}")

    def result(self) -> CallToolResult:
        return CallToolResult(
            content=[TextContent(type="text", text=str(self))],
            structured_content=self.problem.model_dump(),
            is_error=True,
        )


# -- the server --------------------------------------------------------------------------------


class PostlaneMCPServer(MCPServer[Any]):
    """`MCPServer` whose anticipated tool failures are ``isError`` results naming the field."""

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        """Call a tool; a bad argument or a `_Problem` becomes an error result naming the field.

        Raises:
            ToolError: an unknown tool (the SDK's own error result).
            UnexpectedToolError: a crash inside a tool (the SDK answers a generic error
                result and logs the traceback).
        """
        unknown = await self._unknown_arguments(name, arguments)
        if unknown:
            # The SDK drops arguments a tool does not declare: a misspelt ``sendAt`` would
            # send at once. Refuse it, naming it, before the tool runs.
            declared = await self._arguments(name)
            close = difflib.get_close_matches(unknown[0].lower(), sorted(declared), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return _Problem(
                "InvalidInput",
                unknown[0],
                f"is not an argument of {name} (arguments: {', '.join(sorted(declared))}){hint}",
            ).result()
        try:
            return await super().call_tool(name, arguments, context)
        except UnexpectedToolError:
            raise
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, _Problem):
                return cause.result()
            if isinstance(cause, ValidationError):
                err = cause.errors()[0]
                reason = str(err["msg"]).removeprefix("Value error, ")
                return _Problem("InvalidInput", _loc(err["loc"]) or "arguments", reason).result()
            raise

    async def list_tools(self) -> list[MCPTool]:
        """The tools, each input schema saying it takes no argument it does not declare."""
        return [
            tool.model_copy(
                update={"input_schema": {**tool.input_schema, "additionalProperties": False}}
            )
            for tool in await super().list_tools()
        ]

    async def _arguments(self, name: str) -> set[str]:
        """The arguments tool `name` declares (none for an unknown tool)."""
        for tool in await super().list_tools():
            if tool.name == name:
                return set(tool.input_schema.get("properties", {}))
        return set()

    async def _unknown_arguments(self, name: str, arguments: dict[str, Any]) -> list[str]:
        """The arguments given that tool `name` does not declare ([] for an unknown tool:
        the SDK answers that one)."""
        declared = await self._arguments(name)
        return [arg for arg in arguments if arg not in declared] if declared else []


def _loc(parts: Sequence[int | str]) -> str:
    """``("to", 0)`` → ``to[0]``; ``("headers", "X")`` → ``headers.X``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Connection:
    """One `PostlaneClient`, connected on first use (and again after a failed attempt), so
    the server starts, and lists its tools, while Temporal is still down."""

    def __init__(self, connect: Callable[[], Awaitable[PostlaneClient]]) -> None:
        self._connect = connect
        self._client: PostlaneClient | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> PostlaneClient:
        async with self._lock:
            if self._client is None:
                try:
                    self._client = await self._connect()
                except (RuntimeError, ValueError, OSError, RPCError) as exc:
                    # ValueError: the TEMPORAL_* variables (TLS files, profile) are wrong.
                    raise _Problem("Unavailable", "temporal", str(exc)) from None
            return self._client


def _check_sender(scope: SenderScope, sender: str, field: str = "sender") -> None:
    """Raise a tool error naming `field` unless `sender` is in `scope`."""
    if not scope.allows(sender):
        raise _Problem(
            "SenderNotAllowed",
            field,
            f"{sender!r} is not a sender this server may send as (allowed: {scope})",
        )


def _as_problem(exc: BaseException) -> _Problem:
    """A Postlane (or Temporal) error as a tool error naming the field."""
    name = type(exc).__name__
    if isinstance(exc, _Problem):
        return exc
    if isinstance(exc, InvalidInput):
        return _Problem(name, exc.field, exc.reason)
    if isinstance(exc, (IdempotencyConflict, EmailNotFound, SequenceNotFound)):
        return _Problem(name, "key", str(exc))
    if isinstance(exc, ActionRefused):
        return _Problem(name, "key", exc.reason)
    if isinstance(exc, RecipientSuppressed):
        return _Problem(name, "to", str(exc))
    if isinstance(exc, ConfigurationError):
        return _Problem(name, "configuration", str(exc))
    if isinstance(exc, RPCError):
        return _Problem("TemporalError", "temporal", f"{exc.status.name}: {exc.message}")
    return _Problem(name, "email", str(exc) or name)


def _check_key(key: str, field: str = "key") -> None:
    try:
        validate_key(key)
    except ValueError as exc:
        raise _Problem("InvalidEmail", field, str(exc)) from None


def _parse_send_at(value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise _Problem("InvalidEmail", "send_at", f"{value!r} is not an ISO 8601 time") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise _Problem(
            "InvalidEmail", "send_at", f"{value!r} has no time zone; add one, e.g. +00:00"
        )
    return when.astimezone(UTC)


_KEY_HELP = (
    f"Idempotency key (required): names this email, 1-{MAX_KEY_LENGTH} characters without "
    "spaces, e.g. "
    "'invoice-2291-reminder'. The workflow ID is email:<key>. The same key with the same "
    "content never sends twice (reuse it to retry a call whose outcome you did not see); "
    "the same key with different content is refused; a new email needs a new key."
)


def build_server(
    connect: Callable[[], Awaitable[PostlaneClient]],
    settings: Settings,
    *,
    senders: Sequence[str] = (),
    spec_dir: Path = Path("."),
) -> PostlaneMCPServer:
    """The MCP server with Postlane's eight tools.

    Args:
        connect: makes the `PostlaneClient` (called on the first tool call, and again
            after a failed attempt).
        settings: the lanes (``list_dead_letters`` checks its ``lane`` against them).
            ``send_email`` leaves the sender's lane to `PostlaneClient.send`, which
            applies ``[[routes]]`` rules first and refuses a sender nothing serves
            (``UnknownSender``, naming ``sender``) before anything starts.
        senders: the only senders ``send_email`` and ``start_sequence`` may use
            (patterns as `postlane.senders.parse_sender_patterns` checks them); empty:
            any sender a lane serves.
        spec_dir: the directory ``start_sequence`` reads specs from.
    """
    scope = SenderScope(senders)
    specs = SpecDirectory(spec_dir)
    conn = _Connection(connect)
    server = PostlaneMCPServer(SERVER_NAME, instructions=_INSTRUCTIONS)

    async def guarded(action: Callable[[PostlaneClient], Awaitable[_T]]) -> _T:
        pl = await conn.get()
        try:
            return await action(pl)
        except (PostlaneError, RPCError) as exc:
            raise _as_problem(exc) from None
        except RuntimeError as exc:  # Temporal unreachable: a later call reconnects
            raise _Problem("Unavailable", "temporal", str(exc)) from None

    async def send_email(
        key: Annotated[str, Field(description=_KEY_HELP)],
        sender: Annotated[
            str,
            Field(description="From address, e.g. 'agent@acme.test' or 'Ada <agent@acme.test>'."),
        ],
        to: Annotated[list[str], Field(description="Recipient addresses (at least one).")],
        subject: Annotated[str, Field(description="Subject line (one line).")],
        text: Annotated[
            str | None, Field(description="Plain-text body. text or html is required.")
        ] = None,
        html: Annotated[str | None, Field(description="HTML body.")] = None,
        cc: Annotated[list[str] | None, Field(description="Cc addresses.")] = None,
        bcc: Annotated[list[str] | None, Field(description="Bcc addresses.")] = None,
        reply_to: Annotated[str | None, Field(description="Reply-To address.")] = None,
        headers: Annotated[
            dict[str, str] | None,
            Field(description="Extra headers, e.g. {'List-Unsubscribe': '<mailto:...>'}."),
        ] = None,
        tags: Annotated[
            list[str] | None, Field(description="Labels for search: letters, digits, _ . : -")
        ] = None,
        priority: Annotated[
            Literal["high", "normal", "bulk"],
            Field(description="high overtakes a bulk backlog in the same lane."),
        ] = "normal",
        send_at: Annotated[
            str | None,
            Field(
                description="ISO 8601 time with a zone to send at, e.g. "
                "'2026-12-01T09:00:00+01:00'; omit to send now."
            ),
        ] = None,
    ) -> SendEmailResult:
        try:
            email = Email(
                sender=sender,
                to=to,
                subject=subject,
                text=text,
                html=html,
                cc=cc or [],
                bcc=bcc or [],
                reply_to=reply_to,
                headers=headers or {},
                tags=tags or [],
            )
        except InvalidInput as exc:
            raise _as_problem(exc) from None
        _check_sender(scope, email.sender)  # the bare address, also of a "Name <address>" form
        when = _parse_send_at(send_at) if send_at is not None else None
        _check_key(key)
        # Which lane serves the sender ([[routes]] rules first) is pl.send's to say: an
        # unknown sender is its UnknownSender, naming the field, before anything starts.

        async def act(pl: PostlaneClient) -> SendEmailResult:
            try:
                await pl.status(key)
                existed = True
            except EmailNotFound:
                existed = False
            await pl.send(email, key=key, priority=priority, send_at=when)
            return SendEmailResult(
                key=key,
                workflow_id=email_workflow_id(key),
                status=await pl.status(key),
                duplicate=existed,
                send_at=when,
            )

        return await guarded(act)

    async def email_status(
        key: Annotated[str, Field(description="The idempotency key the email was sent with.")],
    ) -> EmailReport:
        return await guarded(lambda pl: pl.describe(key, wait=timedelta(seconds=5)))

    async def list_dead_letters(
        lane: Annotated[str | None, Field(description="Only this lane's emails.")] = None,
        since: Annotated[
            str | None,
            Field(description="Only those parked since this ISO 8601 time (with a zone)."),
        ] = None,
        limit: Annotated[
            int, Field(ge=1, le=500, description="At most this many emails in detail.")
        ] = 50,
    ) -> DeadLetterList:
        when = None
        if since is not None:
            try:
                when = _parse_send_at(since)
            except _Problem as exc:
                raise _Problem("InvalidInput", "since", exc.problem.reason) from None
        if lane is not None and lane not in [known.name for known in settings.lanes]:
            names = ", ".join(known.name for known in settings.lanes)
            raise _Problem("UnknownLane", "lane", f"no lane is named {lane!r} (lanes: {names})")

        async def act(pl: PostlaneClient) -> DeadLetterList:
            # All of them, the longest parked first, so `limit` keeps the longest parked
            # (the list comes from the emails' memos: no call per email).
            parked = await pl.dlq.list(lane=lane, since=when)
            return DeadLetterList(count=len(parked), emails=parked[:limit])

        return await guarded(act)

    async def in_scope(pl: PostlaneClient, key: str) -> None:
        """With ``--senders``, refuse to act on an email sent as someone else."""
        if not scope.restricted:
            return
        sender = await sender_of(pl, key)
        if sender is None:
            raise _Problem("SenderNotAllowed", "key", f"the sender of {key!r} is unknown")
        if not scope.allows(sender):
            raise _Problem(
                "SenderNotAllowed",
                "key",
                f"{key!r} was sent as {sender!r}, not a sender this server may act for"
                f" (allowed: {scope})",
            )

    async def retry_email(
        key: Annotated[str, Field(description="The key of a dead_letter or failed email.")],
        to: Annotated[
            list[str] | None,
            Field(description="Replace the To recipients (e.g. a corrected address)."),
        ] = None,
        lane: Annotated[str | None, Field(description="Send through this lane instead.")] = None,
        reason: Annotated[str, Field(description="Why, for the audit trail.")] = "",
    ) -> RetryEmailResult:
        async def act(pl: PostlaneClient) -> RetryEmailResult:
            await in_scope(pl, key)
            retried = await pl.retry(key, reason=reason or "postlane mcp", to=to, lane=lane)
            return RetryEmailResult(key=key, retried=retried, status=await pl.status(key))

        return await guarded(act)

    async def cancel_email(
        key: Annotated[str, Field(description="The key of the email to cancel.")],
        wait_seconds: Annotated[
            float,
            Field(
                ge=0,
                le=120,
                description="How long to wait for the email to stop (default 20).",
            ),
        ] = DEFAULT_CANCEL_WAIT,
    ) -> CancelResult:
        async def act(pl: PostlaneClient) -> CancelResult:
            await in_scope(pl, key)
            return await pl.cancel(key, wait=timedelta(seconds=wait_seconds))

        return await guarded(act)

    async def start_sequence(
        spec: Annotated[
            str,
            Field(
                description="The sequence spec: its name (e.g. 'q4-outreach') or its .toml "
                "file, in the server's spec directory."
            ),
        ],
        to: Annotated[str, Field(description="The recipient's address.")],
        name: Annotated[str | None, Field(description="The recipient's name.")] = None,
        timezone: Annotated[
            str | None,
            Field(description="The recipient's IANA time zone, e.g. 'Europe/Paris'."),
        ] = None,
        variables: Annotated[
            dict[str, str | int | float | bool] | None,
            Field(description="Template variables, e.g. {'company': 'Acme'}."),
        ] = None,
        key: Annotated[
            str | None,
            Field(
                description="Idempotency key of the enrollment; default '<spec name>:<address>', "
                "so the same recipient is never enrolled twice in one spec."
            ),
        ] = None,
    ) -> StartSequenceResult:
        try:
            recipient = Recipient(
                address=to, name=name, timezone=timezone, variables=variables or {}
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            field = {"address": "to"}.get(_loc(err["loc"]), _loc(err["loc"]))
            raise _Problem(
                "InvalidEmail", field or "to", str(err["msg"]).removeprefix("Value error, ")
            ) from None
        try:
            loaded = specs.load(spec)
        except InvalidInput as exc:
            raise _as_problem(exc) from None
        _check_sender(scope, loaded.sender, "spec.sender")
        enrollment = key or f"{loaded.name}:{recipient.address.lower()}"

        async def act(pl: PostlaneClient) -> StartSequenceResult:
            handle = await pl.sequences.start(loaded, recipient, key=enrollment)
            return StartSequenceResult(
                key=handle.key,
                workflow_id=sequence_workflow_id(handle.key),
                spec=loaded.name,
                created=handle.created,
            )

        return await guarded(act)

    async def sequence_status(
        key: Annotated[str, Field(description="The sequence's key (from start_sequence).")],
    ) -> SequenceReport:
        return await guarded(lambda pl: pl.sequences.status(key))

    async def list_replies(
        key: Annotated[str, Field(description="The sequence's key (from start_sequence).")],
    ) -> RepliesResult:
        async def act(pl: PostlaneClient) -> RepliesResult:
            report = await pl.sequences.status(key)
            return RepliesResult(
                key=key,
                status=report.status,
                replies=report.replies,
                auto_replies=report.auto_replies,
            )

        return await guarded(act)

    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    tools: list[tuple[Callable[..., Any], str, ToolAnnotations]] = [
        (
            send_email,
            "Send one email durably, exactly once per idempotency key. Use it whenever you "
            "need to email someone; it returns at once with the email's status (queued, or "
            "scheduled with send_at) and delivery happens in the background, with retries. "
            "Call email_status with the same key to see it go out. Calling again with the "
            "same key and content sends nothing new (duplicate: true); the same key with "
            "other content is an error. Bad input is an error naming the field, and then "
            "nothing was sent. " + _STATUSES,
            ToolAnnotations(destructive_hint=False, idempotent_hint=True, open_world_hint=True),
        ),
        (
            email_status,
            "Where an email is now, by its idempotency key: status, lane, attempts, the last "
            "SMTP reply or error, the failed attempts, and once sent the receipt "
            "(message_id, accepted and rejected recipients, the server's reply). " + _STATUSES,
            read_only,
        ),
        (
            list_dead_letters,
            "The emails parked in dead_letter: their retries ran out on temporary failures "
            "(an SMTP server down, a mailbox full). Each shows its recipients, attempts and "
            "last reply. Fix the cause, then retry_email (optionally with corrected "
            "recipients) or cancel_email to give up.",
            read_only,
        ),
        (
            retry_email,
            "Send a dead_letter email again (optionally to corrected To recipients, or "
            "through another lane), or run a failed email once more as it was. Refused, "
            "naming the key, for an email in any other status (a sent email is never "
            "sent twice).",
            ToolAnnotations(destructive_hint=False, idempotent_hint=False, open_world_hint=True),
        ),
        (
            cancel_email,
            "Stop an email that has not been sent yet (queued, scheduled, retrying or "
            "dead_letter). outcome: cancelled (nothing was delivered), sent (it had "
            "already gone out; the receipt is included), failed (it had failed for good), "
            "or pending (the cancel is recorded but the email had not stopped within "
            "wait_seconds).",
            ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False),
        ),
        (
            start_sequence,
            "Enroll one recipient in a multi-step email sequence (a spec: sends, waits, "
            "follow-ups) that stops by itself when they reply, bounce or unsubscribe. "
            "Enrolling the same recipient in the same spec again starts nothing new "
            "(created: false). Templates are rendered and checked first: a bad variable or "
            "address is an error naming the field, and then nothing was started.",
            ToolAnnotations(destructive_hint=False, idempotent_hint=True, open_world_hint=True),
        ),
        (
            sequence_status,
            "Where a sequence is: status (active, paused, awaiting_approval, completed, "
            "replied, unsubscribed, bounced, cancelled, failed), the current step, what "
            "happens next and when, what was sent and the replies received.",
            read_only,
        ),
        (
            list_replies,
            "The replies a sequence's recipient sent (sender, subject, the start of the "
            "text, when), oldest first, and how many automatic answers were ignored. A "
            "reply stops the sequence (status replied) unless its spec branches on it.",
            read_only,
        ),
    ]
    for fn, description, hints in tools:
        server.add_tool(
            fn,
            name=fn.__name__,
            description=description,
            annotations=hints,
            structured_output=True,
        )
    return server


# -- streamable HTTP -----------------------------------------------------------------------------


class BearerAuth:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>``.

    Compared in constant time; a missing or wrong token gets ``401`` and reaches nothing.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self._expected):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer realm="postlane-mcp"'),
                        ],
                    }
                )
                await send(
                    {
                        "type": "http.response.body",
                        "body": b'{"error": "unauthorized", "reason": "missing or wrong token"}',
                    }
                )
                return
        await self.app(scope, receive, send)
