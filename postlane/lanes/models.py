"""Wire models of lanes: their limits, the slot protocol between an email and its lane's
quota workflow, and the status and report of a lane.

Like every wire model, they only ever gain fields with defaults.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from postlane.email.models import Priority
from postlane.lanes.guard import GuardSettings, GuardTotals, LanePause


class Warmup(BaseModel):
    """A new account's or IP's ramp: ``start_per_day`` on day 0, times ``factor`` each day."""

    model_config = ConfigDict(frozen=True)

    start_per_day: int = Field(gt=0)
    factor: float = Field(default=2.0, gt=1.0)


class LaneLimits(BaseModel):
    """The limits a lane's quota workflow enforces (the lane's configuration, minus SMTP)."""

    model_config = ConfigDict(frozen=True)

    rate_per_second: float = Field(gt=0)
    per_domain_per_second: float | None = None
    hourly_cap: int | None = None
    daily_cap: int | None = None
    warmup: Warmup | None = None
    failover: str | None = None
    """The lane that takes this lane's sends while its circuit is open."""
    circuit_probe_after: timedelta = timedelta(seconds=30)
    """How long an open circuit waits before probing the provider (half-open)."""
    guard: GuardSettings | None = None
    """The reputation guard's thresholds (None: a lane configured before the guard)."""


class DomainReport(BaseModel):
    """Signal from a send to its lane: a recipient domain asked us to slow down (421,
    4.7.x) or deferred several sends in a row."""

    model_config = ConfigDict(frozen=True)

    domain: str
    reply: str
    reason: str = "throttled"
    """``throttled`` (421 / 4.7.x) or ``deferrals`` (consecutive 4xx)."""


class ProviderReport(BaseModel):
    """Signal from a send to its lane: the provider is unreachable (refused or timed-out
    connections in a row, or a TLS failure)."""

    model_config = ConfigDict(frozen=True)

    reply: str


class DomainBackoff(BaseModel):
    """One receiving domain held below the lane's per-domain rate."""

    weight: float
    """Fairness weight on the lane's queue: the domain's limit is the per-domain rate
    times this (1.0 is no backoff)."""
    since: datetime
    reason: str
    last_reply: str = ""
    throttled_at: datetime
    recover_at: datetime | None = None


class DomainStatus(BaseModel):
    """One row of ``postlane lanes --domains``."""

    model_config = ConfigDict(frozen=True)

    domain: str
    weight: float
    effective_rate: float
    since: datetime
    reason: str
    last_reply: str = ""
    recover_at: datetime | None = None


class SlotRequest(BaseModel):
    """Signal from an email to its lane: may I send? (only lanes with caps are asked)."""

    model_config = ConfigDict(frozen=True)

    workflow_id: str
    priority: Priority = Priority.NORMAL
    since: datetime | None = None
    """When the email first asked (its place in line within its priority). None: an email
    from before asks were repeated, which asks once and must be kept in the lane's window."""
    asked_at: datetime | None = None
    """When this request was sent (a lane drops requests too old to be trusted)."""
    recheck_at: datetime | None = None
    """The `SlotGrant.recheck_at` this email was told last, on the request that follows it
    (the lane stops counting it among the emails due back then)."""
    regrant: bool = False
    """The email was granted a slot but found the lane paused at send: its earlier grant
    went unused, so the lane grants it again (after it resumes)."""


