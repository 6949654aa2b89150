"""The ``postlane`` command: a thin layer over `PostlaneClient`, the worker and the dev stack.

Every failure prints one line, ``error: <Type>: <reason>``, and exits non-zero (2 for bad
input or configuration, or an action the workflow refused in its state; 1 otherwise).
Short-lived commands leave through ``os._exit`` after flushing: the Temporal SDK can abort
at interpreter shutdown (sdk-python#300), and a command that worked must not exit 134.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from temporalio.service import RPCError

from postlane.cli import api as cli_api
from postlane.cli import bulk as cli_bulk
from postlane.cli import mcp as cli_mcp
from postlane.cli import routing as cli_routing
from postlane.cli import sequence as cli_sequence
from postlane.cli import suppressions as cli_suppressions
from postlane.cli import webhooks as cli_webhooks
from postlane.cli.progress import ProgressBar
from postlane.durations import format_duration, parse_duration
from postlane.email.dlq import BatchProgress
from postlane.errors import (
    ActionRefused,
    ConfigurationError,
    InvalidEmail,
    InvalidInput,
    PostlaneError,
)

if TYPE_CHECKING:
    from postlane.client import CancelResult, PostlaneClient
    from postlane.config import Settings
    from postlane.email.models import EmailReport
    from postlane.health import HealthServer

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="postlane", description="Durable outbound email on Temporal.")
    p.add_argument(
        "--address", help="Temporal address (default $TEMPORAL_ADDRESS or localhost:7233)"
    )
    p.add_argument(
        "--namespace", help="Temporal namespace (default $TEMPORAL_NAMESPACE or postlane)"
    )
    p.add_argument(
        "--config", help="configuration file (default $POSTLANE_CONFIG or ./postlane.toml)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser(
        "dev", help="run the embedded stack: Temporal + Web UI, SMTP catcher, worker"
    )
    dev.add_argument("--dir", default=".postlane", help="state directory (default .postlane)")
    dev.add_argument("--port", type=int, default=7233, help="Temporal gRPC port")
    dev.add_argument("--ui-port", type=int, default=8233, help="Temporal Web UI port")
    dev.add_argument("--smtp-port", type=int, default=1025, help="SMTP catcher port")
    dev.add_argument(
        "--codec-port",
        type=int,
        default=8081,
        help="codec server port, when POSTLANE_ENCRYPTION_KEYS is set (default 8081)",
    )
    dev.add_argument(
        "--synchronous",
        choices=["full", "normal"],
        help="SQLite sync mode: full (default, fsync per commit; survives power loss) or"
        " normal (faster; survives a process crash only); also $POSTLANE_DEV_SYNCHRONOUS",
    )
    dev.add_argument("--no-demo", action="store_true", help="do not send the demo email")
    dev.add_argument(
        "--exit-after-demo", action="store_true", help="stop once the demo is delivered"
    )

    w = sub.add_parser("worker", help="run workers for the configured lanes (same as worker.py)")
    w.add_argument("--lanes", help="comma-separated lanes this host serves (default: all)")
    w.add_argument("--no-workflows", action="store_true", help="serve lane sends only")
    w.add_argument("--no-inbound", action="store_true", help="poll no inbox (see inbound)")
    w.add_argument("--json-logs", action="store_true", help="log one JSON object per line")
    _observability_flags(w)
    w.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="host a compose-step agent activity (repeatable)",
    )

    exp = sub.add_parser(
        "exporter",
        help="serve cluster-wide gauges (lane backlog, pollers, dead letters) to Prometheus",
        description="Ask Temporal about every configured lane and serve the answers on "
        "/metrics; run one per cluster (docs/alerts.md).",
    )
    exp.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    exp.add_argument("--port", type=int, default=9466, help="HTTP port (default 9466)")
    exp.add_argument(
        "--interval", type=float, default=15.0, help="seconds between collections (default 15)"
    )
    exp.add_argument("--json-logs", action="store_true", help="log one JSON object per line")

    inbound = sub.add_parser(
        "inbound",
        help="watch the configured inboxes (IMAP) for replies, bounces and unsubscribes",
        description="Start one watcher workflow per [[inboxes]] entry and poll their IMAP "
        "folders from this host; no sends, no other workflows.",
    )
    inbound.add_argument("--json-logs", action="store_true", help="log one JSON object per line")
    _observability_flags(inbound)

    s = sub.add_parser("send", help="send one email")
    s.add_argument("--from", dest="sender", required=True)
    s.add_argument(
        "--to", action="append", help="repeat or comma-separate (required without --csv)"
    )
    s.add_argument("--cc", action="append", default=[])
    s.add_argument("--bcc", action="append", default=[])
    s.add_argument("--reply-to")
    s.add_argument("--subject", required=True)
    s.add_argument("--text", help="plain-text body ('-' reads stdin)")
    s.add_argument("--html", help="HTML body")
    s.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    s.add_argument("--tag", action="append", default=[])
    s.add_argument("--key", help="idempotency key (default: a new random key)")
    s.add_argument("--priority", default="normal", choices=["high", "normal", "bulk"])
    s.add_argument("--send-at", help="ISO 8601 time with a zone, e.g. 2026-12-01T09:00:00+01:00")
    s.add_argument("--wait", action="store_true", help="wait for the delivery receipt")
    cli_bulk.add_arguments(s)

    for name, helptext in (
        ("status", "show an email's status, attempts and last SMTP reply"),
        ("retry", "send a dead-lettered email again"),
        ("cancel", "cancel an email that has not been sent"),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("key")
        if name == "status":
            c.add_argument(
                "--attempts",
                action="store_true",
                help="a table of the failed attempts (number, time, server, reply) instead of JSON",
            )
        if name == "retry":
            c.add_argument("--to", action="append", help="replace the To recipients")
            c.add_argument("--lane", help="send through another lane")

    sub.add_parser("setup", help="create the namespace (30-day retention) and search attributes")
    schema = sub.add_parser(
        "schema", help="JSON Schemas of SendEmail's input and results (docs/contract.md)"
    )
    schema.add_argument("model", nargs="?", help="one of them, e.g. SendEmailInput (default all)")

    dlq = sub.add_parser("dlq", help="dead-lettered emails: list, retry, discard")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="SUBCOMMAND")
    since_help = "parked since: a duration ago (30m, 2h, 3d, 1w) or an ISO time (UTC if no zone)"
    dlq_list = dlq_sub.add_parser(
        "list", help="key, lane, recipients, attempts, parked since, last reply"
    )
    dlq_list.add_argument("--lane")
    dlq_list.add_argument("--since", help=since_help)
    for name, helptext in (("retry", "send them again"), ("discard", "give up on them")):
        action = dlq_sub.add_parser(name, help=helptext)
        action.add_argument("keys", nargs="*", metavar="KEY")
        action.add_argument("--all", action="store_true", help="every dead-lettered email")
        action.add_argument("--lane", help="with --all: only this lane's")
        action.add_argument("--since", help=f"with --all: {since_help}")

    cli_sequence.add_parser(sub)
    cli_webhooks.add_parser(sub)
    cli_mcp.add_parser(sub)
    cli_api.add_parser(sub)

    lanes = sub.add_parser("lanes", help="per lane: rate, backpressure, caps used, backlog")
    lanes_sub = lanes.add_subparsers(dest="lanes_command", metavar="SUBCOMMAND")
    lane_set = lanes_sub.add_parser("set", help="change a lane's rate live, e.g. --rate 5/s")
    lane_set.add_argument("name")
    lane_set.add_argument("--rate", required=True, help="N/s, N/m or N/h")
    cli_routing.add_arguments(lanes)
    lane_resume = lanes_sub.add_parser("resume", help="resume a paused lane (docs/reputation.md)")
    lane_resume.add_argument("name")
    lane_resume.add_argument("--note", default="", help="why (in the worker's log)")
    lane_pause = lanes_sub.add_parser("pause", help="pause a lane: its emails wait scheduled")
    lane_pause.add_argument("name")
    lane_pause.add_argument("--reason", default="paused by an operator")
    cli_suppressions.add_parser(sub)
    codec = sub.add_parser(
        "codec-server",
        help="serve Temporal's remote-codec API (/decode, /encode) for the Web UI and CLI",
        description="Decodes encrypted payloads for people holding POSTLANE_CODEC_TOKEN, with "
        "CORS for POSTLANE_CODEC_ORIGINS only (docs/security.md).",
    )
    codec.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    codec.add_argument("--port", type=int, default=8081, help="port (default 8081)")
    forget = sub.add_parser(
        "forget",
        help="erase a recipient: cancel and delete every email and sequence for ADDRESS",
        description="Find every email and sequence workflow for ADDRESS (by its keyed hash, "
        "PostlaneRecipientHash), cancel the running ones and delete their histories. The "
        "address's suppressions are kept unless --drop-suppression. Prints what it removed "
        "as JSON. Exit 0: done (also when nothing was found); 1: a workflow could not be "
        "deleted or Temporal failed; 2: a malformed address or no token secret.",
    )
    # Not dest "address": that is the global --address (Temporal's).
    forget.add_argument("recipient", metavar="ADDRESS", help="the recipient address")
    forget.add_argument(
        "--drop-suppression",
        action="store_true",
        help="also delete the address's suppressions (senders may enroll it again)",
    )
    forget.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="seconds to wait for cancelled workflows to stop (default 60)",
    )
    sub.add_parser("keygen", help="print a new random key for POSTLANE_ENCRYPTION_KEYS")
    top = sub.add_parser("top", help="live view: lanes, backlog, sends and errors, dead letters")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``postlane`` script."""
    args = _parser().parse_args(argv)
    if args.config:
        os.environ["POSTLANE_CONFIG"] = args.config
    try:
        rc = asyncio.run(_dispatch(args))
    except KeyboardInterrupt:
        rc = 130
    except (InvalidInput, ConfigurationError, ActionRefused) as exc:
        rc = _fail(exc, EXIT_INVALID)
    except PostlaneError as exc:
        rc = _fail(exc, EXIT_FAILED)
    except (RuntimeError, OSError, RPCError) as exc:
        rc = _fail(exc, EXIT_FAILED)
    # Every command, the worker and the dev stack included, has finished its cleanup inside
    # the event loop by now; leaving through os._exit avoids the SDK's abort at shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _schema(model: str | None) -> int:
    """Print the wire models' JSON Schemas (all, keyed by name, or the one named)."""
    import json

    from postlane.contract import schemas

    found = schemas()
    if model is not None:
        if model not in found:
            raise InvalidInput("model", f"{model!r} is not one of {', '.join(found)}")
        print(json.dumps(found[model], indent=2))
        return EXIT_OK
    print(json.dumps(found, indent=2))
    return EXIT_OK


