"""Webhook activities: queue events for the subscriptions that want them, and deliver
each one, signed per the Standard Webhooks specification.

The signing secret is read from the worker's environment at each delivery; it never
enters a workflow's history or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import httpx
import structlog
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from postlane.config import Settings
from postlane.errors import ConfigurationError
from postlane.ids import WORKFLOW_TASK_QUEUE
from postlane.names import Activity, WebhookMessages, WorkflowType
from postlane.webhooks import (
    WEBHOOK_FAILED,
    WebhookConfig,
    WebhookDeliveryInput,
    WebhookEmit,
    WebhookEmitted,
    WebhookEvent,
    WebhookRequest,
    WebhookResponse,
    webhook_workflow_id,
)

log = structlog.get_logger(__name__)

REQUEST_TIMEOUT = 15.0
"""Seconds for one POST in all, from connecting to the last byte of the answer (within
the activity's start-to-close); a receiver that has not answered by then is retried."""
MAX_ERROR_BODY = 200


def signature(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` and the base64 HMAC-SHA256 of
    ``{id}.{timestamp}.{body}`` under `secret` (Standard Webhooks)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def encode_body(event: WebhookEvent) -> bytes:
    """The event's JSON body, compact, as signed and sent."""
    return json.dumps(event.body(), separators=(",", ":"), ensure_ascii=False).encode()


class WebhookActivities:
    """Owns the worker's webhook subscriptions and the HTTP client that delivers to them."""

    def __init__(
        self, settings: Settings, client: Client, *, request_timeout: float = REQUEST_TIMEOUT
    ) -> None:
        self._settings = settings
        self._client = client
        self._request_timeout = request_timeout
        # No retries of its own: every attempt is a Temporal attempt, visible in the UI.
        # httpx bounds each phase (connect, each read) by its timeout; deliver_webhook bounds
        # the whole POST, so a receiver that trickles its answer cannot stretch it.
        self._http = httpx.AsyncClient(timeout=request_timeout, follow_redirects=False)

    async def close(self) -> None:
        """Close the HTTP client's connections."""
        await self._http.aclose()

    def _subscription(self, name: str) -> WebhookConfig | None:
        return next((w for w in self._settings.webhooks if w.name == name), None)

    @activity.defn(name=Activity.EMIT_WEBHOOK_EVENT)
    async def emit_webhook_event(self, emit: WebhookEmit) -> WebhookEmitted:
        """Queue `emit.event` with every subscription that wants it (a local activity).

        One signal-with-start per subscription, on the delivery workflow of that
        subscription and the emitting workflow: it starts one, or queues behind the
        events it already holds.
        """
        queued: list[str] = []
        for sub in self._settings.webhooks:
            if not sub.wants(emit.event.type):
                continue
            await self._client.start_workflow(
                WorkflowType.WEBHOOK_DELIVERY,
                WebhookDeliveryInput(
                    subscription=sub.name, url=sub.shown_url, subject=emit.subject, retry=sub.retry
                ),
                id=webhook_workflow_id(sub.name, emit.subject),
                task_queue=WORKFLOW_TASK_QUEUE,
                start_signal=WebhookMessages.ENQUEUE,
                start_signal_args=[emit.event],
                static_summary=f"webhook {sub.name} → {sub.shown_url} for {emit.subject}",
            )
            queued.append(sub.name)
        return WebhookEmitted(subscriptions=queued)

    @activity.defn(name=Activity.DELIVER_WEBHOOK)
    async def deliver_webhook(self, request: WebhookRequest) -> WebhookResponse:
        """POST one event, signed, to the subscription's URL; 2xx is delivered.

        Raises:
            ApplicationError: ``WebhookDeliveryError``, retried until the subscription's
                ``give_up_after``: the answer was not 2xx or did not come within
                `REQUEST_TIMEOUT`, the receiver could not be reached, the subscription is
                not configured on this worker, or its secret is unusable here.
        """
        info = activity.info()
        sub = self._subscription(request.subscription)
        if sub is None:
            # Retried: during a rolling configuration change another worker (or this one,
            # restarted) may hold the subscription; dropping the event would lose it.
            raise ApplicationError(
                f"webhook {request.subscription!r} is not configured on this worker",
                type=WEBHOOK_FAILED,
            )
        try:
            secret = sub.secret()
        except ConfigurationError as exc:
            # Retried: the operator can set the variable and restart the worker.
            raise ApplicationError(str(exc), type=WEBHOOK_FAILED) from None
        event = request.event
        body = encode_body(event)
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "postlane-webhooks",
            "webhook-id": event.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secret, event.id, timestamp, body),
        }
        try:
            async with asyncio.timeout(self._request_timeout):
                response = await self._http.post(sub.url, content=body, headers=headers)
        except TimeoutError:
            log.info("webhook.timeout", subscription=sub.name, id=event.id, attempt=info.attempt)
            raise ApplicationError(
                f"{sub.shown_url}: no complete answer within {self._request_timeout:g} s",
                type=WEBHOOK_FAILED,
            ) from None
        except httpx.HTTPError as exc:
            log.info(
                "webhook.unreachable", subscription=sub.name, id=event.id, attempt=info.attempt
            )
            detail = (str(exc) or "no answer").replace(sub.url, sub.shown_url)
            raise ApplicationError(
                f"{sub.shown_url}: {type(exc).__name__}: {detail}", type=WEBHOOK_FAILED
            ) from None
        if not 200 <= response.status_code < 300:
            excerpt = response.text[:MAX_ERROR_BODY].strip()
            log.info(
                "webhook.refused",
                subscription=sub.name,
                id=event.id,
                status=response.status_code,
                attempt=info.attempt,
            )
            raise ApplicationError(
                f"{sub.shown_url}: HTTP {response.status_code}"
                + (f": {excerpt}" if excerpt else ""),
                type=WEBHOOK_FAILED,
            )
        log.info("webhook.delivered", subscription=sub.name, id=event.id, type=event.type)
        return WebhookResponse(status_code=response.status_code, attempt=info.attempt)
