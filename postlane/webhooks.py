"""Event webhooks: subscriptions (``[[webhooks]]`` in ``postlane.toml``), events and the
wire models of their delivery.

A subscription names a URL, the events it wants and the environment variable that holds
its signing secret (Standard Webhooks' ``whsec_<base64>`` form). Emails and sequences emit
their terminal events; each (subscription, email or sequence) gets one delivery workflow,
``webhook:<subscription>:<workflow ID>``, that posts its events in order, each as an
activity with retries. See docs/webhooks.md.

Standard library and pydantic only: workflow code imports it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from postlane.durations import Duration
from postlane.errors import ConfigurationError

WEBHOOK_ID_PREFIX = "webhook:"
SECRET_PREFIX = "whsec_"
WEBHOOK_UNKNOWN = "WebhookUnknownError"
"""``ApplicationError.type`` the delivery retry policy does not retry. Raised by no worker
since a subscription missing on a worker is retried (`WEBHOOK_FAILED`); still named in the
policy, so deliveries already scheduled keep theirs."""
WEBHOOK_FAILED = "WebhookDeliveryError"
"""``ApplicationError.type``: the receiver answered other than 2xx, not in time or could
not be reached, or this worker lacks the subscription or its secret (retried with the
subscription's backoff until ``give_up_after``)."""
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def shown_url(url: str) -> str:
    """`url` without its user info, query and fragment: receivers often put a token there,
    and what is shown goes into workflow history and the Web UI, which must hold no secret."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    hidden = parts.username is not None or bool(parts.query) or bool(parts.fragment)
    return f"{parts.scheme}://{netloc}{parts.path}" + ("?…" if hidden else "")


class WebhookEventType(StrEnum):
    """The events a subscription may ask for."""

    EMAIL_SENT = "email.sent"
    EMAIL_FAILED = "email.failed"
    EMAIL_DEAD_LETTERED = "email.dead_lettered"
    EMAIL_CANCELLED = "email.cancelled"
    SEQUENCE_REPLIED = "sequence.replied"
    SEQUENCE_BOUNCED = "sequence.bounced"
    SEQUENCE_UNSUBSCRIBED = "sequence.unsubscribed"
    SEQUENCE_COMPLETED = "sequence.completed"


class WebhookRetry(BaseModel):
    """How one subscription's deliveries are retried (exponential backoff)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_interval: Duration = timedelta(seconds=5)
    """The wait before the second attempt: ``"5s"``, ``"1m"``, or seconds."""
    backoff: float = Field(default=2.0, ge=1.0)
    """Each wait is this many times the one before, up to `maximum_interval`."""
    maximum_interval: Duration = timedelta(minutes=10)
    give_up_after: Duration = timedelta(days=3)
    """An event not delivered by then is dropped (counted as failed) and the next one goes."""

    @field_validator("initial_interval", "maximum_interval", "give_up_after")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v <= timedelta(0):
            raise ValueError("must be positive")
        return v


class WebhookConfig(BaseModel):
    """One subscription: ``[[webhooks]]`` in ``postlane.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """Names the subscription (and its delivery workflows ``webhook:<name>:...``)."""
    url: str
    """Where events are POSTed (``http`` or ``https``)."""
    events: list[WebhookEventType] = Field(min_length=1)
    """The events wanted, e.g. ``["email.sent", "sequence.replied"]``."""
    secret_env: str = Field(min_length=1)
    """Environment variable holding the signing secret, ``whsec_<base64>``; only the
    workers read it, when they sign a delivery."""
    retry: WebhookRetry = WebhookRetry()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r}: use lower-case letters, digits, '-' and '_'")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{shown_url(v)!r}: use an http:// or https:// URL with a host")
        return v

    @property
    def shown_url(self) -> str:
        """`url` as history, the Web UI, errors and logs show it: see `shown_url`."""
        return shown_url(self.url)

    @field_validator("events", mode="before")
    @classmethod
    def _events(cls, v: Any) -> Any:
        if isinstance(v, list):
            known = {e.value for e in WebhookEventType}
            for name in v:
                if name not in known:
                    events = ", ".join(sorted(known))
                    raise ValueError(f"{name!r} is not an event (events: {events})")
        return v

    @field_validator("events")
    @classmethod
    def _distinct(cls, v: list[WebhookEventType]) -> list[WebhookEventType]:
        return list(dict.fromkeys(v))

    @field_validator("secret_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v):
            # Never echo the value: it may be the secret itself, pasted by mistake.
            raise ValueError("name an environment variable (letters, digits, '_'), not a secret")
        return v

    def wants(self, event: str) -> bool:
        """Whether this subscription receives `event`."""
        return event in self.events

    def secret(self) -> bytes:
        """The signing key, read from `secret_env` (worker side only).

        Raises:
            ConfigurationError: the variable is unset or not ``whsec_<base64>``.
        """
        value = os.environ.get(self.secret_env, "")
        if not value:
            raise ConfigurationError(
                f"webhook {self.name!r}: environment variable {self.secret_env} is not set"
            )
        return decode_secret(value, f"webhook {self.name!r}: {self.secret_env}")


def decode_secret(value: str, where: str = "secret") -> bytes:
    """The key bytes of a Standard Webhooks secret, ``whsec_<base64>`` (the prefix optional).

    Raises:
        ConfigurationError: not base64, or shorter than 24 bytes.
    """
    encoded = value.strip().removeprefix(SECRET_PREFIX)
    try:
        # Padding optional, as in the Standard Webhooks libraries.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{where}: not a whsec_<base64> secret") from None
    if len(key) < 24:
        raise ConfigurationError(f"{where}: the secret is {len(key)} bytes; use 24 to 64")
    return key


def webhook_workflow_id(subscription: str, subject: str) -> str:
    """The delivery workflow of `subscription` for one email or sequence (its workflow ID)."""
    return f"{WEBHOOK_ID_PREFIX}{subscription}:{subject}"


def split_webhook_workflow_id(workflow_id: str) -> tuple[str, str]:
    """(subscription, subject workflow ID) of a delivery workflow's ID."""
    rest = workflow_id.removeprefix(WEBHOOK_ID_PREFIX)
    subscription, _, subject = rest.partition(":")
    return subscription, subject


class WebhookEvent(BaseModel):
    """One event, as queued for delivery and sent (body ``{type, timestamp, data}``)."""

    model_config = ConfigDict(frozen=True)

    id: str
    """The ``webhook-id``: the same on every attempt, so receivers drop repeats by it."""
    type: WebhookEventType
    timestamp: datetime
    """When it happened (workflow time, UTC)."""
    data: dict[str, Any] = Field(default_factory=dict)
    """The email's or sequence's key, status, lane, Message-ID, reason... Never a body."""

    def body(self) -> dict[str, Any]:
        """The JSON document POSTed to the receiver."""
        return {
            "type": self.type.value,
            "timestamp": self.timestamp.isoformat().replace("+00:00", "Z"),
            "data": self.data,
        }


class WebhookEmit(BaseModel):
    """Input of the ``emit_webhook_event`` local activity: queue `event` for every
    subscription that wants it."""

    model_config = ConfigDict(frozen=True)

    subject: str
    """The emitting workflow's ID (``email:<key>`` or ``sequence:<key>``)."""
    event: WebhookEvent


class WebhookEmitted(BaseModel):
    """What ``emit_webhook_event`` did: the subscriptions it queued the event for."""

    model_config = ConfigDict(frozen=True)

    subscriptions: list[str] = Field(default_factory=list)


class WebhookDeliveryInput(BaseModel):
    """Input (and continue-as-new state) of ``WebhookDelivery``. No secret: the activity
    reads it from the worker's environment."""

    model_config = ConfigDict(frozen=True)

    subscription: str
    url: str = ""
    """The target when the delivery started, as `shown_url` shows it (the activity posts to
    the subscription's current, full URL)."""
    subject: str
    retry: WebhookRetry = WebhookRetry()
    pending: list[WebhookEvent] = Field(default_factory=list)
    seen: list[str] = Field(default_factory=list)
    """Event IDs already queued, newest last: a repeated signal is dropped."""
    delivered: int = 0
    failed: int = 0
    last_error: str | None = None


class WebhookRequest(BaseModel):
    """Input of the ``deliver_webhook`` activity."""

    model_config = ConfigDict(frozen=True)

    subscription: str
    event: WebhookEvent


class WebhookResponse(BaseModel):
    """What the receiver answered to a delivered event."""

    model_config = ConfigDict(frozen=True)

    status_code: int
    attempt: int = 1


class WebhookDeliveryReport(BaseModel):
    """Query ``status`` of ``WebhookDelivery``."""

    model_config = ConfigDict(frozen=True)

    subscription: str
    subject: str
    url: str
    pending: int
    delivered: int
    failed: int
    next_event: str | None = None
    """The ``webhook-id`` of the event being delivered now."""
    last_error: str | None = None
    """Why the last event given up on failed (the attempt failing now is the pending
    activity's last failure: see ``postlane webhooks list``)."""


__all__ = [
    "WebhookConfig",
    "WebhookDeliveryInput",
    "WebhookDeliveryReport",
    "WebhookEmit",
    "WebhookEmitted",
    "WebhookEvent",
    "WebhookEventType",
    "WebhookRequest",
    "WebhookResponse",
    "WebhookRetry",
    "decode_secret",
    "webhook_workflow_id",
]
