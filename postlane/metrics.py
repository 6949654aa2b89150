"""Postlane's Prometheus metrics: their names, labels and buckets, and how they are recorded.

Activities record through ``activity.metric_meter()`` and workflows through
``workflow.metric_meter()``, which records nothing while a workflow replays its history, so
a worker that restarts, or evicts a workflow from its cache and replays it, counts nothing
twice. Both reach the SDK runtime's Prometheus exporter (see `prometheus_config`), next to
Temporal's own ``temporal_*`` metrics. This module does no I/O and is safe in workflows.

Counters are served without a ``_total`` suffix and histograms without a unit suffix (the
SDK's defaults): ``postlane_emails_sent``, ``postlane_smtp_transaction_seconds_bucket``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum

from temporalio.common import MetricMeter
from temporalio.runtime import PrometheusConfig

from postlane.errors import ErrorType


class Metric(StrEnum):
    """Every metric Postlane serves (the names dashboards and alerts use)."""

    EMAILS_SENT = "postlane_emails_sent"
    """Counter {lane}: emails whose DATA the SMTP server accepted."""
    EMAIL_FAILURES = "postlane_email_failures"
    """Counter {lane, kind}: failed send attempts by `FailureKind`, and emails parked as
    dead letters (``kind="dead_lettered"``)."""
    SMTP_TRANSACTION_SECONDS = "postlane_smtp_transaction_seconds"
    """Histogram {lane}: one SMTP transaction, from getting a connection (connect, TLS and
    AUTH when none is pooled) to the server's reply to DATA, or to the failure."""
    ENQUEUE_TO_ACCEPTED_SECONDS = "postlane_enqueue_to_accepted_seconds"
    """Histogram {lane}: from the email's workflow start to the server's 250 for DATA."""
    LANE_RATE = "postlane_lane_rate_per_second"
    """Gauge {lane}: the rate the lane sends at now (lower while backing off)."""
    LANE_CONFIGURED_RATE = "postlane_lane_configured_rate_per_second"
    """Gauge {lane}: the lane's configured rate."""
    LANE_BACKING_OFF = "postlane_lane_backing_off"
    """Gauge {lane}: 1 while a provider's "slow down" holds the lane below its rate."""
    LANE_CAP_USED = "postlane_lane_cap_used"
    """Gauge {lane, window}: emails granted in the last hour / day."""
    LANE_CAP = "postlane_lane_cap"
    """Gauge {lane, window}: the hourly / daily cap (today's, warm-up applied); absent for
    a window without a cap."""
    LANE_PAUSED = "postlane_lane_paused"
    """Gauge {lane, reason}: 1 for the reason the lane is paused (``hard_bounce``,
    ``complaint``, ``deferral``, ``operator``), 0 for the others; all 0 while it sends."""
    EMAILS_SUPPRESSED = "postlane_emails_suppressed"
    """Counter {lane}: emails that ended ``suppressed`` (a recipient on the suppression list)."""
    SEQUENCE_OUTCOMES = "postlane_sequence_outcomes"
    """Counter {campaign, outcome}: sequences that ended, by `SequenceOutcome`."""
    LANE_CIRCUIT_OPEN = "postlane_lane_circuit_open"
    """Gauge {lane}: 1 while the lane's circuit is open or half-open (sends fail over)."""
    LANE_CIRCUIT_SWITCHES = "postlane_lane_circuit_switches"
    """Counter {lane, state}: the lane's circuit moved to ``open``, ``half_open`` or
    ``closed``."""
    EMAILS_FAILED_OVER = "postlane_emails_failed_over"
    """Counter {lane, failover}: emails moved from `lane` to its failover lane."""
    LANE_DOMAINS_IN_BACKOFF = "postlane_lane_domains_in_backoff"
    """Gauge {lane}: receiving domains held below the per-domain rate."""


