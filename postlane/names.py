"""Every name that crosses a process boundary, defined once: workflow types, activity
names, and the signals, queries and updates of each workflow.

Both sides import these: the workflow that registers a handler and the client, activity
or other workflow that calls it. A name here is part of the wire contract
(docs/contract.md): renaming one breaks running workflows and clients in other languages,
so these strings never change. Error types are `postlane.errors.ErrorType`.

Standard library only, so workflow code imports it without cost.
"""

from __future__ import annotations

from typing import Final


class WorkflowType:
    """Workflow type names (``@workflow.defn(name=...)``)."""

    SEND_EMAIL: Final = "SendEmail"
    SEQUENCE: Final = "Sequence"
    LANE: Final = "Lane"
    SUPPRESSION: Final = "Suppression"
    INBOX_WATCHER: Final = "InboxWatcher"
    WEBHOOK_DELIVERY: Final = "WebhookDelivery"


class Activity:
    """Activity names (``@activity.defn(name=...)``)."""

    SEND_EMAIL: Final = "send_email"
    RESOLVE_LANE: Final = "resolve_lane"
    SET_LANE_RATE: Final = "set_lane_rate"
    PROBE_SMTP: Final = "probe_smtp"
    SUPPRESS_RECIPIENT: Final = "suppress_recipient"
    POLL_INBOX: Final = "poll_inbox"
    RECORD_UNSUBSCRIBE: Final = "record_unsubscribe"
    COMPOSE_EMAIL: Final = "compose_email"
    """The default activity of a sequence's ``compose`` step (an agent you register)."""
    EMIT_WEBHOOK_EVENT: Final = "emit_webhook_event"
    """Local activity: queue an event for every subscription that wants it."""
    DELIVER_WEBHOOK: Final = "deliver_webhook"
    """POST one signed event to a subscription's URL."""


class EmailMessages:
    """Signals, queries and updates of ``SendEmail``."""

    STATUS: Final = "status"
    """Query: the email's `EmailReport`."""
    RETRY: Final = "retry"
    """Signal and update: send a dead-lettered email again (`RetryRequest`)."""
    DISCARD: Final = "discard"
    """Signal and update: give up on a dead-lettered email (`RetryRequest`)."""
    SLOT_GRANTED: Final = "slot_granted"
    """Signal from the lane: this email may send now."""
    ATTEMPT_FAILED: Final = "attempt_failed"
    """Signal from the send activity: an attempt failed (`AttemptRecord`)."""
    DELIVERY_ACCEPTED: Final = "delivery_accepted"
    """Signal from the send activity: the server accepted the message (`DeliveryReceipt`)."""
    ACCEPTED_RECEIPT: Final = "accepted_receipt"
    """Query: the receipt the send activity signalled, if any."""


class EmailMemo:
    """Memo keys ``SendEmail`` sets (besides the content hash, `postlane.idempotency`)."""

    DEAD_LETTER: Final = "postlane_dead_letter"
    """Set when the email parks: subject, recipients, attempts and last error, as a dict."""


class LaneMessages:
    """Signals and queries of ``Lane``."""

    STATUS: Final = "status"
    REQUEST_SLOT: Final = "request_slot"
    CONFIGURE: Final = "configure"
    SET_RATE: Final = "set_rate"
    THROTTLED: Final = "throttled"
    DOMAIN_THROTTLED: Final = "domain_throttled"
    PROVIDER_DOWN: Final = "provider_down"
    RECORD_OUTCOMES: Final = "record_outcomes"
    PAUSE: Final = "pause"
    RESUME: Final = "resume"
    PAUSE_STATE: Final = "pause_state"


class SequenceMessages:
    """Signals, queries and updates of ``Sequence``."""

    STATUS: Final = "status"
    INBOUND: Final = "inbound"
    UNSUBSCRIBE: Final = "unsubscribe"
    PAUSE: Final = "pause"
    RESUME: Final = "resume"
    APPROVE: Final = "approve"


class SuppressionMessages:
    """Signals and queries of ``Suppression``."""

    STATUS: Final = "status"
    LIFT: Final = "lift"


class InboxMessages:
    """Signals and queries of ``InboxWatcher``."""

    STATUS: Final = "status"
    POLL_NOW: Final = "poll_now"
    CONFIGURE: Final = "configure"


class WebhookMessages:
    """Signals and queries of ``WebhookDelivery``."""

    STATUS: Final = "status"
    """Query: the `WebhookDeliveryReport`."""
    ENQUEUE: Final = "enqueue"
    """Signal: one more event to deliver, after those queued (`WebhookEvent`)."""
