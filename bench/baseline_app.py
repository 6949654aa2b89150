"""The baseline app: one workflow that runs one no-op activity on a separate task queue.

It is what "a trivial one-workflow-one-activity app" means in Postlane's performance
targets: the same shape as Postlane (an orchestration queue plus an activity queue), with
none of Postlane's work (no SMTP, search attributes, memo, heartbeats or pydantic models).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import SearchAttributeKey

WORKFLOW_QUEUE = "bench-baseline"
ACTIVITY_QUEUE = "bench-baseline.activity"


@activity.defn(name="bench_noop")
async def noop(payload: str) -> int:
    """Do nothing but return the payload's size."""
    return len(payload)


@workflow.defn(name="BenchTrivial")
class TrivialWorkflow:
    """Execute `noop` once, on its own task queue, and return its result."""

    @workflow.run
    async def run(self, payload: str) -> int:
        return await workflow.execute_activity(
            "bench_noop",
            payload,
            result_type=int,
            task_queue=ACTIVITY_QUEUE,
            start_to_close_timeout=timedelta(seconds=30),
        )


# -- variants for bench/ablation.py: the baseline plus one Postlane cost at a time ----------

STATUS = SearchAttributeKey.for_keyword("PostlaneStatus")


@dataclass
class VariantInput:
    payload: str
    heartbeat: bool = False
    """The activity heartbeats once, as Postlane's send does when it starts."""
    upsert: bool = False
    """The workflow upserts a keyword search attribute before it completes, as Postlane's
    does (status "sent")."""


@activity.defn(name="bench_noop_variant")
async def noop_variant(inp: VariantInput) -> int:
    """`noop`, with an optional heartbeat."""
    if inp.heartbeat:
        activity.heartbeat({"phase": "connect"})
    return len(inp.payload)


@workflow.defn(name="BenchVariant")
class VariantWorkflow:
    """`TrivialWorkflow`, with the options of `VariantInput`."""

    @workflow.run
    async def run(self, inp: VariantInput) -> int:
        result = await workflow.execute_activity(
            "bench_noop_variant",
            inp,
            result_type=int,
            task_queue=ACTIVITY_QUEUE,
            start_to_close_timeout=timedelta(seconds=30),
        )
        if inp.upsert:
            workflow.upsert_search_attributes([STATUS.value_set("sent")])
        return result