class FailureKind(StrEnum):
    """The ``kind`` label of ``postlane_email_failures``."""

    TRANSIENT = "transient"
    THROTTLE = "throttle"
    PERMANENT = "permanent"
    CONFIGURATION = "configuration"
    DEAD_LETTERED = "dead_lettered"


class CapWindow(StrEnum):
    """The ``window`` label of the cap gauges."""

    HOUR = "hour"
    DAY = "day"


SEQUENCE_OUTCOMES = frozenset({"replied", "bounced", "unsubscribed", "completed", "cancelled"})
"""Sequence statuses counted as outcomes (``failed`` is not: it is an error, in the logs)."""

_FAILURE_KINDS: Mapping[str, FailureKind] = {
    ErrorType.SMTP_TRANSIENT: FailureKind.TRANSIENT,
    ErrorType.SMTP_THROTTLED: FailureKind.THROTTLE,
    ErrorType.SMTP_PERMANENT: FailureKind.PERMANENT,
    ErrorType.SMTPUTF8_UNSUPPORTED: FailureKind.PERMANENT,
    ErrorType.SMTP_TLS: FailureKind.CONFIGURATION,
    ErrorType.LANE_UNKNOWN: FailureKind.CONFIGURATION,
    ErrorType.CONFIGURATION: FailureKind.CONFIGURATION,
}

SMTP_TRANSACTION_BUCKETS: Sequence[float] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip
"""Seconds; SMTP timeouts are 60 s by default, so the top buckets catch a hung server."""
ENQUEUE_TO_ACCEPTED_BUCKETS: Sequence[float] = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)  # fmt: skip
"""Seconds, up to 10 minutes; 300 s is a bucket edge so "accepted within 5 minutes" is
exact."""

HISTOGRAM_BUCKETS: Mapping[str, Sequence[float]] = {
    Metric.SMTP_TRANSACTION_SECONDS: SMTP_TRANSACTION_BUCKETS,
    Metric.ENQUEUE_TO_ACCEPTED_SECONDS: ENQUEUE_TO_ACCEPTED_BUCKETS,
}
"""Bucket boundaries per histogram, for the SDK's Prometheus exporter."""


def failure_kind(error_type: str | None) -> FailureKind:
    """The ``kind`` of a failed attempt raised with `error_type` (`ErrorType`); anything
    unexpected is transient, as the retry policy treats it."""
    return _FAILURE_KINDS.get(error_type or "", FailureKind.TRANSIENT)


def count_sent(meter: MetricMeter, lane: str) -> None:
    """One email accepted on `lane`."""
    meter.create_counter(Metric.EMAILS_SENT, "emails the SMTP server accepted").add(
        1, {"lane": lane}
    )


def count_failure(meter: MetricMeter, lane: str, kind: FailureKind) -> None:
    """One failed attempt (or one dead letter) on `lane`."""
    meter.create_counter(Metric.EMAIL_FAILURES, "failed send attempts and dead letters").add(
        1, {"lane": lane, "kind": kind.value}
    )


def observe_smtp_transaction(meter: MetricMeter, lane: str, seconds: float) -> None:
    """How long one SMTP transaction on `lane` took."""
    meter.create_histogram_float(
        Metric.SMTP_TRANSACTION_SECONDS, "one SMTP transaction, connection to DATA reply", "s"
    ).record(max(seconds, 0.0), {"lane": lane})


def observe_enqueue_to_accepted(meter: MetricMeter, lane: str, seconds: float) -> None:
    """How long an email on `lane` took from when it was due (its workflow's start, or a
    later ``send_at``) to the 250 for DATA."""
    meter.create_histogram_float(
        Metric.ENQUEUE_TO_ACCEPTED_SECONDS, "workflow start to the DATA accepted", "s"
    ).record(max(seconds, 0.0), {"lane": lane})


