"""Sender scopes: which senders an API key (``--senders``) or an MCP server may act as.

A scope is a list of patterns as lanes write them: an address (``agent@acme.test``),
``*@domain`` (``*@ops.acme.test``), ``*@*.domain`` or ``*`` (any sender). A sender matches
by its bare address, so ``Ada <agent@acme.test>`` is ``agent@acme.test``, and case does not
count, as when a lane picks the sender it serves. An empty scope allows every sender.

`sender_of` reads the sender an existing email was started with from the Temporal server,
so cancel and retry can be held to the same scope as the send.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from temporalio.service import RPCError, RPCStatusCode

from postlane.email.addresses import normalise_sender_pattern, parse_mailbox
from postlane.email.models import check_address
from postlane.email.started import started_input
from postlane.errors import EmailNotFound, InvalidInput
from postlane.ids import email_workflow_id

if TYPE_CHECKING:
    from postlane.client import PostlaneClient


def parse_sender_patterns(values: str | Iterable[str], field: str = "senders") -> list[str]:
    """Comma-separated patterns (one string, or several, as a repeated option gives them)
    → the patterns, checked and normalised (internationalised domains in A-labels).

    Raises:
        InvalidInput: no pattern at all, or one that is not ``*``, ``*@domain``,
            ``*@*.domain`` or an address (naming `field`).
    """
    texts = [values] if isinstance(values, str) else list(values)
    patterns = [p.strip() for text in texts for p in text.split(",") if p.strip()]
    if not patterns:
        raise InvalidInput(field, "give at least one sender, e.g. agent@acme.test")
    out: list[str] = []
    for pattern in patterns:
        try:
            normalised = normalise_sender_pattern(pattern)
            if normalised.startswith("*@"):  # the domain (or *.domain) must be one
                domain = normalised[2:].removeprefix("*.")
                try:
                    check_address(f"x@{domain}")
                except ValueError:
                    raise ValueError(f"{domain!r} is not a domain") from None
            out.append(normalised)
        except ValueError as exc:
            raise InvalidInput(field, f"{pattern!r}: {exc}") from None
    return out


class SenderScope:
    """The senders one caller may act as.

    Args:
        patterns: checked patterns (`parse_sender_patterns`); empty allows every sender.
    """

    def __init__(self, patterns: Sequence[str] = ()) -> None:
        self.patterns: tuple[str, ...] = tuple(p.strip() for p in patterns if p.strip())
        self._lowered = [p.lower() for p in self.patterns]

    @property
    def restricted(self) -> bool:
        """False for a scope that allows every sender: empty, or holding ``*``."""
        return bool(self.patterns) and "*" not in self.patterns

    def allows(self, sender: str) -> bool:
        """Is `sender` (``address`` or ``Name <address>``) in this scope? An unparsable
        sender is in no restricted scope."""
        if not self.restricted:
            return True
        try:
            address = parse_mailbox(sender).address.lower()
        except ValueError:
            return False
        return any(
            pattern == address or fnmatch.fnmatchcase(address, pattern) for pattern in self._lowered
        )

    def __str__(self) -> str:
        return ", ".join(self.patterns) if self.patterns else "*"


async def sender_of(pl: PostlaneClient, key: str) -> str | None:
    """The sender the email `key` was started with, read from the first event of its
    workflow history through the client's data converter (so an encrypted input is read
    too); None if the input cannot be read.

    Raises:
        EmailNotFound: no email has this key.
        RPCError: Temporal failed otherwise.
    """
    handle = pl.temporal.get_workflow_handle(email_workflow_id(key))
    try:
        started = await started_input(pl.temporal, handle)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise EmailNotFound(key) from None
        raise
    if started is None:
        return None
    return started.email.sender
