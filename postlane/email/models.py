"""Models shared by the client, the workflows and the activities.

Only pydantic, the standard library and `postlane.email.addresses` (standard library only) are
imported here, so workflow code can pass this module through Temporal's sandbox cheaply.
Wire models only ever gain fields with defaults, and ignore unknown ones, so workers of
different versions interoperate.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from postlane.durations import Duration
from postlane.email.addresses import parse_mailbox
from postlane.errors import InvalidEmail

MAX_RECIPIENTS = 100
"""to + cc + bcc of one email; larger audiences are many emails (one workflow each)."""
MAX_EMAIL_BYTES = 1_000_000
"""Serialized size of one email, attachments included; Temporal payloads stay well below 2 MB."""
MAX_HEADER_LENGTH = 998
"""RFC 5322 line length limit, applied to the subject and each custom header."""
MAX_TAGS = 10
MAX_ATTEMPT_HISTORY = 20
"""Failed attempts an email's workflow remembers (the most recent ones)."""

# An addr-spec in its common dot-atom form; quoted local parts and address literals are
# legal but so rare in outbound mail that accepting them mostly lets typos through.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDRESS_RE = re.compile(rf"^{_LOCAL}@{_LABEL}(?:\.{_LABEL})+$")
_HEADER_NAME_RE = re.compile(r"^[!-9;-~]+$")
_SUBFIELD_RE = re.compile(r"^([a-z_][a-z0-9_]*(?:\[\d+\])?): (.+)$", re.DOTALL)
MSG_ID_HEADERS = frozenset({"in-reply-to", "references"})
"""Headers that hold one or more ``<msg-id>`` (RFC 5322, section 3.6.4)."""
URI_LIST_HEADERS = frozenset(
    {"list-unsubscribe", "list-subscribe", "list-help", "list-archive", "list-owner"}
)
"""Headers that hold a comma-separated list of ``<uri>`` (RFC 2369)."""
_MSG_ID_LIST_RE = re.compile(r"^\s*<[^<>\s]+>(?:\s*<[^<>\s]+>)*\s*$")
_URI_ITEM = r"<[\x21-\x3b\x3d\x3f-\x7e]+>"  # printable ASCII but '<' and '>'
_URI_LIST_RE = re.compile(rf"^\s*{_URI_ITEM}(?:\s*,\s*{_URI_ITEM})*\s*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "From",
        "To",
        "Cc",
        "Bcc",
        "Subject",
        "Reply-To",
        "Message-ID",
        "Date",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Sender",
        "Return-Path",
    )
)


class Priority(StrEnum):
    """How urgently an email should overtake others in the same lane."""

    HIGH = "high"
    NORMAL = "normal"
    BULK = "bulk"

    @property
    def key(self) -> int:
        """Temporal priority key: lower runs first."""
        return {"high": 1, "normal": 3, "bulk": 5}[self.value]


class EmailStatus(StrEnum):
    """Where an email is in its life; kept in the `PostlaneStatus` search attribute."""

    QUEUED = "queued"
    SCHEDULED = "scheduled"
    SENDING = "sending"
    SENT = "sent"
    RETRYING = "retrying"
    DEAD_LETTER = "dead_letter"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUPPRESSED = "suppressed"
    """A recipient is suppressed for the sender: nothing was sent (terminal)."""


def check_address(value: str) -> str:
    """Return the address if it is a plain, valid ``local@domain.tld``.

    Raises:
        ValueError: it is not.
    """
    if len(value) > 254 or not _ADDRESS_RE.match(value):
        raise ValueError(f"{value!r} is not a valid email address")
    return value


def _mailbox(value: str, field: str, names: dict[str, str]) -> str:
    """The bare address of `value`, recording its display name in `names`.

    Raises:
        ValueError: ``field: why`` (the model turns it into `InvalidEmail` naming `field`).
    """
    try:
        mailbox = parse_mailbox(value)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None
    if mailbox.name is not None:
        known = names.get(mailbox.address)
        if known is not None and known != mailbox.name:
            raise ValueError(
                f"{field}: {mailbox.address} is already named {known!r}; give one name per address"
            )
        names[mailbox.address] = mailbox.name
    return mailbox.address


def _structured_header(name: str, value: str) -> None:
    """Check the headers whose syntax Postlane writes item by item (see `activities.mime`).

    Raises:
        ValueError: the value is not a list of the header's items.
    """
    lower = name.lower()
    if lower in MSG_ID_HEADERS and not _MSG_ID_LIST_RE.match(value):
        raise ValueError(f"{value!r} is not a list of message IDs like '<id@domain>'")
    if lower in URI_LIST_HEADERS and not _URI_LIST_RE.match(value):
        raise ValueError(f"{value!r} is not a comma-separated list of '<uri>' (RFC 2369)")
    if lower == "list-unsubscribe-post" and value.strip() != "List-Unsubscribe=One-Click":
        raise ValueError("must be 'List-Unsubscribe=One-Click' (RFC 8058)")


