"""Postlane's wire contract for any Temporal client: names, input checks and JSON Schemas.

A client in any language may start ``SendEmail`` on the ``postlane`` task queue with the
workflow ID ``email:<key>`` (docs/contract.md). The workflow checks what it was given with
`parse_send_email_input`, the same way whoever started it, so a foreign client's mistake
ends the email as ``failed`` with a reason naming the field instead of a workflow task
that fails for ever.
"""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any

from pydantic import BaseModel, ValidationError

from postlane.email.models import (
    MAX_EMAIL_BYTES,
    AttemptRecord,
    DeliveryReceipt,
    EmailReport,
    RetryRequest,
    SendEmailInput,
    invalid_email_from,
)
from postlane.errors import InvalidEmail
from postlane.ids import EMAIL_ID_PREFIX, validate_key
from postlane.names import WorkflowType

SEND_EMAIL_WORKFLOW = WorkflowType.SEND_EMAIL
"""Workflow type of one email."""
JSON_ENCODING = b"json/plain"
"""The payload encoding Postlane's inputs and results use (Temporal's JSON converter)."""

INPUTS: dict[str, type[BaseModel]] = {
    "SendEmailInput": SendEmailInput,
    "RetryRequest": RetryRequest,
}
"""What a client sends: ``SendEmail``'s input, the ``retry``/``discard`` signals' input."""
RESULTS: dict[str, type[BaseModel]] = {
    "DeliveryReceipt": DeliveryReceipt,
    "EmailReport": EmailReport,
    "AttemptRecord": AttemptRecord,
}
"""What a client reads: ``SendEmail``'s result, the ``status`` query's result and the
failed attempts it lists."""


def schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of the wire models, by name, as `postlane schema` prints them.

    Inputs are described as they are accepted (validation mode), results as they are
    written (serialization mode).
    """
    found = {name: model.model_json_schema() for name, model in INPUTS.items()}
    for name, model in RESULTS.items():
        found[name] = model.model_json_schema(mode="serialization")
    return found


def parse_send_email_input(
    data: bytes | None, encoding: bytes | None, workflow_id: str
) -> SendEmailInput:
    """Check a ``SendEmail`` start's raw input payload and return it normalised.

    Normalised: ``send_at`` in UTC, ``key`` filled in from the workflow ID when empty.
    The caller-owned fields are checked here; the lane is checked by the worker's
    ``resolve_lane``.

    Args:
        data: the payload's bytes (after any payload codec), None if there was no argument.
        encoding: the payload's ``encoding`` metadata.
        workflow_id: the workflow's ID (``email:<key>``).

    Raises:
        InvalidEmail: naming the offending field (``input`` for the payload as a whole).
    """
    if data is None or encoding is None:
        raise InvalidEmail("input", "missing: start SendEmail with one SendEmailInput object")
    if encoding != JSON_ENCODING:
        raise InvalidEmail(
            "input", f"expected one JSON object (json/plain), got encoding {encoding.decode()!r}"
        )
    try:
        raw = json.loads(data)
    except ValueError:
        raise InvalidEmail("input", "is not valid JSON") from None
    if not isinstance(raw, dict):
        raise InvalidEmail("input", f"expected a JSON object, got {type(raw).__name__}")
    try:
        req = SendEmailInput.model_validate_json(data)
    except ValidationError as exc:
        raise invalid_email_from(exc) from None
    update: dict[str, Any] = {}
    if req.send_at is not None:
        if req.send_at.tzinfo is None or req.send_at.utcoffset() is None:
            raise InvalidEmail("send_at", "must carry a time zone, e.g. 2030-01-01T09:00:00Z")
        update["send_at"] = req.send_at.astimezone(UTC)
    update["key"] = _key(req.key, workflow_id)
    req = req.model_copy(update=update)
    size = len(req.model_dump_json())
    if size > MAX_EMAIL_BYTES:
        raise InvalidEmail(
            "email.attachments", f"the input is {size} bytes, over {MAX_EMAIL_BYTES}"
        )
    return req


def _key(key: str, workflow_id: str) -> str:
    """The email's idempotency key: the one given, which must match the workflow ID."""
    from_id = workflow_id[len(EMAIL_ID_PREFIX) :] if workflow_id.startswith(EMAIL_ID_PREFIX) else ""
    if not key and not from_id:
        raise InvalidEmail(
            "key", f"missing, and the workflow ID {workflow_id!r} is not email:<key>"
        )
    key = key or from_id
    try:
        validate_key(key)
    except ValueError as exc:
        raise InvalidEmail("key", str(exc)) from None
    if from_id and key != from_id:
        raise InvalidEmail("key", f"{key!r} does not match the workflow ID {workflow_id!r}")
    return key
