"""Rolling hourly and daily caps, counted in per-minute buckets (pure, deterministic).

A bucket counts against a window while any moment of its minute lies inside the window,
so the caps hold for every rolling hour and day, not just clock-aligned ones. Lanes pass a
longer `hold` (`SEND_HOLD`): a slot is counted when granted, and its email sends a moment
later, so a bucket keeps counting for a while after its minute, or sends from the end of one
window and the start of the next could fall within one rolling hour.
"""

from __future__ import annotations

from bisect import bisect_right
from datetime import datetime, timedelta

from postlane.lanes.models import (
    LaneLimits,
)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)
SEND_HOLD = 2 * MINUTE
"""How long past its minute's start a bucket counts, allowing a minute from grant to send."""
UNLIMITED = 1 << 31


def bucket_key(at: datetime) -> str:
    """The minute bucket `at` falls in."""
    return at.replace(second=0, microsecond=0).isoformat()


def used(buckets: dict[str, int], now: datetime, span: timedelta, hold: timedelta = MINUTE) -> int:
    """Slots granted in the rolling `span` ending at `now` (a bucket counts for `hold` more)."""
    return sum(n for key, n in buckets.items() if datetime.fromisoformat(key) + hold > now - span)


def daily_cap(limits: LaneLimits, warmup_started: datetime | None, now: datetime) -> int | None:
    """Today's daily cap: the configured one, or less while the lane warms up."""
    cap = limits.daily_cap
    if limits.warmup is not None:
        day = max(0, (now - (warmup_started or now)) // DAY)
        ramp = limits.warmup.start_per_day * limits.warmup.factor**day
        cap = int(ramp) if cap is None else min(cap, int(ramp))
    return cap


def capacity(
    buckets: dict[str, int],
    limits: LaneLimits,
    warmup_started: datetime | None,
    now: datetime,
    hold: timedelta = MINUTE,
) -> int:
    """How many slots may be granted at `now`."""
    room = UNLIMITED
    if limits.hourly_cap is not None:
        room = min(room, limits.hourly_cap - used(buckets, now, HOUR, hold))
    cap = daily_cap(limits, warmup_started, now)
    if cap is not None:
        room = min(room, cap - used(buckets, now, DAY, hold))
    return max(0, room)


def next_opening(
    buckets: dict[str, int],
    limits: LaneLimits,
    warmup_started: datetime | None,
    now: datetime,
    hold: timedelta = MINUTE,
) -> datetime:
    """The earliest time after `now` at which a slot frees up (a bucket ages out, a new day)."""
    candidates = []
    for key in buckets:
        start = datetime.fromisoformat(key)
        candidates += [start + hold + HOUR, start + hold + DAY]
    if limits.warmup is not None and warmup_started is not None:
        days = (now - warmup_started) // DAY + 1
        candidates.append(warmup_started + days * DAY)
    for at in sorted(c for c in candidates if c > now):
        if capacity(buckets, limits, warmup_started, at, hold) > 0:
            return at
    return now + DAY  # unreachable with positive caps; a safe, visible fallback


def slot_times(
    buckets: dict[str, int],
    limits: LaneLimits,
    warmup_started: datetime | None,
    now: datetime,
    count: int,
    hold: timedelta = MINUTE,
) -> list[datetime]:
    """When the next `count` slots would be granted if nothing else asked first."""
    sim = dict(buckets)
    at, times = now, list[datetime]()
    while len(times) < count:
        room = capacity(sim, limits, warmup_started, at, hold)
        if room > 0:
            take = min(room, count - len(times))
            times += [at] * take
            sim[bucket_key(at)] = sim.get(bucket_key(at), 0) + take
        else:
            at = next_opening(sim, limits, warmup_started, at, hold)
    return times


def prune(buckets: dict[str, int], now: datetime) -> dict[str, int]:
    """Drop buckets that no window can see any more (with the longest hold)."""
    return {k: n for k, n in buckets.items() if datetime.fromisoformat(k) + SEND_HOLD + DAY > now}


class Planner:
    """Slot arithmetic for a lane with a backlog: cheap enough for one workflow task.

    `times` books the slots it plans, so use a fresh planner for each question.

    Buckets are parsed once and kept sorted with running sums, so the slots used in any
    window cost a binary search rather than a pass over every bucket. Planning walks the
    openings (moments a window frees slots) up to `max_openings` and extrapolates past them
    at the binding cap's steady pace, so a position deep in the backlog costs no more than
    one near the front.
    """

    def __init__(
        self,
        buckets: dict[str, int],
        limits: LaneLimits,
        warmup_started: datetime | None,
        now: datetime,
        hold: timedelta = MINUTE,
    ) -> None:
        self._limits, self._warmup, self._now, self._hold = limits, warmup_started, now, hold
        items = sorted((datetime.fromisoformat(k), n) for k, n in buckets.items())
        self._starts = [start for start, _ in items]
        self._sums = [0]
        for _, n in items:
            self._sums.append(self._sums[-1] + n)

    def _used(self, at: datetime, span: timedelta) -> int:
        # A bucket counts while `start + hold > at - span`, i.e. start > at - span - hold.
        first = bisect_right(self._starts, at - span - self._hold)
        return self._sums[-1] - self._sums[first]

    def capacity(self, at: datetime) -> int:
        """Slots free at `at` (same rule as `capacity`)."""
        room = UNLIMITED
        if self._limits.hourly_cap is not None:
            room = min(room, self._limits.hourly_cap - self._used(at, HOUR))
        cap = daily_cap(self._limits, self._warmup, at)
        if cap is not None:
            room = min(room, cap - self._used(at, DAY))
        return max(0, room)

    def _take(self, at: datetime, n: int) -> None:
        start = at.replace(second=0, microsecond=0)
        if self._starts and self._starts[-1] == start:
            self._sums[-1] += n
        else:
            self._starts.append(start)
            self._sums.append(self._sums[-1] + n)

    def next_opening(self, at: datetime) -> datetime:
        """The earliest time after `at` with a free slot (same rule as `next_opening`)."""
        hold = self._hold
        hour_from = bisect_right(self._starts, at - hold - HOUR)
        day_from = bisect_right(self._starts, at - hold - DAY)
        hour = [s + hold + HOUR for s in self._starts[hour_from:]]
        day = [s + hold + DAY for s in self._starts[day_from:]]
        if self._limits.warmup is not None and self._warmup is not None:
            day.append(self._warmup + ((at - self._warmup) // DAY + 1) * DAY)
        for candidate in sorted(c for c in [*hour, *day] if c > at):
            if self.capacity(candidate) > 0:
                return candidate
        return at + DAY  # unreachable with positive caps; a safe, visible fallback

    def pace(self) -> tuple[int, timedelta]:
        """The binding cap's steady pace: this many slots per this period."""
        hourly, daily = self._limits.hourly_cap, daily_cap(self._limits, self._warmup, self._now)
        options = []
        if hourly is not None:
            options.append((hourly, HOUR + self._hold))
        if daily is not None:
            options.append((daily, DAY + self._hold))
        if not options:
            return UNLIMITED, DAY
        return min(options, key=lambda o: o[0] / (o[1] / MINUTE))

    def times(
        self, positions: list[int], max_openings: int = 200, offsets: list[int] | None = None
    ) -> list[datetime]:
        """When the slots at these 0-based backlog positions are expected (nothing else asking).

        Args:
            positions: sorted ascending.
            max_openings: openings simulated before extrapolating at the steady pace.
            offsets: if given, receives each position's place among the slots its opening
                frees (0 for the first), so a caller can spread one opening's emails over
                the time the lane's rate needs to send them.

        Returns:
            One time per position.
        """
        out: list[datetime] = []
        at, granted, openings = self._now, 0, 0
        i = 0
        while i < len(positions):
            room = self.capacity(at)
            if room > 0:
                while i < len(positions) and positions[i] < granted + room:
                    out.append(at)
                    if offsets is not None:
                        offsets.append(positions[i] - granted)
                    i += 1
                take = min(room, max(positions[-1] + 1 - granted, 0))
                self._take(at, take)
                granted += take
                if i == len(positions):
                    break
            openings += 1
            if openings > max_openings:
                per, period = self.pace()
                while i < len(positions):
                    ahead = positions[i] - granted
                    out.append(at + (ahead // per + 1) * period)
                    if offsets is not None:
                        offsets.append(ahead % per)
                    i += 1
                break
            at = self.next_opening(at)
        return out
