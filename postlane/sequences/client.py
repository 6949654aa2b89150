"""``pl.sequences``: enroll recipients in sequences, inspect, pause, stop, route replies."""

from __future__ import annotations

import builtins
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import Priority as TemporalPriority
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from postlane import search_attributes as sa
from postlane.config import Settings
from postlane.erasure import RecipientHasher
from postlane.errors import (
    ActionRefused,
    InvalidEmail,
    RecipientSuppressed,
    SequenceNotFound,
    UnknownSender,
)
from postlane.idempotency import (
    CONTENT_HASH,
    check_same_content,
    content_digest,
    started_new,
)
from postlane.ids import (
    SEQUENCE_ID_PREFIX,
    WORKFLOW_TASK_QUEUE,
    sequence_workflow_id,
    validate_key,
)
from postlane.inbound.classify import classify, route
from postlane.names import SequenceMessages, WorkflowType
from postlane.sequences.models import (
    Approval,
    InboundEvent,
    InboundKind,
    RenderedMessage,
    SequenceInput,
    SequenceReport,
    SequenceStatus,
    sequence_email,
)
from postlane.sequences.spec import Recipient, SequenceSpec
from postlane.sequences.suppressions import Suppressions
from postlane.sequences.templates import render_sequence, render_string, variables_for
from postlane.tokens import UNSUBSCRIBE_TOKEN_PLACEHOLDER, TokenKeys
from postlane.waiting import workflow_result

_CAMPAIGN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STATUSES = {s.value for s in SequenceStatus}


class SequenceHandle:
    """An enrolled sequence: ask where it is, pause, resume or stop it."""

    def __init__(
        self,
        client: Sequences,
        key: str,
        handle: WorkflowHandle[Any, Any] | None = None,
        *,
        created: bool = False,
    ) -> None:
        self.key = key
        self.created = created
        """True if this call enrolled the recipient; False if the key was already used."""
        self.workflow_id = sequence_workflow_id(key)
        self._client = client
        # The handle start_workflow returned, when there is one: in the time-skipping test
        # environment only such handles skip time while waiting for the result.
        self._handle = handle or client.temporal.get_workflow_handle(self.workflow_id)

    async def status(self) -> SequenceReport:
        """See `Sequences.status`."""
        return await self._client.status(self.key)

    async def result(self) -> SequenceReport:
        """Wait until the sequence ends and return its final report."""
        return SequenceReport.model_validate(await workflow_result(self._handle))