class SlotGrant(BaseModel):
    """Signal from a lane to an email: go now (``planned`` False), or expect a slot at ``at``."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    planned: bool = False
    recheck_at: datetime | None = None
    """For a planned grant: when to ask again if no slot was granted by then."""


class ThrottleReport(BaseModel):
    """Signal from a send to its lane: the provider asked us to slow down."""

    model_config = ConfigDict(frozen=True)

    reply: str
    retry_after: timedelta | None = None


class RateChange(BaseModel):
    """Signal to a lane: a new configured per-second rate (``postlane lanes set``)."""

    model_config = ConfigDict(frozen=True)

    rate_per_second: float = Field(gt=0)
    reason: str = ""


class LaneRateRequest(BaseModel):
    """Input of the ``set_lane_rate`` activity."""

    model_config = ConfigDict(frozen=True)

    lane: str
    rate_per_second: float
    per_domain_per_second: float | None = None
    reason: str = ""
    domain_weights: dict[str, float] = Field(default_factory=dict)
    """Fairness weights of domains in backoff (absent: weight 1)."""
    clear_domains: list[str] = Field(default_factory=list)
    """Domains whose weight override goes (they recovered)."""


class LaneState(BaseModel):
    """Everything a lane's quota workflow carries across continue-as-new."""

    name: str
    limits: LaneLimits
    effective_rate: float
    """The rate in force: the configured one, or less while backing off."""
    applied: LaneRateRequest | None = None
    """The rates last set on the server (reason blank)."""
    warmup_started: datetime | None = None
    buckets: dict[str, int] = Field(default_factory=dict)
    """Slots granted per minute (ISO minute → count), for the rolling hour and day."""
    waiting: list[SlotRequest] = Field(default_factory=list)
    """Requests over the caps, in the order they will be granted."""
    arrived: list[SlotRequest] = Field(default_factory=list)
    """Requests not yet looked at when the workflow continued as new."""
    unplanned: list[str] = Field(default_factory=list)
    """Waiting emails not yet told when to expect their slot."""
    planned: dict[str, datetime] = Field(default_factory=dict)
    """The slot time each waiting email was last told (to tell it again if that moves)."""
    more_to_do: bool = False
    """The run before continued as new with work left for at once (free slots, emails not
    yet told, a rate not yet applied): the next run does it first instead of waiting."""
    throttled_at: datetime | None = None
    last_throttle: str | None = None
    recover_at: datetime | None = None
    deferred: dict[str, int] = Field(default_factory=dict)
    """Emails beyond the window, told to ask again later: ``"<priority key>|<ISO minute of
    recheck_at>"`` → count. Bounded by time buckets, not by the backlog."""
    granted_recently: dict[str, str] = Field(default_factory=dict)
    """ISO minute → concatenated 8-hex digests of the emails granted in it (the last few
    minutes), so a repeated ask never takes a second slot."""
    ceiling: float | None = None
    """Backpressure: the rate the lane recovers to after repeated throttles (a fraction of
    the rate that was throttled); None recovers to the configured rate."""
    ceiling_until: datetime | None = None
    """When the ceiling is forgotten if no throttle came meanwhile."""
    domains: dict[str, DomainBackoff] = Field(default_factory=dict)
    """Receiving domains in backoff on this lane."""
    circuit: str = "closed"
    """``closed``, ``open`` (sends go to the failover lane) or ``half_open`` (probing)."""
    circuit_since: datetime | None = None
    circuit_reason: str = ""
    probe_at: datetime | None = None
    outcomes: dict[str, list[int]] = Field(default_factory=dict)
    """Reputation guard: 5-minute bucket → [sent, hard bounces, complaints, deferrals]."""
    reports_counted: dict[str, str] = Field(default_factory=dict)
    """Reputation guard: inbound reports counted in its window (a digest of each report's
    Message-ID → its 5-minute bucket), so a report read twice counts once."""
    pause: LanePause = LanePause()
    """Paused by the guard or an operator: no slot is granted until resumed."""


class LaneStatus(BaseModel):
    """What ``postlane lanes`` shows for one lane (query ``status`` of its quota workflow)."""

    model_config = ConfigDict(frozen=True)

    name: str
    configured_rate: float
    effective_rate: float
    backing_off: bool = False
    last_throttle: str | None = None
    recover_at: datetime | None = None
    hourly_cap: int | None = None
    daily_cap: int | None = None
    """Today's cap, warm-up applied."""
    used_last_hour: int = 0
    """Slots counting against the hourly cap: granted in the last hour, plus up to a minute
    more (a slot counts a little past the hour, so that its send, which follows the grant by
    a moment, keeps the cap too)."""
    used_last_day: int = 0
    waiting: int = 0
    next_slot_at: datetime | None = None
    window: int = 0
    """Waiting emails the lane holds by ID (bounded); the rest are counted, not listed."""
    ceiling: float | None = None
    """The rate backpressure recovers to after repeated throttles (None: configured)."""
    domains: list[DomainStatus] = Field(default_factory=list)
    """Receiving domains in backoff (``postlane lanes --domains``)."""
    circuit: str = "closed"
    """``closed``, ``open`` or ``half_open``: see `LaneState.circuit`."""
    circuit_since: datetime | None = None
    circuit_reason: str = ""
    failover: str | None = None
    paused: bool = False
    """Paused by the reputation guard or an operator; its emails wait ``scheduled``."""
    pause_reason: str | None = None
    paused_at: datetime | None = None
    paused_by: str | None = None
    guard: GuardTotals | None = None
    """The reputation guard's counts over its window (None: the guard is off)."""


class LaneReport(BaseModel):
    """One row of ``postlane lanes``: the lane's own state plus its task queue on the server."""

    model_config = ConfigDict(frozen=True)

    name: str
    status: LaneStatus | None = None
    """None when the lane's workflow is not running (no worker has started it)."""
    server_rate: float | None = None
    """The rate limit the server enforces on the lane's queue."""
    backlog: int | None = None
    backlog_age: timedelta | None = None
    dispatch_rate: float | None = None
    in_flight: int | None = None
    """Emails handed to the lane and not finished (backlog + being sent)."""
