"""The reputation guard of a lane: rolling outcome counts, thresholds and the pause.

Every send reports its outcome to the lane's workflow (``record_outcomes``): recipients
accepted, hard bounces (5xx at send, or a DSN saying ``failed``), spam complaints (ARF
reports) and deferrals (4xx). The lane keeps the counts in buckets over a rolling window;
once a rate crosses its threshold on at least `GuardSettings.min_sample` recipients, the
lane pauses itself until an operator resumes it. Pure functions here, so the workflow can
use them (no I/O, no clock: the caller passes ``now``).

Defaults and their sources are in docs/reputation.md.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

BUCKET = timedelta(minutes=5)
"""Outcome counts are kept per 5-minute bucket (12 per hour of window)."""

PAUSE_MEMO = "PostlanePause"
"""Memo of the lane workflow holding its `LanePause` while paused (absent otherwise): the
send activity reads it with a describe, which the server answers without a worker."""

SENT, BOUNCED, COMPLAINED, DEFERRED = range(4)
"""Positions in a bucket's counts."""


class PauseKind(StrEnum):
    """Why a lane is paused: the ``reason`` label of ``postlane_lane_paused``."""

    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    DEFERRAL = "deferral"
    OPERATOR = "operator"


class GuardSettings(BaseModel):
    """``[lanes.guard]`` in postlane.toml: when the lane pauses itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    window_minutes: int = Field(default=60, ge=5, le=24 * 60)
    """The rolling window the rates are measured over."""
    min_sample: int = Field(default=100, ge=1)
    """Recipients (accepted + hard-bounced) the window must hold before a rate is judged,
    so one bounce among the first three sends does not pause the lane."""
    hard_bounce_rate: float | None = Field(default=0.05, gt=0, le=1)
    """Hard bounces / attempted recipients; None: not watched."""
    complaint_rate: float | None = Field(default=0.003, gt=0, le=1)
    """Spam complaints / accepted recipients; None: not watched."""
    deferral_rate: float | None = Field(default=0.5, gt=0, le=1)
    """Deferred attempts / all attempts; None: not watched."""


class OutcomeReport(BaseModel):
    """Signal ``record_outcomes`` to a lane: outcomes since the sender's last report."""

    model_config = ConfigDict(frozen=True)

    sent: int = 0
    """Recipients the SMTP server accepted."""
    hard_bounces: int = 0
    complaints: int = 0
    deferrals: int = 0
    detail: str = ""
    """The last bad reply or report, for the pause reason (``550 5.1.1 no such user``)."""
    inbound_id: str | None = None
    """For a bounce or complaint read from an inbox: the report's own Message-ID. The lane
    counts each report once, however often it is read (a poll retried after it reported,
    or a provider sending the same report twice)."""


class LanePause(BaseModel):
    """Whether a lane is paused (query ``pause_state``), and why."""

    model_config = ConfigDict(frozen=True)

    paused: bool = False
    reason: str | None = None
    since: datetime | None = None
    by: str | None = None
    """``guard`` (a threshold crossed) or ``operator``."""
    kind: PauseKind | None = None


class PauseRequest(BaseModel):
    """Signal ``pause``: an operator pauses the lane by hand."""

    model_config = ConfigDict(frozen=True)

    reason: str = "paused by an operator"


class ResumeRequest(BaseModel):
    """Update ``resume``: an operator resumes a paused lane (its window starts afresh)."""

    model_config = ConfigDict(frozen=True)

    note: str = ""


class GuardTotals(BaseModel):
    """The counts over the window and the rates they make."""

    model_config = ConfigDict(frozen=True)

    sent: int = 0
    hard_bounces: int = 0
    complaints: int = 0
    deferrals: int = 0

    @property
    def attempted(self) -> int:
        """Recipients a server answered for good: accepted or hard-bounced."""
        return self.sent + self.hard_bounces

    @property
    def bounce_rate(self) -> float:
        """Hard bounces over attempted recipients."""
        return self.hard_bounces / self.attempted if self.attempted else 0.0

    @property
    def complaint_rate(self) -> float:
        """Complaints over accepted recipients."""
        return self.complaints / self.sent if self.sent else 0.0

    @property
    def deferral_rate(self) -> float:
        """Deferrals over every answer (accepted, bounced or deferred)."""
        answers = self.attempted + self.deferrals
        return self.deferrals / answers if answers else 0.0


def bucket_key(now: datetime) -> str:
    """The ISO start of the 5-minute bucket `now` falls in."""
    start = now.replace(second=0, microsecond=0)
    return start.replace(minute=start.minute - start.minute % 5).isoformat()


def record(buckets: dict[str, list[int]], now: datetime, report: OutcomeReport) -> None:
    """Add `report` to the bucket of `now` (in place)."""
    counts = buckets.setdefault(bucket_key(now), [0, 0, 0, 0])
    counts[SENT] += report.sent
    counts[BOUNCED] += report.hard_bounces
    counts[COMPLAINED] += report.complaints
    counts[DEFERRED] += report.deferrals


def prune(buckets: dict[str, list[int]], now: datetime, settings: GuardSettings) -> None:
    """Drop buckets that left the window (in place)."""
    oldest = _oldest(now, settings)
    for key in [k for k in buckets if k < oldest]:
        del buckets[key]


def forget_reports(counted: dict[str, str], now: datetime, settings: GuardSettings) -> None:
    """Drop counted reports (ID → bucket) whose bucket left the window (in place)."""
    oldest = _oldest(now, settings)
    for report in [r for r, bucket in counted.items() if bucket < oldest]:
        del counted[report]


def _oldest(now: datetime, settings: GuardSettings) -> str:
    return bucket_key(now - timedelta(minutes=settings.window_minutes) + BUCKET)


def totals(buckets: dict[str, list[int]]) -> GuardTotals:
    """The sums over every bucket."""
    sums = [sum(c[i] for c in buckets.values()) for i in range(4)]
    return GuardTotals(
        sent=sums[SENT],
        hard_bounces=sums[BOUNCED],
        complaints=sums[COMPLAINED],
        deferrals=sums[DEFERRED],
    )


def verdict(t: GuardTotals, settings: GuardSettings) -> tuple[PauseKind, str] | None:
    """Why the lane must pause, or None while every watched rate is within its threshold."""
    if not settings.enabled:
        return None
    window = f"over the last {settings.window_minutes} min"
    checks = [
        (
            PauseKind.HARD_BOUNCE,
            settings.hard_bounce_rate,
            t.bounce_rate,
            t.hard_bounces,
            t.attempted,
        ),
        (PauseKind.COMPLAINT, settings.complaint_rate, t.complaint_rate, t.complaints, t.sent),
        (
            PauseKind.DEFERRAL,
            settings.deferral_rate,
            t.deferral_rate,
            t.deferrals,
            t.attempted + t.deferrals,
        ),
    ]
    for kind, limit, rate, count, of in checks:
        if limit is None or of < settings.min_sample:
            continue
        if rate >= limit:
            name = kind.replace("_", "-")
            return kind, (
                f"{name} rate {rate:.1%} ({count} of {of}) {window} reached the"
                f" threshold {limit:.1%}"
            )
    return None