class Sequences:
    """``pl.sequences``: the sequence part of `PostlaneClient`, on the client's connection."""

    def __init__(self, temporal: Client, settings: Settings, suppressions: Suppressions) -> None:
        self.temporal = temporal
        self.settings = settings
        self._suppressions = suppressions
        self._keys: TokenKeys | None = None
        self._hasher: RecipientHasher | None | bool = False  # False: not loaded yet

    def _token_keys(self) -> TokenKeys:
        """Keys to open sealed Message-IDs and tokens with (legacy forms only, without a
        token secret in this process's settings)."""
        if self._keys is None:
            self._keys = TokenKeys.from_settings(self.settings)
        return self._keys

    def _hash_pair(self, address: str) -> list[SearchAttributePair[Sequence[str]]]:
        """`sa.RECIPIENT_HASH` for `address`, when this process holds the token secret."""
        if self._hasher is False:
            self._hasher = RecipientHasher.from_settings(self.settings)
        hasher = self._hasher if isinstance(self._hasher, RecipientHasher) else None
        return [SearchAttributePair(sa.RECIPIENT_HASH, [hasher.hash(address)])] if hasher else []

    def prepare(
        self,
        spec: SequenceSpec,
        recipient: Recipient,
        *,
        key: str | None = None,
        history_limit: int | None = None,
    ) -> SequenceInput:
        """Validate and render a sequence for one recipient, without starting anything.

        Raises:
            InvalidEmail: a bad key, or a template that does not render for this recipient
                (the message names the template field), or a rendered email that is invalid.
            UnknownSender: no lane serves ``spec.sender``.
        """
        if not isinstance(spec, SequenceSpec):
            raise InvalidEmail("spec", f"expected a SequenceSpec, got {type(spec).__name__}")
        if not isinstance(recipient, Recipient):
            raise InvalidEmail("recipient", f"expected a Recipient, got {type(recipient).__name__}")
        key = key if key is not None else f"{spec.name}:{recipient.address.lower()}"
        try:
            validate_key(key)
        except ValueError as exc:
            raise InvalidEmail("key", str(exc)) from None
        lane = self.settings.lane_for(spec.sender)
        if lane is None:
            raise UnknownSender(spec.sender)
        # The worker that sends puts the sealed token here: the secret stays with it, and
        # the token stays out of the workflow's history.
        token = UNSUBSCRIBE_TOKEN_PLACEHOLDER
        url = ""
        if spec.unsubscribe_url:
            variables = {
                **variables_for(spec, recipient),
                "unsubscribe_token": token,
                "key": key,
            }
            url = render_string(spec.unsubscribe_url, variables, field="unsubscribe_url").strip()
            if not url.startswith("https://"):
                raise InvalidEmail("unsubscribe_url", f"{url!r} must be an https:// URL")
        elif self.settings.api.public_url:
            # The HTTP API's own RFC 8058 endpoint (``postlane api``, POST /u/<token>).
            url = f"{self.settings.api.public_url}/u/{token}"
        rendered, instructions = render_sequence(spec, recipient, unsubscribe_url=url)
        mailto = f"<mailto:{spec.sender}?subject=unsubscribe%20{token}>"
        inp = SequenceInput(
            key=key,
            spec=spec,
            recipient=recipient,
            lane=lane.name,
            retry=lane.retry,
            quota=lane.has_quota,
            priority=spec.priority,
            rendered=rendered,
            instructions=instructions,
            list_unsubscribe=f"{mailto}, <{url}>" if url else mailto,
            one_click=bool(url),
            **({"history_limit": history_limit} if history_limit else {}),
        )
        for step, content in rendered.items():
            _check_email(inp, step, content)
        return inp

    async def start(
        self,
        spec: SequenceSpec,
        recipient: Recipient,
        *,
        key: str | None = None,
        history_limit: int | None = None,
    ) -> SequenceHandle:
        """Enroll one recipient; idempotent by key (default ``<spec.name>:<address>``).

        Enrolling the same key with the same spec and recipient returns the existing
        sequence, running or finished: nobody is enrolled twice.

        Raises:
            InvalidEmail, UnknownSender: see `prepare`; nothing was started.
            RecipientSuppressed: the address unsubscribed from this sender.
            IdempotencyConflict: the key was used for a different spec or recipient.
        """
        inp = self.prepare(spec, recipient, key=key, history_limit=history_limit)
        digest = content_digest(spec.model_dump_json(), recipient.model_dump_json())
        workflow_id = sequence_workflow_id(inp.key)
        existing = await self._existing(workflow_id)
        if existing is not None:
            await check_same_content(existing, inp.key, digest)
            return SequenceHandle(self, inp.key, existing)
        if await self._suppressions.is_suppressed(spec.sender, recipient.address):
            raise RecipientSuppressed(spec.sender, recipient.address)
        try:
            handle = await self.temporal.start_workflow(
                WorkflowType.SEQUENCE,
                inp,
                id=workflow_id,
                task_queue=WORKFLOW_TASK_QUEUE,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                memo={CONTENT_HASH: digest},
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(sa.STATUS, SequenceStatus.ACTIVE.value),
                        SearchAttributePair(sa.LANE, inp.lane),
                        SearchAttributePair(
                            sa.RECIPIENT_DOMAIN,
                            [recipient.address.rsplit("@", 1)[1].lower()]
                            if self.settings.recipient_domain_attribute
                            else [],
                        ),
                        SearchAttributePair(sa.TAG, [*spec.tags, f"sequence:{spec.name}"][:10]),
                        *self._hash_pair(recipient.address),
                    ]
                ),
                static_summary=f"sequence {spec.name} → {recipient.address}",
                static_details=f"{len(spec.steps)} steps; lane: {inp.lane}; key: {inp.key}",
                priority=TemporalPriority(priority_key=spec.priority.key),
            )
        except WorkflowAlreadyStartedError:
            handle = self.temporal.get_workflow_handle(workflow_id)
        created = started_new(handle)
        if not created:
            await check_same_content(handle, inp.key, digest)
        return SequenceHandle(self, inp.key, handle, created=created)

    async def _existing(self, workflow_id: str) -> WorkflowHandle[Any, Any] | None:
        handle = self.temporal.get_workflow_handle(workflow_id)
        try:
            await handle.describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        return handle

    def get(self, key: str) -> SequenceHandle:
        """The handle of a sequence enrolled earlier with `key` (not checked to exist)."""
        return SequenceHandle(self, key)

    async def status(self, key: str) -> SequenceReport:
        """Current step, next action and its time, what was sent, why it stopped.

        Raises:
            SequenceNotFound: no sequence has this key.
        """
        handle, desc = await self._describe_sequence(key)
        if desc.status == WorkflowExecutionStatus.COMPLETED:
            return SequenceReport.model_validate(await handle.result())
        report: SequenceReport | None
        try:
            report = SequenceReport.model_validate(
                await handle.query(SequenceMessages.STATUS, result_type=SequenceReport)
            )
        except (RPCError, WorkflowFailureError):
            report = None
        if desc.status == WorkflowExecutionStatus.RUNNING and report is not None:
            return report
        closed = SequenceStatus.CANCELLED
        if desc.status in (WorkflowExecutionStatus.FAILED, WorkflowExecutionStatus.TIMED_OUT):
            closed = SequenceStatus.FAILED
        if report is not None:
            return report.model_copy(update={"status": closed, "step": None, "next_at": None})
        return SequenceReport(key=key, status=closed, recipient="")

    async def list(
        self, *, campaign: str | None = None, status: SequenceStatus | str | None = None
    ) -> builtins.list[tuple[str, SequenceStatus]]:
        """Enrolled sequences as (key, status), from visibility (needs a real server).

        Args:
            campaign: only this spec name's (its ``sequence:<name>`` tag).
            status: only those in this status.

        Raises:
            InvalidEmail: an unknown status or a campaign name that is not a valid name.
        """
        query = f'WorkflowType="{WorkflowType.SEQUENCE}"'
        if campaign is not None:
            if not _CAMPAIGN_RE.match(campaign):
                raise InvalidEmail("campaign", f"{campaign!r} is not a campaign name")
            query += f' AND PostlaneTag="sequence:{campaign}"'
        if status is not None:
            try:
                query += f' AND PostlaneStatus="{SequenceStatus(status).value}"'
            except ValueError:
                raise InvalidEmail("status", f"{status!r} is not a sequence status") from None
        found: builtins.list[tuple[str, SequenceStatus]] = []
        async for execution in self.temporal.list_workflows(query):
            stored = execution.typed_search_attributes.get(sa.STATUS)
            state = SequenceStatus(stored) if stored in _STATUSES else SequenceStatus.ACTIVE
            if execution.status == WorkflowExecutionStatus.CANCELED:
                state = SequenceStatus.CANCELLED
            found.append((execution.id.removeprefix(SEQUENCE_ID_PREFIX), state))
        return found

    async def _describe_sequence(
        self, key: str
    ) -> tuple[WorkflowHandle[Any, Any], WorkflowExecutionDescription]:
        handle = self.temporal.get_workflow_handle(sequence_workflow_id(key))
        try:
            return handle, await handle.describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                raise SequenceNotFound(key) from None
            raise

    async def _signal(self, key: str, signal: str, arg: Any = None) -> bool:
        """Signal a running sequence; False if it has finished.

        Raises:
            SequenceNotFound: no sequence has this key.
        """
        handle, desc = await self._describe_sequence(key)
        if desc.status != WorkflowExecutionStatus.RUNNING:
            return False
        try:
            if arg is None:
                await handle.signal(signal)
            else:
                await handle.signal(signal, arg)
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:  # it finished since the describe
                return False
            raise
        return True

    async def _update(self, key: str, action: str, arg: Any = None) -> bool:
        """Send the `action` update to a running sequence; False if it has finished.

        Raises:
            SequenceNotFound: no sequence has this key.
            ActionRefused: the sequence's validator refused the action in its state.
        """
        handle, desc = await self._describe_sequence(key)
        if desc.status != WorkflowExecutionStatus.RUNNING:
            return False
        try:
            if arg is None:
                await handle.execute_update(action)
            else:
                await handle.execute_update(action, arg)
        except WorkflowUpdateFailedError as err:
            cause = err.cause
            reason = cause.message if isinstance(cause, ApplicationError) else str(cause or err)
            raise ActionRefused(key, action, reason) from None
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return False  # it finished meanwhile
            raise
        return True

    async def pause(self, key: str) -> bool:
        """Hold a sequence: nothing is sent until `resume`.

        Returns:
            True if paused; False if it had finished.

        Raises:
            ActionRefused: it is paused already.
        """
        return await self._update(key, SequenceMessages.PAUSE)

    async def resume(self, key: str) -> bool:
        """Let a paused sequence go on.

        Returns:
            True if resumed; False if it had finished.

        Raises:
            ActionRefused: it is not paused.
        """
        return await self._update(key, SequenceMessages.RESUME)

    async def cancel(self, key: str) -> bool:
        """Stop a sequence now (an email already handed to its lane may still go out).

        Returns:
            False if it had already finished.
        """
        handle, desc = await self._describe_sequence(key)
        if desc.status != WorkflowExecutionStatus.RUNNING:
            return False
        await handle.cancel()
        return True

    async def approve(
        self,
        key: str,
        step: str,
        *,
        approved: bool = True,
        subject: str | None = None,
        text: str | None = None,
        html: str | None = None,
        by: str = "",
    ) -> bool:
        """Approve (optionally edited) or reject the draft a compose step holds.

        Returns:
            True: the decision was taken.

        Raises:
            SequenceNotFound: no sequence has this key.
            ActionRefused: `step` is not the current step, no draft awaits approval, or
                the sequence has finished (the reason says which); nothing changed.
        """
        decision = Approval(
            step=step, approved=approved, subject=subject, text=text, html=html, by=by
        )
        if not await self._update(key, SequenceMessages.APPROVE, decision):
            status = (await self.status(key)).status
            raise ActionRefused(key, "approve", f"cannot approve: the sequence is {status}")
        return True

    async def unsubscribe(self, key: str, *, reason: str = "") -> bool:
        """Stop the sequence and suppress its recipient for the sender's future sequences.

        Works for a finished sequence too (the suppression is recorded all the same).

        Returns:
            True if a running sequence was stopped.
        """
        if await self._signal(key, SequenceMessages.UNSUBSCRIBE, reason or "by request"):
            return True
        inp = await self._input_of(sequence_workflow_id(key))
        if inp is not None:
            await self._suppressions.add(
                inp.spec.sender, inp.recipient.address, reason=reason, source=inp.key
            )
        return False

    async def _input_of(self, workflow_id: str) -> SequenceInput | None:
        handle = self.temporal.get_workflow_handle(workflow_id)
        async for event in handle.fetch_history_events():
            attrs = event.workflow_execution_started_event_attributes
            if attrs.input.payloads:
                converter = self.temporal.data_converter
                values = await converter.decode(attrs.input.payloads, [SequenceInput])
                return values[0] if isinstance(values[0], SequenceInput) else None
            break
        return None

    async def record_reply(self, message: bytes | str | InboundEvent) -> str | None:
        """Route an inbound message (raw RFC 5322 bytes, or a parsed event) to its sequence.

        For apps that receive mail by webhook; `postlane inbound` does the same for IMAP.
        Replies stop the sequence, bounces stop it when hard, auto-replies are only
        recorded, unsubscribes stop it and suppress the recipient. Idempotent: the same
        message twice changes nothing.

        Returns:
            The sequence key it reached, or None if it answers no running sequence.
        """
        if isinstance(message, InboundEvent):
            event: InboundEvent | None = message
        else:
            raw = message.encode() if isinstance(message, str) else message
            event = classify(raw, received_at=datetime.now(UTC), keys=self._token_keys())
        if event is None:
            return None
        target = route(event, self._token_keys())
        if target is None:
            return None
        if event.refers_to and event.kind != InboundKind.UNSUBSCRIBE:
            # What the sequence is told it answers is what opened here, not what was given.
            opened = self._token_keys().open_message_id(event.refers_to) or ""
            event = event.model_copy(update={"refers_to_workflow": opened})
        key = target.removeprefix("sequence:")
        try:
            if event.kind == InboundKind.UNSUBSCRIBE:
                await self.unsubscribe(key, reason=f"mail from {event.from_address}".strip())
            elif not await self._signal(key, SequenceMessages.INBOUND, event):
                return None
        except SequenceNotFound:
            return None
        return key


def _check_email(inp: SequenceInput, step: str, content: RenderedMessage) -> None:
    """A rendered step must make a valid email, or nothing starts."""
    try:
        sequence_email(inp, content)
    except InvalidEmail as err:
        raise InvalidEmail(f"steps.{step}.{err.field}", err.reason) from None
