"""Lane limits the Temporal server enforces for a lane's task queue as a whole."""

from __future__ import annotations

import structlog
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import RateLimit
from temporalio.api.workflowservice.v1 import UpdateTaskQueueConfigRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from postlane.config import LaneConfig

log = structlog.get_logger(__name__)


async def apply_lane_limits(client: Client, lane: LaneConfig, *, rate: float | None = None) -> bool:
    """Set the lane queue's server-side rate (and per-recipient-domain rate).

    The server enforces it across every worker host, unlike a per-worker option.

    Args:
        rate: sends per second; default the lane's configured ``rate_per_second``.

    Returns:
        False if the server does not implement task-queue config (the time-skipping test
        server); workers then fall back to their own per-queue limit.
    """
    rps = rate if rate is not None else lane.rate_per_second
    update = UpdateTaskQueueConfigRequest.RateLimitUpdate
    request = UpdateTaskQueueConfigRequest(
        namespace=client.namespace,
        identity="postlane",
        task_queue=lane.task_queue,
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        update_queue_rate_limit=update(
            rate_limit=RateLimit(requests_per_second=rps), reason=f"postlane lane {lane.name}"
        ),
    )
    if lane.per_domain_per_second is not None:
        request.update_fairness_key_rate_limit_default.CopyFrom(
            update(
                rate_limit=RateLimit(requests_per_second=lane.per_domain_per_second),
                reason=f"postlane lane {lane.name}: per recipient domain",
            )
        )
    try:
        await client.workflow_service.update_task_queue_config(request)
    except RPCError as err:
        if err.status == RPCStatusCode.UNIMPLEMENTED:
            log.warning(
                "lane.rate_not_applied", lane=lane.name, reason="server lacks UpdateTaskQueueConfig"
            )
            return False
        raise
    log.info(
        "lane.rate_applied",
        lane=lane.name,
        rate_per_second=rps,
        per_domain=lane.per_domain_per_second,
    )
    return True
