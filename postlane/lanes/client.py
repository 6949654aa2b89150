"""``pl.lanes``: each lane's rate, backpressure, caps, backlog and in-flight sends; change a
lane's rate live."""

from __future__ import annotations

import builtins
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from postlane.config import Settings
from postlane.errors import ActionRefused, ConfigurationError
from postlane.ids import lane_task_queue, lane_workflow_id
from postlane.lanes.guard import LanePause, PauseRequest, ResumeRequest
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
        await self._signal(
            name, LaneMessages.SET_RATE, RateChange(rate_per_second=rate_per_second, reason=reason)
        )

    async def pause(self, name: str, *, reason: str = "paused by an operator") -> None:
        """Pause a lane by hand: its emails wait ``scheduled`` until `resume`.

        Raises:
            ConfigurationError: no lane has this name, or its workflow is not running.
        """
        self.settings.lane(name)
        await self._signal(name, LaneMessages.PAUSE, PauseRequest(reason=reason))

    async def resume(self, name: str, *, note: str = "") -> LanePause:
        """Resume a paused lane: the emails it held go out, each once, in their order.

        The guard's counts start afresh, so the rates that paused the lane do not pause it
        again at once.

        Returns:
            The pause that ended (its reason, since when, by whom).

        Raises:
            ConfigurationError: no lane has this name, or its workflow is not running.
            ActionRefused: the lane is not paused.
        """
        self.settings.lane(name)
        handle = self.temporal.get_workflow_handle(lane_workflow_id(name))
        try:
            ended: LanePause = await handle.execute_update(
                LaneMessages.RESUME, ResumeRequest(note=note), result_type=LanePause
            )
            return ended
        except WorkflowUpdateFailedError as err:
            cause = err.cause
            reason = str(getattr(cause, "message", None) or cause or err)
            raise ActionRefused(lane_workflow_id(name), "resume", reason) from None
        except RPCError as err:
            raise _not_running(name, err) from None

    async def _signal(self, name: str, signal: str, arg: BaseModel) -> None:
        try:
            await self.temporal.get_workflow_handle(lane_workflow_id(name)).signal(signal, arg)
        except RPCError as err:
            raise _not_running(name, err) from None


def _not_running(name: str, err: RPCError) -> Exception:
    """The error to raise for `err` from a lane workflow's handle: NOT_FOUND names the fix."""
    if err.status == RPCStatusCode.NOT_FOUND:
        return ConfigurationError(
            f"lane {name!r} has no running lane workflow; start a worker for it first"
        )
    return err
