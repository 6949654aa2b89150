"""``postlane suppressions list|add|remove|export|import``: the suppression list, as CSV.

Each suppression is a small workflow on the server (``suppressed:<sender>/<address>``);
``export`` writes them all as CSV and ``import`` starts one per row, so the list can be
audited, moved to another namespace, or restored after its workflows were lost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postlane.email.models import check_address
from postlane.errors import InvalidInput

if TYPE_CHECKING:
    from postlane.client import PostlaneClient

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def add_parser(sub: Any) -> None:
    """Register ``postlane suppressions`` and its subcommands."""
    top = sub.add_parser(
        "suppressions", help="addresses a sender never mails again: list, add, export, ..."
    )
    cmds = top.add_subparsers(dest="suppressions_command", required=True, metavar="SUBCOMMAND")
    listing = cmds.add_parser("list", help="every suppressed address (sender, address, why)")
    listing.add_argument("--sender", help="only this sender's")
    add = cmds.add_parser("add", help="suppress ADDRESS for SENDER")
    add.add_argument("sender")
    add.add_argument("address")
    add.add_argument("--reason", default="", help="why (kept with it, shown by list)")
    remove = cmds.add_parser("remove", help="lift a suppression: SENDER may mail ADDRESS again")
    remove.add_argument("sender")
    remove.add_argument("address")
    export = cmds.add_parser("export", help="write the list as CSV (stdout, or --output)")
    export.add_argument("--sender", help="only this sender's")
    export.add_argument("--output", "-o", help="file to write (default: stdout)")
    imp = cmds.add_parser("import", help="suppress every row of a CSV made by export")
    imp.add_argument("file", help="CSV file (sender,address[,reason,source]); - for stdin")


async def run(pl: PostlaneClient, args: argparse.Namespace) -> int:
    """Run one ``postlane suppressions`` subcommand."""
    command = args.suppressions_command
    sup = pl.suppressions
    if command == "list":
        for item in await sup.list(args.sender):
            print(f"{item.sender}\t{item.address}\t{item.source or '-'}\t{item.reason or '-'}")
        return EXIT_OK
    if command in ("add", "remove"):
        for name in ("sender", "address"):
            try:
                check_address(getattr(args, name))
            except ValueError as exc:
                raise InvalidInput(name, str(exc)) from None
    if command == "add":
        await sup.add(args.sender, args.address, reason=args.reason, source="operator")
        print(f"{args.address}: suppressed for {args.sender}")
        return EXIT_OK
    if command == "remove":
        if await sup.lift(args.sender, args.address):
            print(f"{args.address}: no longer suppressed for {args.sender}")
            return EXIT_OK
        print(f"{args.address}: was not suppressed for {args.sender}")
        return EXIT_FAILED
    if command == "export":
        text = await sup.export_csv(args.sender)
        if args.output:
            _write(args.output, text)
        else:
            sys.stdout.write(text)
        return EXIT_OK
    if command == "import":
        count = await sup.import_csv(_read(args.file))
        print(f"imported {count} suppression(s)")
        return EXIT_OK
    raise InvalidInput("command", f"unknown suppressions command {command!r}")


def _read(name: str) -> str:
    """The CSV to import (``-``: standard input)."""
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput("file", f"{name}: {exc.strerror or exc}") from None


def _write(name: str, text: str) -> None:
    try:
        Path(name).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InvalidInput("output", f"{name}: {exc.strerror or exc}") from None
