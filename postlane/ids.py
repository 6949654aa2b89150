"""Workflow IDs, task-queue names and Message-IDs: pure functions shared by every side.

Message-IDs encode the workflow ID (base32), so every retry of a send carries the same
Message-ID and an inbound reply's ``In-Reply-To`` leads back to the workflow that sent it.
"""

from __future__ import annotations

import base64
import re

WORKFLOW_TASK_QUEUE = "postlane"
"""Task queue of the orchestration workflows (no rate limit: they only decide)."""

LANE_QUEUE_PREFIX = "postlane.lane."
EMAIL_ID_PREFIX = "email:"
LANE_ID_PREFIX = "lane:"
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


def lane_task_queue(lane: str) -> str:
    """Activity task queue of a lane: one per sending account, rate limited by the server."""
    return LANE_QUEUE_PREFIX + lane


def lane_workflow_id(lane: str) -> str:
    """Workflow ID of a lane's quota and backpressure workflow."""
    return LANE_ID_PREFIX + lane


def message_id(workflow_id: str, domain: str) -> str:
    """The Message-ID every attempt of this workflow's send carries."""
    encoded = base64.b32encode(workflow_id.encode()).decode().rstrip("=").lower()
    return f"<pl.{encoded}@{domain}>"


def workflow_id_from_message_id(value: str) -> str | None:
    """The workflow ID a Postlane Message-ID encodes, or None for a foreign one."""
    match = _MESSAGE_ID_RE.match(value.strip())
    if not match:
        return None
    encoded = match.group(1).upper()
    encoded += "=" * (-len(encoded) % 8)
    try:
        return base64.b32decode(encoded).decode()
    except (ValueError, UnicodeDecodeError):
        return None
