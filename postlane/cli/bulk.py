"""``postlane send --csv FILE``: one email per row, from templates, each row keyed once.

Every row is checked first (address, every template rendered for it, a key of its own);
one bad row stops the run with a message per bad row and nothing sent. Then the emails
start with bounded concurrency, with a progress bar. Each row's idempotency key is
``<campaign>:<value of --key-column>`` or, without that column, ``<campaign>:<hash of the
row>``, so running the same file twice sends nothing new.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from postlane.cli.progress import ProgressBar
from postlane.email.models import Email, invalid_email_from
from postlane.errors import InvalidEmail, InvalidInput, PostlaneError, UnknownSender
from postlane.idempotency import started_new
from postlane.sequences.templates import render_string

if TYPE_CHECKING:
    from postlane.client import PostlaneClient
    from postlane.config import Settings

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
DEFAULT_CONCURRENCY = 32
"""Starts in flight at once: enough to keep a server busy, few enough to be a fair client."""
_ADDRESS_COLUMNS = ("email", "to", "address")
_NOT_WITH_CSV = (
    ("--to", "to"),
    ("--key", "key"),
    ("--send-at", "send_at"),
    ("--wait", "wait"),
    ("--cc", "cc"),
    ("--bcc", "bcc"),
    ("--reply-to", "reply_to"),
    ("--header", "header"),
)
"""Options of ``send`` that ``--csv`` refuses: (flag, argparse destination)."""

T = TypeVar("T")
R = TypeVar("R")


async def bounded(
    items: Iterable[T], action: Callable[[T], Awaitable[R]], *, limit: int
) -> list[R]:
    """`action` over `items`, at most `limit` at once; results in the items' order."""
    gate = asyncio.Semaphore(max(1, limit))

    async def one(item: T) -> R:
        async with gate:
            return await action(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


def add_arguments(send: argparse.ArgumentParser) -> None:
    """The ``--csv`` options of ``postlane send``."""
    send.add_argument(
        "--csv",
        metavar="FILE",
        help="one email per row: an 'email' (or 'to') column, any others are template"
        " variables; --subject, --text and --html are then Jinja templates",
    )
    send.add_argument("--key-column", help="with --csv: the column that keys each row")
    send.add_argument(
        "--campaign", help="with --csv: key prefix (default: the file's name without .csv)"
    )
    send.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"with --csv: starts in flight at once (default {DEFAULT_CONCURRENCY})",
    )


@dataclass(frozen=True)
class Row:
    """One CSV row, ready to send."""

    line: int
    key: str
    email: Email


def row_key(campaign: str, row: dict[str, str], key_column: str | None) -> str:
    """The row's idempotency key: its key column's value, or a hash of the whole row."""
    if key_column is not None:
        return f"{campaign}:{row.get(key_column, '')}"
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f"{campaign}:{hashlib.sha256(canonical.encode()).hexdigest()[:32]}"


def read_rows(args: argparse.Namespace) -> tuple[list[Row], list[tuple[int, InvalidEmail]]]:
    """Every row validated and rendered, or the reasons rows are invalid.

    Raises:
        InvalidInput: the file is unreadable, has no address column, or the key column is
            missing.
    """
    path = Path(args.csv)
    campaign = args.campaign or path.stem
    key_column = args.key_column.strip().lower() if args.key_column else None
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise InvalidInput("csv", f"{path}: {exc.strerror or exc}") from None
    rows: list[Row] = []
    invalid: list[tuple[int, InvalidEmail]] = []
    seen: dict[str, int] = {}
    with handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        address = next((c for c in _ADDRESS_COLUMNS if c in columns), None)
        if address is None:
            raise InvalidInput("csv", f"{path} needs an 'email' column; it has: {columns}")
        if key_column is not None and key_column not in columns:
            raise InvalidInput("key_column", f"{path} has no column {key_column!r}")
        for raw in reader:
            clean = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            line = reader.line_num
            try:
                email = _render(args, clean, address)
            except InvalidEmail as exc:
                invalid.append((line, exc))
                continue
            key = row_key(campaign, clean, key_column)
            if key in seen:
                invalid.append((line, InvalidEmail("key", f"{key} is also line {seen[key]}'s key")))
                continue
            seen[key] = line
            rows.append(Row(line=line, key=key, email=email))
    return rows, invalid


def _render(args: argparse.Namespace, row: dict[str, str], address: str) -> Email:
    variables: dict[str, Any] = {**row, "email": row.get(address, "")}
    text = render_string(args.text, variables, field="text") if args.text else None
    html = render_string(args.html, variables, field="html", html=True) if args.html else None
    try:
        return Email(
            sender=args.sender,
            to=[row.get(address, "")],
            subject=render_string(args.subject, variables, field="subject").strip(),
            text=text,
            html=html,
            tags=list(args.tag),
        )
    except ValidationError as exc:
        raise invalid_email_from(exc) from None


async def send_csv(
    args: argparse.Namespace,
    settings: Settings,
    connect: Callable[[], Awaitable[PostlaneClient]],
) -> int:
    """``postlane send --csv FILE``: validate every row, then connect and send each once."""
    # One CC, header or Reply-To for every row is rarely what a mail merge means; refusing
    # them beats sending without them.
    for flag, given in _NOT_WITH_CSV:
        if getattr(args, given):
            raise InvalidInput(flag, "not with --csv: each row's email goes to its row alone")
    if args.text == "-":
        args.text = sys.stdin.read()  # the template itself, as ``send --text -`` reads a body
    if args.concurrency < 1:
        raise InvalidInput("concurrency", "must be at least 1")
    if not args.text and not args.html:
        raise InvalidInput("text", "--csv needs a --text or --html template")
    if settings.lane_for(args.sender) is None:
        raise UnknownSender(args.sender)
    rows, invalid = read_rows(args)
    for line, err in invalid:
        print(f"{args.csv}:{line}: {err.field}: {err.reason}", file=sys.stderr)
    if invalid:
        print(f"{len(invalid)} invalid row(s); nothing was sent", file=sys.stderr)
        return EXIT_INVALID
    pl = await connect()
    bar = ProgressBar(len(rows), "sending")
    counts = {"queued": 0, "already queued": 0, "failed": 0}

    async def one(row: Row) -> None:
        try:
            handle = await pl.send(row.email, key=row.key, priority=args.priority)
            # Not new: an earlier run started this key, so this run sends nothing for it.
            outcome = detail = "queued" if started_new(handle._handle) else "already queued"
        except PostlaneError as exc:
            outcome, detail = "failed", f"failed: {type(exc).__name__}: {exc}"
        counts[outcome] += 1
        bar.step(row.key, detail)

    await bounded(rows, one, limit=args.concurrency)
    bar.close()
    print(", ".join(f"{n} {what}" for what, n in counts.items()))
    return EXIT_FAILED if counts["failed"] else EXIT_OK
