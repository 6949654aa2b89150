"""``postlane top``: a live view of every lane and the newest dead letters.

Each refresh asks the server, never a worker's memory: the lanes' own reports (rate,
backpressure, caps, the task queue's backlog and its age) and visibility counts of the
emails per lane and status. Sends and errors per minute are the change in those counts
between two refreshes, so the view is the same from any host.
"""

from __future__ import annotations

import asyncio
import builtins
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from temporalio.service import RPCError

from postlane.durations import format_duration

if TYPE_CHECKING:
    from postlane.client import PostlaneClient
    from postlane.email.models import EmailReport
    from postlane.lanes.models import LaneReport

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 20
"""Refreshes a lane's sparkline of sends covers."""
NEWEST_DEAD_LETTERS = 5
WORKER_ANSWER = timedelta(seconds=2)
"""How long a refresh waits for a worker to answer about one dead letter (its last reply)."""


@dataclass
class LaneCounts:
    """One lane's emails by outcome at one moment, from the server's visibility store."""

    sent: int
    failed: int
    """Ended ``failed`` or parked in ``dead_letter``."""
    retrying: int
    """Waiting between attempts now."""


@dataclass
class Sample:
    """What one refresh read."""

    at: datetime
    lanes: builtins.list[LaneReport]
    counts: dict[str, LaneCounts]
    dead_letters: builtins.list[EmailReport]


RATE_WINDOW = timedelta(minutes=1)
"""Sends and errors per minute are averaged over this much of the recent refreshes."""


@dataclass
class LaneTrend:
    """A lane's recent counts, for its per-minute rates and its sparkline of sends."""

    sends: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    """Emails sent between consecutive refreshes, newest last."""
    points: deque[tuple[datetime, LaneCounts]] = field(default_factory=deque)
    sends_per_minute: float | None = None
    errors_per_minute: float | None = None


async def _count(pl: PostlaneClient, query: str) -> int:
    return (await pl.temporal.count_workflows(query)).count


async def lane_counts(pl: PostlaneClient, lane: str) -> LaneCounts:
    """The lane's sent, failed (and dead-lettered) and retrying emails, counted by the server."""
    where = f'PostlaneLane="{lane}" AND '
    sent, failed, retrying = await asyncio.gather(
        _count(pl, where + 'PostlaneStatus="sent"'),
        _count(pl, where + "PostlaneStatus IN ('failed', 'dead_letter')"),
        _count(pl, where + 'PostlaneStatus="retrying" AND ExecutionStatus="Running"'),
    )
    return LaneCounts(sent=sent, failed=failed, retrying=retrying)


async def sample(pl: PostlaneClient) -> Sample:
    """Read everything one frame shows."""
    lanes = await pl.lanes.list()
    counts = dict(
        zip(
            [r.name for r in lanes],
            await asyncio.gather(*(lane_counts(pl, r.name) for r in lanes)),
            strict=True,
        )
    )
    # From the listing and each email's dead-letter memo: the server knows it, whether or
    # not any worker is up to answer a query.
    newest = await pl.dlq.newest(NEWEST_DEAD_LETTERS, wait=WORKER_ANSWER)
    return Sample(at=datetime.now(UTC), lanes=lanes, counts=counts, dead_letters=newest)


def advance(trends: dict[str, LaneTrend], now: Sample) -> None:
    """Fold a refresh into each lane's trend (rates need two refreshes, so none on the first)."""
    for name, counts in now.counts.items():
        trend = trends.setdefault(name, LaneTrend())
        if trend.points:
            trend.sends.append(max(0, counts.sent - trend.points[-1][1].sent))
        trend.points.append((now.at, counts))
        while len(trend.points) > 2 and now.at - trend.points[1][0] >= RATE_WINDOW:
            trend.points.popleft()
        first_at, first = trend.points[0]
        minutes = (now.at - first_at).total_seconds() / 60
        if minutes > 0:
            trend.sends_per_minute = max(0, counts.sent - first.sent) / minutes
            trend.errors_per_minute = max(0, counts.failed - first.failed) / minutes


def sparkline(values: deque[float] | builtins.list[float]) -> str:
    """``▁▃█…``: each value scaled to the largest shown (all ``▁`` when nothing moved)."""
    top = max(values, default=0)
    if top <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1)))] for v in values)


def _rate(value: float | None) -> str:
    return "…" if value is None else f"{value:.1f}"


def render(now: Sample, trends: dict[str, LaneTrend]) -> Group:
    """One frame: the lanes table, then the newest dead letters."""
    lanes = Table(title=f"postlane top — {now.at:%H:%M:%S}Z", title_justify="left")
    # Names are never cut short; on a narrow terminal the numbers' headings are.
    longest = max((len(r.name) for r in now.lanes), default=4)
    lanes.add_column("LANE", no_wrap=True, min_width=longest)
    for title in ("RATE/s", "BACKLOG", "OLDEST", "WAITING", "SENT", "SENT/min", "ERRORS/min"):
        lanes.add_column(title, justify="right", no_wrap=True, min_width=len(title))
    lanes.add_column("RETRYING", justify="right", no_wrap=True, min_width=8)
    lanes.add_column("SENDS", no_wrap=True, width=HISTORY)
    for report in now.lanes:
        st, counts = report.status, now.counts[report.name]
        trend = trends.get(report.name, LaneTrend())
        rate = f"{st.effective_rate:g}/{st.configured_rate:g}" if st else "-"
        if st and st.backing_off:
            rate += " ↓"
        lanes.add_row(
            report.name,
            rate,
            "-" if report.backlog is None else str(report.backlog),
            "-" if report.backlog_age is None else format_duration(report.backlog_age),
            str(st.waiting) if st else "-",
            str(counts.sent),
            _rate(trend.sends_per_minute),
            _rate(trend.errors_per_minute),
            str(counts.retrying),
            sparkline(trend.sends),
        )
    dead = Table(title=f"newest dead letters ({len(now.dead_letters)} shown)", title_justify="left")
    longest_key = max((len(r.key) for r in now.dead_letters), default=3)
    dead.add_column("KEY", no_wrap=True, min_width=longest_key)
    for title in ("LANE", "PARKED", "LAST REPLY"):
        dead.add_column(title, overflow="ellipsis", no_wrap=True)
    for letter in now.dead_letters:
        parked = "-" if letter.parked_at is None else format_duration(now.at - letter.parked_at)
        dead.add_row(
            Text(letter.key),
            Text(letter.lane or "-"),
            f"{parked} ago",
            Text(letter.last_error or "-"),
        )
    return Group(lanes, Text(""), dead, Text("Ctrl-C to quit", style="dim"))


async def run_top(pl: PostlaneClient, *, interval: float, once: bool, console: Console) -> int:
    """Refresh every `interval` seconds until Ctrl-C (or print one frame with `once`).

    Returns:
        The exit code: 0 for one frame, 1 if the server cannot answer (no visibility).
    """
    trends: dict[str, LaneTrend] = {}
    try:
        first = await sample(pl)
    except RPCError as exc:
        console.print(f"error: the server cannot answer postlane top: {exc.message}")
        return 1
    advance(trends, first)
    if once:
        console.print(render(first, trends))
        return 0
    # Ctrl-C cancels this loop; leaving the block restores the terminal (the CLI exits 130).
    with Live(render(first, trends), console=console, auto_refresh=False) as live:
        while True:
            await asyncio.sleep(interval)
            now = await sample(pl)
            advance(trends, now)
            live.update(render(now, trends), refresh=True)
