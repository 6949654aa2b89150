"""Workflow IDs, task-queue names and Message-IDs: pure functions shared by every side.

Message-IDs encode the workflow ID (base32), so every retry of a send carries the same
Message-ID and an inbound reply's ``In-Reply-To`` leads back to the workflow that sent it.
"""

from __future__ import annotations

import base64
import re

WORKFLOW_TASK_QUEUE = "postlane"
"""Task queue of the orchestration workflows (no rate limit: they only decide)."""

INBOUND_TASK_QUEUE = "postlane.inbound"
"""Activity task queue of the IMAP polls (hosts that run ``postlane inbound``)."""

LANE_QUEUE_PREFIX = "postlane.lane."
EMAIL_ID_PREFIX = "email:"
LANE_ID_PREFIX = "lane:"
SEQUENCE_ID_PREFIX = "sequence:"
SUPPRESSION_ID_PREFIX = "suppressed:"
INBOX_ID_PREFIX = "inbound:"
MAX_KEY_LENGTH = 200
_KEY_RE = re.compile(r"^[^\s\x00-\x1f\x7f]+$")
_MESSAGE_ID_RE = re.compile(r"^<pl\.([a-z2-7]+)@[^>]+>$")


def validate_key(key: str) -> str:
    """Check an idempotency key and return it.

    Raises:
        ValueError: the key is empty, too long, or has whitespace or control characters.
    """
    if not key:
        raise ValueError("must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"must be at most {MAX_KEY_LENGTH} characters")
    if not _KEY_RE.match(key):
        raise ValueError("must not contain whitespace or control characters")
    return key


def email_workflow_id(key: str) -> str:
    """Workflow ID of the email with this idempotency key."""
    return EMAIL_ID_PREFIX + key


def key_from_workflow_id(workflow_id: str) -> str:
    """Inverse of `email_workflow_id` (other IDs come back unchanged)."""
    return workflow_id.removeprefix(EMAIL_ID_PREFIX)


def sequence_workflow_id(key: str) -> str:
    """Workflow ID of the sequence enrolled with this key."""
    return SEQUENCE_ID_PREFIX + key


def sequence_email_key(sequence_key: str, step: str) -> str:
    """Idempotency key of the email a sequence's step sends."""
    return f"{sequence_key}:{step}"


def sequence_of_email(workflow_id: str) -> str | None:
    """The sequence workflow that sent an email (``email:K:step`` → ``sequence:K``).

    Standalone emails whose key contains ``:`` also map to a name; no such sequence
    exists, and signalling it fails harmlessly.
    """
    key = workflow_id.removeprefix(EMAIL_ID_PREFIX)
    if key == workflow_id or ":" not in key:
        return None
    return sequence_workflow_id(key.rsplit(":", 1)[0])


def suppression_workflow_id(sender: str, address: str) -> str:
    """Workflow ID that, while running, keeps `address` out of `sender`'s sequences."""
    return f"{SUPPRESSION_ID_PREFIX}{sender.lower()}/{address.lower()}"


def unsubscribe_token(sequence_id: str) -> str:
    """Opaque, reversible token naming a sequence in unsubscribe links and mailto subjects."""
    return "pl-" + _b32(sequence_id)


def sequence_from_unsubscribe_token(token: str) -> str | None:
    """Inverse of `unsubscribe_token` (None for anything else)."""
    match = re.search(r"\bpl-([a-z2-7]+)\b", token.strip().lower())
    return _unb32(match.group(1)) if match else None


def lane_task_queue(lane: str) -> str:
    """Activity task queue of a lane: one per sending account, rate limited by the server."""
    return LANE_QUEUE_PREFIX + lane


def lane_workflow_id(lane: str) -> str:
    """Workflow ID of a lane's quota and backpressure workflow."""
    return LANE_ID_PREFIX + lane


def inbox_workflow_id(inbox: str) -> str:
    """Workflow ID of an inbox's watcher (one durable poller per inbox)."""
    return INBOX_ID_PREFIX + inbox


def message_id(workflow_id: str, domain: str) -> str:
    """The Message-ID every attempt of this workflow's send carries."""
    return f"<pl.{_b32(workflow_id)}@{domain}>"


def workflow_id_from_message_id(value: str) -> str | None:
    """The workflow ID a Postlane Message-ID encodes, or None for a foreign one."""
    match = _MESSAGE_ID_RE.match(value.strip())
    if not match:
        return None
    return _unb32(match.group(1))


def _b32(value: str) -> str:
    return base64.b32encode(value.encode()).decode().rstrip("=").lower()


def _unb32(encoded: str) -> str | None:
    encoded = encoded.upper() + "=" * (-len(encoded) % 8)
    try:
        return base64.b32decode(encoded).decode()
    except (ValueError, UnicodeDecodeError):
        return None
