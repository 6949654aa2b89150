"""Idempotency keys as workflow IDs: what makes a second start with one key "the same".

A start carries a hash of its content in the workflow's memo. A second start with the
same key attaches to the first workflow (USE_EXISTING, or REJECT_DUPLICATE once closed)
only if the hashes match; otherwise the caller gets `IdempotencyConflict`.

An email's hash covers only what its sender chose (the email and its ``send_at``), never
what the workers resolve (lane, retry policy), so ``SendEmail`` computes the same hash
for itself when a client in another language started it without one (see
`email_digest`), and a Python send with the same key and content then finds that email.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from temporalio.client import WorkflowHandle

from postlane.email.models import Email
from postlane.errors import IdempotencyConflict

CONTENT_HASH = "postlane_content_hash"
"""Memo key holding the hash of what a workflow was started with."""


def content_digest(*parts: str) -> str:
    """The hash stored in the memo for a start made of these parts."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def email_digest(email: Email, send_at: datetime | None) -> str:
    """The content hash of one email: the same whichever client started it.

    Args:
        email: the validated email (its canonical JSON is hashed).
        send_at: the aware send time, or None (compared in UTC).
    """
    when = send_at.astimezone(UTC) if send_at is not None else None
    # An email without display names hashes as it did before the field existed, so a send
    # repeated across an upgrade is still "the same email".
    unnamed = {"display_names"} if not email.display_names else None
    return content_digest(email.model_dump_json(exclude=unnamed), str(when))


def started_new(handle: WorkflowHandle[Any, Any]) -> bool:
    """True if this `start_workflow` call started the workflow, False if it attached to a
    running one (USE_EXISTING) or the SDK cannot tell."""
    response = getattr(handle, "_start_workflow_response", None)
    return response is not None and bool(getattr(response, "started", True))


async def check_same_content(
    handle: WorkflowHandle[Any, Any],
    key: str,
    digest: str,
    *,
    digest_of_start: Callable[[], Awaitable[str | None]] | None = None,
) -> None:
    """Raise `IdempotencyConflict` unless the workflow was started with this content.

    Args:
        digest_of_start: for a workflow without the memo (started by another client and
            not yet picked up by a worker), the hash of the input it was started with.

    Raises:
        IdempotencyConflict: the key is already used for different content.
    """
    description = await handle.describe()
    stored = (await description.memo()).get(CONTENT_HASH)
    if stored is None and digest_of_start is not None:
        stored = await digest_of_start()
    if stored != digest:
        raise IdempotencyConflict(key)
