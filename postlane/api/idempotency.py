"""The ``Idempotency-Key`` request header (IETF draft-ietf-httpapi-idempotency-key-header).

The key *is* the email's (or sequence's) idempotency key, so the durable record of a
request is its Temporal workflow: the same key and body find the same workflow and get the
same answer, from any API process, for as long as the namespace retains the workflow.
Another body under a used key is `postlane.errors.IdempotencyConflict` (422).

`InFlight` covers the moment before that record exists: while one request with a key is
being processed in this process, a second with the same key and the same body waits for
the first and gets its answer (status and body), marked ``Idempotent-Replayed: true``; with
another body it gets 422 at once. Across API processes, Temporal's start with
``USE_EXISTING`` makes concurrent starts attach to the one workflow, with the same result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from postlane.errors import IdempotencyConflict
from postlane.ids import validate_key

from .problems import Problem

T = TypeVar("T")

HEADER = "Idempotency-Key"


def require_key(value: str | None) -> str:
    """The key of an ``Idempotency-Key`` header (a bare token or an RFC 8941 sf-string,
    ``"abc"``).

    Raises:
        Problem: 400, the header is missing or malformed (naming the header).
    """
    if value is None or not value.strip():
        raise Problem(
            400,
            "idempotency-key-missing",
            "Idempotency-Key required",
            f"{HEADER}: this request is not idempotent by itself; send an {HEADER} header"
            " (the email's key; the same key never sends twice)",
            field=HEADER,
        )
    key = value.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    try:
        return validate_key(key)
    except ValueError as exc:
        raise Problem(
            400,
            "idempotency-key-invalid",
            "Idempotency-Key invalid",
            f"{HEADER}: {exc}",
            field=HEADER,
        ) from None


class InFlight(Generic[T]):
    """Requests being processed right now in this process, by key."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[str, asyncio.Future[T]]] = {}

    def __len__(self) -> int:
        return len(self._running)

    async def run(
        self, key: str, fingerprint: str, work: Callable[[], Awaitable[T]]
    ) -> tuple[T, bool]:
        """Run `work` for `key`, or join the run already under way.

        Args:
            key: the scoped idempotency key (e.g. ``email:<key>``).
            fingerprint: the hash of what is asked; a different one under a running key is
                a conflict.

        Returns:
            The result, and whether it was another request's (joined).

        Raises:
            IdempotencyConflict: the running request with this key asks for something else.
            Exception: whatever the first run raised (a joined request gets it too). A
                joined request whose first run was cancelled runs `work` itself.
        """
        running = self._running.get(key)
        if running is not None:
            theirs, future = running
            if theirs != fingerprint:
                raise IdempotencyConflict(key.split(":", 1)[-1])
            try:
                return await asyncio.shield(future), True
            except asyncio.CancelledError:
                if not future.cancelled():
                    raise  # this request was cancelled itself
            # The first request went away (its client hung up) before it finished: the
            # work is idempotent on the server, so this one does it instead.
            return await self.run(key, fingerprint, work)
        future = asyncio.get_running_loop().create_future()
        self._running[key] = (fingerprint, future)
        try:
            result = await work()
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here: nobody may have joined
            raise
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(result)
        finally:
            del self._running[key]
        return result, False
