"""The inbox watcher continuing as new, in a time-skipping server of its own.

Its status is read while it continues as new; on Temporal's Java test server a query
that lands during continue-as-new can leave virtual time locked for good, so this test
must not share the session's server with the others.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from temporalio.service import RPCError
from temporalio.worker import Replayer

from postlane.connection import data_converter
from postlane.inbound.inboxes import start_inbox_watcher
from postlane.inbound.models import WatcherReport
from postlane.testing import PostlaneTestEnv, postlane_test_env
from tests.conftest import LANES
from tests.procs import assert_eventually
from tests.test_inbox_watcher import FakeImap, imap, new_inbox, simple_reply, status
from workflows import WORKFLOWS, workflow_runner

__all__ = ["imap"]  # the fixture, here bound to this module's own `pl`


@pytest_asyncio.fixture
async def pl() -> AsyncIterator[PostlaneTestEnv]:
    async with postlane_test_env(LANES) as env:
        yield env


async def test_watcher_continues_as_new_carrying_cursor_and_counts(
    pl: PostlaneTestEnv, imap: FakeImap
) -> None:
    inbox = new_inbox(imap).model_copy(update={"max_messages": 1})
    imap.mailboxes[inbox.name] = [simple_reply("") for _ in range(12)]  # a backlog

    await start_inbox_watcher(pl.env.client, inbox, history_limit=50)
    # Counted at the IMAP server, not by asking the watcher: a query that lands while it
    # continues as new times out on the test server ("query deadline exceeded").
    await assert_eventually(lambda: len(imap.polls) >= 12, what="12 polls at the IMAP server")

    async def settled() -> WatcherReport | None:
        try:
            report = await status(pl, inbox)
        except RPCError:
            return None  # asked mid continue-as-new: ask again
        return report if report.polls >= 12 else None

    report = await assert_eventually(settled, what="the watcher's report of 12 polls")

    assert report.runs >= 2
    assert report.cursor.last_uid == 12 and report.ignored == 12
    # every poll asked from where the previous one (in any run) ended
    assert [p.cursor.last_uid for p in imap.polls[:12]] == list(range(12))

    # and the history replays against today's code
    handle = pl.env.client.get_workflow_handle(f"inbound:{inbox.name}")
    history = await handle.fetch_history()
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(history)
