"""Rolling-window quota arithmetic of the lane workflow (pure functions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from postlane.models import LaneLimits, Warmup
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
