"""``postlane exporter``: the cluster-wide gauges, served once per cluster over HTTP.

Workers serve what they see themselves (sends, failures, latencies; `docs/alerts.md`). What
no single worker sees comes from the Temporal server, and one process asks for it so that
Prometheus gets one series per lane however many workers run:

- ``postlane_lane_backlog{lane}`` and ``postlane_lane_backlog_age_seconds{lane}``: tasks
  waiting on the lane's send queue and how long the oldest has waited (DescribeTaskQueue
  with stats; approximate, as the server reports them);
- ``postlane_lane_add_rate_per_second{lane}``: tasks added to the queue per second (the
  server's recent average), so alerts can tell how fast the backlog must drain;
- ``postlane_lane_rate_limit_per_second{lane}``: the rate limit the server enforces on the
  queue, as a worker or ``postlane lanes set`` set it (absent until one does);
- ``postlane_lane_pollers{lane}``: workers the server saw polling the queue recently;
- ``postlane_dead_letters{lane}``: emails parked as dead letters (a visibility count);
- ``postlane_exporter_collect_success``: 1 when the last round of questions to the
  server all succeeded. After a failed round the last good lane figures are served for
  up to `KEEP_LAST_GOOD` seconds, so one slow round does not reset every alert's ``for``
  timer; after that the lane series go away rather than serve stale figures.

It is a process of its own rather than a duty one worker is elected to: it needs no leader
election (which Temporal does not offer workers), it keeps working while every worker is
down (the moment "a lane with no worker polling" matters most), and it scrapes the same
way under Docker Compose, Kubernetes or systemd. Run one (two is harmless: alert rules
take ``max by (lane)``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog
from temporalio.api.enums.v1 import RateLimitSource, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from postlane.config import Settings
from postlane.errors import ConfigurationError
from postlane.ids import lane_task_queue

log = structlog.get_logger(__name__)

_SET_SOURCES = (RateLimitSource.RATE_LIMIT_SOURCE_API, RateLimitSource.RATE_LIMIT_SOURCE_WORKER)

DEFAULT_PORT = 9466
"""``postlane exporter``'s default HTTP port."""
DEFAULT_INTERVAL = 15.0
"""Seconds between two rounds of questions to the server (Prometheus's default scrape
interval); a scrape returns the last round's answers."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Prometheus's text exposition format."""
COLLECT_TIMEOUT = 30.0
"""Seconds one round may take: a server that stops answering mid-round shows as a failed
collection, not as the last answers served forever."""
KEEP_LAST_GOOD = 60.0
"""Seconds the last good lane figures are still served while collections fail."""
MAX_CONCURRENT_LANES = 8
"""Lanes described at the same time: a cluster with many lanes is not hit all at once."""

METRICS: dict[str, str] = {
    "postlane_lane_backlog": "Tasks waiting on the lane's send queue (approximate).",
    "postlane_lane_backlog_age_seconds": "How long the oldest waiting task has waited.",
    "postlane_lane_add_rate_per_second": "Tasks added to the lane's send queue per second.",
    "postlane_lane_rate_limit_per_second": "The rate limit the server enforces on the lane.",
    "postlane_lane_pollers": "Workers the server saw polling the lane's send queue recently.",
    "postlane_dead_letters": "Emails parked as dead letters on the lane.",
    "postlane_exporter_collect_success": "1 if the last collection from Temporal succeeded.",
}
"""Every gauge the exporter serves, with its help text."""


@dataclass(frozen=True)
class LaneGauges:
    """One lane's cluster-wide figures at one moment."""

    lane: str
    backlog: int
    backlog_age_seconds: float
    add_rate_per_second: float
    rate_limit_per_second: float | None
    pollers: int
    dead_letters: int


@dataclass
class Snapshot:
    """The last round's answers, as served."""

    lanes: list[LaneGauges] = field(default_factory=list)
    success: bool = False
    collected_at: float = 0.0
    """Event-loop time of the round the lane figures come from."""


async def describe_lane(client: Client, lane: str) -> LaneGauges:
    """Ask the server about one lane: its queue's stats and pollers, its dead letters.

    Raises:
        temporalio.service.RPCError: the server refused or is unreachable.
    """
    desc = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=lane_task_queue(lane)),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            report_stats=True,
            report_config=True,
        )
    )
    # GROUP BY works only on ExecutionStatus, so one count per lane. The lane name is a
    # validated identifier (postlane.config), safe inside the quotes.
    query = f'PostlaneStatus="dead_letter" AND ExecutionStatus="Running" AND PostlaneLane="{lane}"'
    dead = await client.count_workflows(query)
    effective = desc.effective_rate_limit
    # The system default (no limit set by the API or a worker) is no lane rate.
    limit = effective.requests_per_second if effective.rate_limit_source in _SET_SOURCES else 0.0
    return LaneGauges(
        lane=lane,
        backlog=desc.stats.approximate_backlog_count,
        backlog_age_seconds=desc.stats.approximate_backlog_age.ToTimedelta().total_seconds(),
        add_rate_per_second=desc.stats.tasks_add_rate,
        rate_limit_per_second=limit or None,
        pollers=len(desc.pollers),
        dead_letters=dead.count,
    )


