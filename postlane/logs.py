"""One logging pipeline: structlog for Postlane's events, stdlib records (Temporal's) alike."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import structlog
from temporalio.exceptions import ApplicationError
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from postlane.errors import SEND_FAILURES, ConfigurationError


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
        return not (isinstance(exc, ApplicationError) and exc.type in SEND_FAILURES)


WORKFLOW_TASK_FAILURE_WINDOW = timedelta(minutes=10)
"""How long the repeats of one workflow-task failure stay quiet after it was logged."""


@dataclass
class _Logged:
    at: float
    repeats: int = 0


class RepeatedWorkflowTaskFailures(logging.Filter):
    """Log a failing workflow task once per distinct error, not on every retry.

    The server retries a failed workflow task for as long as the workflow runs (every 10 s
    or so), and the SDK logs each failure with its traceback. This filter lets the first
    failure of each (workflow type, error type, message) through, traceback and all, keeps
    the repeats quiet for `window` while counting them, and then lets one through as a single
    line saying how many were not logged. A different error of the same workflow type, such
    as a new bug after a deploy, gets its own traceback at once.

    Args:
        window: how long repeats stay quiet after an error was logged.
        clock: seconds, monotonic (for tests).
    """

    MAX_ERRORS = 1000
    """Distinct errors remembered; past this, those not seen for a window are forgotten."""

    def __init__(
        self,
        window: timedelta = WORKFLOW_TASK_FAILURE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.window = window
        self._clock = clock
        # Workflow activations run on worker threads, so records arrive from several.
        self._lock = threading.Lock()
        self._logged: dict[tuple[str, str, str], _Logged] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a repeat inside the window; the record made one line after it."""
        if getattr(record, "__temporal_error_identifier", None) != "WorkflowTaskFailure":
            return True
        exc = record.exc_info[1] if record.exc_info else None
        details = getattr(record, "temporal_workflow", None)
        workflow_type = str(details.get("workflow_type")) if isinstance(details, dict) else "?"
        error = (workflow_type, type(exc).__name__, str(exc))
        now = self._clock()
        window = self.window.total_seconds()
        with self._lock:
            logged = self._logged.get(error)
            if logged is None:
                if len(self._logged) >= self.MAX_ERRORS:
                    self._forget_older_than(now - window)
                self._logged[error] = _Logged(at=now)
                return True
            if now - logged.at < window:
                logged.repeats += 1
                return False
            repeats, logged.at, logged.repeats = logged.repeats, now, 0
        minutes = f"{window / 60:g} min"
        record.msg = (
            f"{record.getMessage()}: still failing with {error[1]}: {error[2]} "
            f"({repeats} more failures in the last {minutes} not logged; traceback logged "
            "with the first)"
        )
        record.args = None
        record.exc_info = None
        record.exc_text = None
        return True

    def _forget_older_than(self, when: float) -> None:
        for error in [e for e, logged in self._logged.items() if logged.at < when]:
            del self._logged[error]


CORE_LOGGER = "temporalio.core"
"""Where the SDK core's own log lines go (Rust; by default it prints them to stderr)."""


class CoreWorkflowTaskFailures(logging.Filter):
    """Drop the SDK core's "Failing workflow task" line, the whole stack trace on one line,
    printed on every retry. The SDK's Python record of the same failure is logged instead,
    once per error (`RepeatedWorkflowTaskFailures`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the core's record of a failing workflow task."""
        entry = getattr(record, "temporal_log", None)
        return getattr(entry, "message", None) != "Failing workflow task"


