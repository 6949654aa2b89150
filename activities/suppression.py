"""The `suppress_recipient` activity: a sequence records an unsubscribe."""

from __future__ import annotations

from temporalio import activity
from temporalio.client import Client

from postlane.names import Activity
from postlane.sequences.models import Suppression
from postlane.sequences.suppressions import start_suppression


class SuppressionActivities:
    """Starts suppression workflows on behalf of sequences (a workflow's own child would be
    tied to its parent; a suppression must outlive the sequence that asked for it)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @activity.defn(name=Activity.SUPPRESS_RECIPIENT)
    async def suppress_recipient(self, suppression: Suppression) -> None:
        """Suppress the recipient for the sender (idempotent)."""
        await start_suppression(self._client, suppression)