async def collect(client: Client, lanes: Sequence[str]) -> list[LaneGauges]:
    """Every lane's figures, a few lanes at a time.

    Raises:
        temporalio.service.RPCError: a question to the server failed.
    """
    gate = asyncio.Semaphore(MAX_CONCURRENT_LANES)

    async def one(lane: str) -> LaneGauges:
        async with gate:
            return await describe_lane(client, lane)

    return list(await asyncio.gather(*(one(lane) for lane in lanes)))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(snapshot: Snapshot) -> str:
    """The snapshot in Prometheus's text format (version 0.0.4)."""
    values: dict[str, list[tuple[str, float]]] = {name: [] for name in METRICS}
    for g in snapshot.lanes:
        lane = _label(g.lane)
        values["postlane_lane_backlog"].append((lane, g.backlog))
        values["postlane_lane_backlog_age_seconds"].append((lane, g.backlog_age_seconds))
        values["postlane_lane_add_rate_per_second"].append((lane, g.add_rate_per_second))
        if g.rate_limit_per_second is not None:
            values["postlane_lane_rate_limit_per_second"].append((lane, g.rate_limit_per_second))
        values["postlane_lane_pollers"].append((lane, g.pollers))
        values["postlane_dead_letters"].append((lane, g.dead_letters))
    lines: list[str] = []
    for name, help_text in METRICS.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        if name == "postlane_exporter_collect_success":
            lines.append(f"{name} {int(snapshot.success)}")
        lines += [f'{name}{{lane="{lane}"}} {_number(v)}' for lane, v in values[name]]
    return "\n".join(lines) + "\n"


class Exporter:
    """Asks the server every `interval` seconds and serves the answers over HTTP.

    Paths: ``/metrics`` (the gauges), ``/healthz`` (200 while the process serves),
    ``/readyz`` (200 once a collection has succeeded, 503 before or after a failed one).

    Args:
        client: a connected client, or a coroutine function that connects: the exporter
            then serves (``collect_success 0``) until the server answers.
        settings: the configuration whose lanes are described.
        interval: seconds between two collections.
    """

    def __init__(
        self,
        client: Client | Callable[[], Awaitable[Client]],
        settings: Settings,
        *,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self._client = client if isinstance(client, Client) else None
        self._connect = None if isinstance(client, Client) else client
        self.lanes = [lane.name for lane in settings.lanes]
        self.interval = interval
        self.snapshot = Snapshot()

    async def collect_once(self) -> None:
        """One round of questions; the snapshot is replaced whole, success or not."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(COLLECT_TIMEOUT):
                if self._client is None:
                    assert self._connect is not None
                    self._client = await self._connect()
                lanes = await collect(self._client, self.lanes)
        except Exception as exc:  # any failure: say so, and soon stop serving old figures
            log.warning("exporter.collect_failed", error_type=type(exc).__name__, error=str(exc))
            last = self.snapshot
            fresh = loop.time() - last.collected_at <= KEEP_LAST_GOOD
            self.snapshot = Snapshot(
                lanes=last.lanes if fresh else [], success=False, collected_at=last.collected_at
            )
        else:
            self.snapshot = Snapshot(lanes=lanes, success=True, collected_at=loop.time())

    async def run(
        self,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        *,
        stop: asyncio.Event | None = None,
        ready: asyncio.Event | None = None,
    ) -> None:
        """Serve until `stop` is set (or forever); `ready` is set once the port listens.

        Raises:
            ConfigurationError: the port cannot be listened on (taken, or not allowed).
        """
        stop = stop or asyncio.Event()
        try:
            server = await asyncio.start_server(self._handle, host, port)
        except OSError as exc:
            raise ConfigurationError(f"port: cannot serve on {host}:{port}: {exc}") from None
        log.info("exporter.serving", host=host, port=port, lanes=self.lanes)
        if ready is not None:
            ready.set()
        try:
            async with server:
                while not stop.is_set():
                    await self.collect_once()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            status, content_type, body = self._respond(method, path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
                + (body if method != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a client that went away or sent garbage gets nothing
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _respond(self, method: str, path: str) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"GET only\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE, render(self.snapshot).encode()
        if path == "/healthz":
            return "200 OK", text, b"ok\n"
        if path == "/readyz":
            if self.snapshot.success:
                return "200 OK", text, b"ready\n"
            return "503 Service Unavailable", text, b"no successful collection yet\n"
        return "404 Not Found", text, b"not found: try /metrics\n"
