"""``pl.lanes``: each lane's rate, backpressure, caps, backlog and in-flight sends; change a
lane's rate live."""

from __future__ import annotations

import builtins
from datetime import timedelta
from typing import Any

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from postlane.config import Settings
from postlane.errors import ConfigurationError
from postlane.ids import lane_task_queue, lane_workflow_id
from postlane.lanes.models import LaneReport, LaneStatus, RateChange
from postlane.names import LaneMessages

LANE_ANSWER = timedelta(seconds=5)
"""How long a report waits for a worker to answer for the lane's workflow (none may run)."""


class Lanes:
    """``pl.lanes``: the lane part of `PostlaneClient`, on the client's connection."""

    def __init__(self, temporal: Client, settings: Settings) -> None:
        self.temporal = temporal
        self.settings = settings

    async def list(self) -> builtins.list[LaneReport]:
        """Every configured lane: rate, backpressure, cap usage, backlog and in-flight sends."""
        return [await self.get(lane.name) for lane in self.settings.lanes]

    async def get(self, name: str) -> LaneReport:
        """One lane's report (see `list`).

        Raises:
            ConfigurationError: no lane has this name.
        """
        self.settings.lane(name)
        status: LaneStatus | None = None
        try:
            handle = self.temporal.get_workflow_handle(lane_workflow_id(name))
            status = await handle.query(
                LaneMessages.STATUS, result_type=LaneStatus, rpc_timeout=LANE_ANSWER
            )
        except RPCError:
            status = None  # not started yet, or no worker to answer
        report: dict[str, Any] = {"name": name, "status": status}
        try:
            desc = await self.temporal.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=self.temporal.namespace,
                    task_queue=TaskQueue(name=lane_task_queue(name)),
                    task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
                    report_stats=True,
                    report_config=True,
                )
            )
        except RPCError as err:
            if err.status != RPCStatusCode.UNIMPLEMENTED:
                raise
        else:
            report.update(
                server_rate=desc.effective_rate_limit.requests_per_second or None,
                backlog=desc.stats.approximate_backlog_count,
                backlog_age=desc.stats.approximate_backlog_age.ToTimedelta(),
                dispatch_rate=desc.stats.tasks_dispatch_rate,
            )
            try:
                query = (
                    f'PostlaneLane="{name}" AND PostlaneStatus="queued"'
                    ' AND ExecutionStatus="Running"'
                )
                report["in_flight"] = (await self.temporal.count_workflows(query)).count
            except RPCError:
                pass  # no visibility store (test server)
        return LaneReport(**report)

    async def set_rate(self, name: str, rate_per_second: float, *, reason: str = "") -> None:
        """Change a lane's rate live, on every host; a worker restart re-applies the file's.

        Raises:
            ConfigurationError: no lane has this name, or the rate is not positive.
        """
        self.settings.lane(name)
        if not rate_per_second > 0:
            raise ConfigurationError(f"rate: {rate_per_second:g} must be greater than 0")
        handle = self.temporal.get_workflow_handle(lane_workflow_id(name))
        try:
            await handle.signal(
                LaneMessages.SET_RATE, RateChange(rate_per_second=rate_per_second, reason=reason)
            )
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                raise ConfigurationError(
                    f"lane {name!r} has no running lane workflow; start a worker for it first"
                ) from None
            raise
