"""The pieces of bulk operations that need no server: row keys, bounded starts, the bar."""

from __future__ import annotations

import asyncio
import io

from postlane.cli.bulk import bounded, row_key
from postlane.cli.progress import ProgressBar
from tests.procs import assert_eventually


def test_row_keys_are_stable_and_distinct() -> None:
    row = {"email": "a@example.test", "name": "Ann"}
    assert row_key("launch", row, None) == row_key("launch", dict(reversed(row.items())), None)
    assert row_key("launch", row, None) != row_key("launch", {**row, "name": "Anne"}, None)
    assert row_key("launch", row, None) != row_key("other", row, None)
    assert row_key("launch", {**row, "id": "42"}, "id") == "launch:42"


async def test_bounded_keeps_at_most_limit_in_flight_and_the_order() -> None:
    in_flight = peak = 0
    release = asyncio.Event()

    async def work(n: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if n == 0:
            await release.wait()
        await asyncio.sleep(0)
        in_flight -= 1
        return n * 2

    task = asyncio.ensure_future(bounded(range(20), work, limit=4))
    await assert_eventually(lambda: peak >= 4, within=5, interval=0.001, what="4 in flight")
    release.set()
    assert await task == [n * 2 for n in range(20)]
    assert peak == 4


def test_advance_follows_a_server_side_count() -> None:
    out = io.StringIO()
    bar = ProgressBar(0, "dlq retry", stream=out, width=8)
    bar.advance(0, "batch job j: running", total=4)
    bar.advance(2, "batch job j: running")
    bar.advance(2, "batch job j: running")  # no change, no line
    bar.advance(4, "batch job j: completed", total=4)
    bar.close()
    assert out.getvalue().splitlines() == [
        "dlq retry [--------] 0/4  batch job j: running",
        "dlq retry [####----] 2/4  batch job j: running",
        "dlq retry [########] 4/4  batch job j: completed",
    ]
