"""Idempotency keys as workflow IDs: what makes a second start with one key "the same".

A start carries a hash of its content in the workflow's memo. A second start with the
same key attaches to the first workflow (USE_EXISTING, or REJECT_DUPLICATE once closed)
only if the hashes match; otherwise the caller gets `IdempotencyConflict`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from temporalio.client import WorkflowHandle

from postlane.errors import IdempotencyConflict

CONTENT_HASH = "postlane_content_hash"
"""Memo key holding the hash of what a workflow was started with."""


def content_digest(*parts: str) -> str:
    """The hash stored in the memo for a start made of these parts."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def started_new(handle: WorkflowHandle[Any, Any]) -> bool:
    """True if this `start_workflow` call started the workflow, False if it attached to a
    running one (USE_EXISTING) or the SDK cannot tell."""
    response = getattr(handle, "_start_workflow_response", None)
    return response is not None and bool(getattr(response, "started", True))


async def check_same_content(handle: WorkflowHandle[Any, Any], key: str, digest: str) -> None:
    """Raise `IdempotencyConflict` unless the workflow was started with this content.

    Raises:
        IdempotencyConflict: the key is already used for different content.
    """
    description = await handle.describe()
    if (await description.memo()).get(CONTENT_HASH) != digest:
        raise IdempotencyConflict(key)