def forward_core_logs(metrics: PrometheusConfig | None = None) -> None:
    """Send the SDK core's log lines through Python logging (this module's handler and
    filters) instead of straight to stderr. Takes effect for clients connected after it.

    Args:
        metrics: also serve the SDK's and Postlane's metrics over HTTP for Prometheus, from
            the same runtime (there is one default runtime per process).

    Raises:
        ConfigurationError: the metrics address cannot be bound (e.g. the port is taken).
    """
    forwarding = LogForwardingConfig(logger=logging.getLogger(CORE_LOGGER))
    telemetry = TelemetryConfig(
        logging=LoggingConfig(
            filter=TelemetryFilter(core_level="WARN", other_level="ERROR"), forwarding=forwarding
        ),
        metrics=metrics,
    )
    try:
        runtime = Runtime(telemetry=telemetry)
    except Exception as exc:  # the core says why in its message (address in use, ...)
        if metrics is None:
            raise
        raise ConfigurationError(
            f"metrics_port: cannot serve metrics on {metrics.bind_address}: {exc}"
        ) from exc
    Runtime.set_default(runtime, error_if_already_set=False)


def install_log_filters() -> None:
    """Add Postlane's filters to the Temporal SDK's loggers (once, however often called)."""
    for name, kind in (
        ("temporalio.activity", ExpectedActivityFailures),
        ("temporalio.worker._workflow_instance", RepeatedWorkflowTaskFailures),
        (CORE_LOGGER, CoreWorkflowTaskFailures),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


LOG_LEVEL_ENV = "POSTLANE_LOG_LEVEL"
"""The root level when `configure_logging` is given none (default ``INFO``)."""

_ADDRESS_RE = re.compile(
    r"(?<![\w.!#$%&'*+/=?^`{|}~-])([\w.!#$%&'*+/=?^`{|}~-]+)"
    r"@((?:[\w-]+\.)+[\w-]+|\[[^\]\s]+\])",
)
_OWN_MESSAGE_ID_RE = re.compile(r"^pl1?\.[a-z2-7]+$")
REDACTED_LOCAL_PART = "***"


def redact_addresses(text: str) -> str:
    """`text` with the local part of every email address in it replaced by ``***``: the
    domain stays, for telling providers apart. Postlane's own Message-IDs are kept (their
    left side is opaque, and it is what ties a log line to a message)."""

    def domain_only(match: re.Match[str]) -> str:
        if _OWN_MESSAGE_ID_RE.match(match.group(1)):
            return match.group(0)
        return f"{REDACTED_LOCAL_PART}@{match.group(2)}"

    return _ADDRESS_RE.sub(domain_only, text) if "@" in text else text


class RedactAddresses:
    """structlog processor: addresses in an event's values (the message, the bound
    context, stdlib records' extras, lists and dicts of them) keep only their domain.

    Recipients' local parts are personal data, and logs travel further than the mail
    they describe. Keys and workflow IDs that embed an address are redacted alike.
    """

    def __call__(
        self, logger: object, method_name: str, event_dict: structlog.types.EventDict
    ) -> structlog.types.EventDict:
        """The event with every address reduced to ``***@domain``."""
        for name, value in event_dict.items():
            if not name.startswith("_"):  # `_record` and structlog's own bookkeeping
                event_dict[name] = _redacted(value)
        return event_dict


def _redacted(value: object) -> object:
    if isinstance(value, str):
        return redact_addresses(value)
    if isinstance(value, list | tuple):
        return type(value)(_redacted(v) for v in value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    return value


def configure_logging(
    *, json: bool = False, level: str | None = None, full_addresses: bool | None = None
) -> None:
    """Route structlog and stdlib logging through one handler on stderr.

    Args:
        json: one JSON object per line (for log shippers) instead of readable console lines.
        level: the root level name; default ``$POSTLANE_LOG_LEVEL`` or ``INFO``.
        full_addresses: log email addresses whole; default only at ``DEBUG``. Otherwise
            they appear as ``***@domain`` (`RedactAddresses`).
    """
    level = (level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    if full_addresses is None:
        full_addresses = logging.getLevelName(level) == logging.DEBUG
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not full_addresses:
        shared.append(RedactAddresses())
    # Tracebacks plain, never with their frames' locals: those hold passwords and message
    # bodies, and rendering them (as rich does by default) is slow enough on a busy machine
    # to trip the SDK's deadlock detector when a workflow task failure is logged.
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
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
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # JSON: the traceback as plain text in "exception" (the console renders its own).
                *([structlog.processors.format_exc_info] if json else []),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    install_log_filters()
    forward_core_logs()
