"""The workers' configuration as the authority on lanes: the ``resolve_lane`` local activity.

`SendEmailWorkflow` runs it once, at its start, whoever started it (the Python client, a
sequence, or a Temporal client in another language). Its answer lands in the history, so
the decision replays exactly even after ``postlane.toml`` changes.
"""

from __future__ import annotations

from temporalio import activity

from postlane.config import Settings
from postlane.email.models import LaneQuery, LaneResolution
from postlane.erasure import RecipientHasher
from postlane.errors import ErrorType
from postlane.names import Activity


class LaneResolver:
    """Answers from the settings the worker was started with (never from the caller)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._hasher = RecipientHasher.from_settings(settings)

    @activity.defn(name=Activity.RESOLVE_LANE)
    async def resolve_lane(self, query: LaneQuery) -> LaneResolution:
        """The lane that sends for `query.sender` (or `query.lane`, checked) and its settings.

        Unknown senders and lanes are answers, not errors: the workflow fails the email
        with a typed reason instead of retrying something that cannot change by itself.
        """
        resolution = resolve(self._settings, query)
        if query.recipients and self._hasher is not None and resolution.error_type is None:
            hashes = self._hasher.hashes(query.recipients)
            resolution = resolution.model_copy(update={"recipient_hashes": hashes})
        wanted = [e for e in self._settings.webhook_events() if e.startswith("email.")]
        if wanted and resolution.error_type is None:
            resolution = resolution.model_copy(update={"webhook_events": wanted})
        return resolution


def resolve(settings: Settings, query: LaneQuery) -> LaneResolution:
    """`LaneResolver.resolve_lane` as a plain function of the settings."""
    route = ""
    routed = settings.route_for(
        query.sender, query.recipient_domains, query.tags, query.priority or "normal"
    )
    if query.lane:
        if routed is not None and routed[0].name == query.lane:
            route = routed[1]  # the client routed it already, by the same rules
        lane = next((lane for lane in settings.lanes if lane.name == query.lane), None)
        if lane is None:
            known = ", ".join(sorted(lane.name for lane in settings.lanes))
            return LaneResolution(
                error_type=ErrorType.UNKNOWN_LANE,
                error=f"no lane named {query.lane!r} is configured (lanes: {known})",
            )
    elif routed is not None:
        lane, route = routed
    else:
        found = settings.lane_for(query.sender)
        if found is None:
            return LaneResolution(
                error_type=ErrorType.UNKNOWN_SENDER,
                error=f"no lane serves {query.sender!r}; add it to a lane's senders",
            )
        lane = found
    return LaneResolution(
        lane=lane.name,
        retry=lane.retry,
        quota=lane.has_quota,
        recipient_domain_attribute=settings.recipient_domain_attribute,
        route=route,
    )