def _no_line_breaks(value: str) -> str:
    if any(c in value for c in "\r\n\x00"):
        raise ValueError("must not contain CR, LF or NUL characters")
    if len(value) > MAX_HEADER_LENGTH:
        raise ValueError(f"must be at most {MAX_HEADER_LENGTH} characters")
    return value


class Attachment(BaseModel):
    """A small file sent inline with the email (the whole email stays under 1 MB)."""

    model_config = ConfigDict(
        frozen=True, ser_json_bytes="base64", val_json_bytes="base64", use_attribute_docstrings=True
    )

    filename: str = Field(min_length=1, max_length=255)
    """The file name the recipient sees, e.g. ``invoice.pdf`` (one line)."""
    content: bytes
    """The file's bytes (base64 in JSON)."""
    content_type: str = "application/octet-stream"
    """Its MIME type, e.g. ``application/pdf``."""

    @field_validator("filename", "content_type")
    @classmethod
    def _single_line(cls, v: str) -> str:
        return _no_line_breaks(v)

    @field_validator("content_type")
    @classmethod
    def _mime_type(cls, v: str) -> str:
        if not re.match(r"^[\w.+-]+/[\w.+-]+$", v):
            raise ValueError(f"{v!r} is not a MIME type like 'application/pdf'")
        return v


