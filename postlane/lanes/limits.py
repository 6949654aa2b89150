"""Lane limits the Temporal server enforces for a lane's task queue as a whole."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta

import structlog
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import RateLimit
from temporalio.api.workflowservice.v1 import UpdateTaskQueueConfigRequest
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from postlane.config import LaneConfig
from postlane.ids import WORKFLOW_TASK_QUEUE, lane_task_queue, lane_workflow_id
from postlane.lanes.models import (
    LaneState,
)
from postlane.names import LaneMessages, WorkflowType

log = structlog.get_logger(__name__)


async def apply_lane_limits(
    client: Client,
    lane: str,
    *,
    rate: float,
    per_domain: float | None = None,
    reason: str = "",
    domain_weights: Mapping[str, float] | None = None,
    clear_domains: Sequence[str] = (),
) -> bool:
    """Set the lane queue's server-side rate (and per-recipient-domain rate).

    The server enforces it across every worker host, unlike a per-worker option.
    `domain_weights` set fairness weight overrides (a domain's limit is the per-domain rate
    times its weight: per-domain backoff); `clear_domains` remove earlier ones.

    Returns:
        False if the server does not implement task-queue config (the time-skipping test
        server); workers then fall back to their own per-queue limit.
    """
    update = UpdateTaskQueueConfigRequest.RateLimitUpdate
    request = UpdateTaskQueueConfigRequest(
        namespace=client.namespace,
        identity="postlane",
        task_queue=lane_task_queue(lane),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        update_queue_rate_limit=update(
            rate_limit=RateLimit(requests_per_second=rate),
            reason=f"postlane lane {lane}: {reason or 'configured'}",
        ),
    )
    # No per-domain rate means none: an update without a rate clears an earlier one.
    request.update_fairness_key_rate_limit_default.CopyFrom(
        update(
            rate_limit=RateLimit(requests_per_second=per_domain) if per_domain else None,
            reason=f"postlane lane {lane}: per recipient domain",
        )
    )
    if domain_weights:
        request.set_fairness_weight_overrides.update(domain_weights)
    if clear_domains:
        request.unset_fairness_weight_overrides.extend(clear_domains)
    try:
        await client.workflow_service.update_task_queue_config(request)
    except RPCError as err:
        if err.status == RPCStatusCode.UNIMPLEMENTED:
            log.warning(
                "lane.rate_not_applied", lane=lane, reason="server lacks UpdateTaskQueueConfig"
            )
            return False
        raise
    log.info(
        "lane.rate_applied",
        lane=lane,
        rate_per_second=rate,
        per_domain=per_domain,
        reason=reason,
        domain_weights=dict(domain_weights or {}),
        cleared=list(clear_domains),
    )
    return True


async def start_lane_workflow(client: Client, lane: LaneConfig) -> None:
    """Start the lane's quota workflow if needed and hand it the lane's configuration.

    Idempotent: every worker calls it at start (signal-with-start), so a restarted worker
    applies an edited ``postlane.toml``.
    """
    await client.start_workflow(
        WorkflowType.LANE,
        LaneState(name=lane.name, limits=lane.limits(), effective_rate=lane.rate_per_second),
        id=lane_workflow_id(lane.name),
        task_queue=WORKFLOW_TASK_QUEUE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        start_signal=LaneMessages.CONFIGURE,
        start_signal_args=[lane.limits()],
        static_summary=f"Lane {lane.name}: rate, caps and backpressure",
        # A burst of slot requests makes for long workflow tasks on a loaded host.
        task_timeout=timedelta(minutes=1),
    )
