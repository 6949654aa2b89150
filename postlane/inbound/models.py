"""Wire models of the inbox watcher: its input and state, the IMAP poll activity's
request and result. Like every wire model, they only ever gain fields with defaults."""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from postlane.sequences.models import InboundEvent


class InboxCursor(BaseModel):
    """How far an inbox has been read: IMAP UIDs are only comparable within one
    UIDVALIDITY, so the cursor holds both."""

    model_config = ConfigDict(frozen=True)

    uidvalidity: int | None = None
    """None until the first poll."""
    last_uid: int = 0
    """Every message with this UID or lower has been read and its event delivered."""


class PollRequest(BaseModel):
    """Input of the ``poll_inbox`` activity. Names the inbox; the worker holds its login."""

    model_config = ConfigDict(frozen=True)

    inbox: str
    cursor: InboxCursor = InboxCursor()
    max_messages: int = Field(default=50, ge=1)


class InboundItem(BaseModel):
    """One message of a poll that concerns a sequence."""

    model_config = ConfigDict(frozen=True)

    uid: int
    event: InboundEvent
    target: str
    """The sequence workflow it goes to (``sequence:<key>``)."""
    running: bool = True
    """The target was running when the poll read this message; a finished or unknown one
    is not signalled (a signal to it could only fail)."""


class PollResult(BaseModel):
    """What one poll found: the events to deliver and the cursor after them."""

    model_config = ConfigDict(frozen=True)

    cursor: InboxCursor
    items: list[InboundItem] = Field(default_factory=list)
    fetched: int = 0
    """Messages read in this poll, ours or not."""
    ignored: int = 0
    """Messages that answer nothing of ours (or could not be read)."""
    more: bool = False
    """Messages beyond `max_messages` are waiting: poll again at once."""
    reset: bool = False
    """The folder's UIDVALIDITY changed: it was read again from the start."""


class WatcherConfig(BaseModel):
    """Signal ``configure`` (sent by every worker at start): the inbox's current settings."""

    model_config = ConfigDict(frozen=True)

    poll_interval: timedelta = timedelta(seconds=60)
    max_messages: int = Field(default=50, ge=1)


class WatcherState(BaseModel):
    """Everything the watcher carries across continue-as-new."""

    cursor: InboxCursor = InboxCursor()
    polls: int = 0
    delivered: int = 0
    """Events signalled to their sequence."""
    skipped: int = 0
    """Events whose sequence does not exist or has finished."""
    ignored: int = 0
    resets: int = 0
    """UIDVALIDITY changes seen."""
    last_poll_at: datetime | None = None
    last_error: str | None = None
    """Why the last poll failed (None once one succeeds)."""
    runs: int = 1


class WatcherInput(BaseModel):
    """Input of `InboxWatcherWorkflow`. Holds no secrets: the worker resolves the inbox."""

    model_config = ConfigDict(frozen=True)

    inbox: str
    config: WatcherConfig = WatcherConfig()
    history_limit: int = Field(default=2000, ge=50)
    """Continue as new once the history is this long (or when the server suggests it)."""
    state: WatcherState | None = None
    """Carried across continue-as-new; None on the first run."""


class WatcherReport(BaseModel):
    """The ``status`` query of a watcher."""

    model_config = ConfigDict(frozen=True)

    inbox: str
    config: WatcherConfig
    cursor: InboxCursor
    polls: int
    delivered: int
    skipped: int
    ignored: int
    resets: int
    last_poll_at: datetime | None = None
    last_error: str | None = None
    runs: int = 1


class UnsubscribeRequest(BaseModel):
    """Input of ``record_unsubscribe``: an unsubscribe for a sequence that has finished."""

    model_config = ConfigDict(frozen=True)

    key: str
    """The sequence key."""
    reason: str = ""
