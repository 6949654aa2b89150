"""Erasure: find and delete everything Temporal holds for one recipient address.

Every email and sequence workflow carries ``PostlaneRecipientHash``: a keyed hash (HMAC-SHA256
under a key derived from the token secret) of each recipient address. The server can match
it, but nobody without the secret can tell which address it stands for, so the search
attribute does not leak the addresses the payload codec keeps encrypted.

`forget` lists every workflow with the address's hash, plus sequences whose workflow ID is
the default ``sequence:<name>:<address>`` (and their emails), cancels the running ones,
deletes their histories (``DeleteWorkflowExecution``) and keeps, or drops, the address's
suppressions.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Callable
from datetime import timedelta

import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from postlane import search_attributes as sa
from postlane.config import Settings
from postlane.email.addresses import normalise_address
from postlane.errors import ConfigurationError, InvalidInput
from postlane.ids import (
    EMAIL_ID_PREFIX,
    SEQUENCE_ID_PREFIX,
    SUPPRESSION_ID_PREFIX,
)
from postlane.names import WorkflowType
from postlane.tokens import MIN_SECRET_LENGTH, SECRET_ENV, load_secret

log = structlog.get_logger(__name__)

HASH_CHARS = 16
"""Base32 characters kept of each HMAC (80 bits): short enough that 100 recipients fit in
one search attribute value (2 KB by default), long enough that no two addresses meet."""
FORGET_WAIT = timedelta(seconds=60)
"""How long `forget` waits for cancelled workflows to stop, and deletions to take effect."""


def normalise_recipient(address: str) -> str:
    """The form an address is hashed in: bare, IDNA domain, lower-cased throughout.

    Lower-casing the local part too is deliberate: erasure must find ``Bob@x`` when asked
    for ``bob@x``, and no mail system tells those apart in practice.

    Raises:
        InvalidInput: ``address`` is not a valid address (the field is ``address``).
    """
    try:
        return normalise_address(address.strip()).lower()
    except ValueError as exc:
        raise InvalidInput("address", str(exc)) from None


class RecipientHasher:
    """Keyed hashes of recipient addresses (the ``PostlaneRecipientHash`` values).

    Args:
        secret: the token secret (``POSTLANE_TOKEN_SECRET``), the same on the workers and on
            every client that sends, enrolls or forgets.
    """

    def __init__(self, secret: bytes) -> None:
        self._key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"postlane recipient-hash v1"
        ).derive(secret)

    @classmethod
    def from_settings(cls, settings: Settings) -> RecipientHasher | None:
        """The hasher the settings' token secret gives; None without a secret.

        Raises:
            ConfigurationError: the secret is too short or its file unreadable.
        """
        secret = load_secret(settings)
        return cls(secret) if secret is not None else None

    def hash(self, address: str) -> str:
        """The hash of one address (normalised first, see `normalise_recipient`).

        Raises:
            InvalidInput: the address is malformed.
        """
        mac = hmac.new(self._key, normalise_recipient(address).encode(), hashlib.sha256)
        return base64.b32encode(mac.digest()).decode()[:HASH_CHARS].lower()

    def hashes(self, addresses: list[str]) -> list[str]:
        """Distinct hashes of `addresses`, in first-seen order."""
        return list(dict.fromkeys(self.hash(a) for a in addresses))


def require_hasher(settings: Settings) -> RecipientHasher:
    """The settings' hasher, or a `ConfigurationError` naming the setting to set."""
    hasher = RecipientHasher.from_settings(settings)
    if hasher is None:
        raise ConfigurationError(
            f"token_secret: not set; set {SECRET_ENV} (at least {MIN_SECRET_LENGTH}"
            " characters), the same secret the workers have, to find an address's workflows"
        )
    return hasher


class ForgetResult(BaseModel):
    """What `forget` found and did. Workflow IDs may contain the address (default keys)."""

    model_config = ConfigDict(frozen=True)

    recipient_hash: str
    """The address's ``PostlaneRecipientHash`` (safe to log)."""
    cancelled: list[str] = Field(default_factory=list)
    """Workflow IDs that were running and were cancelled first."""
    deleted: list[str] = Field(default_factory=list)
    """Workflow IDs whose histories were deleted (emails, sequences, dropped suppressions)."""
    suppressions_kept: list[str] = Field(default_factory=list)
    """Suppression workflow IDs left running, so the address stays suppressed."""
    not_stopped: list[str] = Field(default_factory=list)
    """Cancelled workflows that had not stopped within the wait: deleted all the same
    (which terminates them)."""

    @property
    def found(self) -> int:
        """How many workflows matched (deleted or kept)."""
        return len(self.deleted) + len(self.suppressions_kept)


