"""``pl.dlq``: the emails parked in the dead-letter state: list them, or discard one.

``pl.retry`` sends a parked email again; it stays on `PostlaneClient` because it also
re-runs failed emails.
"""

from __future__ import annotations

import builtins
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from postlane.email.models import EmailReport, RetryRequest
from postlane.errors import InvalidEmail
from postlane.ids import key_from_workflow_id
from postlane.names import EmailMessages

if TYPE_CHECKING:
    from postlane.client import PostlaneClient


class DeadLetters:
    """``pl.dlq``: the dead-letter part of `PostlaneClient`, on the client's connection."""

    def __init__(self, client: PostlaneClient) -> None:
        self._client = client

    async def discard(self, key: str, *, reason: str = "") -> bool:
        """Give up on a dead-lettered email; it ends cancelled.

        Returns:
            True: the email was dead-lettered and is now discarded.

        Raises:
            EmailNotFound: no email has this key.
            ActionRefused: the email is not dead-lettered (the reason says its status).
        """
        return await self._client._update_dead_letter(
            key, EmailMessages.DISCARD, RetryRequest(reason=reason)
        )

    async def list(
        self, *, lane: str | None = None, since: datetime | None = None
    ) -> builtins.list[EmailReport]:
        """Emails parked in the dead-letter state, the longest parked first.

        Needs a server with visibility (the dev server or a cluster, not the time-skipping
        test server).

        Args:
            lane: only this lane's.
            since: only those parked at or after this aware time.

        Raises:
            ConfigurationError: no lane has this name.
            InvalidEmail: `since` is not timezone-aware.
        """
        keys = await self.keys(lane=lane, since=since)
        reports = [await self._client.describe(key) for key in keys]
        far_past = datetime.min.replace(tzinfo=UTC)
        return sorted(reports, key=lambda r: r.parked_at or far_past)

    async def keys(
        self, *, lane: str | None = None, since: datetime | None = None
    ) -> builtins.list[str]:
        """Keys of the emails parked in the dead-letter state (see `list`).

        The server filters on `PostlaneParkedAt`. Emails that parked under workflow code
        older than that search attribute lack it; their own workflow tells when they
        parked (they are left out if no worker answers).
        """
        query = 'PostlaneStatus="dead_letter" AND ExecutionStatus="Running"'
        if lane is not None:
            self._client.settings.lane(lane)  # also keeps the name safe inside the query
            query += f' AND PostlaneLane="{lane}"'
        if since is None:
            return await self._listed_keys(query)
        since = _aware(since, "since")
        stamp = since.astimezone(UTC).isoformat().replace("+00:00", "Z")
        keys = await self._listed_keys(f'{query} AND PostlaneParkedAt >= "{stamp}"')
        for key in await self._listed_keys(f"{query} AND PostlaneParkedAt IS NULL"):
            parked_at = (await self._client.describe(key)).parked_at
            if parked_at is not None and parked_at >= since:
                keys.append(key)
        return keys

    async def _listed_keys(self, query: str) -> builtins.list[str]:
        return [
            key_from_workflow_id(execution.id)
            async for execution in self._client.temporal.list_workflows(query)
        ]


def _aware(when: datetime, field: str) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidEmail(field, "must be timezone-aware, e.g. datetime.now(UTC)")
    return when
