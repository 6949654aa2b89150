"""The HTTP API's in-process join of concurrent requests with one idempotency key
(`postlane.api.idempotency.InFlight`), without a server: the live ones are in test_api.py."""

from __future__ import annotations

import asyncio

import pytest

from postlane.api.idempotency import InFlight
from postlane.errors import IdempotencyConflict


async def test_a_joined_request_runs_the_work_itself_when_the_first_is_cancelled() -> None:
    flight: InFlight[str] = InFlight()
    started, release = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    async def first_work() -> str:
        runs.append("first")
        started.set()
        await release.wait()
        return "first's"

    async def second_work() -> str:
        runs.append("second")
        return "second's"

    first = asyncio.create_task(flight.run("email:k", "same", first_work))
    await started.wait()
    second = asyncio.create_task(flight.run("email:k", "same", second_work))
    await asyncio.sleep(0)  # one turn of the loop: the second runs up to its join
    assert not second.done()
    first.cancel()  # its client hung up
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second == ("second's", False)
    assert runs == ["first", "second"] and len(flight) == 0


async def test_a_joined_request_gets_the_first_ones_result_or_a_conflict() -> None:
    flight: InFlight[str] = InFlight()
    release = asyncio.Event()

    async def work() -> str:
        await release.wait()
        return "sent"

    first = asyncio.create_task(flight.run("email:k", "same", work))
    await asyncio.sleep(0)
    joined = asyncio.create_task(flight.run("email:k", "same", work))
    with pytest.raises(IdempotencyConflict):
        await flight.run("email:k", "other", work)
    release.set()
    assert await first == ("sent", False)
    assert await joined == ("sent", True)