async def forget(
    client: Client,
    hasher: RecipientHasher,
    address: str,
    *,
    drop_suppression: bool = False,
    wait: timedelta = FORGET_WAIT,
) -> ForgetResult:
    """Erase what Temporal holds for `address`; see `postlane.client.PostlaneClient.forget`.

    Raises:
        InvalidInput: the address is malformed (field ``address``); nothing was changed.
    """
    normal = normalise_recipient(address)
    digest = hasher.hash(normal)
    suffix = ":" + normal
    found: dict[str, WorkflowExecutionStatus | None] = {}
    runs: dict[str, set[str]] = {}
    """Every run listed per workflow ID: a sequence that continued as new left earlier
    runs, each with a history of its own."""
    kept: list[str] = []

    async def collect(query: str, keep: bool = True) -> list[str]:
        ids: list[str] = []
        async for execution in client.list_workflows(query):
            if keep and execution.id not in found:
                found[execution.id] = execution.status
            runs.setdefault(execution.id, set()).add(execution.run_id)
            ids.append(execution.id)
        return ids

    await collect(f'{sa.RECIPIENT_HASH.name} = "{digest}"')
    # Sequences enrolled under the default key ``<name>:<address>`` by a client without the
    # token secret carry no hash; their workflow ID names the address all the same.
    for wid in await collect(f'WorkflowType = "{WorkflowType.SEQUENCE}"', keep=False):
        if wid.lower().endswith(suffix):
            found.setdefault(wid, None)
    for wid in [w for w in found if w.startswith(SEQUENCE_ID_PREFIX)]:
        prefix = EMAIL_ID_PREFIX + wid.removeprefix(SEQUENCE_ID_PREFIX) + ":"
        if '"' in prefix or "\\" in prefix:
            continue  # a key no query string can quote; its emails carry the hash anyway
        for email_id in await collect(f'WorkflowId STARTS_WITH "{prefix}"', keep=False):
            if ":" not in email_id.removeprefix(prefix):  # not a longer key's email
                found.setdefault(email_id, None)
    for wid in await collect(f'WorkflowType = "{WorkflowType.SUPPRESSION}"', keep=False):
        if wid.startswith(SUPPRESSION_ID_PREFIX) and wid.lower().endswith("/" + normal):
            found.setdefault(wid, None)

    # What visibility listed may be gone already (a deletion it has not caught up with).
    live: dict[str, WorkflowExecutionStatus] = {}
    for wid in found:
        try:
            desc = await client.get_workflow_handle(wid).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                continue
            raise
        if desc.status is not None:
            live[wid] = desc.status
    for wid, status in list(live.items()):
        if wid.startswith(SUPPRESSION_ID_PREFIX) and not drop_suppression:
            if status == WorkflowExecutionStatus.RUNNING:
                kept.append(wid)
                del live[wid]  # the suppression stays; a lifted one's history goes

    running = [
        w
        for w, s in live.items()
        if s == WorkflowExecutionStatus.RUNNING and not w.startswith(SUPPRESSION_ID_PREFIX)
    ]
    for wid in running:
        try:
            await client.get_workflow_handle(wid).cancel()
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
    not_stopped = await _until(
        client, running, wait, lambda s: s != WorkflowExecutionStatus.RUNNING
    )

    deleted: list[str] = []
    for wid in live:
        # The current run first (terminating it if it still runs), then earlier ones.
        if await _delete(client, wid, ""):
            deleted.append(wid)
        for run_id in sorted(runs.get(wid, ())):
            await _delete(client, wid, run_id)
    # Deletion is asynchronous on the server: wait for it, so a second run finds nothing.
    await _until(client, deleted, wait, lambda s: s is None)

    result = ForgetResult(
        recipient_hash=digest,
        cancelled=sorted(running),
        deleted=sorted(deleted),
        suppressions_kept=sorted(kept),
        not_stopped=sorted(not_stopped),
    )
    log.info(
        "forget.done",
        recipient_hash=digest,
        deleted=len(result.deleted),
        cancelled=len(result.cancelled),
        suppressions_kept=len(result.suppressions_kept),
    )
    log.debug("forget.workflows", deleted=result.deleted, kept=result.suppressions_kept)
    return result


async def _delete(client: Client, workflow_id: str, run_id: str) -> bool:
    """Delete one run's history (the current run's with `run_id` empty); False if gone."""
    try:
        await client.workflow_service.delete_workflow_execution(
            DeleteWorkflowExecutionRequest(
                namespace=client.namespace,
                workflow_execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
            )
        )
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        return False
    return True


async def _until(
    client: Client,
    workflow_ids: list[str],
    within: timedelta,
    done: Callable[[WorkflowExecutionStatus | None], bool],
) -> list[str]:
    """Poll until `done(status)` holds for each workflow (status None: not found); return
    those for which it did not within `within`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within.total_seconds()
    pending = list(workflow_ids)
    while pending:
        still: list[str] = []
        for wid in pending:
            try:
                status = (await client.get_workflow_handle(wid).describe()).status
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
                status = None
            if not done(status):
                still.append(wid)
        pending = still
        if not pending or loop.time() > deadline:
            break
        await asyncio.sleep(0.5)  # the server has no notification for a close or a deletion
    return pending
