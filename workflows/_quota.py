"""Rolling hourly and daily caps, counted in per-minute buckets (pure, deterministic).

A bucket counts against a window while any moment of its minute lies inside the window,
so the caps hold for every rolling hour and day, not just clock-aligned ones.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from postlane.models import LaneLimits

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)
UNLIMITED = 1 << 31


def bucket_key(at: datetime) -> str:
    """The minute bucket `at` falls in."""
    return at.replace(second=0, microsecond=0).isoformat()


def used(buckets: dict[str, int], now: datetime, span: timedelta) -> int:
    """Slots granted in the rolling `span` ending at `now`."""
    return sum(n for key, n in buckets.items() if datetime.fromisoformat(key) + MINUTE > now - span)


def daily_cap(limits: LaneLimits, warmup_started: datetime | None, now: datetime) -> int | None:
    """Today's daily cap: the configured one, or less while the lane warms up."""
    cap = limits.daily_cap
    if limits.warmup is not None:
        day = max(0, (now - (warmup_started or now)) // DAY)
        ramp = limits.warmup.start_per_day * limits.warmup.factor**day
        cap = int(ramp) if cap is None else min(cap, int(ramp))
    return cap


def capacity(
    buckets: dict[str, int], limits: LaneLimits, warmup_started: datetime | None, now: datetime
) -> int:
    """How many slots may be granted at `now`."""
    room = UNLIMITED
    if limits.hourly_cap is not None:
        room = min(room, limits.hourly_cap - used(buckets, now, HOUR))
    cap = daily_cap(limits, warmup_started, now)
    if cap is not None:
        room = min(room, cap - used(buckets, now, DAY))
    return max(0, room)


def next_opening(
    buckets: dict[str, int], limits: LaneLimits, warmup_started: datetime | None, now: datetime
) -> datetime:
    """The earliest time after `now` at which a slot frees up (a bucket ages out, a new day)."""
    candidates = []
    for key in buckets:
        start = datetime.fromisoformat(key)
        candidates += [start + MINUTE + HOUR, start + MINUTE + DAY]
    if limits.warmup is not None and warmup_started is not None:
        days = (now - warmup_started) // DAY + 1
        candidates.append(warmup_started + days * DAY)
    for at in sorted(c for c in candidates if c > now):
        if capacity(buckets, limits, warmup_started, at) > 0:
            return at
    return now + DAY  # unreachable with positive caps; a safe, visible fallback


def slot_times(
    buckets: dict[str, int],
    limits: LaneLimits,
    warmup_started: datetime | None,
    now: datetime,
    count: int,
) -> list[datetime]:
    """When the next `count` slots would be granted if nothing else asked first."""
    sim = dict(buckets)
    at, times = now, list[datetime]()
    while len(times) < count:
        room = capacity(sim, limits, warmup_started, at)
        if room > 0:
            take = min(room, count - len(times))
            times += [at] * take
            sim[bucket_key(at)] = sim.get(bucket_key(at), 0) + take
        else:
            at = next_opening(sim, limits, warmup_started, at)
    return times


def prune(buckets: dict[str, int], now: datetime) -> dict[str, int]:
    """Drop buckets that no window can see any more."""
    return {k: n for k, n in buckets.items() if datetime.fromisoformat(k) + MINUTE + DAY > now}
