"""Helpers for integration tests: Postlane worker OS processes, config files, polling.

Worker processes are started the way operators start them (``python worker.py`` from the
repository root) with their output captured to files, and are always killed on exit from
their ``with`` block. Waits poll an observable condition against a deadline
(`assert_eventually`); nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from temporalio.api.enums.v1 import PendingActivityState, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflow.v1 import PendingActivityInfo
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowHandle

from postlane.config import LaneConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
POSTLANE_SCRIPT = Path(sys.executable).parent / "postlane"

T = TypeVar("T")


PORTS_FROM = 20000
"""The lowest port `free_port` hands out."""
_handed_out: set[int] = set()
_pick = random.SystemRandom()


def _ephemeral_ports_from() -> int:
    """The first port of the kernel's range for outgoing connections' local ports."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now, and no outgoing connection takes.

    A port the kernel picks (bind to port 0) comes from its ephemeral range, where every
    outgoing connection (a client's, a worker's) also gets its local port; one of those can
    take it before the server that was given it binds it, and that server then exits
    ("address already in use"). So ports come from below that range (with room for a dev
    server's UI at port + 1000, which is not handed out later either), at random, never
    twice in this process, and each is checked free by binding it.
    """
    last = _ephemeral_ports_from() - 1001
    if last - PORTS_FROM < 1000:  # an unusual range: fall back to the kernel's pick
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _ in range(1000):
        port = _pick.randint(PORTS_FROM, last)
        if port in _handed_out or port + 1000 in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        # A dev server given only this port puts its Web UI on port + 1000.
        _handed_out.update((port, port + 1000))
        return port
    raise RuntimeError(f"no free port in {PORTS_FROM}-{last}")


# -- waiting ---------------------------------------------------------------------------------


async def assert_eventually(
    probe: Callable[[], T | Awaitable[T]],
    *,
    within: float = 30.0,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Poll `probe` (sync or async) until it returns something truthy, and return that.

    An `AssertionError` raised by the probe counts as "not yet".

    Raises:
        AssertionError: still not true after `within` seconds (with the last value seen).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: object = None
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value  # type: ignore[return-value]
            last = value
        except AssertionError as exc:
            last = exc
        if loop.time() >= deadline:
            raise AssertionError(f"{what}: not reached within {within}s; last seen: {last!r}")
        await asyncio.sleep(interval)


# -- configuration files ---------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def lanes_toml(lanes: Sequence[LaneConfig | Mapping[str, Any]]) -> str:
    """``[[lanes]]`` tables for `lanes` (timedeltas as ISO 8601 durations, e.g. ``PT1S``)."""
    out: list[str] = []
    for lane in lanes:
        data = (
            lane.model_dump(mode="json", exclude_none=True)
            if isinstance(lane, LaneConfig)
            else dict(lane)
        )
        out.append("[[lanes]]")
        tables = {k: v for k, v in data.items() if isinstance(v, dict)}
        out += [f"{k} = {_toml_value(v)}" for k, v in data.items() if k not in tables]
        for name, table in tables.items():
            out.append(f"[lanes.{name}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


def write_config(path: Path, lanes: Sequence[LaneConfig | Mapping[str, Any]]) -> Path:
    """Write a ``postlane.toml`` holding `lanes` to `path` and return `path`."""
    path.write_text(lanes_toml(lanes), encoding="utf-8")
    return path


def postlane_env(
    address: str, config: Path, *, namespace: str = "default", **extra: str
) -> dict[str, str]:
    """This process's environment minus any ``TEMPORAL_*``/``POSTLANE_*`` settings, plus
    the given Temporal address, namespace and config file, the tests' token secret (and
    `extra` variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "POSTLANE_"))}
    env.update(
        TEMPORAL_ADDRESS=address,
        TEMPORAL_NAMESPACE=namespace,
        POSTLANE_CONFIG=str(config),
        POSTLANE_TOKEN_SECRET=os.environ["POSTLANE_TOKEN_SECRET"],
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


# -- worker processes ------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """A ``python worker.py`` OS process; killed when its ``with`` block exits."""

    proc: subprocess.Popen[bytes]
    log_dir: Path
    name: str

    @classmethod
    def start(
        cls, env: Mapping[str, str], log_dir: Path, *args: str, name: str = "worker"
    ) -> WorkerProcess:
        """Start ``python worker.py *args`` in the repository root with `env`.

        Its stdout and stderr go to ``<log_dir>/<name>.out`` and ``<name>.err``.
        """
        log_dir.mkdir(parents=True, exist_ok=True)
        out = (log_dir / f"{name}.out").open("wb")
        err = (log_dir / f"{name}.err").open("wb")
        try:
            proc = subprocess.Popen(
                [sys.executable, "worker.py", *args],
                cwd=REPO_ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        finally:
            out.close()
            err.close()
        return cls(proc, log_dir, name)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def identity_prefix(self) -> str:
        """Temporal's default worker identity is ``<pid>@<host>``."""
        return f"{self.pid}@"

    def owns(self, identity: str) -> bool:
        """Is `identity` (a poller's or an attempt's) this process?"""
        return identity.startswith(self.identity_prefix)

    @property
    def stdout(self) -> str:
        return (self.log_dir / f"{self.name}.out").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.log_dir / f"{self.name}.err").read_text(errors="replace")

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, no goodbyes."""
        if self.running:
            self.proc.send_signal(signal.SIGKILL)

    async def wait(self, within: float = 60.0) -> int:
        """The exit code, waiting (off the event loop) up to `within` seconds."""
        return await asyncio.to_thread(self.proc.wait, within)

    def describe_exit(self) -> str:
        return f"{self.name} pid={self.pid} rc={self.proc.returncode}\n{self.stderr[-4000:]}"

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        self.proc.wait(30)


async def run_command(
    args: Sequence[str], env: Mapping[str, str], *, within: float = 90.0
) -> tuple[int, str, str]:
    """Run a command to completion without blocking the event loop: (rc, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=REPO_ROOT,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def run_postlane(
    args: Sequence[str], env: Mapping[str, str], *, within: float = 90.0
) -> tuple[int, str, str]:
    """Run the ``postlane`` console script: (rc, stdout, stderr)."""
    return await run_command([str(POSTLANE_SCRIPT), *args], env, within=within)


# -- Temporal observations -------------------------------------------------------------------


async def activity_pollers(client: Client, task_queue: str) -> list[str]:
    """Identities of the workers recently polling the activity task queue `task_queue`."""
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        )
    )
    return [p.identity for p in response.pollers]