class Email(BaseModel):
    """One outbound email. The sender's address picks the lane that sends it.

    Construction validates everything and raises `InvalidEmail` naming the field.
    """

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    sender: str
    """From address; must be served by a configured lane. ``ada@acme.test``,
    ``Ada Lovelace <ada@acme.test>`` or ``"Lovelace, Ada" <ada@acme.test>`` (as for every
    address field): the field keeps the bare address, `display_names` the name."""
    to: list[str] = Field(min_length=1)
    """Recipient addresses (at least one)."""
    subject: str
    """Subject line (one line)."""
    text: str | None = None
    """Plain-text body. At least one of `text` and `html` is required."""
    html: str | None = None
    """HTML body."""
    cc: list[str] = Field(default_factory=list)
    """Cc addresses."""
    bcc: list[str] = Field(default_factory=list)
    """Bcc addresses: in the envelope, never in the headers."""
    reply_to: str | None = None
    """Reply-To address."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra headers, e.g. ``List-Unsubscribe``. Structural headers are set by Postlane.
    ``In-Reply-To`` and ``References`` take ``<msg-id>`` items, the ``List-*`` URL headers
    take ``<uri>`` items (RFC 2369); Postlane folds them between items, never inside one."""
    display_names: dict[str, str] = Field(default_factory=dict)
    """Display name by address. Filled from ``"Ada Lovelace" <ada@acme.test>`` forms in
    `sender`, `to`, `cc`, `bcc` and `reply_to`, which then hold the bare address."""
    tags: list[str] = Field(default_factory=list)
    """Labels for search (`PostlaneTag`): letters, digits and ``_ . : -``."""
    attachments: list[Attachment] = Field(default_factory=list)
    """Files sent with the email."""

    if not TYPE_CHECKING:
        # Surface pydantic's errors as Postlane's own, naming the first bad field. Hidden
        # from type checkers so they keep the precise generated signature.
        def __init__(self, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as exc:
                raise invalid_email_from(exc) from None

    @model_validator(mode="before")
    @classmethod
    def _mailboxes(cls, data: Any) -> Any:
        """Split ``Name <address>`` forms into the bare address and `display_names`, and
        normalise internationalised domains to A-labels (`postlane.email.addresses`)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = data.get("display_names")
        names: dict[str, str] = dict(given) if isinstance(given, dict) else {}
        for field in ("sender", "reply_to", "to", "cc", "bcc"):
            value = data.get(field)
            if isinstance(value, str):
                data[field] = _mailbox(value, field, names)
            elif isinstance(value, list | tuple):
                data[field] = [
                    _mailbox(item, f"{field}[{i}]", names) if isinstance(item, str) else item
                    for i, item in enumerate(value)
                ]
        if isinstance(given, dict) or (given is None and names):
            data["display_names"] = names  # otherwise pydantic reports the bad type
        return data

    @field_validator("display_names")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for address, name in v.items():
            try:
                _no_line_breaks(name)
            except ValueError as exc:
                raise ValueError(f"{address}: {exc}") from None
        return v

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str) -> str:
        return _no_line_breaks(v)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _HEADER_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"{name} is set by Postlane; use the Email field instead")
            try:
                _no_line_breaks(value)
                _structured_header(name, value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags")
        for tag in v:
            if not _TAG_RE.match(tag):
                raise ValueError(f"{tag!r} is not a valid tag (1-64 of A-Z a-z 0-9 _ . : -)")
        return v

    @model_validator(mode="after")
    def _whole(self) -> Email:
        if not (self.text and self.text.strip()) and not (self.html and self.html.strip()):
            raise ValueError("text: the email needs a non-empty text or html body")
        count = len(self.to) + len(self.cc) + len(self.bcc)
        if count > MAX_RECIPIENTS:
            raise ValueError(f"to: {count} recipients is more than the limit of {MAX_RECIPIENTS}")
        size = len(self.model_dump_json())
        if size > MAX_EMAIL_BYTES:
            raise ValueError(f"attachments: the email is {size} bytes, over {MAX_EMAIL_BYTES}")
        # display_names may name addresses the email no longer has (a dead-letter retry
        # replaces `to` and keeps the names): they are simply not used.
        return self

    @property
    def recipients(self) -> list[str]:
        """Every envelope recipient: to, cc and bcc."""
        return [*self.to, *self.cc, *self.bcc]

    @property
    def smtputf8_address(self) -> str | None:
        """The first address (sender or recipient) with a non-ASCII local part, which only
        a server offering SMTPUTF8 can take; None if every address is ASCII."""
        for address in (self.sender, *self.recipients, self.reply_to or ""):
            if not address.isascii():
                return address
        return None

    @property
    def recipient_domains(self) -> list[str]:
        """Distinct recipient domains, lower-cased, in first-seen order."""
        return list(dict.fromkeys(a.rsplit("@", 1)[1].lower() for a in self.recipients))


def invalid_email_from(exc: ValidationError) -> InvalidEmail:
    """Turn pydantic's first error into an `InvalidEmail` naming the field."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"])
    reason = str(err["msg"]).removeprefix("Value error, ")
    # Whole-model checks name their field as "field: reason".
    if not field and ": " in reason:
        field, reason = reason.split(": ", 1)
    elif err["type"] == "value_error" and (sub := _SUBFIELD_RE.match(reason)):
        field, reason = f"{field}.{sub.group(1)}", sub.group(2)
    return InvalidEmail(field or "email", reason)


class RetrySettings(BaseModel):
    """How a lane retries transient failures before the email is dead-lettered."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    initial_interval: Duration = timedelta(seconds=5)
    backoff: float = Field(default=2.0, ge=1.0)
    maximum_interval: Duration = timedelta(minutes=10)
    maximum_attempts: int = Field(default=0, ge=0)
    """0 means unlimited within `retry_window`."""
    retry_window: Duration = timedelta(hours=72)
    """After this long without success the email is dead-lettered."""


class SendEmailInput(BaseModel):
    """Input of `SendEmailWorkflow` (workflow type ``SendEmail``). Holds no credentials.

    Any Temporal client may start it (see docs/contract.md): the workflow validates it and
    takes the lane's retry policy and caps from the workers' configuration.
    """

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    email: Email
    key: str = ""
    """The idempotency key; empty means the one in the workflow ID ``email:<key>``."""
    lane: str = ""
    """The lane (sending account) by name; empty means the lane that serves the sender."""
    priority: Priority = Priority.NORMAL
    send_at: datetime | None = None
    """Timezone-aware datetime; None sends immediately."""
    retry: RetrySettings = RetrySettings()
    """Ignored by current workers, which use the lane's configured retry policy."""
    quota: bool = False
    """Ignored by current workers, which know whether the lane has caps or a warm-up."""


class LaneQuery(BaseModel):
    """Input of the ``resolve_lane`` local activity: which lane sends for this sender?"""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    sender: str
    lane: str = ""
    """A lane the caller named (checked to exist), or empty to pick the sender's lane."""
    recipients: list[str] = Field(default_factory=list)
    """Addresses to hash for ``PostlaneRecipientHash`` (an email started without it)."""
    recipient_domains: list[str] = Field(default_factory=list)
    """For ``[[routes]]`` rules: the email's recipient domains."""
    tags: list[str] = Field(default_factory=list)
    """For ``[[routes]]`` rules: the email's tags."""
    priority: str = ""
    """For ``[[routes]]`` rules: the email's priority."""


class LaneResolution(BaseModel):
    """The workers' answer to a `LaneQuery`: the lane and its settings, or why there is none."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    lane: str = ""
    retry: RetrySettings = RetrySettings()
    quota: bool = False
    """The lane has hourly/daily caps or a warm-up: sends ask its lane workflow for a slot."""
    error_type: str | None = None
    """``UnknownSender`` or ``UnknownLane`` when there is no lane to send through."""
    error: str = ""
    recipient_domain_attribute: bool = True
    """The workers index recipient domains as a search attribute (their settings' choice)."""
    recipient_hashes: list[str] = Field(default_factory=list)
    """Keyed hashes of `LaneQuery.recipients` under the workers' token secret."""
    webhook_events: list[str] = Field(default_factory=list)
    """The ``email.*`` webhook events some subscription of the workers wants: the email
    emits only these (none at all, and no history events, when the list is empty)."""
    route: str = ""
    """The ``[[routes]]`` rule that chose the lane (empty: the sender's lane, or named)."""


class SmtpSendRequest(BaseModel):
    """Input of the `send_email` activity."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    email: Email
    lane: str
    message_id: str
    key: str
    seal_message_id: bool = False
    """The worker makes the Message-ID (sealed with its token secret, `postlane.tokens`)
    from the workflow ID; `message_id` is then empty."""
    failover_from: str = ""
    """The lane whose open circuit moved this send here (it never fails over again)."""


class DeliveryReceipt(BaseModel):
    """What the SMTP server accepted."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    key: str
    """The email's idempotency key."""
    message_id: str
    """The ``Message-ID`` header it was sent with."""
    lane: str
    """The lane that sent it."""
    accepted: list[str]
    """Recipients the server accepted."""
    rejected: dict[str, str] = Field(default_factory=dict)
    """Recipient → the server's reply, for recipients refused while others were accepted."""
    attempts: int = 1
    """SMTP attempts it took."""
    smtp_reply: str = ""
    """The server's reply to DATA, e.g. ``250 2.0.0 Ok: queued as 4F2A``."""
    sent_at: datetime | None = None
    """When the server accepted DATA (the worker's clock)."""
    dispatched_at: datetime | None = None
    """When the workflow last handed the email to its lane (workflow time: virtual in tests)."""


class RetryRequest(BaseModel):
    """Signal input of ``retry`` (and ``discard``): send a dead-lettered email again,
    optionally corrected."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    reason: str = ""
    to: list[str] | None = None
    """New To recipients (e.g. a fixed address)."""
    lane: str | None = None
    """Another lane (sending account) to send through."""
    retry: RetrySettings | None = None
    """The new lane's retry settings (filled in by the client)."""

    @field_validator("to")
    @classmethod
    def _addresses(cls, v: list[str] | None) -> list[str] | None:
        for address in v or []:
            check_address(address)
        return v


class AttemptRecord(BaseModel):
    """One failed send attempt: what the SMTP server (or the network) answered, and where.

    The send activity signals one to its email's workflow (``attempt_failed``) on every
    failed attempt, because Temporal's history keeps only the last failure of a retried
    activity.
    """

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    attempt: int = Field(ge=1)
    """The email's attempt number, counted across dead-letter retries (1 is the first).
    The activity sends its own attempt number within the current invocation; the workflow
    adds the attempts of the invocations before."""
    at: datetime
    """When the attempt failed (the worker's clock)."""
    reply: str
    """The SMTP reply (``451 4.3.0 ...``) or what went wrong on the way (a refused
    connection, a timeout)."""
    smtp_server: str = ""
    """``host:port`` of the lane's SMTP server."""
    worker: str = ""
    """The worker that made the attempt (Temporal identity, ``pid@host``)."""
    phase: str | None = None
    """SMTP phase it failed in: connect, mail, rcpt or data."""
    error_type: str | None = None
    """The failure's `ErrorType` (``SmtpTransientError``, ...)."""


class EmailReport(BaseModel):
    """Everything `PostlaneClient.describe` knows about one email."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    key: str
    """The email's idempotency key."""
    status: EmailStatus
    """Where it is now (`EmailStatus`)."""
    lane: str | None = None
    """The lane that sends it, once resolved."""
    subject: str = ""
    recipients: list[str] = Field(default_factory=list)
    """Every envelope recipient (To, Cc and Bcc)."""
    attempts: int = 0
    """SMTP attempts so far."""
    last_error: str | None = None
    """The last failure, e.g. the server's reply to a refused attempt."""
    scheduled_for: datetime | None = None
    """When a scheduled email is due (``send_at``)."""
    parked_at: datetime | None = None
    """When the email last parked in ``dead_letter`` (workflow time)."""
    attempt_history: list[AttemptRecord] = Field(default_factory=list)
    """The last failed attempts (up to `MAX_ATTEMPT_HISTORY`), oldest first."""
    receipt: DeliveryReceipt | None = None
    """What the SMTP server accepted, once sent."""
    stuck: str | None = None
    """Why a running email makes no progress, e.g. ``"workflow task failing: RuntimeError:
    ... (attempt 4)"``: a bug or an incompatible change in the workers' workflow code."""
    route: str | None = None
    """The ``[[routes]]`` rule that chose `lane`, if one did."""
    failed_over_from: str | None = None
    """The lane this email left for `lane` because its provider was down (circuit open)."""
