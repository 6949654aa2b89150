"""Rolling-window quota arithmetic of the lane workflow (pure functions)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from bench.lane_scale import worst_rolling
from postlane.lanes.models import (
    LaneLimits,
    Warmup,
)
from workflows import _quota as quota

T0 = datetime(2026, 11, 23, 10, 0, 30, tzinfo=UTC)
HOURLY = LaneLimits(rate_per_second=5, hourly_cap=10)


def test_capacity_counts_the_rolling_hour() -> None:
    buckets = {quota.bucket_key(T0): 7}
    assert quota.capacity(buckets, HOURLY, None, T0) == 3
    assert quota.capacity(buckets, HOURLY, None, T0 + timedelta(minutes=59)) == 3
    # The minute bucket is fully out of the window only after its minute + 1 h.
    assert quota.capacity(buckets, HOURLY, None, T0 + timedelta(minutes=61)) == 10


def test_next_opening_is_when_the_oldest_bucket_ages_out() -> None:
    buckets = {quota.bucket_key(T0): 10}
    opening = quota.next_opening(buckets, HOURLY, None, T0)
    assert opening == T0.replace(second=0) + timedelta(hours=1, minutes=1)
    assert quota.capacity(buckets, HOURLY, None, opening) == 10


def test_slot_times_fill_each_window_up_to_the_cap() -> None:
    times = quota.slot_times({}, HOURLY, None, T0, 25)
    windows = sorted({t for t in times})
    assert [times.count(w) for w in windows] == [10, 10, 5]
    assert windows[1] - windows[0] > timedelta(hours=1)


def test_daily_cap_follows_warmup_and_never_exceeds_the_cap() -> None:
    limits = LaneLimits(rate_per_second=1, daily_cap=100, warmup=Warmup(start_per_day=10, factor=2))
    assert quota.daily_cap(limits, T0, T0) == 10
    assert quota.daily_cap(limits, T0, T0 + timedelta(days=1)) == 20
    assert quota.daily_cap(limits, T0, T0 + timedelta(days=3, hours=1)) == 80
    assert quota.daily_cap(limits, T0, T0 + timedelta(days=10)) == 100


def test_no_caps_means_no_waiting() -> None:
    limits = LaneLimits(rate_per_second=5)
    assert quota.capacity({quota.bucket_key(T0): 10_000}, limits, None, T0) > 10_000
    assert quota.slot_times({}, limits, None, T0, 3) == [T0, T0, T0]


def test_prune_keeps_only_what_a_window_can_see() -> None:
    buckets = {quota.bucket_key(T0): 1, quota.bucket_key(T0 - timedelta(days=2)): 5}
    assert quota.prune(buckets, T0) == {quota.bucket_key(T0): 1}


def _random_buckets(rng: random.Random, span: timedelta) -> dict[str, int]:
    minutes = int(span / timedelta(minutes=1))
    return {
        quota.bucket_key(T0 - timedelta(minutes=rng.randrange(minutes))): rng.randint(1, 4)
        for _ in range(rng.randint(0, 40))
    }


@pytest.mark.parametrize("seed", range(40))
def test_planner_agrees_with_the_slot_by_slot_simulation(seed: int) -> None:
    """The planner's capacity, openings and slot times are the simple functions' answers."""
    rng = random.Random(seed)
    limits = LaneLimits(
        rate_per_second=5,
        hourly_cap=rng.choice([None, 3, 10, 25]),
        daily_cap=rng.choice([None, 40, 90]),
        warmup=rng.choice([None, Warmup(start_per_day=30, factor=2)]),
    )
    if limits.hourly_cap is None and limits.daily_cap is None and limits.warmup is None:
        limits = HOURLY
    started = T0 - timedelta(hours=rng.randrange(60)) if limits.warmup else None
    buckets = _random_buckets(rng, timedelta(days=1))
    hold = rng.choice([quota.MINUTE, quota.SEND_HOLD])
    planner = quota.Planner(buckets, limits, started, T0, hold)
    assert planner.capacity(T0) == quota.capacity(buckets, limits, started, T0, hold)
    assert planner.next_opening(T0) == quota.next_opening(buckets, limits, started, T0, hold)
    expected = quota.slot_times(buckets, limits, started, T0, 120, hold)
    positions = sorted(rng.sample(range(120), 30))
    assert planner.times(positions) == [expected[p] for p in positions]


def test_planner_extrapolates_far_positions_at_the_cap_pace() -> None:
    """Deep in a backlog the plan costs a few openings: then whole periods at the cap."""
    planner = quota.Planner({}, HOURLY, None, T0)
    far = planner.times([0, 9, 10, 50_000], max_openings=3)
    assert far[:3] == [T0, T0, T0.replace(second=0) + timedelta(hours=1, minutes=1)]
    # 5,000 hours of 10: about 5,000 periods of an hour and a minute later, never sooner.
    assert far[3] - T0 >= timedelta(hours=4_999, minutes=4_999)
    assert far[3] - T0 <= timedelta(hours=5_001, minutes=5_001)


def _worst_rolling_hour(times: list[datetime]) -> int:
    return worst_rolling(times, timedelta(hours=1))


def _sends_of_a_greedy_lane(hold: timedelta, seed: int) -> list[datetime]:
    """Three hours of a lane with a backlog, granting whenever a slot is free; each email
    sends up to a minute after its grant (queued behind the lane's rate, a busy worker)."""
    rng, buckets, sends = random.Random(seed), dict[str, int](), list[datetime]()
    start = T0.replace(second=59)  # a window that opens at the end of its minute
    for second in range(3 * 3600):
        at = start + timedelta(seconds=second)
        room = quota.capacity(buckets, HOURLY, None, at, hold)
        if room:
            buckets[quota.bucket_key(at)] = buckets.get(quota.bucket_key(at), 0) + room
            sends += [at + timedelta(seconds=rng.uniform(0, 59.9)) for _ in range(room)]
    return sends


def test_the_send_hold_keeps_the_cap_for_sends_that_follow_their_grant() -> None:
    """Caps are counted at grant; the SMTP server sees the send. A bucket held for
    `SEND_HOLD` keeps every rolling hour of sends within the cap when each send follows its
    grant by under a minute; held for just its minute, the windows' sends can overlap."""
    seeds = range(8)
    assert [_worst_rolling_hour(_sends_of_a_greedy_lane(quota.SEND_HOLD, n)) for n in seeds] == [
        10
    ] * len(seeds)
    assert max(_worst_rolling_hour(_sends_of_a_greedy_lane(quota.MINUTE, n)) for n in seeds) > 10
