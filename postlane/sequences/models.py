"""Wire models of sequences: the workflow's input and state, signals, query and agent I/O.

Like `postlane.email.models`, these only ever gain fields with defaults, so running sequences
keep working across upgrades.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from postlane.email.models import MAX_HEADER_LENGTH, Email, Priority, RetrySettings
from postlane.sequences.spec import Recipient, SequenceSpec

MAX_THREAD_TEXT = 4000
"""Characters of each message body kept for the thread an agent sees."""


class SequenceStatus(StrEnum):
    """Where a sequence is; kept in the `PostlaneStatus` search attribute."""

    ACTIVE = "active"
    PAUSED = "paused"
    AWAITING_APPROVAL = "awaiting_approval"
    COMPLETED = "completed"
    REPLIED = "replied"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """The sequence will send nothing more."""
        return self not in (self.ACTIVE, self.PAUSED, self.AWAITING_APPROVAL)


class InboundKind(StrEnum):
    """What an inbound message means for the sequence it answers."""

    REPLY = "reply"
    AUTO_REPLY = "auto_reply"
    """Out-of-office and other automatic answers: recorded, never a stop."""
    BOUNCE = "bounce"
    UNSUBSCRIBE = "unsubscribe"
    COMPLAINT = "complaint"
    """A spam complaint (an ARF feedback report, RFC 5965): the lane's reputation guard
    counts it and the address is suppressed for the sender; not routed to sequences."""


class InboundEvent(BaseModel):
    """A reply, auto-reply, bounce or unsubscribe, routed to a sequence (signal ``inbound``)."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    kind: InboundKind
    message_id: str
    """The inbound message's own Message-ID: repeated deliveries are ignored by it."""
    refers_to: str | None = None
    """The Postlane Message-ID it answers (from In-Reply-To, References or the bounce)."""
    refers_to_workflow: str = ""
    """The workflow `refers_to` names (an email's; for an unsubscribe, its sequence's), as
    the inbound worker opened and authenticated it with the token secret."""
    from_address: str = ""
    subject: str = ""
    text: str = ""
    """The start of its plain-text body."""
    received_at: datetime | None = None
    hard: bool = True
    """For bounces: a permanent failure (5.x.x). Soft bounces are recorded, not a stop."""
    status: str = ""
    """For bounces: the DSN status code, e.g. ``5.1.1``; for complaints, the feedback type
    (``abuse``)."""
    original_sender: str = ""
    """For bounces and complaints: the From of the returned message (the Postlane sender)."""
    original_recipient: str = ""
    """For bounces and complaints: the recipient that failed or complained."""


class Approval(BaseModel):
    """Signal ``approve``: a person's decision on a composed draft."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    step: str
    approved: bool = True
    subject: str | None = None
    """Replace the draft's subject (and, below, its bodies) before sending."""
    text: str | None = None
    html: str | None = None
    by: str = ""


class ThreadMessage(BaseModel):
    """One message of the conversation so far, as the agent sees it."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    direction: str
    """``out`` (we sent it) or ``in`` (they replied)."""
    subject: str
    text: str
    at: datetime | None = None
    message_id: str = ""


class ComposeRequest(BaseModel):
    """Input of a ``compose`` step's agent activity."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    sequence_key: str
    step: str
    sender: str
    recipient: Recipient
    instructions: str
    """The step's instructions, rendered for this recipient."""
    thread: list[ThreadMessage] = Field(default_factory=list)
    feedback: str | None = None
    """Why the previous draft was refused (it did not validate), for the agent to fix."""
    attempt: int = 1


class Draft(BaseModel):
    """What an agent returns: the email to send (validated like any `Email`)."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    subject: str
    text: str | None = None
    html: str | None = None


class RenderedMessage(BaseModel):
    """A send step's content, rendered for one recipient when the sequence starts."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    subject: str
    text: str | None = None
    html: str | None = None


class SentMessage(BaseModel):
    """An email the sequence sent (or handed to its lane)."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    step: str
    key: str
    """The email's idempotency key: ``<sequence key>:<step>``."""
    message_id: str
    subject: str
    text: str = ""
    sent_at: datetime | None = None