def _fail(exc: BaseException, rc: int) -> int:
    message = " ".join(str(exc).split()) or repr(exc)
    print(f"error: {type(exc).__name__}: {message}", file=sys.stderr)
    return rc


async def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "dev":
        try:
            from postlane.dev.stack import DevStack, synchronous_from_environment
        except ModuleNotFoundError as exc:  # a production install has no dev stack
            if exc.name != "aiosmtpd":
                raise
            raise ConfigurationError(
                f"postlane dev needs the dev extra: pip install 'postlane[dev]' ({exc})"
            ) from None

        stack = DevStack(
            Path(args.dir),
            port=args.port,
            ui_port=args.ui_port,
            smtp_port=args.smtp_port,
            codec_port=args.codec_port,
            synchronous=synchronous_from_environment(args.synchronous),
        )
        return await stack.run(demo=not args.no_demo, exit_after_demo=args.exit_after_demo)
    if args.command in ("worker", "inbound"):
        return await _worker(args)
    if args.command == "schema":
        return _schema(args.model)
    if args.command == "exporter":
        return await _exporter(args)
    if args.command == "keygen":
        from postlane.encryption import new_key

        print(new_key())
        return EXIT_OK
    if args.command == "codec-server":
        return await _codec_server(args)
    if args.command == "mcp":
        return await cli_mcp.run(args)

    from postlane.config import load_settings

    settings = load_settings()
    if args.command == "api-key":
        return cli_api.run_keys(args, settings)
    if args.command == "send" and args.csv:
        return await cli_bulk.send_csv(args, settings, lambda: _connect(args, settings))
    if args.command == "send":
        if not args.to:
            raise InvalidInput("to", "required: --to ADDRESS (or --csv FILE)")
        email, key = _email_from_args(args)  # validate before touching the network
        send_at = _parse_time(args.send_at) if args.send_at else None
        pl = await _connect(args, settings)
        handle = await pl.send(email, key=key, priority=args.priority, send_at=send_at)
        print(f"workflow_id={handle.workflow_id} key={key}")
        if args.wait:
            receipt = await handle.result()
            print(receipt.model_dump_json(indent=2))
        return EXIT_OK

    if args.command == "forget":
        from datetime import timedelta

        from postlane.erasure import normalise_recipient, require_hasher
        from postlane.logs import configure_logging

        configure_logging()  # the log goes to stderr, the JSON report alone to stdout
        normalise_recipient(args.recipient)  # bad input fails before touching the network
        require_hasher(settings)
        pl = await _connect(args, settings)
        result = await pl.forget(
            args.recipient,
            drop_suppression=args.drop_suppression,
            wait=timedelta(seconds=args.wait),
        )
        print(result.model_dump_json(indent=2))
        return EXIT_OK

    pl = await _connect(args, settings)
    if args.command == "status":
        report = await pl.describe(args.key)
        if args.attempts:
            print(format_attempts(report))
        else:
            print(report.model_dump_json(indent=2, exclude_none=True))
        return EXIT_OK
    if args.command == "retry":
        to = _split(args.to) if args.to else None
        if await pl.retry(args.key, to=to, lane=args.lane):
            print(f"{args.key}: going out again")
            return EXIT_OK
        print(f"{args.key}: nothing to retry")
        return EXIT_FAILED
    if args.command == "cancel":
        return _report_cancel(await pl.cancel(args.key))
    if args.command == "dlq":
        return await _dlq(pl, args)
    if args.command == "sequence":
        return await cli_sequence.run(pl, args)
    if args.command == "api":
        return await cli_api.run_api(pl, args)
    if args.command == "webhooks":
        return await cli_webhooks.run(pl, args)
    if args.command == "suppressions":
        return await cli_suppressions.run(pl, args)
    if args.command == "top":
        from rich.console import Console

        from postlane.cli.top import run_top

        # Off a terminal (a pipe, a file) one frame is printed wide rather than cut to 80.
        console = Console() if sys.stdout.isatty() else Console(width=200)
        return await run_top(pl, interval=args.interval, once=args.once, console=console)
    if args.command == "lanes":
        if args.lanes_command == "set":
            rate = parse_rate(args.rate)
            await pl.lanes.set_rate(args.name, rate, reason="postlane lanes set")
            print(f"lane {args.name}: rate set to {rate:g}/s")
            return EXIT_OK
        if args.lanes_command == "resume":
            ended = await pl.lanes.resume(args.name, note=args.note)
            print(f"lane {args.name}: resumed (was paused by {ended.by}: {ended.reason})")
            return EXIT_OK
        if args.lanes_command == "pause":
            await pl.lanes.pause(args.name, reason=args.reason)
            print(f"lane {args.name}: pausing ({args.reason})")
            return EXIT_OK
        reports = await pl.lanes.list()
        if args.domains:
            print(cli_routing.format_domains(reports))
            return EXIT_OK
        print(format_lanes(reports))
        for r in reports:  # the reputation guard's pauses, under the table
            if r.status is not None and r.status.paused:
                since = _utc(r.status.paused_at) if r.status.paused_at else "-"
                print(f"PAUSED {r.name} since {since} by {r.status.paused_by}: ", end="")
                print(f"{r.status.pause_reason}  (resume: postlane lanes resume {r.name})")
        return EXIT_OK
    if args.command == "setup":
        from postlane.namespace import ensure_namespace, ensure_search_attributes

        await ensure_namespace(pl.temporal, pl.temporal.namespace)
        await ensure_search_attributes(pl.temporal, pl.temporal.namespace)
        print(f"namespace {pl.temporal.namespace}: ready")
        return EXIT_OK
    raise AssertionError(args.command)  # pragma: no cover