def set_lane_gauges(
    meter: MetricMeter,
    lane: str,
    *,
    rate: float,
    configured_rate: float,
    caps: Mapping[CapWindow, tuple[int, int | None]],
) -> None:
    """Publish a lane's rates, backpressure and cap usage.

    Args:
        caps: per window, (used, cap); a cap of None (no cap) publishes only the usage.
    """
    labels = {"lane": lane}
    meter.create_gauge_float(Metric.LANE_RATE, "the lane's rate now").set(rate, labels)
    meter.create_gauge_float(Metric.LANE_CONFIGURED_RATE, "the lane's configured rate").set(
        configured_rate, labels
    )
    meter.create_gauge(Metric.LANE_BACKING_OFF, "1 while the lane is backing off").set(
        int(rate < configured_rate), labels
    )
    used_gauge = meter.create_gauge(Metric.LANE_CAP_USED, "emails granted in the window")
    cap_gauge = meter.create_gauge(Metric.LANE_CAP, "the lane's cap for the window")
    for window, (used, cap) in caps.items():
        window_labels = {"lane": lane, "window": window.value}
        used_gauge.set(used, window_labels)
        if cap is not None:
            cap_gauge.set(cap, window_labels)


def set_lane_health_gauges(
    meter: MetricMeter, lane: str, *, circuit_open: bool, domains_in_backoff: int
) -> None:
    """Publish a lane's circuit state and how many receiving domains are in backoff."""
    labels = {"lane": lane}
    meter.create_gauge(Metric.LANE_CIRCUIT_OPEN, "1 while the circuit is open").set(
        int(circuit_open), labels
    )
    meter.create_gauge(Metric.LANE_DOMAINS_IN_BACKOFF, "domains in backoff").set(
        domains_in_backoff, labels
    )


def count_circuit_switch(meter: MetricMeter, lane: str, state: str) -> None:
    """The lane's circuit moved to `state` (``open``, ``half_open``, ``closed``)."""
    meter.create_counter(Metric.LANE_CIRCUIT_SWITCHES, "circuit state changes").add(
        1, {"lane": lane, "state": state}
    )


def count_failed_over(meter: MetricMeter, lane: str, failover: str) -> None:
    """One email moved from `lane` to its `failover` lane (the circuit was open)."""
    meter.create_counter(Metric.EMAILS_FAILED_OVER, "emails moved to a failover lane").add(
        1, {"lane": lane, "failover": failover}
    )


def count_sequence_outcome(meter: MetricMeter, campaign: str, outcome: str) -> None:
    """One sequence of `campaign` ended with `outcome` (ignored if no `SEQUENCE_OUTCOMES`)."""
    if outcome in SEQUENCE_OUTCOMES:
        meter.create_counter(Metric.SEQUENCE_OUTCOMES, "sequences ended, by outcome").add(
            1, {"campaign": campaign, "outcome": outcome}
        )


def prometheus_config(bind_address: str) -> PrometheusConfig:
    """The SDK runtime's Prometheus exporter on `bind_address` (``host:port``), with
    Postlane's histogram buckets."""
    return PrometheusConfig(
        bind_address=bind_address, histogram_bucket_overrides=dict(HISTOGRAM_BUCKETS)
    )


PAUSE_REASONS = ("hard_bounce", "complaint", "deferral", "operator")
"""The ``reason`` label values of ``postlane_lane_paused`` (`postlane.lanes.guard.PauseKind`)."""


def set_lane_paused(meter: MetricMeter, lane: str, reason: str | None) -> None:
    """1 on the series of the reason `lane` is paused for, 0 on the others (all 0: sending)."""
    gauge = meter.create_gauge(Metric.LANE_PAUSED, "1 while the lane is paused, by reason")
    for each in PAUSE_REASONS:
        gauge.set(1 if reason == each else 0, {"lane": lane, "reason": each})


def count_suppressed(meter: MetricMeter, lane: str) -> None:
    """One email ended ``suppressed`` (nothing sent)."""
    meter.create_counter(Metric.EMAILS_SUPPRESSED, "emails that ended suppressed").add(
        1, {"lane": lane}
    )
