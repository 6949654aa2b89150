"""Postlane's workflows: deterministic code only (no I/O, no clock, no randomness)."""

from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from workflows.inbox import InboxWatcherWorkflow
from workflows.lane import LaneWorkflow
from workflows.send_email import SendEmailWorkflow
from workflows.sequence import SequenceWorkflow
from workflows.suppression import SuppressionWorkflow
from workflows.webhook import WebhookDeliveryWorkflow

WORKFLOWS: list[type] = [
    SendEmailWorkflow,
    LaneWorkflow,
    SequenceWorkflow,
    SuppressionWorkflow,
    InboxWatcherWorkflow,
    WebhookDeliveryWorkflow,
]


PASSTHROUGH_MODULES = (
    "workflows",
    "postlane",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_extensions",
    "typing_inspection",
    "tzdata",
)
"""What the sandbox shares with the worker instead of re-importing for every run: Postlane's
workflow code and the models it imports, and the libraries those models are built on.
Anything else (the client, Jinja2, pydantic-settings, I/O libraries) is not imported by
workflow code at all (tests/test_public_api.py checks), so it needs no pass-through."""


def workflow_runner(*also: str) -> SandboxedWorkflowRunner:
    """The sandbox Postlane's workflows run in (workers and the replay test alike).

    Calls that break determinism (the clock, randomness, I/O) stay forbidden. The modules
    in `PASSTHROUGH_MODULES` are shared instead of re-imported for every run, which made a
    busy lane workflow ten times slower (3-5 s per workflow task with 60 signals, against
    0.3 s). Postlane's workflow modules and models keep no mutable module state, so sharing
    them is safe.

    Args:
        also: further modules to share, such as the module of a workflow defined outside
            ``workflows`` (a benchmark's or a test's own workflow).
    """
    modules = (*PASSTHROUGH_MODULES, *also)
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*modules)
    )


__all__ = [
    "PASSTHROUGH_MODULES",
    "WORKFLOWS",
    "InboxWatcherWorkflow",
    "LaneWorkflow",
    "SendEmailWorkflow",
    "SequenceWorkflow",
    "SuppressionWorkflow",
    "WebhookDeliveryWorkflow",
    "workflow_runner",
]
