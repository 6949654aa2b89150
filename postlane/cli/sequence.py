"""``postlane sequence ...``: enroll recipients in bulk, inspect, pause, resume, stop.

Bulk enrollment validates every row (address, time zone, every template rendered for that
row) before it starts anything: one bad row stops the whole run with a message per bad
row, unless ``--skip-invalid``. Then the rows start with bounded concurrency
(``--concurrency``, default 32). Each row is its own sequence keyed ``<campaign>:<address>``,
so running the same file twice enrolls nobody twice.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from postlane.cli.bulk import DEFAULT_CONCURRENCY, bounded
from postlane.cli.progress import ProgressBar
from postlane.email.models import invalid_email_from
from postlane.errors import (
    InvalidEmail,
    InvalidInput,
    InvalidRecipients,
    PostlaneError,
    RecipientSuppressed,
)
from postlane.sequences.models import SequenceInput, SequenceReport
from postlane.sequences.spec import Recipient, SequenceSpec, load_spec

if TYPE_CHECKING:
    from postlane.client import PostlaneClient

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
_ADDRESS_COLUMNS = ("email", "address")
_KNOWN_COLUMNS = {*_ADDRESS_COLUMNS, "name", "timezone"}


def add_parser(sub: Any) -> None:
    """Register ``postlane sequence`` and its subcommands."""
    seq = sub.add_parser("sequence", help="multi-step sequences: start, status, pause, ...")
    seq_sub = seq.add_subparsers(dest="sequence_command", required=True, metavar="SUBCOMMAND")
    start = seq_sub.add_parser("start", help="enroll one recipient (--to) or a CSV file")
    start.add_argument("--spec", required=True, help="sequence spec (TOML)")
    who = start.add_mutually_exclusive_group(required=True)
    who.add_argument("--recipients", help="CSV: email[,name,timezone,<template variables>...]")
    who.add_argument("--to", help="one recipient address")
    start.add_argument("--name", help="with --to: the recipient's name")
    start.add_argument("--timezone", help="with --to: the recipient's IANA time zone")
    start.add_argument("--var", action="append", default=[], metavar="NAME=VALUE")
    start.add_argument("--campaign", help="key prefix (default: the spec's name)")
    start.add_argument(
        "--skip-invalid", action="store_true", help="enroll the valid rows, report the rest"
    )
    start.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"with --recipients: starts in flight at once (default {DEFAULT_CONCURRENCY})",
    )
    listing = seq_sub.add_parser("list", help="enrolled sequences: key and status")
    listing.add_argument("--campaign", help="only this campaign (spec name)")
    listing.add_argument("--status", help="only this status, e.g. replied or active")
    for name, helptext in (
        ("status", "current step, next action and time, what was sent"),
        ("pause", "hold a sequence (nothing is sent until resume)"),
        ("resume", "let a paused sequence go on"),
        ("cancel", "stop a sequence now"),
        ("unsubscribe", "stop it and suppress the recipient for this sender"),
    ):
        seq_sub.add_parser(name, help=helptext).add_argument("key")
    approve = seq_sub.add_parser("approve", help="approve or reject a composed draft")
    approve.add_argument("key")
    approve.add_argument("step")
    approve.add_argument("--reject", action="store_true")
    approve.add_argument("--subject", help="replace the draft's subject")
    approve.add_argument("--text", help="replace the draft's text")


async def run(pl: PostlaneClient, args: argparse.Namespace) -> int:
    """Run one ``postlane sequence`` subcommand."""
    command = args.sequence_command
    if command == "start":
        return await _start(pl, args)
    if command == "status":
        print(format_report(await pl.sequences.status(args.key)))
        return EXIT_OK
    if command == "list":
        found = await pl.sequences.list(campaign=args.campaign, status=args.status)
        for key, status in found:
            print(f"{status:<18} {key}")
        print(f"{len(found)} sequence(s)", file=sys.stderr)
        return EXIT_OK
    if command == "approve":
        ok = await pl.sequences.approve(
            args.key,
            args.step,
            approved=not args.reject,
            subject=args.subject,
            text=args.text,
            by="cli",
        )
    else:
        act = {
            "pause": pl.sequences.pause,
            "resume": pl.sequences.resume,
            "cancel": pl.sequences.cancel,
            "unsubscribe": pl.sequences.unsubscribe,
        }[command]
        ok = await act(args.key)
    if ok:
        print(f"{args.key}: {command} sent")
        return EXIT_OK
    report = await pl.sequences.status(args.key)
    print(f"{args.key}: already {report.status}; nothing changed")
    return EXIT_FAILED


def read_recipients(path: Path) -> list[tuple[int, Recipient | InvalidEmail]]:
    """Rows of a recipients CSV as (line number, recipient or the reason it is invalid).

    Raises:
        InvalidRecipients: the file is unreadable or has no ``email`` column.
    """
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise InvalidRecipients(str(path), exc.strerror or str(exc)) from None
    with handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        address_column = next((c for c in _ADDRESS_COLUMNS if c in columns), None)
        if address_column is None:
            raise InvalidRecipients(
                str(path), f"needs an 'email' column; it has: {', '.join(columns)}"
            )
        rows: list[tuple[int, Recipient | InvalidEmail]] = []
        for row in reader:
            clean = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            rows.append((reader.line_num, _recipient(clean, address_column)))
    return rows


def _recipient(row: dict[str, str], address_column: str) -> Recipient | InvalidEmail:
    try:
        return Recipient(
            address=row.get(address_column, ""),
            name=row.get("name") or None,
            timezone=row.get("timezone") or None,
            variables={k: v for k, v in row.items() if k not in _KNOWN_COLUMNS},
        )
    except ValidationError as exc:
        return invalid_email_from(exc)


async def _start(pl: PostlaneClient, args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    campaign = args.campaign or spec.name
    if args.to:
        variables = dict(_pair(v) for v in args.var)
        try:
            recipient = Recipient(
                address=args.to, name=args.name, timezone=args.timezone, variables=variables
            )
        except ValidationError as exc:
            raise invalid_email_from(exc) from None
        handle = await pl.sequences.start(
            spec, recipient, key=f"{campaign}:{recipient.address.lower()}"
        )
        state = "enrolled" if handle.created else "already enrolled"
        print(f"{handle.key}: {state} (workflow {handle.workflow_id})")
        return EXIT_OK
    if args.concurrency < 1:
        raise InvalidInput("concurrency", "must be at least 1")
    prepared, invalid = _validate(pl, spec, campaign, Path(args.recipients))
    for line, err in invalid:
        print(f"{args.recipients}:{line}: {err.field}: {err.reason}", file=sys.stderr)
    if invalid and not args.skip_invalid:
        print(
            f"{len(invalid)} invalid row(s); nothing was enrolled (fix them or --skip-invalid)",
            file=sys.stderr,
        )
        return EXIT_INVALID
    counts = {"enrolled": 0, "already enrolled": 0, "suppressed": 0, "failed": 0}
    progress = ProgressBar(len(prepared), "enrolling")

    async def enroll(inp: SequenceInput) -> None:
        try:
            handle = await pl.sequences.start(inp.spec, inp.recipient, key=inp.key)
            outcome = detail = "enrolled" if handle.created else "already enrolled"
        except RecipientSuppressed:
            outcome = detail = "suppressed"
        except PostlaneError as exc:
            outcome, detail = "failed", f"failed: {exc}"
        counts[outcome] += 1
        progress.step(inp.key, detail)

    # Each row is its own sequence, keyed: starts in any order enroll the same set.
    await bounded(prepared, enroll, limit=args.concurrency)
    progress.close()
    print(", ".join(f"{n} {what}" for what, n in counts.items()) + f", {len(invalid)} invalid")
    return EXIT_FAILED if counts["failed"] else EXIT_OK


def _validate(
    pl: PostlaneClient, spec: SequenceSpec, campaign: str, path: Path
) -> tuple[list[SequenceInput], list[tuple[int, InvalidEmail]]]:
    """Every row checked and rendered before anything starts."""
    prepared: list[SequenceInput] = []
    invalid: list[tuple[int, InvalidEmail]] = []
    seen: set[str] = set()
    for line, row in read_recipients(path):
        if isinstance(row, InvalidEmail):
            invalid.append((line, row))
            continue
        key = f"{campaign}:{row.address.lower()}"
        if key in seen:
            invalid.append((line, InvalidEmail("email", f"{row.address} is listed twice")))
            continue
        seen.add(key)
        try:
            prepared.append(pl.sequences.prepare(spec, row, key=key))
        except InvalidEmail as exc:
            invalid.append((line, exc))
    return prepared, invalid


def _pair(value: str) -> tuple[str, str]:
    name, sep, val = value.partition("=")
    if not sep or not name.strip():
        raise InvalidInput("var", f"{value!r} is not NAME=VALUE")
    return name.strip(), val


def format_report(report: SequenceReport) -> str:
    """A sequence's status for people: where it is, what is next, what was sent."""
    lines = [
        f"sequence   {report.key}",
        f"recipient  {report.recipient}",
        f"status     {report.status}" + (f" ({report.stop_reason})" if report.stop_reason else ""),
    ]
    if report.step:
        lines.append(f"step       {report.step}")
    if report.next_action:
        when = f" at {report.next_at:%Y-%m-%d %H:%M} UTC" if report.next_at else ""
        lines.append(f"next       {report.next_action}{when}")
    if report.draft:
        lines.append(f"draft      {report.draft.subject}")
    for m in report.sent:
        when = f"{m.sent_at:%Y-%m-%d %H:%M}" if m.sent_at else "-"
        lines.append(f"sent       {when}  {m.step}: {m.subject}  {m.message_id}")
    for r in report.replies:
        when = f"{r.received_at:%Y-%m-%d %H:%M}" if r.received_at else "-"
        lines.append(f"reply      {when}  {r.from_address}: {r.subject}")
    if report.auto_replies:
        lines.append(f"auto-replies {report.auto_replies} (ignored)")
    return "\n".join(lines)
