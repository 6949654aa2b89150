"""Errors a Postlane caller can catch.

::

    PostlaneError
    ├── InvalidEmail (also ValueError)      bad input, raised before anything starts
    │   └── UnknownSender                   the sender matches no configured lane
    ├── ConfigurationError (also ValueError) postlane.toml / environment is wrong
    ├── IdempotencyConflict                 same key, different content
    ├── EmailNotFound                       no email with that key
    ├── SequenceNotFound                    no sequence with that key
    ├── RecipientSuppressed                 the address is suppressed for this sender
    ├── ActionRefused                       an operator action the workflow's state refuses
    └── DeliveryError                       the email did not go out
        ├── PermanentDeliveryError          the SMTP server said no (5xx)
        └── EmailCancelled                  an operator cancelled it

`ErrorType` holds the `ApplicationError.type` strings that activities raise and retry
policies name; they are part of the wire contract, so never rename one.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorType(StrEnum):
    """`ApplicationError.type` values raised by Postlane activities."""

    SMTP_TRANSIENT = "SmtpTransientError"
    """4xx reply, refused or dropped connection, timeout: retried with backoff."""
    SMTP_THROTTLED = "SmtpThrottledError"
    """The provider asked us to slow down (421, 4.7.x, "rate limit"): retried after its hint."""
    SMTP_PERMANENT = "SmtpPermanentError"
    """5xx reply or every recipient refused: never retried automatically."""
    SMTP_TLS = "SmtpTlsError"
    """The server's certificate did not verify: a configuration problem, not retried."""
    LANE_UNKNOWN = "LaneUnknownError"
    """The worker serving the lane has no configuration for it."""
    CONFIGURATION = "ConfigurationError"
    """The worker's lane configuration is unusable (missing login variable, no AUTH offered)."""
    SMTPUTF8_UNSUPPORTED = "SmtpUtf8UnsupportedError"
    """An address has a non-ASCII local part and the server does not offer SMTPUTF8: not
    retried (the email ends `failed`)."""
    IMAP_TRANSIENT = "ImapTransientError"
    """The IMAP server is unreachable, dropped the connection or answered NO/BAD: retried."""
    IMAP_AUTH = "ImapAuthError"
    """The IMAP server refused the inbox's login: a configuration problem, not retried."""
    INBOX_UNKNOWN = "InboxUnknownError"
    """The worker that took the poll has no such inbox (another host may have it): retried."""
    INVALID_EMAIL = "InvalidEmail"
    """A `SendEmail` input is invalid (from any client): failed at once, naming the field."""
    UNKNOWN_SENDER = "UnknownSender"
    """No lane in the workers' configuration serves the email's sender: failed at once."""
    UNKNOWN_LANE = "UnknownLane"
    """The input names a lane the workers' configuration does not have: failed at once."""
    ACTION_REFUSED = "ActionRefused"
    """An update's validator refused an operator action (retry, discard, approve, ...)."""
    EMAIL_DISCARDED = "EmailDiscarded"
    """An operator discarded the dead-lettered email: it ends cancelled with this type."""
    CIRCUIT_OPEN = "CircuitOpen"
    """The lane's provider is down (its circuit is open): the email moves to the lane's
    ``failover`` lane, keeping its Message-ID and key. Never retried on the same lane."""
    LANE_PAUSED = "LanePaused"
    """The lane was paused (reputation guard or operator) when the send was about to start:
    nothing was sent; the email waits ``scheduled`` for the lane to resume."""
    RECIPIENT_SUPPRESSED = "RecipientSuppressed"
    """A recipient is suppressed for the sender (hard bounce, complaint, unsubscribe or an
    operator): nothing was sent; the email ends ``suppressed``."""
    SUPPRESSION_UNKNOWN = "SuppressionUnknown"
    """The suppression list could not be read before a send (the Temporal server did not
    answer in time, or failed): nothing was sent; retried like a transient failure."""


