"""What an email's workflow was started with, read back from its history on the server.

Read through the client's data converter (so an encrypted input is read too) and checked
with the wire contract's parser, so an email another client started, in any language,
reads the same as one `PostlaneClient.send` started.
"""

from __future__ import annotations

from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.common import RawValue

from postlane.contract import parse_send_email_input
from postlane.email.models import SendEmailInput
from postlane.errors import InvalidInput


async def decode_started(
    temporal: Client, payloads: Any, workflow_id: str
) -> SendEmailInput | None:
    """The `SendEmailInput` in a ``WorkflowExecutionStarted`` event's input payloads
    (None if there is none, or it is no valid input)."""
    payloads = list(payloads)
    if not payloads:
        return None
    [raw] = await temporal.data_converter.decode(payloads[:1], [RawValue])
    try:
        return parse_send_email_input(
            raw.payload.data, raw.payload.metadata.get("encoding"), workflow_id
        )
    except InvalidInput:
        return None


async def started_input(
    temporal: Client, handle: WorkflowHandle[Any, Any]
) -> SendEmailInput | None:
    """The input the email's current run was started with (None if unreadable).

    Raises:
        RPCError: from the history fetch (``NOT_FOUND`` if no such workflow).
    """
    async for event in handle.fetch_history_events():
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        return await decode_started(temporal, payloads, handle.id)
    return None
