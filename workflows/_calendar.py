"""Local-time arithmetic for sequences: "next 09:00 in Tokyo", "when do sending hours open".

Pure functions of their arguments (the workflow passes `workflow.now()`), so they are
deterministic; zone rules come from the IANA database via `zoneinfo`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from postlane.sequences.spec import WEEKDAYS


def _allowed(day: datetime, days: Sequence[str] | None) -> bool:
    return days is None or WEEKDAYS[day.weekday()] in days


def next_local_time(
    now: datetime, at: time, zone: str, days: Sequence[str] | None = None
) -> datetime:
    """The first instant after `now` that is `at` o'clock in `zone`, on one of `days`."""
    tz = ZoneInfo(zone)
    local = now.astimezone(tz)
    for offset in range(8):
        day = local.date() + timedelta(days=offset)
        candidate = datetime.combine(day, at, tzinfo=tz)
        if candidate > local and _allowed(candidate, days):
            return candidate.astimezone(UTC)
    raise ValueError(f"no allowed day in {days!r}")  # unreachable: days is never empty


def next_opening(
    now: datetime, window: tuple[time, time] | None, zone: str, days: Sequence[str] | None = None
) -> datetime:
    """`now` if sending is allowed now, else when the window next opens (in UTC)."""
    if window is None and days is None:
        return now
    opens, closes = window or (time(0, 0), time(23, 59, 59))
    tz = ZoneInfo(zone)
    local = now.astimezone(tz)
    if _allowed(local, days) and opens <= local.time() < closes:
        return now
    return next_local_time(now, opens, zone, days)