def _report_cancel(result: CancelResult) -> int:
    """Print what ``postlane cancel`` did; exit 0 if cancelled or already sent."""
    key = result.key
    if result.outcome == "cancelled":
        print(f"{key}: already cancelled" if result.already else f"{key}: cancelled")
        return EXIT_OK
    if result.outcome == "sent":
        assert result.receipt is not None
        r = result.receipt
        print(f"{key}: already sent, message {r.message_id} ({r.smtp_reply}); nothing to cancel")
        print(r.model_dump_json(indent=2))
        return EXIT_OK
    if result.outcome == "failed":
        print(f"{key}: already failed ({result.reason}); nothing to cancel")
        return EXIT_FAILED
    print(f"{key}: cancel requested but not confirmed: {result.reason}")
    return EXIT_FAILED


async def _dlq(pl: PostlaneClient, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    since = parse_since(args.since, now) if args.since else None
    if args.dlq_command == "list":
        print(format_dead_letters(await pl.dlq.list(lane=args.lane, since=since), now))
        return EXIT_OK
    if bool(args.keys) == bool(args.all):
        raise InvalidInput("keys", "give KEY... or --all, not both")
    if args.keys and (args.lane or since):
        raise InvalidInput("keys", "--lane and --since select with --all only")
    retry = args.dlq_command == "retry"
    changed_as = "going out again" if retry else "discarded"
    if args.all:
        return await _dlq_batch(pl, args, since)
    keys = args.keys
    bar = ProgressBar(len(keys), f"dlq {args.dlq_command}")
    changed = unchanged = failed = 0
    for key in keys:
        try:
            ok = await (pl.retry(key) if retry else pl.dlq.discard(key))
            result = changed_as if ok else f"unchanged: {await pl.status(key)}"
        except ActionRefused:
            # Not parked (any more): safe to run twice, the second run changes nothing.
            ok, result = False, f"unchanged: {await pl.status(key)}"
            unchanged += 1
        except (PostlaneError, RPCError) as exc:
            ok, result = False, f"error: {type(exc).__name__}: {exc}"
            failed += 1
        else:
            changed += ok
            unchanged += not ok
        bar.step(key, result)
    bar.close()
    print(
        f"{args.dlq_command}: {changed} of {len(keys)} {changed_as}"
        f" ({unchanged} unchanged, {failed} errors)"
    )
    return EXIT_FAILED if failed else EXIT_OK


async def _dlq_batch(pl: PostlaneClient, args: argparse.Namespace, since: datetime | None) -> int:
    """``dlq retry|discard --all``: one server-side batch job, its progress from the server."""
    bar = ProgressBar(0, f"dlq {args.dlq_command}")
    last: list[tuple[int, int, bool]] = []

    def show(p: BatchProgress) -> None:
        seen = (p.total, p.done, p.finished)
        if last and last[-1] == seen:
            return
        last.append(seen)
        bar.advance(p.done + p.failed, f"batch job {p.job_id}: {p.state}", total=p.total)

    run = pl.dlq.retry_all if args.dlq_command == "retry" else pl.dlq.discard_all
    result = await run(lane=args.lane, since=since, on_progress=show)
    bar.close()
    # Counted by the server: each matched email got the signal, which a parked email acts
    # on and any other (no longer parked) ignores.
    print(
        f"{args.dlq_command}: {result.done} of {result.total} parked emails signalled"
        f" ({result.failed} errors)"
    )
    print(f"batch job {result.job_id}: {result.state}")
    return EXIT_FAILED if result.failed or result.state != "completed" else EXIT_OK


def format_dead_letters(reports: Sequence[EmailReport], now: datetime) -> str:
    """The ``postlane dlq list`` table; `now` only words how long each has been parked."""
    rows = [("KEY", "LANE", "RECIPIENTS", "ATTEMPTS", "PARKED SINCE", "LAST REPLY")]
    for r in reports:
        parked = "-"
        if r.parked_at is not None:
            parked = f"{_utc(r.parked_at)} ({format_duration(now - r.parked_at)} ago)"
        rows.append(
            (
                r.key,
                r.lane or "-",
                ", ".join(r.recipients) or "-",
                str(r.attempts),
                parked,
                r.last_error or "",
            )
        )
    return _table(rows)


def format_attempts(report: EmailReport) -> str:
    """``postlane status KEY --attempts``: the email's state, then one row per failed attempt."""
    head = f"{report.key}: {report.status}, lane {report.lane or '-'}"
    lines = [f"{head}, {report.attempts} attempts"]
    if report.parked_at is not None and report.status == "dead_letter":
        lines[0] += f", parked since {_utc(report.parked_at)}"
    rows = [("ATTEMPT", "FAILED AT", "SMTP SERVER", "WORKER", "REPLY")]
    for a in report.attempt_history:
        rows.append((str(a.attempt), _utc(a.at), a.smtp_server or "-", a.worker or "-", a.reply))
    if len(rows) > 1:
        first = report.attempt_history[0].attempt
        if first > 1:
            lines.append(f"(attempts before {first} are no longer kept)")
        lines.append(_table(rows))
    else:
        lines.append("no failed attempts recorded")
    if report.receipt is not None:
        r = report.receipt
        when = _utc(r.sent_at) if r.sent_at else "-"
        lines.append(f"sent on attempt {r.attempts} at {when}: {r.smtp_reply}")
    elif report.last_error and report.status != "dead_letter":
        lines.append(f"last reply: {report.last_error}")
    return "\n".join(lines)


def _utc(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def parse_since(value: str, now: datetime) -> datetime:
    """``30m``, ``2h``, ``3d``, ``1w``, ``1h30m`` before `now`, or an ISO 8601 time (UTC if
    it names no zone) → an aware datetime.

    Raises:
        InvalidInput: anything else (field ``since``).
    """
    text = value.strip()
    with contextlib.suppress(ValueError):
        return now - parse_duration(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            "since", f"{value!r} is neither a duration like 2h, 30m, 3d nor an ISO 8601 time"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _table(rows: Sequence[Sequence[str]]) -> str:
    """`rows` (the first is the header) as plain, aligned columns two spaces apart."""
    table = Table(box=None, pad_edge=False, padding=(0, 1), show_header=True, header_style="")
    for title in rows[0]:
        table.add_column(title, no_wrap=True, overflow="ignore")
    for row in rows[1:]:
        table.add_row(*row)
    # Wide enough never to wrap: the output is read by scripts as much as by people.
    width = sum(max(len(row[i]) for row in rows) + 2 for i in range(len(rows[0])))
    console = Console(width=width, no_color=True, highlight=False, markup=False)
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())


async def _connect(args: argparse.Namespace, settings: Settings) -> PostlaneClient:
    from postlane.client import PostlaneClient

    try:
        return await PostlaneClient.connect(
            args.address, namespace=args.namespace, settings=settings
        )
    except RuntimeError as exc:
        address = args.address or os.environ.get("TEMPORAL_ADDRESS", "localhost:7233")
        raise RuntimeError(f"cannot reach Temporal at {address}: {exc}") from None


def _observability_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at /metrics on this port (default $POSTLANE_METRICS_PORT;"
        " 0: off)",
    )
    p.add_argument(
        "--health-port",
        type=int,
        help="serve /healthz and /readyz on this port (default $POSTLANE_HEALTH_PORT; 0: off)",
    )
    p.add_argument(
        "--metrics-address",
        help="address both bind to (default $POSTLANE_METRICS_ADDRESS or 0.0.0.0)",
    )


async def _worker(args: argparse.Namespace) -> int:
    from postlane.config import load_settings
    from postlane.connection import connect_temporal
    from postlane.logs import configure_logging
    from postlane.sequences.agent import load_agent
    from postlane.worker import run_workers

    configure_logging(json=args.json_logs)
    settings = load_settings()
    agents = [load_agent(spec) for spec in getattr(args, "agent", [])]
    health_server = _serve_observability(args, settings)
    try:
        if args.command == "inbound":
            if not settings.inboxes:
                raise ConfigurationError("no [[inboxes]] configured: nothing to watch")
            client = await connect_temporal(args.address, args.namespace)
            await run_workers(
                client,
                settings,
                workflows=False,
                sends=False,
                inbound=True,
                health=health_server.health if health_server else None,
            )
            return EXIT_OK
        lanes = [n.strip() for n in args.lanes.split(",") if n.strip()] if args.lanes else None
        client = await connect_temporal(args.address, args.namespace)
        await run_workers(
            client,
            settings,
            lanes=lanes,
            workflows=not args.no_workflows,
            inbound=not args.no_inbound,
            agents=agents,
            health=health_server.health if health_server else None,
        )
        return EXIT_OK
    finally:
        if health_server is not None:
            health_server.stop()


def _serve_observability(args: argparse.Namespace, settings: Settings) -> HealthServer | None:
    """Start the metrics exporter (in the SDK runtime, before any client connects) and the
    health server, as the flags or settings say; the health server, if any.

    Raises:
        ConfigurationError: a port out of range or taken.
    """
    import structlog

    from postlane.health import Health, HealthServer
    from postlane.logs import forward_core_logs
    from postlane.metrics import prometheus_config

    address = args.metrics_address or settings.metrics_address
    metrics_port = settings.metrics_port if args.metrics_port is None else args.metrics_port
    health_port = settings.health_port if args.health_port is None else args.health_port
    for field, port in (("metrics_port", metrics_port), ("health_port", health_port)):
        if not 0 <= port <= 65535:
            raise ConfigurationError(f"{field}: {port} is not a port (0-65535; 0: off)")
    log = structlog.get_logger(__name__)
    if metrics_port:
        forward_core_logs(prometheus_config(_host_port(address, metrics_port)))
        log.info("worker.metrics", url=f"http://{_host_port(address, metrics_port)}/metrics")
    if not health_port:
        return None
    try:
        server = HealthServer(Health(), address, health_port).start()
    except OSError as exc:
        raise ConfigurationError(
            f"health_port: cannot serve health on {_host_port(address, health_port)}: {exc}"
        ) from exc
    log.info("worker.health", url=f"http://{_host_port(address, health_port)}/healthz")
    return server


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


async def _exporter(args: argparse.Namespace) -> int:
    from temporalio.client import Client

    from postlane.config import load_settings
    from postlane.connection import connect_temporal
    from postlane.exporter import Exporter
    from postlane.logs import configure_logging

    if not args.interval > 0:
        raise InvalidInput("interval", f"{args.interval:g} must be greater than 0")
    configure_logging(json=args.json_logs)
    settings = load_settings()

    async def connect() -> Client:  # retried every round: serve while Temporal is down
        return await connect_temporal(args.address, args.namespace)

    await Exporter(connect, settings, interval=args.interval).run(args.host, args.port)
    return EXIT_OK


async def _codec_server(args: argparse.Namespace) -> int:
    from postlane.codec_server import CodecServer

    server = CodecServer.from_environment(host=args.host, port=args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with server:
        print(f"postlane codec-server on http://{args.host}:{server.port}", flush=True)
        await stop.wait()
    return EXIT_OK


def _split(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _email_from_args(args: argparse.Namespace) -> tuple[Any, str]:
    from postlane.email.models import Email

    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            raise InvalidEmail("headers", f"{item!r} is not NAME:VALUE")
        headers[name.strip()] = value.strip()
    text = sys.stdin.read() if args.text == "-" else args.text
    email = Email(
        sender=args.sender,
        to=_split(args.to),
        cc=_split(args.cc),
        bcc=_split(args.bcc),
        reply_to=args.reply_to,
        subject=args.subject,
        text=text,
        html=args.html,
        headers=headers,
        tags=_split(args.tag),
    )
    return email, args.key or uuid.uuid4().hex


def _parse_time(value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidEmail("send_at", f"{value!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise InvalidEmail("send_at", f"{value!r} has no time zone; add one, e.g. +00:00")
    return when


_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(value: str) -> float:
    """``5/s``, ``300/m`` or ``1000/h`` (or a bare number of sends per second) → per second.

    Raises:
        ConfigurationError: anything else, or a rate that is not positive.
    """
    number, _, unit = value.strip().partition("/")
    try:
        rate = float(number) / _RATE_UNITS[unit or "s"]
    except (ValueError, KeyError):
        raise ConfigurationError(f"rate: {value!r} is not like 5/s, 300/m or 1000/h") from None
    if rate <= 0:
        raise ConfigurationError(f"rate: {value!r} must be greater than 0")
    return rate


def format_lanes(reports: Sequence[Any]) -> str:
    """The ``postlane lanes`` table."""
    rows = [
        (
            "LANE",
            "RATE/s",
            "NOW/s",
            "BACKPRESSURE",
            "HOUR",
            "DAY",
            "WAITING",
            "NEXT SLOT",
            "BACKLOG",
            "AGE",
            "IN FLIGHT",
        )
    ]
    for r in reports:
        st = r.status
        rows.append(
            (
                r.name,
                f"{st.configured_rate:g}" if st else "-",
                f"{st.effective_rate:g}" if st else "-",
                _backpressure(st) if st else "-",
                f"{st.used_last_hour}/{st.hourly_cap}" if st and st.hourly_cap else "-",
                f"{st.used_last_day}/{st.daily_cap}" if st and st.daily_cap else "-",
                f"{st.waiting} ({st.window} planned)" if st and st.waiting else "0" if st else "-",
                _utc(st.next_slot_at) if st and st.next_slot_at else "-",
                "-" if r.backlog is None else str(r.backlog),
                "-" if r.backlog_age is None else format_duration(r.backlog_age),
                "-" if r.in_flight is None else str(r.in_flight),
            )
        )
    return _table(rows)


def _backpressure(status: Any) -> str:
    """``-``, or why the lane runs below its rate and how high it will recover."""
    if not status.backing_off:
        return "-"
    text = "backing off: " + (status.last_throttle or "")[:30]
    if status.ceiling is not None:
        text += f" (recovers to {status.ceiling:g}/s)"
    return text