class SequenceState(BaseModel):
    """Everything a sequence carries across continue-as-new."""

    position: int = 0
    """Index of the current step."""
    entered_at: datetime | None = None
    """When the current step began (its wait deadline is counted from here)."""
    deadline: datetime | None = None
    """When the current wait ends."""
    status: SequenceStatus = SequenceStatus.ACTIVE
    paused: bool = False
    stop_reason: str | None = None
    sent: list[SentMessage] = Field(default_factory=list)
    replies: list[InboundEvent] = Field(default_factory=list)
    auto_replies: int = 0
    soft_bounces: int = 0
    seen: list[str] = Field(default_factory=list)
    """Message-IDs of inbound events already applied (the last 200)."""
    reply_branch: bool = False
    """A reply arrived while a `wait_for_reply` step with a branch was waiting."""
    draft: Draft | None = None
    """A composed draft waiting for approval."""
    approval: Approval | None = None
    runs: int = 1
    """How many runs (continue-as-new) this sequence has had."""


class SequenceInput(BaseModel):
    """Input of `SequenceWorkflow`. Built and validated by the client; holds no secrets."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    key: str
    spec: SequenceSpec
    recipient: Recipient
    lane: str
    retry: RetrySettings = RetrySettings()
    quota: bool = False
    priority: Priority = Priority.NORMAL
    rendered: dict[str, RenderedMessage] = Field(default_factory=dict)
    """Send steps' content by step ID (templates rendered at enrollment)."""
    instructions: dict[str, str] = Field(default_factory=dict)
    """Compose steps' rendered instructions by step ID."""
    list_unsubscribe: str = ""
    """The List-Unsubscribe header value (mailto, plus the one-click URL if any)."""
    one_click: bool = False
    """An https URL is offered: add List-Unsubscribe-Post (RFC 8058)."""
    history_limit: int = Field(default=5000, ge=10)
    """Continue as new once the history is this long (or when the server suggests it)."""
    state: SequenceState | None = None
    """Carried across continue-as-new; None on the first run."""


class SequenceReport(BaseModel):
    """The ``status`` query of a sequence: where it is and what it did."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    key: str
    status: SequenceStatus
    recipient: str
    step: str | None = None
    """The current step's ID (None once finished)."""
    next_action: str | None = None
    """What happens next, e.g. ``send follow-up`` or ``wait for a reply``."""
    next_at: datetime | None = None
    paused: bool = False
    stop_reason: str | None = None
    sent: list[SentMessage] = Field(default_factory=list)
    replies: list[InboundEvent] = Field(default_factory=list)
    auto_replies: int = 0
    draft: Draft | None = None
    runs: int = 1


class Suppression(BaseModel):
    """Input of the suppression workflow: this sender never enrolls this address again."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    sender: str
    address: str
    reason: str = ""
    source: str = ""
    """The sequence (or operator) that asked for it."""


def sequence_email(
    inp: SequenceInput, content: RenderedMessage, thread_ids: list[str] | tuple[str, ...] = ()
) -> Email:
    """The email a sequence step sends: its content, the unsubscribe headers, and, when
    `thread_ids` (the conversation so far, oldest first) is given, the threading headers.

    Raises:
        InvalidEmail: the content does not make a valid email.
    """
    headers = {"List-Unsubscribe": inp.list_unsubscribe} if inp.list_unsubscribe else {}
    if inp.one_click:
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    if thread_ids:
        headers["In-Reply-To"] = thread_ids[-1]
        headers["References"] = " ".join(references(list(thread_ids)))
    return Email(
        sender=inp.spec.sender,
        to=[inp.recipient.address],
        reply_to=inp.spec.reply_to,
        subject=content.subject,
        text=content.text,
        html=content.html,
        headers=headers,
        tags=list(inp.spec.tags),
    )


def references(thread_ids: list[str]) -> list[str]:
    """The References of a follow-up within one header line: the first message (the
    thread's root) and as many of the latest as fit (RFC 5322, section 3.6.4)."""
    root, latest = thread_ids[0], thread_ids[-1]
    kept = [latest]
    for mid in reversed(thread_ids[1:-1]):  # the middle, newest first
        if len(" ".join([root, mid, *kept])) > MAX_HEADER_LENGTH:
            break
        kept.insert(0, mid)
    if root != latest and len(" ".join([root, *kept])) <= MAX_HEADER_LENGTH:
        kept.insert(0, root)
    return kept
