"""How Postlane waits for a workflow's result without trusting one long poll to be woken.

A workflow handle's ``result()`` is one long poll, ``GetWorkflowExecutionHistory`` with
``wait_new_event`` on the close event. The server parks it until the history service
notifies it that the workflow closed, or until ``history.longPollExpirationInterval``
(20 s by default) runs out. That notification can be lost: each waiter has a one-slot
buffer, and the server drops a notification when the previous one has not been read yet
(its comment says it "should NOT happen, unless there is a bug or high load"), so on a busy
server a waiter sometimes learns of the close only when its 20 s expire. A burst then
takes 20 s longer than its emails did (bench/results/latency.md).

Giving each poll a short deadline bounds that loss. The server answers a poll at its
deadline less about a second with an empty page, and the SDK asks again at once; a poll
that starts after the close returns the close event at once. A lost wake-up then costs at
most `RESULT_POLL_TIMEOUT` less that second, and an email that closes while a poll is
parked is answered at once, as before.
"""

from __future__ import annotations

import asyncio
import math
from datetime import timedelta
from typing import Any

from temporalio.client import WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

RESULT_POLL_TIMEOUT = timedelta(seconds=2.5)
"""Deadline of each long poll for a result. The server answers about 1 s before the
deadline, so polls are ~1.5 s apart while the email is in flight: a lost wake-up costs at
most that, not 20 s. Below ~1.5 s the server would answer at once and the wait would spin."""
RESULT_PATIENCE = timedelta(seconds=30)
"""How long polls may keep expiring unanswered (the server not answering at all) before the
wait gives up with the `RPCError`, like the SDK's own retries on an unreachable server."""


async def workflow_result(
    handle: WorkflowHandle[Any, Any], *, poll_timeout: timedelta = RESULT_POLL_TIMEOUT
) -> Any:
    """The workflow's result, as ``handle.result()`` returns or raises it, with each long
    poll bounded by `poll_timeout` (see the module docstring for why).

    Args:
        handle: the workflow to wait for.
        poll_timeout: the deadline of each poll; more than 1.5 s.

    Raises:
        WorkflowFailureError: the workflow failed, was cancelled, terminated or timed out.
        RPCError: the server did not answer for `RESULT_PATIENCE`, or refused the call.
        ValueError: `poll_timeout` is 1.5 s or less.
    """
    if poll_timeout <= timedelta(seconds=1.5):
        raise ValueError(f"poll_timeout must be more than 1.5 s, got {poll_timeout}")
    loop = asyncio.get_running_loop()
    streak_began = last_expired = -math.inf
    while True:
        try:
            return await handle.result(rpc_timeout=poll_timeout)
        except RPCError as err:
            # A poll whose deadline passed before the server answered at all (a server too
            # busy or restarting): ask again, for as long as the SDK's own retries would
            # have, instead of failing the wait after one short deadline.
            if err.status not in (RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED):
                raise
            now = loop.time()
            if now - last_expired > 2 * poll_timeout.total_seconds():
                streak_began = now
            last_expired = now
            if now - streak_began > RESULT_PATIENCE.total_seconds():
                raise