SEND_FAILURES = frozenset(
    {
        ErrorType.SMTP_TRANSIENT,
        ErrorType.SMTP_THROTTLED,
        ErrorType.SMTP_PERMANENT,
        ErrorType.SMTP_TLS,
        ErrorType.LANE_UNKNOWN,
        ErrorType.CONFIGURATION,
        ErrorType.SMTPUTF8_UNSUPPORTED,
        ErrorType.CIRCUIT_OPEN,
        ErrorType.LANE_PAUSED,
        ErrorType.RECIPIENT_SUPPRESSED,
    }
)
"""Every failure the send activity raises (``activities/smtp*.py``), each after logging its
own one-line ``email.attempt_failed`` event (``email.failing_over`` for an open circuit)."""


class PostlaneError(Exception):
    """Base class of every error Postlane raises on purpose."""


class InvalidInput(PostlaneError, ValueError):
    """Something given to Postlane is invalid (an argument, an option, a file); nothing was
    started or changed. The subclasses say what it was.

    Attributes:
        field: the offending field, option or file, e.g. ``since`` or ``spec.toml: steps.0``.
        reason: what is wrong with it.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class InvalidEmail(InvalidInput):
    """The email (or its send options) is invalid; nothing was started.

    Attributes:
        field: dotted path of the offending field, e.g. ``to.0`` or ``headers``.
        reason: what is wrong with it.
    """


class InvalidSpec(InvalidInput):
    """A sequence spec is invalid: its file is unreadable or not TOML, or a field is wrong
    (``field`` names the file and the field, e.g. ``spec.toml: steps.2.timeout``)."""


class InvalidRecipients(InvalidInput):
    """A recipients file is unreadable or has no address column (``field`` is the file)."""


class UnknownLane(InvalidInput):
    """No configured lane has this name."""

    def __init__(self, lane: str, known: list[str]) -> None:
        names = ", ".join(known) or "none configured"
        super().__init__("lane", f"no lane is named {lane!r} (lanes: {names})")
        self.lane = lane


class UnknownSender(InvalidEmail):
    """No configured lane serves this sender address."""

    def __init__(self, sender: str) -> None:
        super().__init__("sender", f"no lane serves {sender!r}; add it to a lane's senders")
        self.sender = sender


class ConfigurationError(PostlaneError, ValueError):
    """The configuration is invalid; the message names the file, line and field."""


class IdempotencyConflict(PostlaneError):
    """The key is already used by an email with different content."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"key {key!r} was already used for a different email; use a new key to send it"
        )


class EmailNotFound(PostlaneError, LookupError):
    """No email (workflow) exists for this key."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"no email with key {key!r}")


class SequenceNotFound(PostlaneError, LookupError):
    """No sequence (workflow) exists for this key."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"no sequence with key {key!r}")


class RecipientSuppressed(PostlaneError):
    """The address is suppressed for this sender (it unsubscribed, hard-bounced or
    complained, or an operator added it): a sequence does not enrol it, and an email to it
    ends ``suppressed`` with nothing sent."""

    def __init__(self, sender: str, address: str, message: str | None = None) -> None:
        self.sender = sender
        self.address = address
        super().__init__(message or f"{address} is suppressed for {sender}; not enrolled")


class ActionRefused(PostlaneError):
    """A workflow refused an operator action in its current state; nothing changed.

    Raised for an email's ``retry``/``discard`` when it is not dead-lettered, and for a
    sequence's ``approve`` of a step that holds no draft, ``pause`` of a paused one, ...

    Attributes:
        key: the email's or sequence's key.
        action: the refused action, e.g. ``retry`` or ``approve``.
        reason: why the workflow refused it.
    """

    def __init__(self, key: str, action: str, reason: str) -> None:
        self.key = key
        self.action = action
        self.reason = reason
        super().__init__(f"{key}: {reason}")


class DeliveryError(PostlaneError):
    """The email was not delivered."""


class PermanentDeliveryError(DeliveryError):
    """The SMTP server rejected the email permanently (5xx) or TLS verification failed.

    Attributes:
        smtp_code: the server's reply code, when it gave one.
        smtp_message: the server's reply text.
    """

    def __init__(
        self, message: str, *, smtp_code: int | None = None, smtp_message: str = ""
    ) -> None:
        self.smtp_code = smtp_code
        self.smtp_message = smtp_message
        super().__init__(message)


class EmailCancelled(DeliveryError):
    """The email was cancelled before it was sent."""
