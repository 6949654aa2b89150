"""``postlane api`` (serve the HTTP API with uvicorn) and ``postlane api-key`` (create,
list and revoke the API's keys; docs/api.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from postlane.errors import ConfigurationError

if TYPE_CHECKING:
    from postlane.client import PostlaneClient
    from postlane.config import Settings

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
COMMANDS = ("api", "api-key")


def add_parser(sub: Any) -> None:
    """Register ``postlane api`` and ``postlane api-key``."""
    api = sub.add_parser(
        "api",
        help="serve the HTTP API (send, status, sequences, inbound, one-click unsubscribe)",
        description="Serve Postlane's HTTP API with uvicorn; OpenAPI at /openapi.json, "
        "interactive docs at /docs (docs/api.md).",
    )
    api.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    api.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    api.add_argument("--ssl-keyfile", help="... and this private key (PEM)")
    api.add_argument("--json-logs", action="store_true", help="log one JSON object per line")

    keys = sub.add_parser("api-key", help="API keys of the HTTP API: create, list, revoke")
    keys_sub = keys.add_subparsers(dest="api_key_command", required=True, metavar="SUBCOMMAND")
    create = keys_sub.add_parser(
        "create", help="make a key; prints it once (only its hash is kept)"
    )
    create.add_argument(
        "--senders",
        required=True,
        help="comma-separated senders it may send as: addresses, *@domain, or *",
    )
    create.add_argument("--name", default="", help="a label, e.g. the agent it is for")
    keys_sub.add_parser("list", help="id, name, senders, created, revoked (never the keys)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id")


def run_keys(args: argparse.Namespace, settings: Settings) -> int:
    """``postlane api-key ...``: needs no Temporal."""
    from postlane.api.keys import KeyStore
    from postlane.senders import parse_sender_patterns

    store = KeyStore(settings.api.keys_file)
    if args.api_key_command == "create":
        record, plaintext = store.create(parse_sender_patterns(args.senders), name=args.name)
        print(plaintext)
        print(
            f"key {record.id} may send as {', '.join(record.senders)}; this is the only"
            " time it is shown",
            file=sys.stderr,
        )
        return EXIT_OK
    if args.api_key_command == "list":
        for record in store.keys():
            print(json.dumps(record.model_dump(mode="json", exclude={"sha256"})))
        return EXIT_OK
    record = store.revoke(args.id)
    print(f"key {record.id}: revoked")
    return EXIT_OK


async def run_api(pl: PostlaneClient, args: argparse.Namespace) -> int:
    """``postlane api``: serve until SIGINT or SIGTERM."""
    import uvicorn

    from postlane.api.app import create_app
    from postlane.logs import configure_logging

    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ConfigurationError("ssl: give both --ssl-certfile and --ssl-keyfile, or neither")
    configure_logging(json=args.json_logs)
    app = create_app(pl)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        log_config=None,  # the root logger Postlane configured takes uvicorn's lines
        access_log=False,  # its lines show paths, which carry keys and tokens: api.request
        proxy_headers=False,
        server_header=False,
    )
    server = uvicorn.Server(config)
    await server.serve()
    return EXIT_OK if server.started else EXIT_FAILED
