"""SuppressionWorkflow: while it runs, no email from this sender goes to this address, and
no sequence of the sender enrolls it.

Suppressions live in Temporal, not in a second database: one small workflow per
(sender, address), ID ``suppressed:<sender>/<address>``, found by ID when an email is
sent or a sequence enrolls, and listed with ``WorkflowType="Suppression"``. It waits for a
``lift`` signal, forever.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from postlane.names import SuppressionMessages, WorkflowType
    from postlane.sequences.models import Suppression


@workflow.defn(name=WorkflowType.SUPPRESSION)
class SuppressionWorkflow:
    """Holds one unsubscribe; ends only when an operator lifts it."""

    def __init__(self) -> None:
        self._input: Suppression | None = None
        self._lifted = False

    @workflow.run
    async def run(self, suppression: Suppression) -> Suppression:
        """Wait until lifted (one timer-free condition: the history stays a few events)."""
        self._input = suppression
        workflow.set_current_details(
            f"{suppression.address} is suppressed for {suppression.sender}: {suppression.reason}"
        )
        await workflow.wait_condition(lambda: self._lifted)
        return suppression

    @workflow.signal(name=SuppressionMessages.LIFT)
    def lift(self, reason: str = "") -> None:
        """Allow this sender to enroll the address again."""
        self._lifted = True

    @workflow.query(name=SuppressionMessages.STATUS)
    def status(self) -> Suppression | None:
        """Who is suppressed for whom, and why."""
        return self._input
