"""The worker's health endpoints: ``/healthz`` (liveness) and ``/readyz`` (readiness).

They are served from a thread of their own, so they answer even while the worker's event
loop is blocked, and say so. The loop proves it runs by stamping a heartbeat every
`BEAT_EVERY` seconds; a stamp older than `STALL_AFTER` means a stuck worker (a blocking
call in an activity, a deadlock), which a busy one never is: with every slot in use, the
loop still turns and the pollers still poll.

- ``/healthz``: 200 while the loop beats and no worker has crashed; else 503. A liveness
  probe restarts the process on 503.
- ``/readyz``: 200 when, in addition, every worker is running (polling its task queue),
  Temporal answered a health check in the last `TEMPORAL_FRESH` seconds and the process is
  not shutting down; else 503. A readiness probe takes the host out of rotation.

Each answers a small JSON object saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from temporalio.client import Client
from temporalio.worker import Worker

log = structlog.get_logger(__name__)

BEAT_EVERY = 1.0
"""Seconds between the event loop's heartbeat stamps."""
STALL_AFTER = 10.0
"""A heartbeat older than this many seconds: the event loop is blocked."""
TEMPORAL_CHECK_EVERY = 5.0
"""Seconds between health checks of the Temporal frontend."""
TEMPORAL_FRESH = 15.0
"""Readiness needs a successful Temporal health check at most this many seconds old."""


class Health:
    """What the endpoints report, updated by the worker's event loop.

    Args:
        clock: seconds, monotonic (for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._beat = clock()
        self._temporal_ok_at: float | None = None
        self._temporal_error: str | None = "not checked yet"
        self._workers: Sequence[Worker] = ()
        self._started = False
        self._stopping = False
        self._crashed: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- fed by the worker ---------------------------------------------------------------

    def start(self, client: Client, workers: Sequence[Worker]) -> None:
        """Watch `workers` (just started) and `client`'s connection, from the running loop."""
        self._workers = workers
        self._started = True
        self._beat = self._clock()
        self._tasks = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._check_temporal(client)),
        ]

    def stopping(self) -> None:
        """The worker is shutting down: not ready any more."""
        self._stopping = True

    def crashed(self, reason: str) -> None:
        """A worker stopped on its own: not alive any more."""
        self._crashed = reason

    async def close(self) -> None:
        """Stop the heartbeat and the Temporal checks."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _heartbeat(self) -> None:
        while True:
            self._beat = self._clock()
            await asyncio.sleep(BEAT_EVERY)

    async def _check_temporal(self, client: Client) -> None:
        while True:
            error: str | None = None
            try:
                ok = await client.service_client.check_health(
                    timeout=timedelta(seconds=TEMPORAL_CHECK_EVERY)
                )
            except Exception as exc:  # any failure means "not reachable now"
                ok, error = False, f"{type(exc).__name__}: {exc}"
            if not ok and error is None:
                error = "Temporal reports it is not serving"
            if ok:
                self._temporal_ok_at, self._temporal_error = self._clock(), None
            else:
                self._temporal_error = error
            await asyncio.sleep(TEMPORAL_CHECK_EVERY)

    # -- read by the endpoints -----------------------------------------------------------

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """(alive, details): the loop beats and no worker crashed."""
        lag = max(0.0, self._clock() - self._beat)
        problems = []
        if lag > STALL_AFTER:
            problems.append(f"event loop blocked for {lag:.1f}s")
        if self._crashed is not None:
            problems.append(f"worker crashed: {self._crashed}")
        return not problems, {"loop_heartbeat_age_seconds": round(lag, 3), "problems": problems}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details): alive, workers polling, Temporal reachable, not stopping."""
        alive, details = self.liveness()
        problems: list[str] = list(details["problems"])
        if not self._started:
            problems.append("workers not started yet")
        if self._stopping:
            problems.append("shutting down")
        idle = [w.task_queue for w in self._workers if not w.is_running]
        if self._started and idle:
            problems.append(f"workers not polling: {', '.join(idle)}")
        now = self._clock()
        temporal_age = None if self._temporal_ok_at is None else now - self._temporal_ok_at
        if temporal_age is None or temporal_age > TEMPORAL_FRESH:
            problems.append(f"Temporal not reachable: {self._temporal_error}")
        details.update(
            problems=problems,
            workers={w.task_queue: w.is_running for w in self._workers},
            temporal_checked_seconds_ago=None if temporal_age is None else round(temporal_age, 3),
        )
        return alive and not problems, details


class HealthServer:
    """``/healthz`` and ``/readyz`` for `health` on (`address`, `port`), in a thread."""

    def __init__(self, health: Health, address: str, port: int) -> None:
        self.health = health
        handler = _handler(health)
        self._server = ThreadingHTTPServer((address, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="postlane-health", daemon=True
        )

    @property
    def port(self) -> int:
        """The port it listens on (useful when started with 0)."""
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        """Serve in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _handler(health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] == "/healthz":
                ok, details = health.liveness()
            elif self.path.split("?", 1)[0] == "/readyz":
                ok, details = health.readiness()
            else:
                self.send_error(404, "try /healthz or /readyz")
                return
            body = json.dumps({"status": "ok" if ok else "unavailable", **details}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would drown the worker's own lines

    return Handler
