"""``postlane mcp``: Postlane's tools for agents over MCP, on stdio or streamable HTTP.

On stdio (the default) the agent's MCP client starts this command and talks over its
stdin and stdout; the log goes to stderr. With ``--http`` it serves streamable HTTP at
``http://HOST:PORT/mcp``, bound to 127.0.0.1 unless told otherwise; a bearer token from
the environment (``POSTLANE_MCP_TOKEN`` by default) is then required on every request,
and binding anywhere but loopback without one is refused. See docs/mcp.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from postlane.errors import ConfigurationError, InvalidInput

EXIT_OK = 0
DEFAULT_TOKEN_ENV = "POSTLANE_MCP_TOKEN"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub: Any) -> None:
    """Register ``postlane mcp``."""
    p = sub.add_parser(
        "mcp",
        help="serve Postlane's tools to AI agents over MCP (stdio, or streamable HTTP)",
        description="Serve send_email, email_status, list_dead_letters, retry_email, "
        "cancel_email, start_sequence, sequence_status and list_replies as MCP tools "
        "(docs/mcp.md). Stdio by default; --http serves streamable HTTP at /mcp.",
    )
    p.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    p.add_argument("--host", default="127.0.0.1", help="with --http: address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="with --http: port (default 8765)")
    p.add_argument(
        "--token-env",
        default=DEFAULT_TOKEN_ENV,
        metavar="NAME",
        help=f"with --http: the environment variable holding the bearer token clients must "
        f"send (default {DEFAULT_TOKEN_ENV}; unset: no token, loopback only)",
    )
    p.add_argument(
        "--senders",
        action="append",
        default=[],
        metavar="PATTERNS",
        help="the only senders the tools may send as, comma-separated addresses, *@domain "
        "or *, e.g. "
        "'agent@acme.test,*@ops.acme.test' (default: any sender a lane serves)",
    )
    p.add_argument(
        "--specs",
        default=".",
        metavar="DIR",
        help="directory start_sequence reads sequence specs from (default: .)",
    )


async def run(args: argparse.Namespace) -> int:
    """Serve until the client hangs up (stdio) or the process is stopped (HTTP).

    Raises:
        InvalidInput: a bad ``--port``, ``--specs`` or ``--senders``.
        ConfigurationError: ``postlane.toml`` is invalid, or ``--http`` on a non-loopback
            address without a token.
    """
    from postlane.client import PostlaneClient
    from postlane.config import load_settings
    from postlane.logs import configure_logging
    from postlane.mcp_tools import build_server
    from postlane.senders import parse_sender_patterns

    configure_logging()  # stderr: on stdio, stdout carries the protocol alone
    settings = load_settings()
    specs = _spec_dir(args.specs)
    senders = parse_sender_patterns(args.senders) if args.senders else []

    async def connect() -> PostlaneClient:
        return await PostlaneClient.connect(
            args.address, namespace=args.namespace, settings=settings
        )

    server = build_server(connect, settings, senders=senders, spec_dir=specs)
    if not args.http:
        await server.run_stdio_async()
        return EXIT_OK
    return await _serve_http(server, args)


def _spec_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise InvalidInput("specs", f"{value!r} is not a directory")
    return path


async def _serve_http(server: Any, args: argparse.Namespace) -> int:
    import uvicorn

    from postlane.mcp_tools import BearerAuth

    if not 0 < args.port <= 65535:
        raise InvalidInput("port", f"{args.port} is not a port (1-65535)")
    token = os.environ.get(args.token_env, "")
    if not token and args.host not in _LOOPBACK:
        raise ConfigurationError(
            f"host: serving on {args.host} needs a token; set {args.token_env} (docs/mcp.md)"
        )
    app = server.streamable_http_app(host=args.host)
    config = uvicorn.Config(
        BearerAuth(app, token) if token else app,
        host=args.host,
        port=args.port,
        log_level="warning",
        lifespan="on",
    )
    await uvicorn.Server(config).serve()
    return EXIT_OK
