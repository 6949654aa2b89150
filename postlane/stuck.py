"""Why a running workflow makes no progress: a workflow task that keeps failing.

A workflow whose task fails (a bug in workflow code, a change that breaks replay) is
retried by the server forever and answers no query, so asking it "where are you?" waits
for nothing. The server knows better: the pending task's attempt (``describe``) and the
``WorkflowTaskFailed`` event it recorded when the first attempt failed (history).
"""

from __future__ import annotations

from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.api.failure.v1 import Failure
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryReverseRequest
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

# How a workflow task ended. A retry's Scheduled/Started events are left out: the Temporal
# server keeps a failing task's retries out of history, its time-skipping test server does not.
_TASK_OUTCOMES = frozenset(
    {EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED}
)
_PAGE = 20
"""Events read per page, newest first: the last task outcome is rarely far back."""


async def workflow_task_failure(client: Client, desc: WorkflowExecutionDescription) -> str | None:
    """Say why the workflow is stuck, if its workflow task is failing.

    Args:
        client: a client of the workflow's namespace.
        desc: the workflow's description, just fetched.

    Returns:
        e.g. ``"workflow task failing: RuntimeError: boom (attempt 4)"`` while the last
        workflow task failed and none has completed since; None otherwise (also for a
        closed workflow).
    """
    if desc.status != WorkflowExecutionStatus.RUNNING:
        return None
    raw = desc.raw_description
    attempt = 0
    if raw.HasField("pending_workflow_task"):
        attempt = raw.pending_workflow_task.attempt
        if attempt < 2:
            # The server says its current task has not failed: no history to read.
            return None
    failed = await _last_task_outcome(client, desc)
    if failed is None or failed.event_type != EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
        return None
    attributes = failed.workflow_task_failed_event_attributes
    failure = attributes.failure
    if failure.HasField("application_failure_info") and failure.application_failure_info.type:
        kind = failure.application_failure_info.type
    else:
        kind = WorkflowTaskFailedCause.Name(attributes.cause).removeprefix(
            "WORKFLOW_TASK_FAILED_CAUSE_"
        )
    reason = f"workflow task failing: {kind}: {await failure_message(client, failure)}"
    return f"{reason} (attempt {attempt})" if attempt else reason


async def failure_message(client: Client, failure: Failure) -> str:
    """A failure's message, opened first when encryption sealed it into its attributes
    (``Encoded failure`` is all the server stores then)."""
    if not failure.HasField("encoded_attributes"):
        return failure.message
    copy = Failure()
    copy.CopyFrom(failure)  # decoding works in place; the caller's copy stays as it came
    try:
        err = await client.data_converter.decode_failure(copy)
    except Exception:  # a key this process lacks: say what the server says
        return failure.message
    return str(getattr(err, "message", None) or err)


async def _last_task_outcome(
    client: Client, desc: WorkflowExecutionDescription
) -> HistoryEvent | None:
    """The newest Completed or Failed workflow-task event of the run's history."""
    request = GetWorkflowExecutionHistoryReverseRequest(
        namespace=client.namespace, maximum_page_size=_PAGE
    )
    request.execution.workflow_id = desc.id
    request.execution.run_id = desc.run_id
    try:
        while True:
            page = await client.workflow_service.get_workflow_execution_history_reverse(request)
            for event in page.history.events:
                if event.event_type in _TASK_OUTCOMES:
                    return event
            if not page.next_page_token:
                return None
            request.next_page_token = page.next_page_token
    except RPCError as err:
        if err.status != RPCStatusCode.UNIMPLEMENTED:
            raise
    # Temporal's time-skipping test server reads history forwards only.
    last = None
    handle = client.get_workflow_handle(desc.id, run_id=desc.run_id)
    async for event in handle.fetch_history_events():
        if event.event_type in _TASK_OUTCOMES:
            last = event
    return last
