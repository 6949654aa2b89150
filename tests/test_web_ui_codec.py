"""`postlane dev` with encryption on: the Web UI, in a real headless browser, shows an
email decoded through the stack's codec server; the same stored history opened in a Web UI
with no codec endpoint shows only ciphertext."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from temporalio.client import Client

from postlane.client import PostlaneClient
from postlane.config import Settings, dev_lane
from postlane.connection import data_converter
from postlane.dev.binaries import dev_server_path
from postlane.encryption import EncryptionSettings, new_key
from tests.procs import POSTLANE_SCRIPT, REPO_ROOT, assert_eventually, free_port
from tests.test_encryption_at_rest import _email
from tests.test_web_ui import chromium

pytestmark = pytest.mark.devserver


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


@asynccontextmanager
async def bare_dev_server(
    db: Path, env: dict[str, str], logs: Path
) -> AsyncIterator[tuple[int, int]]:
    """A plain dev server (no codec endpoint) on `db`, once its Web UI answers: its gRPC
    and UI ports.

    The ports are free when chosen, but another process can take one before the server
    binds it; the server then exits, and is started again on new ones.
    """
    for attempt in range(3):
        port, ui = free_port(), free_port()
        args = [
            dev_server_path(), "server", "start-dev", "--ip", "127.0.0.1",
            "--port", str(port), "--ui-port", str(ui),
            "--db-filename", str(db), "--log-level", "warn",
        ]  # fmt: skip
        log = logs / f"bare-{attempt}.log"
        with process(args, env, log) as server:

            async def ready(ui: int = ui, server: subprocess.Popen[bytes] = server) -> str | None:
                if server.poll() is not None:
                    return "exited"
                try:
                    await asyncio.to_thread(_get_json, f"http://127.0.0.1:{ui}/api/v1/settings")
                except OSError:
                    return None
                return "up"

            if await assert_eventually(ready, within=60, what="bare Web UI up") == "up":
                yield port, ui
                return
        assert "address already in use" in log.read_text(), log.read_text()
    raise AssertionError("the bare dev server found no free ports in 3 tries")


@pytest.mark.timeout(300)
async def test_web_ui_codec_shows_subject_only_with_codec_endpoint(tmp_path: Path) -> None:
    keys = f"k1:{new_key()}"
    port, ui_port, smtp_port, codec_port = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "POSTLANE_"))}
    env.update(POSTLANE_ENCRYPTION_KEYS=keys, PYTHONUNBUFFERED="1")
    state = tmp_path / "state"
    log = tmp_path / "dev.log"
    email, _ = _email("ui")
    dev = [
        str(POSTLANE_SCRIPT), "dev", "--dir", str(state), "--no-demo",
        "--port", str(port), "--ui-port", str(ui_port), "--smtp-port", str(smtp_port),
        "--codec-port", str(codec_port),
    ]  # fmt: skip
    with process(dev, env, log) as stack:

        async def up() -> bool:
            assert stack.poll() is None, log.read_text()
            return "postlane dev is up" in log.read_text()

        await assert_eventually(up, within=90, what="postlane dev up")
        assert f"codec server http://127.0.0.1:{codec_port}" in log.read_text()
        settings = _get_json(f"http://127.0.0.1:{ui_port}/api/v1/settings")
        endpoint = settings["Codec"]["Endpoint"]  # type: ignore[index]
        assert endpoint.startswith(f"http://127.0.0.1:{codec_port}/")
        token = endpoint.rsplit("/", 1)[1]
        assert token not in log.read_text()  # the stack never prints its token

        client = await Client.connect(
            f"127.0.0.1:{port}",
            namespace="postlane",
            data_converter=data_converter(EncryptionSettings(keys=keys)),  # type: ignore[arg-type]
        )
        pl = PostlaneClient(client, Settings(lanes=[dev_lane(smtp_port)]))
        handle = await pl.send(email, key="ui-codec")
        await asyncio.wait_for(handle.result(), 60)
        page = f"/namespaces/postlane/workflows/{handle.workflow_id}"
        decoded = await asyncio.to_thread(
            chromium, "--dump-dom", f"http://127.0.0.1:{ui_port}{page}"
        )
        assert email.subject in decoded, decoded[-3000:]
        assert email.to[0] in decoded

    # The same database under a bare dev server whose UI has no codec endpoint.
    async with bare_dev_server(state / "temporal.db", env, tmp_path) as (bare_port, bare_ui):
        assert not _get_json(f"http://127.0.0.1:{bare_ui}/api/v1/settings")["Codec"]["Endpoint"]  # type: ignore[index]
        sealed = await asyncio.to_thread(
            chromium, "--dump-dom", f"http://127.0.0.1:{bare_ui}{page}"
        )
        assert handle.workflow_id in sealed  # the page did render the workflow
        # What it shows as the input is the ciphertext the server stores.
        raw = await Client.connect(f"127.0.0.1:{bare_port}", namespace="postlane")
        history = await raw.get_workflow_handle(handle.workflow_id).fetch_history()
        [stored] = history.events[0].workflow_execution_started_event_attributes.input.payloads
        assert stored.metadata["encoding"] == b"binary/encrypted"
        assert base64.b64encode(stored.data).decode()[:60] in sealed
        assert email.subject not in sealed and email.to[0] not in sealed