async def describe_lane_queue(client: Client, lane: LaneConfig) -> Any:
    """The lane's activity queue as the server describes it, with its rate-limit config."""
    return await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=lane.task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            report_config=True,
        )
    )


async def wait_for_pollers(
    client: Client, task_queue: str, workers: Sequence[WorkerProcess], within: float = 60.0
) -> None:
    """Wait until every one of `workers` polls `task_queue` (fails fast if one died)."""

    async def ready() -> bool:
        for w in workers:
            assert w.running, f"worker exited before polling: {w.describe_exit()}"
        identities = await activity_pollers(client, task_queue)
        return all(any(w.owns(i) for i in identities) for w in workers)

    await assert_eventually(ready, within=within, what=f"pollers on {task_queue}")


@dataclass(frozen=True)
class RunningSend:
    """A send activity attempt that a worker holds right now."""

    attempt: int
    worker_identity: str
    details: dict[str, Any]

    @property
    def phase(self) -> str | None:
        return self.details.get("phase")


async def running_send(client: Client, handle: WorkflowHandle[Any, Any]) -> RunningSend | None:
    """The workflow's started send attempt with its last heartbeat, or None."""
    desc = await handle.describe()
    pending: list[PendingActivityInfo] = list(desc.raw_description.pending_activities)
    for info in pending:
        if info.state != PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
            continue
        details: dict[str, Any] = {}
        if info.heartbeat_details.payloads:
            decoded = await client.data_converter.decode(info.heartbeat_details.payloads)
            if decoded and isinstance(decoded[-1], dict):
                details = decoded[-1]
        return RunningSend(info.attempt, info.last_worker_identity, details)
    return None


async def history_identities(handle: WorkflowHandle[Any, Any]) -> list[tuple[str, str]]:
    """(event type, worker identity) of the activity started/completed/failed events."""
    history = await handle.fetch_history()
    found: list[tuple[str, str]] = []
    for event in history.events:
        for attr in (
            "activity_task_started_event_attributes",
            "activity_task_completed_event_attributes",
            "activity_task_failed_event_attributes",
        ):
            if event.HasField(attr):
                found.append(
                    (attr.removesuffix("_event_attributes"), getattr(event, attr).identity)
                )
    return found
