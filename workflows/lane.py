"""LaneWorkflow: one per lane; holds its caps, warm-up and backpressure in Temporal.

Emails on a lane with an hourly or daily cap ask this workflow for a send slot and wait,
durably and visibly ``scheduled``, until it grants one: in priority order, as the rolling
windows free up. A provider's "slow down" halves the lane's server-side rate; the rate
recovers step by step once the provider stops complaining. No second database: the state
is this workflow's, carried through continue-as-new.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from postlane.models import (
        LaneLimits,
        LaneRateRequest,
        LaneState,
        LaneStatus,
        RateChange,
        SlotGrant,
        SlotRequest,
        ThrottleReport,
    )
    from workflows import _quota as quota
    from workflows._options import ADMIN_RETRY, ADMIN_START_TO_CLOSE

SET_LANE_RATE_ACTIVITY = "set_lane_rate"
BACKOFF_COALESCE = timedelta(seconds=10)
"""Throttle replies this close together count as one event (one halving)."""
RECOVERY_STEP = timedelta(minutes=1)
"""After a quiet period this long, the rate doubles back toward the configured one."""
MIN_RATE_FRACTION = 1 / 16
MAX_HISTORY = 4000
SIGNALS_PER_TASK = 100
PLAN_SLACK = timedelta(minutes=5)
"""A waiting email is told again when its expected slot moves by more than this."""
RETELL_PATCH = "retell-moved-plans"


@workflow.defn(name="Lane")
class LaneWorkflow:
    """Quota, warm-up and backpressure of one lane (workflow ID ``lane:<name>``)."""

    @workflow.init
    def __init__(self, state: LaneState) -> None:
        # Handlers may run before `run`, so the state must exist from construction on.
        self._s = state
        self._arrived, state.arrived = list(state.arrived), []
        # A run that continued as new in the middle of a burst (slots still free, emails not
        # yet told) picks up where it left off; waiting for the next opening would leave the
        # free slots unused for an hour. Runs started before this flag existed wait as before.
        self._dirty, state.more_to_do = state.more_to_do, False
        self._replan = False

    @property
    def state(self) -> LaneState:
        """The lane's state (also what continues as new)."""
        return self._s

    @workflow.run
    async def run(self, state: LaneState) -> None:
        """Grant slots and steer the rate, forever (continuing as new to stay small)."""
        s = self.state
        if s.warmup_started is None and s.limits.warmup is not None:
            s.warmup_started = workflow.now()
        while True:
            try:
                await workflow.wait_condition(
                    lambda: self._dirty or bool(self._arrived), timeout=self._next_wakeup()
                )
            except TimeoutError:
                pass
            self._dirty = False
            self._recover_if_due()
            await self._apply_rate()
            await self._grant()
            if (
                workflow.info().is_continue_as_new_suggested()
                or workflow.info().get_current_history_length() > MAX_HISTORY
            ):
                await workflow.wait_condition(workflow.all_handlers_finished)
                s.buckets = quota.prune(s.buckets, workflow.now())
                s.arrived = self._arrived  # requests that came in meanwhile go along
                s.more_to_do = self._dirty
                workflow.continue_as_new(s)

    def _next_wakeup(self) -> timedelta | None:
        s, now = self.state, workflow.now()
        wakeups: list[datetime] = []
        if s.waiting:
            wakeups.append(quota.next_opening(s.buckets, s.limits, s.warmup_started, now))
        if s.recover_at is not None:
            wakeups.append(s.recover_at)
        if not wakeups:
            return None
        return max(min(wakeups) - now, timedelta(seconds=1))

    def _recover_if_due(self) -> None:
        s, now = self.state, workflow.now()
        if s.recover_at is None or now < s.recover_at:
            return
        s.effective_rate = min(s.limits.rate_per_second, s.effective_rate * 2)
        if s.effective_rate < s.limits.rate_per_second:
            s.recover_at = now + RECOVERY_STEP
        else:
            s.recover_at = None
            s.last_throttle = None
        workflow.logger.info("lane %s recovering: rate %.3g/s", s.name, s.effective_rate)

    def _wanted(self) -> LaneRateRequest:
        s = self.state
        return LaneRateRequest(
            lane=s.name,
            rate_per_second=s.effective_rate,
            per_domain_per_second=s.limits.per_domain_per_second,
        )

    async def _apply_rate(self) -> None:
        """Bring the server in line with the rate in force (and the per-domain rate)."""
        s, wanted = self.state, self._wanted()
        if s.applied == wanted:
            return
        backing_off = s.effective_rate < s.limits.rate_per_second
        await workflow.execute_activity(
            SET_LANE_RATE_ACTIVITY,
            wanted.model_copy(update={"reason": "backpressure" if backing_off else "configured"}),
            start_to_close_timeout=ADMIN_START_TO_CLOSE,
            retry_policy=ADMIN_RETRY,
        )
        # What was sent, not what is wanted now: a change signalled meanwhile goes next.
        s.applied = wanted
        if self._wanted() != wanted:
            self._dirty = True

    async def _grant(self) -> None:
        s, now = self.state, workflow.now()
        arrived, self._arrived = self._arrived, []
        queued = {r.workflow_id for r in s.waiting}
        fresh = [r for r in arrived if r.workflow_id not in queued]
        # Stable sort: priority first, then arrival order.
        s.waiting = sorted([*s.waiting, *fresh], key=lambda r: r.priority.key)
        s.unplanned += [r.workflow_id for r in fresh]
        # Bounded work per workflow task keeps each task short however large the burst.
        room = min(quota.capacity(s.buckets, s.limits, s.warmup_started, now), SIGNALS_PER_TASK)
        go, s.waiting = s.waiting[:room], s.waiting[room:]
        # Counted before they are told, so `status` never shows a grant in flight as neither
        # waiting nor used; an email found gone gives its slot back.
        key = quota.bucket_key(now)
        if go:
            s.buckets[key] = s.buckets.get(key, 0) + len(go)
        granted = await self._tell([(r, SlotGrant(at=now)) for r in go])
        if granted < len(go):
            s.buckets[key] -= len(go) - granted
            if not s.buckets[key]:
                del s.buckets[key]
        for r in go:
            s.planned.pop(r.workflow_id, None)
        unplanned = set(s.unplanned)
        s.unplanned = []
        budget = SIGNALS_PER_TASK - len(go)
        # Emails ahead in priority (or new limits) push waiting ones back: tell those whose
        # slot moved as well as the new ones. Runs recorded before this did not: the patch
        # keeps their replay as it was.
        replan = (
            bool(s.waiting) and (bool(fresh) or self._replan) and workflow.patched(RETELL_PATCH)
        )
        self._replan = False
        if s.waiting and (unplanned or replan):
            times = quota.slot_times(s.buckets, s.limits, s.warmup_started, now, len(s.waiting))
            plans = [
                (r, SlotGrant(at=at, planned=True))
                for r, at in zip(s.waiting, times, strict=True)
                if r.workflow_id in unplanned or (replan and self._moved(r.workflow_id, at))
            ]
            told = plans[:budget]
            await self._tell(told)
            s.planned.update((r.workflow_id, grant.at) for r, grant in told)
            s.unplanned = [r.workflow_id for r, _ in plans[budget:]]
        more_room = quota.capacity(s.buckets, s.limits, s.warmup_started, now) > 0
        if s.unplanned or (s.waiting and more_room):
            self._dirty = True  # more to do: next task, right away

    def _moved(self, workflow_id: str, at: datetime) -> bool:
        told = self.state.planned.get(workflow_id)
        return told is None or abs(at - told) > PLAN_SLACK

    async def _tell(self, grants: list[tuple[SlotRequest, SlotGrant]]) -> int:
        """Signal each email; returns how many were reached (a cancelled one is skipped)."""

        async def one(request: SlotRequest, grant: SlotGrant) -> bool:
            try:
                await workflow.get_external_workflow_handle(request.workflow_id).signal(
                    "slot_granted", grant
                )
            except Exception:  # the email is gone (cancelled, terminated): no slot used
                return False
            return True

        return sum(await asyncio.gather(*(one(r, g) for r, g in grants)))

    @workflow.signal(name="request_slot")
    def request_slot(self, request: SlotRequest) -> None:
        """An email asks to be sent; it gets ``slot_granted`` back, now or later."""
        self._arrived.append(request)

    @workflow.signal(name="configure")
    def configure(self, limits: LaneLimits) -> None:
        """A worker (re)started with this lane's configuration: apply it."""
        s = self.state
        s.limits = limits
        s.effective_rate = (
            min(limits.rate_per_second, s.effective_rate)
            if s.recover_at is not None
            else limits.rate_per_second
        )
        if limits.warmup is not None and s.warmup_started is None:
            s.warmup_started = workflow.now()
        self._dirty = True
        self._replan = True  # other caps move the waiting emails' slots

    @workflow.signal(name="set_rate")
    def set_rate(self, change: RateChange) -> None:
        """An operator changed the lane's rate live (``postlane lanes set``)."""
        s = self.state
        s.limits = s.limits.model_copy(update={"rate_per_second": change.rate_per_second})
        s.effective_rate = change.rate_per_second
        s.recover_at = None
        s.last_throttle = None
        self._dirty = True

    @workflow.signal(name="throttled")
    def throttled(self, report: ThrottleReport) -> None:
        """The provider said "slow down": halve the lane's rate and recover gradually."""
        s, now = self.state, workflow.now()
        s.last_throttle = report.reply
        quiet = max(RECOVERY_STEP, report.retry_after or RECOVERY_STEP)
        if s.throttled_at is None or now - s.throttled_at >= BACKOFF_COALESCE:
            floor = s.limits.rate_per_second * MIN_RATE_FRACTION
            s.effective_rate = max(floor, s.effective_rate / 2)
            s.throttled_at = now
            workflow.logger.warning(
                "lane %s throttled (%s): rate now %.3g/s", s.name, report.reply, s.effective_rate
            )
        s.recover_at = now + quiet
        self._dirty = True

    @workflow.query(name="status")
    def status(self) -> LaneStatus:
        """Rates, backpressure, cap usage and waiting emails."""
        s, now = self.state, workflow.now()
        next_slot = None
        if s.waiting:
            next_slot = quota.next_opening(s.buckets, s.limits, s.warmup_started, now)
        return LaneStatus(
            name=s.name,
            configured_rate=s.limits.rate_per_second,
            effective_rate=s.effective_rate,
            backing_off=s.effective_rate < s.limits.rate_per_second,
            last_throttle=s.last_throttle,
            recover_at=s.recover_at,
            hourly_cap=s.limits.hourly_cap,
            daily_cap=quota.daily_cap(s.limits, s.warmup_started, now),
            used_last_hour=quota.used(s.buckets, now, quota.HOUR),
            used_last_day=quota.used(s.buckets, now, quota.DAY),
            waiting=len(s.waiting),
            next_slot_at=next_slot,
        )
