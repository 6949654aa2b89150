"""Running Postlane's workers: the orchestration worker, one send worker per lane, and the
IMAP poll worker of the configured inboxes (with their watcher workflows)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import structlog
from temporalio.client import Client
from temporalio.worker import Worker

from activities.inbound import InboundActivities
from activities.lanes import LaneAdminActivities
from activities.resolve import LaneResolver
from activities.smtp import SmtpActivities
from activities.suppression import SuppressionActivities
from activities.webhooks import WebhookActivities
from postlane.config import InboxConfig, LaneConfig, Settings
from postlane.errors import ConfigurationError
from postlane.health import Health
from postlane.ids import INBOUND_TASK_QUEUE, WORKFLOW_TASK_QUEUE
from postlane.inbound.inboxes import start_inbox_watcher
from postlane.lanes.limits import start_lane_workflow
from postlane.tokens import TokenKeys
from workflows import WORKFLOWS, workflow_runner

log = structlog.get_logger(__name__)

GRACEFUL_SHUTDOWN = timedelta(seconds=30)
"""On SIGTERM, in-flight sends get this long to finish before they are handed back."""


def select_lanes(settings: Settings, names: Sequence[str] | None) -> list[LaneConfig]:
    """The lanes this host serves; every lane's credentials must be present.

    Raises:
        ConfigurationError: an unknown lane name, or a missing credential variable.
    """
    lanes = [settings.lane(n) for n in names] if names else list(settings.lanes)
    for lane in lanes:
        lane.credentials()
    return lanes


def select_inboxes(settings: Settings) -> list[InboxConfig]:
    """The inboxes this host polls (all configured); every login must be present.

    Raises:
        ConfigurationError: a missing credential variable.
    """
    for inbox in settings.inboxes:
        inbox.credentials()
    return list(settings.inboxes)


def build_workers(
    client: Client,
    settings: Settings,
    lanes: Sequence[LaneConfig],
    smtp: SmtpActivities,
    *,
    workflows: bool = True,
    agents: Sequence[Callable[..., Any]] = (),
    inbound: InboundActivities | None = None,
    webhooks: WebhookActivities | None = None,
) -> list[Worker]:
    """The orchestration worker (if `workflows`), one send worker per lane, and the IMAP
    poll worker on ``postlane.inbound`` (if `inbound`).

    `agents` are compose-step activities (see `postlane.sequences.agent`), hosted on ``postlane``.
    `webhooks` emits and delivers webhook events (default: one for `settings`; its HTTP
    client is then never closed).
    """
    workers: list[Worker] = []
    if workflows:
        admin = LaneAdminActivities(client)
        suppressions = SuppressionActivities(client)
        # resolve_lane runs as a local activity of SendEmail: it must live with the workflows.
        resolver = LaneResolver(settings)
        # emit_webhook_event is a local activity of SendEmail and Sequence: it lives here too.
        hooks = webhooks or WebhookActivities(settings, client)
        workers.append(
            Worker(
                client,
                task_queue=WORKFLOW_TASK_QUEUE,
                workflows=WORKFLOWS,
                workflow_runner=workflow_runner(),
                activities=[
                    admin.set_lane_rate,
                    suppressions.suppress_recipient,
                    resolver.resolve_lane,
                    hooks.emit_webhook_event,
                    hooks.deliver_webhook,
                    *agents,
                ],
                graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
            )
        )
    for lane in lanes:
        workers.append(
            Worker(
                client,
                task_queue=lane.task_queue,
                activities=[smtp.send_email, smtp.probe_smtp],
                max_concurrent_activities=lane.max_concurrent,
                # The server-side rate set by apply_lane_limits overrides this; it only
                # matters on servers without task-queue config (the time-skipping one).
                max_task_queue_activities_per_second=lane.rate_per_second,
                graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
            )
        )
    if inbound is not None:
        workers.append(
            Worker(
                client,
                task_queue=INBOUND_TASK_QUEUE,
                activities=[inbound.poll_inbox, inbound.record_unsubscribe],
                # One poll per inbox at a time (the watcher waits for it), plus unsubscribes.
                max_concurrent_activities=len(settings.inboxes) + 2,
                graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
            )
        )
    return workers


async def run_workers(
    client: Client,
    settings: Settings,
    *,
    lanes: Sequence[str] | None = None,
    workflows: bool = True,
    agents: Sequence[Callable[..., Any]] = (),
    sends: bool = True,
    inbound: bool = True,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    health: Health | None = None,
) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT when `stop` is None), then drain.

    `ready` is set once the lanes' and inboxes' workflows are started and the workers are
    polling. `sends=False` serves no lane; `inbound=False` polls no inbox. `agents` are
    compose-step activities (see `postlane.sequences.agent`). `health` is told when the
    workers run, stop or crash (see `postlane.health`).

    Raises:
        ConfigurationError: see `select_lanes` and `select_inboxes`; or lanes or inboxes
            to serve and no token secret (``POSTLANE_TOKEN_SECRET``), or a malformed one.
    """
    served = select_lanes(settings, lanes) if sends else []
    inboxes = select_inboxes(settings) if inbound else []
    if served or inboxes:
        # Sends need it for every Message-ID, inbound mail to tell ours from forgeries:
        # refuse to start rather than dead-letter emails or drop replies.
        TokenKeys.from_settings(settings).require()
    if not served and not workflows and not inboxes:
        raise ConfigurationError(
            "this worker would serve nothing: no lanes, no workflows and no inboxes"
        )
    for lane in served:
        # The lane's workflow sets its server-side rate (and keeps it, through backpressure).
        await start_lane_workflow(client, lane)
    for inbox in inboxes:
        # One watcher per inbox, however many hosts start it; it gets the current settings.
        await start_inbox_watcher(client, inbox)
    smtp = SmtpActivities(settings, client)
    if agents and not workflows:
        raise ConfigurationError("--agent needs the workflow worker (drop --no-workflows)")
    reader = InboundActivities(settings, client) if inboxes else None
    hooks = WebhookActivities(settings, client)
    workers = build_workers(
        client,
        settings,
        served,
        smtp,
        workflows=workflows,
        agents=agents,
        inbound=reader,
        webhooks=hooks,
    )
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    log.info(
        "worker.started",
        namespace=client.namespace,
        lanes=[lane.name for lane in served],
        inboxes=[inbox.name for inbox in inboxes],
        workflows=workflows,
    )
    runs = [asyncio.create_task(w.run()) for w in workers]
    if health is not None:
        health.start(client, workers)
    if ready is not None:
        ready.set()
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopped, *runs], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopped:
                if health is not None:
                    health.crashed(repr(task.exception()) if not task.cancelled() else "cancelled")
                task.result()  # a worker that died on its own: surface why
    finally:
        if health is not None:
            health.stopping()
        log.info("worker.stopping", graceful_seconds=GRACEFUL_SHUTDOWN.total_seconds())
        await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
        stopped.cancel()
        await smtp.close()
        await hooks.close()
        if health is not None:
            await health.close()
        log.info("worker.stopped")
