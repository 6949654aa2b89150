"""Lane quotas, warm-up, priorities within a window and backpressure (time-skipping)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from functools import partial

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.service import RPCError

from bench import lane_scale
from postlane import Email, EmailStatus
from postlane import search_attributes as sa
from postlane.config import LaneConfig
from postlane.email.models import (
    EmailReport,
    Priority,
)
from postlane.ids import email_workflow_id, lane_workflow_id
from postlane.lanes.limits import start_lane_workflow
from postlane.lanes.models import (
    LaneStatus,
    SlotGrant,
    SlotRequest,
    ThrottleReport,
)
from postlane.testing import PostlaneTestEnv, postlane_test_env
from tests.conftest import CAPPED_LANE, FRAGILE_LANE, TINY_LANE, TOUCHY_LANE, WARM_LANE
from tests.procs import assert_eventually
from workflows import lane as lane_module
from workflows import send_email as workflows_send_email


@pytest_asyncio.fixture
async def pl() -> AsyncIterator[PostlaneTestEnv]:
    """A fresh environment per test: quota state and virtual time must not leak between them."""
    async with postlane_test_env([CAPPED_LANE, TINY_LANE, WARM_LANE, TOUCHY_LANE]) as env:
        yield env


def email(domain: str, n: int) -> Email:
    return Email(sender=f"news@{domain}", to=[f"r{n}@example.test"], subject=f"#{n}", text="hi")


async def lane_status(pl: PostlaneTestEnv, lane: str) -> LaneStatus:
    handle = pl.client.temporal.get_workflow_handle(lane_workflow_id(lane))
    return await handle.query("status", result_type=LaneStatus)


async def _is_scheduled(pl: PostlaneTestEnv, key: str) -> bool:
    return await pl.client.status(key) == EmailStatus.SCHEDULED


def worst_rolling_hour(times: list[datetime]) -> int:
    """The most sends in any rolling hour (half-open: [t, t + 1 h))."""
    return lane_scale.worst_rolling(times, timedelta(hours=1))


def windows(times: list[datetime], gap: timedelta = timedelta(minutes=30)) -> list[list[datetime]]:
    """`times`, sorted and split wherever nothing went for longer than `gap`."""
    groups: list[list[datetime]] = []
    for at in sorted(times):
        if groups and at - groups[-1][-1] <= gap:
            groups[-1].append(at)
        else:
            groups.append([at])
    return groups


TOTAL, CAP, HIGH = 2000, 500, 10
_TASK_IN_FLIGHT = (
    EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
)
SEEN = (EmailStatus.SCHEDULED, EmailStatus.SENT)
_SIGNAL_SENT = EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED
_SIGNAL_ENDS = (
    EventType.EVENT_TYPE_EXTERNAL_WORKFLOW_EXECUTION_SIGNALED,
    EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_FAILED,
)


async def quiet_lane_status(pl: PostlaneTestEnv, lane: str) -> LaneStatus | None:
    """The lane's status, asked only once nothing but its timer can wake it (else None).

    Temporal's Java time-skipping server (temporal-test-server 1.40) mishandles a query
    that arrives while a workflow's continue-as-new task is in flight: it schedules a task
    on the closed run, the completion fails ("workflow execution already completed") and
    that task's hold on the clock is never released, so time stops skipping for good. A
    lane with no task in flight and none of its own signals pending is not continuing as
    new, as long as the caller has no requests on their way to it.
    """
    handle = pl.client.temporal.get_workflow_handle(lane_workflow_id(lane))
    events = (await handle.fetch_history()).events
    told = sum(e.event_type == _SIGNAL_SENT for e in events)
    answered = sum(e.event_type in _SIGNAL_ENDS for e in events)
    if events[-1].event_type in _TASK_IN_FLIGHT or told != answered:
        return None
    try:
        return await lane_status(pl, lane)
    except RPCError:
        return None


async def seen_by_lane(pl: PostlaneTestEnv, keys: list[str]) -> bool:
    """Each email is waiting with a planned slot or already sent (read without a query)."""
    for k in reversed(keys):  # the last ones are the last to be seen
        description = await pl.client.temporal.get_workflow_handle(email_workflow_id(k)).describe()
        if description.typed_search_attributes.get(sa.STATUS) not in SEEN:
            return False
    return True


@pytest.mark.timeout(300)  # about a minute on 2 idle cores; the margin is for a busy machine
async def test_hourly_cap_spreads_2000_sends_over_four_hours(pl: PostlaneTestEnv, key: str) -> None:
    """2,000 real sends against a 500/h lane: four windows of 500, none burst, none lost.

    Time moves only by `pl.sleep` (the test server's own clock). Awaiting the emails'
    results instead would unlock the server's time skipping once per waiter: concurrent
    waiters let the clock race ahead of running work, and sequential ones jump it too.
    The lane is asked for its status only while it is quiet (see `quiet_lane_status`).
    """
    keys = [f"{key}-{n}" for n in range(TOTAL)]
    lane_quiet = partial(quiet_lane_status, pl, "capped")

    # Bulk first, in batches the lane takes in before the next (a flood only thrashes the
    # worker's workflow cache); once the hour is used up, a few high-priority emails.
    for batch in range(0, TOTAL - HIGH, 100):
        batch_keys = keys[batch : min(batch + 100, TOTAL - HIGH)]
        await asyncio.gather(
            *(
                pl.client.send(email("capped.test", n), key=k, priority="bulk")
                for n, k in enumerate(batch_keys, start=batch)
            )
        )
        await assert_eventually(
            partial(seen_by_lane, pl, batch_keys), within=60, interval=0.3, what=f"batch {batch}"
        )
    full = await assert_eventually(lane_quiet, what="the lane to be quiet")
    assert (full.used_last_hour, full.waiting) == (CAP, TOTAL - HIGH - CAP)
    await asyncio.gather(
        *(
            pl.client.send(email("capped.test", n), key=keys[n], priority="high")
            for n in range(TOTAL - HIGH, TOTAL)
        )
    )
    await assert_eventually(partial(seen_by_lane, pl, keys[TOTAL - HIGH :]), what="highs seen")
    over_cap = await assert_eventually(lane_quiet, what="the lane to be quiet")
    assert (over_cap.used_last_hour, over_cap.waiting) == (CAP, TOTAL - CAP)
    assert over_cap.next_slot_at is not None

    # Over the cap, an email waits visibly: scheduled, with the time its slot is planned.
    sample = keys[::40] + keys[TOTAL - HIGH :]

    async def shown(k: str) -> EmailReport | None:
        report = await pl.client.describe(k)
        if report.status == EmailStatus.SCHEDULED:
            return report if report.scheduled_for is not None else None
        return report if report.status == EmailStatus.SENT else None  # in the first hour

    plans: dict[str, datetime] = {}
    for k in sample:
        report = await assert_eventually(partial(shown, k), what=f"{k} to show its slot")
        if report.scheduled_for is not None:
            plans[k] = report.scheduled_for
    assert len(plans) >= len(sample) // 2
    assert min(plans.values()) >= over_cap.next_slot_at

    # The clock moves only here: straight to the lane's next opening. Time is locked again
    # while the window's sends run (one long unlocked sleep would outlast its RPC deadline
    # on a busy machine), so wait for the lane to use the window before the next jump.
    outbox_seen = -1

    async def window_used() -> LaneStatus:
        # Each "not yet" says why, so a test that runs out of time says where it stood.
        nonlocal outbox_seen
        if len(pl.outbox) != outbox_seen:  # still sending: no need to ask the lane yet
            outbox_seen = len(pl.outbox)
            raise AssertionError(f"still sending: {outbox_seen} sent")
        status = await lane_quiet()
        if status is None:
            raise AssertionError("the lane is busy")
        if status.used_last_day + status.waiting != TOTAL:
            raise AssertionError(f"not every email counted: {status!r}")
        if len(pl.outbox) != status.used_last_day:
            raise AssertionError(f"granted but not sent: {len(pl.outbox)} sent, {status!r}")
        if status.waiting == 0:
            return status
        now = await pl.now()
        opens_later = status.next_slot_at is not None and status.next_slot_at > now
        if status.used_last_hour == CAP and opens_later:
            return status
        raise AssertionError(f"window not used up at {now}: {status!r}")

    waiting, status = set(plans), over_cap
    for _ in range(8):
        if status.waiting == 0:
            break
        for k in sorted(waiting):  # what a waiting email shows just before the jump
            report = await pl.client.describe(k)
            if report.status != EmailStatus.SCHEDULED:
                waiting.discard(k)
            elif report.scheduled_for is not None:
                plans[k] = report.scheduled_for
        assert status.next_slot_at is not None
        until_open = max(status.next_slot_at - await pl.now(), timedelta(0))
        # Past the opening and the minute over which the emails behind the lane's window
        # come back for their slots (`lane.DEFER_RECHECK` + `lane.DEFER_SPREAD`).
        await pl.sleep(until_open + timedelta(minutes=2))
        status = await assert_eventually(
            window_used, within=120, interval=0.3, what="the window to be used"
        )
    # Closed workflows answer at once, so these waits never unlock time skipping.
    with pl.env.auto_time_skipping_disabled():
        receipts = [await pl.client.handle(k).result() for k in keys]

    assert len(pl.outbox) == TOTAL
    assert {m.message_id for m in pl.outbox} == {r.message_id for r in receipts}
    assert {r.key for r in receipts} == set(keys)
    assert all(r.attempts == 1 for r in receipts)
    went = [r.dispatched_at for r in receipts]
    assert None not in went
    times: list[datetime] = went  # type: ignore[assignment]
    assert worst_rolling_hour(times) == CAP
    assert [len(w) for w in windows(times)] == [CAP] * 4
    assert timedelta(hours=3) <= max(times) - min(times) < timedelta(hours=4)
    # The high-priority ones went in the first window after the cap, ahead of the bulk.
    second = windows(times)[1]
    assert all(second[0] <= t <= second[-1] for t in times[TOTAL - HIGH :])
    # Each sampled email went when it showed it would.
    for k, at in plans.items():
        assert abs(times[keys.index(k)] - at) < timedelta(minutes=2), k


async def test_cap_grants_next_window_in_priority_order(pl: PostlaneTestEnv, key: str) -> None:
    for n in range(2):
        await pl.client.send(email("tiny.test", n), key=f"{key}-now{n}")

    async def window_full() -> bool:
        return (await lane_status(pl, "tiny")).used_last_hour == 2

    # Not awaiting results here: the test server jumps time far ahead after one completes.
    await assert_eventually(window_full, what="the first two to take the hour's slots")
    bulk = [
        await pl.client.send(email("tiny.test", n), key=f"{key}-bulk{n}", priority="bulk")
        for n in range(2)
    ]

    async def told_next_window() -> bool:
        plans = {(await pl.client.describe(h.key)).scheduled_for for h in bulk}
        return None not in plans and len(plans) == 1

    await assert_eventually(told_next_window, what="both bulk emails to be told the next window")
    high = await pl.client.send(email("tiny.test", 9), key=f"{key}-high", priority="high")
    await assert_eventually(
        lambda: _is_scheduled(pl, f"{key}-high"), what="the high email to be scheduled"
    )

    async def pushed_back() -> tuple[str, datetime] | None:
        """The bulk email the high one displaced, and the time it is told once that happens.

        Two bulk emails sent a moment apart ask the lane in whichever order their first
        tasks run, so either may be the one behind.
        """
        high_plan = (await pl.client.describe(f"{key}-high")).scheduled_for
        plans = {h.key: (await pl.client.describe(h.key)).scheduled_for for h in bulk}
        if high_plan is None or None in plans.values():
            return None
        late = [(k, at) for k, at in plans.items() if at and at - high_plan > timedelta(minutes=30)]
        return late[0] if len(late) == 1 else None

    behind, told = await assert_eventually(
        pushed_back, what="one bulk email to be told it waits behind the high one"
    )
    high_at = (await high.result()).dispatched_at
    bulk_at = {h.key: (await h.result()).dispatched_at for h in bulk}
    ahead = next(k for k in bulk_at if k != behind)
    assert high_at is not None and None not in bulk_at.values()
    assert abs(high_at - bulk_at[ahead]) < timedelta(minutes=1)  # type: ignore[operator]  # next window
    assert bulk_at[behind] - high_at > timedelta(minutes=30)  # type: ignore[operator]  # the one after
    assert abs(bulk_at[behind] - told) < timedelta(minutes=2)  # type: ignore[operator]  # as told
    status = await lane_status(pl, "tiny")
    assert status.used_last_hour <= 2


async def test_lane_continuing_as_new_mid_window_keeps_granting(
    pl: PostlaneTestEnv, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lane that continues as new with slots still free fills them at once, not an hour later.

    The lane normally continues as new every few thousand events; here it does after every
    pass and grants one slot per pass, so a window of two spans a continue-as-new.
    """
    monkeypatch.setattr(lane_module, "MAX_HISTORY", 0)
    monkeypatch.setattr(lane_module, "SIGNALS_PER_TASK", 1)
    for n in range(2):
        await pl.client.send(email("tiny.test", n), key=f"{key}-now{n}")
    # Not asking the lane (see `quiet_lane_status`): here it continues as new all the time.
    await assert_eventually(lambda: len(pl.outbox) == 2, what="the first two to take the hour")
    waiting = [
        await pl.client.send(email("tiny.test", n), key=f"{key}-next{n}", priority="bulk")
        for n in range(2)
    ]

    async def planned(k: str) -> bool:
        report = await pl.client.describe(k)
        return report.status == EmailStatus.SCHEDULED and report.scheduled_for is not None

    for h in waiting:
        await assert_eventually(partial(planned, h.key), what=f"{h.key} to be told its time")
    await pl.sleep(timedelta(minutes=70))
    await assert_eventually(lambda: len(pl.outbox) == 4, what="both to go in the next window")
    with pl.env.auto_time_skipping_disabled():  # both are done: nothing to skip time for
        went = [(await h.result()).dispatched_at for h in waiting]
    assert went[0] is not None and went[1] is not None
    assert abs(went[1] - went[0]) < timedelta(minutes=1)


async def test_warmup_ramps_daily_cap(pl: PostlaneTestEnv, key: str) -> None:
    start = await pl.now()
    handles = [await pl.client.send(email("warm.test", n), key=f"{key}-{n}") for n in range(9)]
    receipts = [await h.result() for h in handles]
    days = sorted((r.dispatched_at - start) // timedelta(days=1) for r in receipts)  # type: ignore[operator]
    assert days == [0, 0, 0, 1, 1, 1, 1, 1, 1]  # 3 on day 0, doubling to 6 on day 1


async def test_throttle_reply_slows_whole_lane_then_recovers(pl: PostlaneTestEnv, key: str) -> None:
    before = await lane_status(pl, "touchy")
    assert before.effective_rate == 8 and not before.backing_off
    pl.smtp.fail("data", "421 4.7.0 rate limited, try again in 30 seconds")
    handle = await pl.client.send(email("touchy.test", 1), key=key)

    async def slowed() -> LaneStatus | None:
        status = await lane_status(pl, "touchy")
        return status if status.backing_off else None

    status = await assert_eventually(slowed, what="the lane to back off")
    assert status.effective_rate == 4
    assert "421" in (status.last_throttle or "")
    assert status.recover_at is not None
    await pl.sleep(timedelta(minutes=3))
    recovered = await lane_status(pl, "touchy")
    assert recovered.effective_rate == 8
    assert not recovered.backing_off
    receipt = await handle.result()
    assert receipt.attempts == 2


async def _planned(pl: PostlaneTestEnv, key: str) -> bool:
    report = await pl.client.describe(key)
    return report.status == EmailStatus.SCHEDULED and report.scheduled_for is not None


async def _fill_tiny_hour(pl: PostlaneTestEnv, key: str) -> None:
    for n in range(2):
        await pl.client.send(email("tiny.test", n), key=f"{key}-now{n}")
    await assert_eventually(lambda: len(pl.outbox) == 2, what="the hour's two slots to be used")


def _grants_to(history: WorkflowHistory, workflow_id: str) -> int:
    """Go-now `slot_granted` signals the lane sent to this email (its history, not its word)."""
    grants = 0
    for e in history.events:
        if e.event_type != _SIGNAL_SENT:
            continue
        sig = e.signal_external_workflow_execution_initiated_event_attributes
        if sig.workflow_execution.workflow_id == workflow_id and sig.signal_name == "slot_granted":
            grants += not json.loads(sig.input.payloads[0].data).get("planned")
    return grants


async def test_lane_lost_and_restarted_hears_again_from_waiting_emails(
    pl: PostlaneTestEnv, key: str
) -> None:
    """A lane terminated (its state gone) and started afresh still sends every waiting email.

    The waiting emails were told their slot; when it passes without a grant they ask the
    new lane, which grants them. Emails that asked only once would wait forever.
    """
    await _fill_tiny_hour(pl, key)
    waiting = [
        await pl.client.send(email("tiny.test", n), key=f"{key}-next{n}", priority="bulk")
        for n in range(2)
    ]
    for h in waiting:
        await assert_eventually(partial(_planned, pl, h.key), what=f"{h.key} to be told its slot")
    lane = pl.client.temporal.get_workflow_handle(lane_workflow_id("tiny"))
    await lane.terminate("test: the lane's state is lost")
    await start_lane_workflow(pl.client.temporal, pl.settings.lane("tiny"))  # a worker restart
    fresh = await lane_status(pl, "tiny")
    assert (fresh.waiting, fresh.used_last_hour) == (0, 0)  # it knows of no one

    await pl.sleep(timedelta(minutes=75))  # past their slot and the time to ask again
    await assert_eventually(lambda: len(pl.outbox) == 4, what="both waiting emails to be sent")
    history = await pl.client.temporal.get_workflow_handle(lane_workflow_id("tiny")).fetch_history()
    assert [_grants_to(history, email_workflow_id(h.key)) for h in waiting] == [1, 1]


async def test_repeated_slot_request_never_takes_a_second_slot(
    pl: PostlaneTestEnv, key: str
) -> None:
    """An email that asks again after its grant (a late re-ask) gets no second slot."""
    pl.smtp.fail("data", "451 4.3.0 try later", times=2)  # granted, then still running
    first = await pl.client.send(email("tiny.test", 0), key=f"{key}-0")
    lane = pl.client.temporal.get_workflow_handle(lane_workflow_id("tiny"))

    async def granted_once() -> bool:
        return _grants_to(await lane.fetch_history(), email_workflow_id(first.key)) == 1

    await assert_eventually(granted_once, what="the first email's grant")
    now = await pl.now()
    late = SlotRequest(workflow_id=email_workflow_id(first.key), since=now, asked_at=now)
    for _ in range(2):
        await lane.signal("request_slot", late)
    # The hour's second slot is still free: one of the next two emails takes it (whichever
    # asks first: two workflows' asks reach the lane in no set order), the other waits.
    others = [await pl.client.send(email("tiny.test", n), key=f"{key}-{n}") for n in (1, 2)]

    async def one_planned() -> bool:
        return [await _planned(pl, h.key) for h in others].count(True) == 1

    await assert_eventually(one_planned, what="one of the next two to be planned")
    await assert_eventually(lambda: len(pl.outbox) == 2, what="two emails to be sent")
    history = await lane.fetch_history()
    assert _grants_to(history, email_workflow_id(first.key)) == 1
    counts = [_grants_to(history, email_workflow_id(h.key)) for h in others]
    assert sorted(counts) == [0, 1]
    second = others[counts.index(1)]
    assert sorted(m.message_id for m in pl.outbox) == sorted(
        [(await first.result()).message_id, (await second.result()).message_id]
    )


async def test_dead_letter_retry_moved_to_a_capped_lane_waits_for_its_slot(key: str) -> None:
    """A parked email retried through a capped lane obeys that lane's cap."""
    async with postlane_test_env([FRAGILE_LANE, TINY_LANE]) as pl:
        await _fill_tiny_hour(pl, key)
        opening = await pl.now() + timedelta(hours=1)
        pl.smtp.fail("data", "451 4.3.0 try later", times=3)
        moved = await pl.client.send(
            Email(sender="ops@fragile.test", to=["bob@example.test"], subject="x", text="x"),
            key=f"{key}-moved",
        )

        async def parked() -> bool:
            if await pl.client.status(moved.key) == EmailStatus.DEAD_LETTER:
                return True
            await pl.sleep(timedelta(seconds=30))
            return False

        await assert_eventually(parked, what="the email to park")
        assert await pl.client.retry(moved.key, lane="tiny")
        await assert_eventually(partial(_planned, pl, moved.key), what="it to wait for tiny")
        assert len(pl.outbox) == 2  # not sent over the cap
        report = await pl.client.describe(moved.key)
        assert report.scheduled_for is not None and report.scheduled_for >= opening
        await pl.sleep(timedelta(minutes=70))
        await assert_eventually(lambda: len(pl.outbox) == 3, what="it to go in the next hour")
        with pl.env.auto_time_skipping_disabled():
            receipt = await moved.result()
        assert receipt.lane == "tiny"
        assert receipt.dispatched_at is not None and receipt.dispatched_at >= opening
        lane = pl.client.temporal.get_workflow_handle(lane_workflow_id("tiny"))
        assert _grants_to(await lane.fetch_history(), email_workflow_id(moved.key)) == 1


async def _applied_rates(pl: PostlaneTestEnv, lane: str) -> list[float]:
    """The rates the lane set on the server: its `set_lane_rate` activity inputs, in order."""
    history = await pl.client.temporal.get_workflow_handle(lane_workflow_id(lane)).fetch_history()
    return [
        json.loads(e.activity_task_scheduled_event_attributes.input.payloads[0].data)[
            "rate_per_second"
        ]
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "set_lane_rate"
    ]


async def test_repeated_throttling_settles_below_the_budget(pl: PostlaneTestEnv) -> None:
    """A provider that throttles at 3/s and above: the 8/s lane ends below 3/s and stays.

    Every 15 s of virtual time the test plays the provider: if the rate the lane applies
    is at or over the budget, it reports a throttle. Halving and doubling back (as before)
    saws around the budget and is throttled again every minute or two.
    """
    budget, step = 3.0, timedelta(seconds=15)
    lane = pl.client.temporal.get_workflow_handle(lane_workflow_id("touchy"))
    throttled_at: list[datetime] = []
    start = await pl.now()
    for _ in range(180):  # 45 minutes
        status = await lane_status(pl, "touchy")
        if status.effective_rate >= budget:
            await lane.signal("throttled", ThrottleReport(reply="421 4.7.0 slow down"))
            throttled_at.append(await pl.now())
        await pl.sleep(step)
    rates = await _applied_rates(pl, "touchy")
    assert rates[:3] == [8, 4, 2]  # configured, then halved on each throttle
    assert all(at - start < timedelta(minutes=10) for at in throttled_at), throttled_at
    assert 3 <= len(throttled_at) <= 4
    settled = (await lane_status(pl, "touchy")).effective_rate
    assert budget / 2 <= settled < budget
    assert rates[-1] == settled
    # After the second throttle the lane never went back up to a rate that was throttled.
    assert max(rates[3:]) < 4


@pytest.mark.timeout(900)  # a few minutes on 2 idle cores; the margin is for a busy machine
async def test_backlog_of_2500_on_a_capped_lane_keeps_the_lane_small(key: str) -> None:
    """2,500 emails queued at once on a 500/h lane: each granted once, in five windows.

    The emails are `bench.lane_scale.SlotOnlyEmail` stand-ins: the real slot protocol of
    `SendEmailWorkflow` (inherited), without SMTP. Everything asserted is read from the
    lane's histories on the server: its grant signals, and the size of every run's input.
    Holding every waiting email (about 190 B each) would carry 2,000 of them, ~380 KB.
    """
    total, cap = 2500, 500
    lane = LaneConfig(
        name="scale",
        senders=["*@scale.test"],
        smtp_host="127.0.0.1",
        rate_per_second=100,
        hourly_cap=cap,
    )
    tally = lane_scale.Tally()
    async with postlane_test_env([lane]) as pl, lane_scale.stand_in_worker(pl.env.client, tally):
        ids = await lane_scale.start_stand_ins(pl.env.client, lane, total, tally=tally, prefix=key)
        took = await lane_scale.drive(
            pl.sleep, tally, total, step=timedelta(minutes=5), horizon=timedelta(hours=6)
        )
        facts = lane_scale.lane_facts(await lane_scale.lane_histories(pl.env.client, "scale"))
    assert took < timedelta(hours=5)  # no stall: the fifth window opens after 4 h
    assert sorted(facts.grants) == sorted(ids)
    assert set(facts.grants.values()) == {1}
    assert sorted(i for i, _ in tally.grants) == sorted(ids)
    assert lane_scale.worst_rolling(facts.grant_times, timedelta(hours=1)) == cap
    assert [len(w) for w in windows(facts.grant_times)] == [cap] * 5
    assert facts.runs > 1 and facts.max_input_bytes <= 256 * 1024


async def test_deferred_emails_are_told_and_sent_at_the_lanes_pace(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind the lane's window, one opening's emails are told k / rate apart, and go then.

    An opening frees its slots at once, but the lane sends at its rate. Emails deferred to
    it are told when their turn really comes, and ask again then: not all within a minute
    of the opening, which at campaign scale is a stream of requests the lane cannot keep
    up with. Real sends; the window is shrunk to 2 so a few emails are deferred.
    """
    monkeypatch.setattr(lane_module, "WINDOW", 2)
    cap, rate = 4, 0.1  # one send per 10 s
    lane = LaneConfig(
        name="paced",
        senders=["*@paced.test"],
        smtp_host="127.0.0.1",
        rate_per_second=rate,
        hourly_cap=cap,
    )
    async with postlane_test_env([lane]) as pl:
        # The hour's slots all granted in one minute, so they free up in one opening (the
        # lane counts grants per minute): start at the top of a minute, all at once.
        now = await pl.now()
        await pl.sleep(timedelta(seconds=61 - now.second))
        first = await asyncio.gather(
            *(pl.client.send(email("paced.test", n), key=f"{key}-{n}") for n in range(cap))
        )
        await assert_eventually(lambda: len(pl.outbox) == cap, what="the first hour's slots")
        later = [f"{key}-later{n}" for n in range(2 * cap)]
        for n, k in enumerate(later):
            await pl.client.send(email("paced.test", 100 + n), key=k, priority="bulk")

        async def told() -> dict[str, datetime] | None:
            # An email told early can be moved: one that asked first but started later
            # gives its window place to one that started first. So read the plans once the
            # lane is quiet and each email has heard the last answer the lane sent it.
            if await quiet_lane_status(pl, lane.name) is None:
                return None
            last = {
                workflow_id: message.at
                for kind, workflow_id, message in await _slot_messages(pl, lane.name)
                if kind == "answer" and isinstance(message, SlotGrant)
            }
            plans = {k: (await pl.client.describe(k)).scheduled_for for k in later}
            if any(at is None or at != last.get(email_workflow_id(k)) for k, at in plans.items()):
                return None
            return plans  # type: ignore[return-value]

        plans: dict[str, datetime] = await assert_eventually(told, what="every email told")
        # The window's two are told the opening itself. Each deferred email is told its
        # place k among the opening's slots as k / rate past it: 2 and 3 in the first,
        # 0 to 3 in the next (all deferred).
        by_opening = windows(list(plans.values()))
        step = timedelta(seconds=1 / rate)
        assert [[at - w[0] for at in w] for w in by_opening] == [
            [0 * step, 0 * step, 2 * step, 3 * step],
            [n * step for n in range(cap)],
        ]

        await pl.sleep(timedelta(hours=2, minutes=10))
        await assert_eventually(lambda: len(pl.outbox) == 3 * cap, what="every email sent")
        with pl.env.auto_time_skipping_disabled():  # all done: nothing to skip time for
            sent = {k: (await pl.client.handle(k).result()).dispatched_at for k in later}
            went_first = [(await h.result()).dispatched_at for h in first]
    assert len({m.message_id for m in pl.outbox}) == 3 * cap  # each sent once, at the server
    times = [t for t in [*went_first, *sent.values()] if t is not None]
    assert len(times) == 3 * cap and worst_rolling_hour(times) == cap
    recheck = lane_module.DEFER_RECHECK + timedelta(seconds=lane_module.DEFER_SPREAD)
    slack = timedelta(seconds=5)
    for k, at in plans.items():
        went = sent[k]
        # It asks again by `recheck` past its time; the grant and the send take a moment.
        assert went is not None and at - slack <= went <= at + recheck + slack, (k, at, went)


async def _slot_messages(
    pl: PostlaneTestEnv, lane: str
) -> list[tuple[str, str, SlotGrant | SlotRequest]]:
    """The lane's current run's slot asks received and answers sent, in order, from its history.

    Each item: ("ask" or "answer", the email's workflow ID, the decoded message).
    """
    handle = pl.client.temporal.get_workflow_handle(lane_workflow_id(lane))
    converter = pl.client.temporal.data_converter.payload_converter
    messages: list[tuple[str, str, SlotGrant | SlotRequest]] = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            got = event.workflow_execution_signaled_event_attributes
            if got.signal_name == "request_slot":
                [ask] = converter.from_payloads(got.input.payloads, [SlotRequest])
                messages.append(("ask", ask.workflow_id, ask))
        elif event.event_type == _SIGNAL_SENT:
            sent = event.signal_external_workflow_execution_initiated_event_attributes
            [answer] = converter.from_payloads(sent.input.payloads, [SlotGrant])
            messages.append(("answer", sent.workflow_execution.workflow_id, answer))
    return messages


async def test_a_deferred_email_is_counted_once_whatever_happens_to_its_asks(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ask the lane drops, or never receives, leaves its email counted once, and known.

    Behind the window the lane keeps only a count per recheck time, and an email's next ask
    names the recheck it was told, so the lane can stop counting it. Two ways an ask goes
    unanswered: the lane drops it unread (too old to trust, as after a long backlog, or too
    many to carry through a continue-as-new), or the lane is not there (reset). Either way
    the email stays counted once, and asks again naming the same recheck time.
    """
    monkeypatch.setattr(lane_module, "WINDOW", 1)
    lane = LaneConfig(
        name="recount",
        senders=["*@recount.test"],
        smtp_host="127.0.0.1",
        rate_per_second=1,
        hourly_cap=1,
    )
    handle_id = lane_workflow_id(lane.name)
    async with postlane_test_env([lane]) as pl:
        await pl.client.send(email("recount.test", 0), key=f"{key}-0")
        await assert_eventually(lambda: len(pl.outbox) == 1, what="the hour's one slot used")
        later = [f"{key}-{n}" for n in range(1, 4)]
        for n, k in enumerate(later, start=1):
            await pl.client.send(email("recount.test", n), key=k, priority="bulk")

        async def all_told() -> LaneStatus | None:
            plans = [(await pl.client.describe(k)).scheduled_for for k in later]
            if None in plans:
                return None
            return await quiet_lane_status(pl, lane.name)

        status = await assert_eventually(all_told, what="every email told its plan")
        assert (status.window, status.waiting) == (1, 3)

        # The last one is deferred (counted, not held): an ask of its, dropped unread.
        last = email_workflow_id(later[-1])
        told: dict[str, datetime] = {}
        for kind, wid, message in await _slot_messages(pl, lane.name):
            if kind == "answer" and isinstance(message, SlotGrant) and message.recheck_at:
                told[wid] = message.recheck_at
        assert set(told) == {email_workflow_id(k) for k in later}
        recheck = told[last]
        now = await pl.now()
        stale = SlotRequest(
            workflow_id=last,
            priority=Priority.BULK,
            since=now - timedelta(minutes=20),
            asked_at=now - lane_module.STALE_REQUEST - timedelta(minutes=1),
            recheck_at=recheck,
        )
        await pl.client.temporal.get_workflow_handle(handle_id).signal("request_slot", stale)
        status = await assert_eventually(
            partial(quiet_lane_status, pl, lane.name), what="the lane to take in the ask"
        )
        assert (status.window, status.waiting) == (1, 3)

        # The lane goes away before anyone's recheck time: every ask then fails, and the
        # emails keep asking. A worker starting the lane again hears from each.
        await pl.client.temporal.get_workflow_handle(handle_id).terminate(reason="test: lane reset")
        await pl.sleep(max(told.values()) - now + timedelta(minutes=1))
        await start_lane_workflow(pl.client.temporal, lane)
        await pl.sleep(workflows_send_email.SLOT_REQUEST_RETRY + timedelta(seconds=5))

        async def asked_again() -> dict[str, SlotRequest] | None:
            asks = {
                wid: m
                for kind, wid, m in reversed(await _slot_messages(pl, lane.name))
                if kind == "ask" and isinstance(m, SlotRequest)
            }
            return asks if len(asks) == len(later) else None

        asks = await assert_eventually(asked_again, what="each email to ask the new lane")
        assert asks[last].recheck_at == recheck

        await pl.sleep(timedelta(hours=4))
        await assert_eventually(lambda: len(pl.outbox) == 4, what="every email sent")
        done = await assert_eventually(
            partial(quiet_lane_status, pl, lane.name), what="the lane to be quiet"
        )
    assert done.waiting == 0
    assert len({m.message_id for m in pl.outbox}) == 4  # each sent once, at the server
