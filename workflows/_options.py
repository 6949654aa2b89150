"""Timeouts and retry policies, named once and passed explicitly at every call site."""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy

from postlane.email.models import RetrySettings
from postlane.errors import ErrorType

SMTP_START_TO_CLOSE = timedelta(minutes=5)
"""One whole SMTP transaction; each reply is separately bounded by the lane's smtp_timeout."""
SMTP_HEARTBEAT = timedelta(seconds=5)
"""The send heartbeats every second, so a dead worker's send moves on within ~5 s."""
NON_RETRYABLE = [
    ErrorType.SMTP_PERMANENT,
    ErrorType.SMTP_TLS,
    ErrorType.LANE_UNKNOWN,
    ErrorType.CONFIGURATION,
]


def smtp_retry(settings: RetrySettings) -> RetryPolicy:
    """The send activity's retry policy for a lane's retry settings."""
    return RetryPolicy(
        initial_interval=settings.initial_interval,
        backoff_coefficient=settings.backoff,
        maximum_interval=settings.maximum_interval,
        maximum_attempts=settings.maximum_attempts,
        non_retryable_error_types=[str(t) for t in NON_RETRYABLE],
    )


ADMIN_START_TO_CLOSE = timedelta(seconds=30)
ADMIN_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1)
)
"""Lane administration (setting a queue's rate) retries until the server takes it."""

COMPOSE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2), maximum_interval=timedelta(minutes=1), maximum_attempts=5
)
"""An agent (LLM) call: retried a few times, then the sequence fails visibly."""

IMAP_START_TO_CLOSE = timedelta(minutes=5)
"""One poll: connect, log in, list UIDs, fetch at most `max_messages` messages."""
IMAP_HEARTBEAT = timedelta(minutes=1)
"""The poll heartbeats after each IMAP step: a killed poller's poll moves on within this."""
INBOUND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=5,
    non_retryable_error_types=[str(ErrorType.IMAP_AUTH), str(ErrorType.CONFIGURATION)],
)
"""A poll (or an unsubscribe of a finished sequence) is retried a few times; then the
watcher records the error, waits its poll interval and tries again, for ever."""
INBOUND_START_TO_CLOSE = timedelta(seconds=30)
