"""LaneWorkflow: one per lane; holds its caps, warm-up and backpressure in Temporal.

Emails on a lane with an hourly or daily cap ask this workflow for a send slot and wait,
durably and visibly ``scheduled``, until it grants one: in priority order, as the rolling
windows free up. A provider's "slow down" halves the lane's server-side rate; the rate
recovers step by step once the provider stops complaining. No second database: the state
is this workflow's, carried through continue-as-new.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from postlane import metrics
    from postlane.errors import ErrorType
    from postlane.ids import lane_task_queue
    from postlane.lanes import guard
    from postlane.lanes.models import (
        DomainBackoff,
        DomainReport,
        DomainStatus,
        LaneLimits,
        LaneRateRequest,
        LaneState,
        LaneStatus,
        ProviderReport,
        RateChange,
        SlotGrant,
        SlotRequest,
        ThrottleReport,
    )
    from postlane.names import Activity, EmailMessages, LaneMessages, WorkflowType
    from workflows import _quota as quota
    from workflows._options import ADMIN_RETRY, ADMIN_START_TO_CLOSE

SET_LANE_RATE_ACTIVITY = Activity.SET_LANE_RATE
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

WINDOW_PATCH = "lane-bounded-window"
"""Runs from this patch on hold at most `WINDOW` waiting emails by ID and count the rest."""
WINDOW = 500
"""Waiting emails held by ID, planned precisely (more of them only from emails that ask once)."""
ARRIVED_CARRY = 500
"""Requests not yet looked at that a continue-as-new carries; the rest ask again."""
RUN_HISTORY = 600
"""Runs from `WINDOW_PATCH` on continue as new after this many events (once no request waits
to be answered, or past `MAX_HISTORY`), so a workflow task that must replay its run (after a
worker restart, a cache eviction, or a continue-as-new refused because a signal came in
meanwhile) has little to replay."""
GRANT_MEMORY = timedelta(minutes=15)
"""How long a grant is remembered, so a repeated ask does not take a second slot."""
STALE_REQUEST = timedelta(minutes=10)
"""A request older than this is dropped: its email asks again if it still waits (and a
request older than `GRANT_MEMORY` could come from an email already granted)."""
WINDOW_RECHECK = timedelta(minutes=10)
"""An email in the window asks again this long after its planned time if not granted."""
DEFER_RECHECK = timedelta(seconds=30)
"""Deferred emails ask again this long after their planned time (plus `DEFER_SPREAD`): the
window's emails, ahead of them, take the opening's slots first, and the lane's own timer
has fired by then."""
DEFER_SPREAD = 60
"""Seconds over which one opening's deferred emails ask again (fixed per email), so the lane
takes them in as a stream, not as one burst."""
DEFER_GRACE = timedelta(minutes=15)
"""Counts of deferred emails that did not ask again by their recheck time + this are dropped."""

PACED_PATCH = "lane-paced-rechecks"
"""Runs from this patch spread one opening's deferred emails over the time the lane's rate
needs to send them (`_defer`), and continue as new past `PACED_MAX_HISTORY` events."""
PACED_MAX_HISTORY = 1000
"""Past this many events a run continues as new even with requests waiting: a run that a
stream of requests keeps from a quiet moment stays short enough to replay in well under a
second when a request arriving during the continue-as-new fails that task."""

COUNT_ON_TAKE_PATCH = "lane-count-on-take"
"""Runs from this patch stop counting a deferred email only when its ask is taken in line.
Before, every ask that named a recheck time uncounted one, so an ask dropped as stale, or
lost when a continue-as-new could not carry every request, left its email counted twice once
it asked again (it asked without a recheck time), or a repeated ask uncounted another email."""

SEND_HOLD_PATCH = "lane-send-hold"
"""Runs from this patch count a granted slot for `quota.SEND_HOLD` past its minute (before:
one minute), so that sends, which follow grants by a moment, also keep the caps."""

AIMD_PATCH = "lane-aimd-backoff"
"""Runs from this patch recover to a ceiling below a rate that was throttled again."""
CEILING_FRACTION = 0.75
"""After a repeated throttle the lane recovers to this fraction of the throttled rate."""
CEILING_MEMORY = timedelta(hours=1)
"""A throttle this soon after the previous one is a repeat; a ceiling held this long
without a throttle is forgotten (the lane probes toward its configured rate again)."""
ADDITIVE_STEPS = 4
"""Above half its target, the rate recovers in steps of target / ADDITIVE_STEPS."""

DOMAIN_BACKOFF_PATCH = "lane-domain-backoff"
"""Runs from this patch hold a throttling receiving domain back on its own (a fairness
weight on the lane's queue) instead of ignoring the report."""
DOMAIN_RECOVERY_STEP = timedelta(minutes=1)
"""A domain in backoff doubles its weight after this long without a new complaint."""
MIN_DOMAIN_WEIGHT = 1 / 64
"""The lowest weight a domain backs off to (the server clamps weights to 0.001..1000)."""
CIRCUIT_PATCH = "lane-circuit-breaker"
"""Runs from this patch open a circuit (sends go to the lane's ``failover`` lane) when the
provider is reported down, and probe it to close the circuit again."""
PROBE_SMTP_ACTIVITY = Activity.PROBE_SMTP
PROBE_RETRY = RetryPolicy(maximum_attempts=1)
"""One probe per half-open state: a failed probe reopens the circuit for another wait."""
PROBE_TIMEOUT = timedelta(minutes=2)


GUARD_PATCH = "lane-reputation-guard"
"""Runs from this patch pause on a reputation threshold (or an operator's ``pause``) and
grant no slot until resumed; the marker is recorded where a lane first pauses."""

REPORT_ONCE_PATCH = "lane-inbound-report-once"
"""Runs from this patch count an inbound bounce or complaint once per Message-ID (a poll
retried after it reported used to count it again); recorded at the first repeat."""

PAUSED_HISTORY_PATCH = "lane-paused-history"
"""Runs from this patch keep their history bounded while paused: only the latest request of
each email is kept, and the run continues as new (the pause goes along in its state) once
its history is long, where before it slept on while every waiting email asked again, until
the server's history limit terminated it. Recorded where a paused run first needs it."""


def _digest(workflow_id: str) -> str:
    return hashlib.blake2b(workflow_id.encode(), digest_size=4).hexdigest()


def _deferred_key(request: SlotRequest, recheck_at: datetime) -> str:
    return f"{request.priority.key}|{quota.bucket_key(recheck_at)}"


def _order(request: SlotRequest) -> tuple[int, float]:
    # Emails that ask once (no `since`) were in line before any that repeat their ask.
    return request.priority.key, request.since.timestamp() if request.since else float("-inf")


@workflow.defn(name=WorkflowType.LANE)
class LaneWorkflow:
    """Quota, warm-up and backpressure of one lane (workflow ID ``lane:<name>``)."""

    @workflow.init
    def __init__(self, state: LaneState) -> None:
        # Handlers may run before `run`, so the state must exist from construction on.
        self._s = state
        self._arrived, state.arrived = deque(state.arrived), []
        # A run that continued as new in the middle of a burst (slots still free, emails not
        # yet told) picks up where it left off; waiting for the next opening would leave the
        # free slots unused for an hour. Runs started before this flag existed wait as before.
        self._dirty, state.more_to_do = state.more_to_do, False
        self._replan = False
        self._windowed = False
        self._paced = False
        self._recent: set[str] | None = None
        self._hold = quota.MINUTE
        self._probing: asyncio.Future[None] | None = None
        self._paused_bounded: bool | None = None
        """`PAUSED_HISTORY_PATCH`, once a paused run first needed it (None: not yet)."""

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
        self._windowed = workflow.patched(WINDOW_PATCH)
        self._paced = self._windowed and workflow.patched(PACED_PATCH)
        if self._windowed and workflow.patched(SEND_HOLD_PATCH):
            self._hold = quota.SEND_HOLD
        if s.pause.paused:
            # Continued as new while paused: the new run's memo says so again.
            workflow.upsert_memo({guard.PAUSE_MEMO: s.pause.model_dump(mode="json")})
        self._publish_details()  # a run continued as new shows what the last one showed
        while True:
            timed_out = False
            if self._paused:
                # Decided before the wait, so replaying a history of code before the patch
                # never wakes (and starts a new timer) where that code slept on.
                self._bounded_while_paused()
            try:
                # Paused: requests wait in `_arrived` (their emails ask again meanwhile).
                await workflow.wait_condition(
                    lambda: (
                        self._dirty
                        or (bool(self._arrived) and not self._paused)
                        or (self._paused_bounded is True and self._long_while_paused())
                    ),
                    timeout=self._next_wakeup(),
                )
            except TimeoutError:
                timed_out = True
            if self._long_while_paused() and not self._bounded_while_paused():
                # Code before the patch slept on here: so does its history's replay.
                if not (self._dirty or timed_out):
                    continue
            self._dirty = False
            self._recover_if_due()
            self._recover_domains()
            await self._apply_rate()
            self._probe_if_due()
            if self._paused:
                pass  # nothing granted until an operator resumes the lane
            elif self._windowed:
                await self._grant_windowed()
            else:
                await self._grant()
            self._publish_metrics()
            if self._should_continue_as_new():
                await workflow.wait_condition(workflow.all_handlers_finished)
                if (
                    self._windowed
                    and self._arrived
                    and not self._paused
                    and not self._must_continue_as_new()
                ):
                    # Requests came in, maybe failing an attempt to continue as new (a
                    # signal during that task fails it, and the retry replays the run):
                    # answer them first, and continue as new in a quiet task.
                    self._dirty = True
                    continue
                s.buckets = quota.prune(s.buckets, workflow.now())
                # Requests that came in meanwhile go along, as many as keep the input small;
                # the others' emails ask again when no answer comes.
                s.arrived = list(self._arrived)[: ARRIVED_CARRY if self._windowed else None]
                s.more_to_do = self._dirty
                workflow.continue_as_new(s)

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        limit = min(MAX_HISTORY, RUN_HISTORY) if self._windowed else MAX_HISTORY
        return info.is_continue_as_new_suggested() or info.get_current_history_length() > limit

    def _long_while_paused(self) -> bool:
        """Paused with a long history: asks alone would grow it to the server's limit."""
        return self._paused and self._should_continue_as_new()

    def _bounded_while_paused(self) -> bool:
        """Whether this run keeps its history bounded while paused (`PAUSED_HISTORY_PATCH`)."""
        if self._paused_bounded is None:
            self._paused_bounded = workflow.patched(PAUSED_HISTORY_PATCH)
        return self._paused_bounded

    def _must_continue_as_new(self) -> bool:
        """Past this, continue as new even with requests waiting (they go along, bounded)."""
        limit = PACED_MAX_HISTORY if self._paced else MAX_HISTORY
        return workflow.info().get_current_history_length() > limit

    def _next_wakeup(self) -> timedelta | None:
        s, now = self.state, workflow.now()
        wakeups: list[datetime] = []
        # Paused: an opening grants nothing, so it must not wake the lane (once a second).
        waiting = bool(s.waiting) and not self._paused
        if waiting and self._windowed:
            planner = quota.Planner(s.buckets, s.limits, s.warmup_started, now, self._hold)
            wakeups.append(planner.next_opening(now))
        elif waiting:
            wakeups.append(quota.next_opening(s.buckets, s.limits, s.warmup_started, now))
        if s.recover_at is not None:
            wakeups.append(s.recover_at)
        wakeups += [d.recover_at for d in s.domains.values() if d.recover_at is not None]
        if s.probe_at is not None and s.circuit != "closed" and self._probing is None:
            wakeups.append(s.probe_at)
        if not wakeups:
            return None
        return max(min(wakeups) - now, timedelta(seconds=1))

    def _recover_if_due(self) -> None:
        s, now = self.state, workflow.now()
        if s.ceiling is not None and s.ceiling_until is not None and now >= s.ceiling_until:
            # A whole quiet stretch at the ceiling: probe toward the configured rate again.
            s.ceiling, s.ceiling_until = None, None
            if s.recover_at is None and s.effective_rate < s.limits.rate_per_second:
                s.recover_at = now
        if s.recover_at is None or now < s.recover_at:
            return
        if workflow.patched(AIMD_PATCH):
            self._recover_step(now)
            return
        s.effective_rate = min(s.limits.rate_per_second, s.effective_rate * 2)
        if s.effective_rate < s.limits.rate_per_second:
            s.recover_at = now + RECOVERY_STEP
        else:
            s.recover_at = None
            s.last_throttle = None
        workflow.logger.info("lane %s recovering: rate %.3g/s", s.name, s.effective_rate)

    def _recover_step(self, now: datetime) -> None:
        """Double back to half the target, then add target / `ADDITIVE_STEPS` per quiet step.

        The target is the ceiling a repeated throttle left (below the rate that was
        throttled), or the configured rate.
        """
        s = self.state
        target = min(s.limits.rate_per_second, s.ceiling or s.limits.rate_per_second)
        if s.effective_rate * 2 <= target:
            s.effective_rate *= 2
        else:
            s.effective_rate = min(target, s.effective_rate + target / ADDITIVE_STEPS)
        if s.effective_rate < target:
            s.recover_at = now + RECOVERY_STEP
        else:
            s.effective_rate = max(s.effective_rate, target)
            s.recover_at = None
            if s.ceiling is None:
                s.last_throttle = None
            else:
                s.ceiling_until = now + CEILING_MEMORY
        workflow.logger.info("lane %s recovering: rate %.3g/s", s.name, s.effective_rate)

    def _wanted(self) -> LaneRateRequest:
        s = self.state
        if not s.domains:
            return LaneRateRequest(
                lane=s.name,
                rate_per_second=s.effective_rate,
                per_domain_per_second=s.limits.per_domain_per_second,
            )
        # A weight scales the per-key limit; with no per-domain rate configured, each
        # domain may use the whole lane's rate, and a domain in backoff a fraction of it.
        return LaneRateRequest(
            lane=s.name,
            rate_per_second=s.effective_rate,
            per_domain_per_second=self._per_domain_rate(),
            domain_weights={name: d.weight for name, d in sorted(s.domains.items())},
        )

    def _per_domain_rate(self) -> float:
        s = self.state
        return s.limits.per_domain_per_second or s.limits.rate_per_second

    def _recover_domains(self) -> None:
        """Step domains whose quiet time is up back toward full weight (then forget them)."""
        s, now = self.state, workflow.now()
        for name, d in list(s.domains.items()):
            if d.recover_at is None or now < d.recover_at:
                continue
            d.weight = min(1.0, d.weight * 2)
            if d.weight >= 1.0:
                del s.domains[name]
                workflow.logger.info("lane %s: domain %s recovered", s.name, name)
            else:
                d.recover_at = now + DOMAIN_RECOVERY_STEP
                workflow.logger.info(
                    "lane %s: domain %s recovering: weight %.3g", s.name, name, d.weight
                )

    def _probe_if_due(self) -> None:
        """Half-open an open circuit when its wait is over: one probe of the provider.

        The probe runs beside the lane's loop, so slots are granted meanwhile. A circuit
        found half-open with no probe running (one cut short by a continue-as-new) probes
        again.
        """
        s = self.state
        if s.circuit == "closed" or self._probing is not None:
            return
        if s.probe_at is None or workflow.now() < s.probe_at:
            return
        self._switch("half_open", "probing the provider")
        self._probing = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        s = self.state
        try:
            await workflow.execute_activity(
                PROBE_SMTP_ACTIVITY,
                s.name,
                task_queue=lane_task_queue(s.name),
                start_to_close_timeout=PROBE_TIMEOUT,
                schedule_to_close_timeout=PROBE_TIMEOUT,
                retry_policy=PROBE_RETRY,
            )
        except ActivityError as err:
            if s.circuit == "half_open":
                self._switch("open", f"probe failed: {err.cause or err}")
                s.probe_at = workflow.now() + s.limits.circuit_probe_after
        else:
            if s.circuit == "half_open":
                self._switch("closed", "probe succeeded: the provider is back")
                s.probe_at = None
        finally:
            self._probing = None
            self._dirty = True

    def _switch(self, state: str, reason: str) -> None:
        """Move the circuit to `state`: logged, counted and shown in the lane's details."""
        s = self.state
        s.circuit, s.circuit_since, s.circuit_reason = state, workflow.now(), reason
        level = workflow.logger.info if state == "closed" else workflow.logger.warning
        level(
            "lane %s circuit %s (%s); sends go to lane %s",
            s.name,
            state,
            reason,
            s.limits.failover if state != "closed" else s.name,
        )
        metrics.count_circuit_switch(workflow.metric_meter(), s.name, state)
        self._publish_details()

    def _publish_details(self) -> None:
        """The lane's details in the Web UI: the pause (first), the circuit, domains held
        back. One string, so no event hides another (not a command: replay-safe)."""
        s = self.state
        circuit = f"circuit: {s.circuit}"
        if s.circuit != "closed":
            since = s.circuit_since.isoformat(timespec="seconds") if s.circuit_since else "?"
            circuit += f" since {since} ({s.circuit_reason}); sends go to {s.limits.failover}"
        lines = [f"PAUSED by {s.pause.by}: {s.pause.reason}"] if s.pause.paused else []
        lines.append(circuit)
        if s.domains:
            lines.append(
                "domains in backoff: "
                + ", ".join(f"{n} x{d.weight:.3g}" for n, d in sorted(s.domains.items()))
            )
        workflow.set_current_details("\n".join(lines))

    async def _apply_rate(self) -> None:
        """Bring the server in line with the rate in force (and the per-domain rate)."""
        s, wanted = self.state, self._wanted()
        if s.applied == wanted:
            return
        backing_off = s.effective_rate < s.limits.rate_per_second
        update: dict[str, object] = {"reason": "backpressure" if backing_off else "configured"}
        gone = set(s.applied.domain_weights) - set(wanted.domain_weights) if s.applied else set()
        if gone:
            update["clear_domains"] = sorted(gone)
        await workflow.execute_activity(
            SET_LANE_RATE_ACTIVITY,
            wanted.model_copy(update=update),
            start_to_close_timeout=ADMIN_START_TO_CLOSE,
            retry_policy=ADMIN_RETRY,
        )
        # What was sent, not what is wanted now: a change signalled meanwhile goes next.
        s.applied = wanted
        if self._wanted() != wanted:
            self._dirty = True

    async def _grant(self) -> None:
        s, now = self.state, workflow.now()
        arrived, self._arrived = self._arrived, deque()
        queued = {r.workflow_id for r in s.waiting}
        fresh = [r for r in arrived if r.workflow_id not in queued]
        # Stable sort: priority first, then arrival order.
        s.waiting = sorted([*s.waiting, *fresh], key=lambda r: r.priority.key)
        s.unplanned += [r.workflow_id for r in fresh]
        # Bounded work per workflow task keeps each task short however large the burst.
        room = min(
            quota.capacity(s.buckets, s.limits, s.warmup_started, now, self._hold), SIGNALS_PER_TASK
        )
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
        more_room = quota.capacity(s.buckets, s.limits, s.warmup_started, now, self._hold) > 0
        if s.unplanned or (s.waiting and more_room):
            self._dirty = True  # more to do: next task, right away

    async def _grant_windowed(self) -> None:
        """Grant, plan and defer with state bounded by `WINDOW`, whatever the backlog.

        The first `WINDOW` waiting emails (priority, then first ask) are held by ID and told
        their slot precisely. Emails behind them are told a planned time computed from their
        place in line and when to ask again (`SlotGrant.recheck_at`); the lane keeps only
        their count per priority and recheck minute. Every answer is one signal, at most
        `SIGNALS_PER_TASK` per workflow task.
        """
        s, now = self.state, workflow.now()
        self._forget_old(now)
        budget = SIGNALS_PER_TASK
        window_ids = {r.workflow_id for r in s.waiting}
        recent = self._recent_digests()
        taken: list[SlotRequest] = []
        retell: list[str] = []
        on_take = workflow.patched(COUNT_ON_TAKE_PATCH)
        while self._arrived and len(taken) + len(retell) < budget:
            r = self._arrived.popleft()
            if not on_take:
                self._uncount(r)
            if r.asked_at is not None and now - r.asked_at > STALE_REQUEST:
                continue  # it asks again if it still waits
            if r.workflow_id in window_ids:
                retell.append(r.workflow_id)  # asked again: tell it its slot again
                continue
            if _digest(r.workflow_id) in recent and not r.regrant:
                continue  # granted already: never a second slot (unless paused at send)
            if on_take:
                self._uncount(r)
            taken.append(r)
            window_ids.add(r.workflow_id)
        s.waiting = sorted([*s.waiting, *taken], key=_order)
        s.unplanned += [r.workflow_id for r in taken]
        for workflow_id in retell:
            s.planned.pop(workflow_id, None)
            if workflow_id not in s.unplanned:
                s.unplanned.append(workflow_id)

        # Counted before they are told, so `status` never shows a grant in flight as neither
        # waiting nor used; an email found gone gives its slot back.
        room = min(quota.capacity(s.buckets, s.limits, s.warmup_started, now, self._hold), budget)
        go, s.waiting = s.waiting[:room], s.waiting[room:]
        key = quota.bucket_key(now)
        if go:
            s.buckets[key] = s.buckets.get(key, 0) + len(go)
            digests = "".join(_digest(r.workflow_id) for r in go)
            s.granted_recently[key] = s.granted_recently.get(key, "") + digests
            recent.update(digests[i : i + 8] for i in range(0, len(digests), 8))
        granted = await self._tell([(r, SlotGrant(at=now)) for r in go])
        if granted < len(go):
            s.buckets[key] -= len(go) - granted
            if not s.buckets[key]:
                del s.buckets[key]
        gone = {r.workflow_id for r in go}
        budget -= len(go)

        # Beyond the window: told a planned time and when to ask again, then only counted.
        # Emails that ask only once (from before this patch) stay, or they would never go.
        over = [r for r in s.waiting[WINDOW:] if r.since is not None]
        if over:
            held = {r.workflow_id for r in over}
            s.waiting = [r for r in s.waiting if r.workflow_id not in held]
            gone |= held
            told, later = over[:budget], over[budget:]
            # Answered in the next task, as a request neither stale nor counted as deferred.
            self._arrived.extendleft(
                r.model_copy(update={"asked_at": None, "recheck_at": None}) for r in reversed(later)
            )
            await self._defer(told, now)
            budget -= len(told)
        if gone:
            s.unplanned = [i for i in s.unplanned if i not in gone]
            for workflow_id in gone:
                s.planned.pop(workflow_id, None)

        # The window's emails: told their slot when new, asked again, or moved.
        replan, self._replan = bool(taken) or self._replan, False
        unplanned = set(s.unplanned)
        if s.waiting and (unplanned or replan) and budget > 0:
            planner = quota.Planner(s.buckets, s.limits, s.warmup_started, now, self._hold)
            times = planner.times(list(range(len(s.waiting))))
            plans = [
                (r, SlotGrant(at=at, planned=True, recheck_at=at + WINDOW_RECHECK))
                for r, at in zip(s.waiting, times, strict=True)
                if r.workflow_id in unplanned or (replan and self._moved(r.workflow_id, at))
            ]
            told_now = plans[:budget]
            await self._tell(told_now)
            s.planned.update((r.workflow_id, grant.at) for r, grant in told_now)
            s.unplanned = [r.workflow_id for r, _ in plans[budget:]]
        more_room = quota.capacity(s.buckets, s.limits, s.warmup_started, now, self._hold) > 0
        if self._arrived or s.unplanned or (s.waiting and more_room):
            self._dirty = True  # more to do: next task, right away

    async def _defer(self, over: list[SlotRequest], now: datetime) -> None:
        """Tell emails behind the window when to expect their slot and to ask again then."""
        s = self.state
        if not over:
            return
        ahead_by_priority: dict[int, int] = {}
        for key, n in s.deferred.items():
            prio = int(key.split("|", 1)[0])
            ahead_by_priority[prio] = ahead_by_priority.get(prio, 0) + n
        positions = []
        for i, r in enumerate(over):
            ahead = len(s.waiting) + i
            ahead += sum(n for p, n in ahead_by_priority.items() if p < r.priority.key)
            if r.recheck_at is None:
                ahead += ahead_by_priority.get(r.priority.key, 0)
            else:  # it was in line before those told to come back after it
                mine = quota.bucket_key(r.recheck_at)
                for key, n in s.deferred.items():
                    key_priority, minute = key.split("|", 1)
                    if int(key_priority) == r.priority.key and minute <= mine:
                        ahead += n
            positions.append(ahead)
        wanted = sorted(set(positions))
        planner = quota.Planner(s.buckets, s.limits, s.warmup_started, now, self._hold)
        offsets: list[int] = []
        at_position = dict(zip(wanted, planner.times(wanted, offsets=offsets), strict=True))
        offset_of = dict(zip(wanted, offsets, strict=True))
        grants = []
        for r, position in zip(over, positions, strict=True):
            at = at_position[position]
            if self._paced:
                # An opening frees its slots at once, but the lane sends at its rate: the
                # k-th of them goes k / rate later. Told so, the emails also ask again at
                # that pace instead of all within `DEFER_SPREAD` of the opening.
                at += timedelta(seconds=offset_of[position] / s.limits.rate_per_second)
            spread = int(_digest(r.workflow_id), 16) % DEFER_SPREAD
            recheck = max(at, now) + DEFER_RECHECK + timedelta(seconds=spread)
            key = _deferred_key(r, recheck)
            s.deferred[key] = s.deferred.get(key, 0) + 1
            grants.append((r, SlotGrant(at=at, planned=True, recheck_at=recheck)))
        await self._tell(grants)

    def _uncount(self, request: SlotRequest) -> None:
        """Stop counting a deferred email that asked again (by the recheck it was told)."""
        if request.recheck_at is None:
            return
        s, key = self.state, _deferred_key(request, request.recheck_at)
        if s.deferred.get(key, 0) > 1:
            s.deferred[key] -= 1
        else:
            s.deferred.pop(key, None)

    def _forget_old(self, now: datetime) -> None:
        s = self.state
        old = [k for k in s.granted_recently if datetime.fromisoformat(k) + GRANT_MEMORY < now]
        for k in old:
            del s.granted_recently[k]
        if old:
            self._recent = None
        for key in [
            k for k in s.deferred if k.split("|", 1)[1] < quota.bucket_key(now - DEFER_GRACE)
        ]:
            del s.deferred[key]  # those emails are gone, or will ask again anyway

    def _recent_digests(self) -> set[str]:
        if self._recent is None:
            self._recent = {
                digests[i : i + 8]
                for digests in self.state.granted_recently.values()
                for i in range(0, len(digests), 8)
            }
        return self._recent

    def _moved(self, workflow_id: str, at: datetime) -> bool:
        told = self.state.planned.get(workflow_id)
        return told is None or abs(at - told) > PLAN_SLACK

    async def _tell(self, grants: list[tuple[SlotRequest, SlotGrant]]) -> int:
        """Signal each email; returns how many were reached (a cancelled one is skipped)."""

        async def one(request: SlotRequest, grant: SlotGrant) -> bool:
            try:
                await workflow.get_external_workflow_handle(request.workflow_id).signal(
                    EmailMessages.SLOT_GRANTED, grant
                )
            except Exception:  # the email is gone (cancelled, terminated): no slot used
                return False
            return True

        return sum(await asyncio.gather(*(one(r, g) for r, g in grants)))

    @workflow.signal(name=LaneMessages.REQUEST_SLOT)
    def request_slot(self, request: SlotRequest) -> None:
        """An email asks to be sent; it gets ``slot_granted`` back, now or later.

        While the lane is paused an email's earlier ask still waits when it asks again:
        only the latest is kept, so a long pause holds one request per email.
        """
        if self._paused and self._bounded_while_paused():
            self._arrived = deque(r for r in self._arrived if r.workflow_id != request.workflow_id)
        self._arrived.append(request)

    @workflow.signal(name=LaneMessages.CONFIGURE)
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

    @workflow.signal(name=LaneMessages.SET_RATE)
    def set_rate(self, change: RateChange) -> None:
        """An operator changed the lane's rate live (``postlane lanes set``)."""
        s = self.state
        s.limits = s.limits.model_copy(update={"rate_per_second": change.rate_per_second})
        s.effective_rate = change.rate_per_second
        s.recover_at = None
        s.last_throttle = None
        s.ceiling, s.ceiling_until = None, None
        self._dirty = True

    @workflow.signal(name=LaneMessages.THROTTLED)
    def throttled(self, report: ThrottleReport) -> None:
        """The provider said "slow down": halve the lane's rate and recover gradually."""
        s, now = self.state, workflow.now()
        s.last_throttle = report.reply
        quiet = max(RECOVERY_STEP, report.retry_after or RECOVERY_STEP)
        if s.throttled_at is None or now - s.throttled_at >= BACKOFF_COALESCE:
            floor = s.limits.rate_per_second * MIN_RATE_FRACTION
            repeat = s.throttled_at is not None and now - s.throttled_at < CEILING_MEMORY
            if (repeat or s.ceiling is not None) and workflow.patched(AIMD_PATCH):
                # Throttled again: the budget is below this rate, so never recover to it.
                limit = max(floor, s.effective_rate * CEILING_FRACTION)
                s.ceiling = min(s.ceiling or limit, limit)
                s.ceiling_until = None
            s.effective_rate = max(floor, s.effective_rate / 2)
            s.throttled_at = now
            workflow.logger.warning(
                "lane %s throttled (%s): rate now %.3g/s", s.name, report.reply, s.effective_rate
            )
        s.recover_at = now + quiet
        self._dirty = True

    @workflow.signal(name=LaneMessages.DOMAIN_THROTTLED)
    def domain_throttled(self, report: DomainReport) -> None:
        """A receiving domain said "slow down": halve its weight; it recovers step by step."""
        if not workflow.patched(DOMAIN_BACKOFF_PATCH):
            return
        s, now = self.state, workflow.now()
        d = s.domains.get(report.domain)
        if d is not None and now - d.throttled_at < BACKOFF_COALESCE:
            d.last_reply, d.recover_at = report.reply, now + DOMAIN_RECOVERY_STEP
            return
        weight = max(MIN_DOMAIN_WEIGHT, (d.weight if d else 1.0) / 2)
        s.domains[report.domain] = DomainBackoff(
            weight=weight,
            since=d.since if d else now,
            reason=report.reason,
            last_reply=report.reply,
            throttled_at=now,
            recover_at=now + DOMAIN_RECOVERY_STEP,
        )
        workflow.logger.warning(
            "lane %s: domain %s in backoff (%s: %s): weight %.3g",
            s.name,
            report.domain,
            report.reason,
            report.reply,
            weight,
        )
        self._publish_details()
        self._dirty = True

    @workflow.signal(name=LaneMessages.PROVIDER_DOWN)
    def provider_down(self, report: ProviderReport) -> None:
        """The provider is unreachable: open the circuit (if the lane has a failover lane)."""
        s = self.state
        if s.limits.failover is None or not workflow.patched(CIRCUIT_PATCH):
            return
        if s.circuit == "open":
            s.circuit_reason = report.reply
            return
        self._switch("open", report.reply)
        s.probe_at = workflow.now() + s.limits.circuit_probe_after
        self._dirty = True

    @property
    def _paused(self) -> bool:
        return self.state.pause.paused

    def _guard_settings(self) -> guard.GuardSettings | None:
        settings = self.state.limits.guard
        return settings if settings is not None and settings.enabled else None

    @workflow.signal(name=LaneMessages.RECORD_OUTCOMES)
    def record_outcomes(self, report: guard.OutcomeReport) -> None:
        """Sends (and the inbound watcher) report outcomes; past a threshold, pause.

        An inbound report (a bounce or complaint, named by its Message-ID) counts once in
        the window, however often the inbox poll that read it reports it.
        """
        s, now, settings = self.state, workflow.now(), self._guard_settings()
        if settings is None:
            return
        guard.forget_reports(s.reports_counted, now, settings)
        if report.inbound_id:
            digest = hashlib.blake2b(report.inbound_id.encode(), digest_size=8).hexdigest()
            if digest in s.reports_counted and workflow.patched(REPORT_ONCE_PATCH):
                return
            s.reports_counted[digest] = guard.bucket_key(now)
        guard.record(s.outcomes, now, report)
        guard.prune(s.outcomes, now, settings)
        # Wake the loop, which continues as new when these signals made the history long.
        self._dirty = True
        if s.pause.paused:
            return
        found = guard.verdict(guard.totals(s.outcomes), settings)
        if found is not None and workflow.patched(GUARD_PATCH):
            kind, reason = found
            if report.detail:
                reason += f"; last: {report.detail}"
            self._set_pause(
                guard.LanePause(paused=True, reason=reason, since=now, by="guard", kind=kind)
            )

    @workflow.signal(name=LaneMessages.PAUSE)
    def pause(self, request: guard.PauseRequest) -> None:
        """An operator pauses the lane by hand (``postlane lanes pause``)."""
        if not self.state.pause.paused and workflow.patched(GUARD_PATCH):
            self._set_pause(
                guard.LanePause(
                    paused=True,
                    reason=request.reason,
                    since=workflow.now(),
                    by="operator",
                    kind=guard.PauseKind.OPERATOR,
                )
            )

    @workflow.update(name=LaneMessages.RESUME)
    def resume(self, request: guard.ResumeRequest) -> guard.LanePause:
        """Resume a paused lane; the guard's window starts afresh. Returns the pause ended."""
        ended = self.state.pause
        self.state.outcomes = {}
        self._set_pause(guard.LanePause())
        workflow.logger.warning(
            "lane %s resumed by an operator (%s) after: %s",
            self.state.name,
            request.note or "no note",
            ended.reason,
        )
        return ended

    @resume.validator
    def _validate_resume(self, request: guard.ResumeRequest) -> None:
        if not self.state.pause.paused:
            raise ApplicationError(
                f"lane {self.state.name} is not paused",
                type=ErrorType.ACTION_REFUSED,
                non_retryable=True,
            )

    @workflow.query(name=LaneMessages.PAUSE_STATE)
    def pause_state(self) -> guard.LanePause:
        """Whether the lane is paused (the send activity reads the memo instead)."""
        return self.state.pause

    def _set_pause(self, pause: guard.LanePause) -> None:
        s = self.state
        s.pause = pause
        self._dirty = True
        # What the send activity reads (a describe needs no worker, and never races a
        # continue-as-new as a query can).
        workflow.upsert_memo(
            {guard.PAUSE_MEMO: pause.model_dump(mode="json") if pause.paused else None}
        )
        if pause.paused:
            workflow.logger.warning("lane %s paused: %s", s.name, pause.reason)
        self._publish_details()

    def _publish_metrics(self) -> None:
        """The lane's rate, backpressure and cap gauges, after each pass.

        From the workflow (not the rate activity) because only it knows cap usage, and its
        meter is silent while replaying, so a worker never publishes a replayed, stale value.
        """
        st = self.status()
        metrics.set_lane_gauges(
            workflow.metric_meter(),
            st.name,
            rate=st.effective_rate,
            configured_rate=st.configured_rate,
            caps={
                metrics.CapWindow.HOUR: (st.used_last_hour, st.hourly_cap),
                metrics.CapWindow.DAY: (st.used_last_day, st.daily_cap),
            },
        )
        if st.failover is not None or st.domains:
            metrics.set_lane_health_gauges(
                workflow.metric_meter(),
                st.name,
                circuit_open=st.circuit != "closed",
                domains_in_backoff=len(st.domains),
            )
        metrics.set_lane_paused(workflow.metric_meter(), st.name, self.state.pause.kind)

    @workflow.query(name=LaneMessages.STATUS)
    def status(self) -> LaneStatus:
        """Rates, backpressure, cap usage and waiting emails."""
        s, now = self.state, workflow.now()
        next_slot = None
        if s.waiting or s.deferred:
            planner = quota.Planner(s.buckets, s.limits, s.warmup_started, now, self._hold)
            next_slot = planner.next_opening(now)
        return LaneStatus(
            name=s.name,
            configured_rate=s.limits.rate_per_second,
            effective_rate=s.effective_rate,
            backing_off=s.effective_rate < s.limits.rate_per_second,
            last_throttle=s.last_throttle,
            recover_at=s.recover_at,
            hourly_cap=s.limits.hourly_cap,
            daily_cap=quota.daily_cap(s.limits, s.warmup_started, now),
            used_last_hour=quota.used(s.buckets, now, quota.HOUR, self._hold),
            used_last_day=quota.used(s.buckets, now, quota.DAY, self._hold),
            waiting=len(s.waiting) + sum(s.deferred.values()),
            next_slot_at=next_slot,
            window=len(s.waiting),
            ceiling=s.ceiling,
            domains=[
                DomainStatus(
                    domain=name,
                    weight=d.weight,
                    effective_rate=self._per_domain_rate() * d.weight,
                    since=d.since,
                    reason=d.reason,
                    last_reply=d.last_reply,
                    recover_at=d.recover_at,
                )
                for name, d in sorted(s.domains.items())
            ],
            circuit=s.circuit,
            circuit_since=s.circuit_since,
            circuit_reason=s.circuit_reason,
            failover=s.limits.failover,
            paused=s.pause.paused,
            pause_reason=s.pause.reason,
            paused_at=s.pause.since,
            paused_by=s.pause.by,
            guard=self._totals(now),
        )

    def _totals(self, now: datetime) -> guard.GuardTotals | None:
        settings = self._guard_settings()
        if settings is None:
            return None
        window = dict(self.state.outcomes)  # a query changes nothing: prune a copy
        guard.prune(window, now, settings)
        return guard.totals(window)
