"""One logging pipeline: structlog for Postlane's events, stdlib records (Temporal's) alike."""

from __future__ import annotations

import logging
import sys

import structlog
from temporalio.exceptions import ApplicationError

from postlane.errors import ErrorType

EXPECTED_FAILURES = frozenset(
    {
        ErrorType.SMTP_TRANSIENT,
        ErrorType.SMTP_THROTTLED,
        ErrorType.SMTP_PERMANENT,
        ErrorType.SMTP_TLS,
        ErrorType.LANE_UNKNOWN,
        ErrorType.CONFIGURATION,
    }
)
"""Failures the send activity raises on purpose, after logging its own one-line
``email.attempt_failed`` event; the SDK's traceback for them is noise."""


class ExpectedActivityFailures(logging.Filter):
    """Drop the Temporal SDK's "Completing activity as failed" record (with traceback) for
    an attempt that failed in an expected way, e.g. a server that said "450 4.7.1".

    Any other exception, such as a bug in an activity, keeps its traceback. Metrics and
    the failure in the workflow's history are unchanged (the category stays default).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the SDK's record of an expected failure."""
        if getattr(record, "__temporal_error_identifier", None) != "ActivityFailure":
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, ApplicationError) and exc.type in EXPECTED_FAILURES)


def configure_logging(*, json: bool = False, level: str = "INFO") -> None:
    """Route structlog and stdlib logging through one handler on stderr.

    Args:
        json: one JSON object per line (for log shippers) instead of readable console lines.
        level: the root level name.
    """
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    activity_logger = logging.getLogger("temporalio.activity")
    if not any(isinstance(f, ExpectedActivityFailures) for f in activity_logger.filters):
        activity_logger.addFilter(ExpectedActivityFailures())
