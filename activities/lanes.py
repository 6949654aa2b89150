"""Lane administration on the Temporal server: the `set_lane_rate` activity."""

from __future__ import annotations

from temporalio import activity
from temporalio.client import Client

from postlane.lanes.limits import apply_lane_limits
from postlane.lanes.models import (
    LaneRateRequest,
)
from postlane.names import Activity


class LaneAdminActivities:
    """Side effects of the lane quota workflow; owns the Temporal client it talks through."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @activity.defn(name=Activity.SET_LANE_RATE)
    async def set_lane_rate(self, req: LaneRateRequest) -> bool:
        """Set the lane queue's server-side rate; False if the server cannot (test server)."""
        return await apply_lane_limits(
            self._client,
            req.lane,
            rate=req.rate_per_second,
            per_domain=req.per_domain_per_second,
            reason=req.reason,
            domain_weights=req.domain_weights,
            clear_domains=req.clear_domains,
        )
