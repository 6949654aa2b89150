"""`postlane codec-server` over real sockets: tokens, CORS, and Temporal's own CLI using it."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.client import Client

from postlane.client import PostlaneClient
from postlane.codec_server import CodecServer
from postlane.config import Settings
from postlane.dev.binaries import dev_server_path
from postlane.dev.catcher import SmtpCatcher
from postlane.encryption import ENCODING, AesGcmCodec, EncryptionSettings, KeyRing, new_key
from postlane.testing import running_workers
from tests.procs import (
    POSTLANE_SCRIPT,
    REPO_ROOT,
    free_port,
    postlane_env,
    run_command,
    write_config,
)
from tests.test_encryption_at_rest import _email, _keys, dev_server
from tests.test_integration import address_of, new_lane

TOKEN = "t0ken-" + "x" * 26
UI = "http://localhost:8233"
SECRET = b'"Your code is 847291"'


@pytest.fixture
def codec() -> AesGcmCodec:
    return AesGcmCodec(KeyRing({"k1": os.urandom(32)}))


@pytest.fixture
def server(codec: AesGcmCodec) -> Iterator[CodecServer]:
    with CodecServer(codec, token=TOKEN, origins=frozenset({UI}), port=0) as running:
        yield running


def _body(*payloads: Payload) -> bytes:
    return json.dumps(
        {
            "payloads": [
                {
                    "metadata": {k: base64.b64encode(v).decode() for k, v in p.metadata.items()},
                    "data": base64.b64encode(p.data).decode(),
                }
                for p in payloads
            ]
        }
    ).encode()


def _payloads(body: bytes) -> list[Payload]:
    return [
        Payload(
            metadata={k: base64.b64decode(v) for k, v in p.get("metadata", {}).items()},
            data=base64.b64decode(p.get("data", "")),
        )
        for p in json.loads(body)["payloads"]
    ]


def request(
    server: CodecServer, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if body:
            sent.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body or None, headers=sent)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _sealed(codec: AesGcmCodec) -> Payload:
    return codec.encode_payload(Payload(metadata={"encoding": b"json/plain"}, data=SECRET))


def test_codec_server_decodes_with_bearer_token(server: CodecServer, codec: AesGcmCodec) -> None:
    sealed = _sealed(codec)
    status, headers, body = request(
        server,
        "POST",
        "/default/decode",
        _body(sealed, sealed),
        Authorization=f"Bearer {TOKEN}",
        X_Namespace="default",
        Origin=UI,
    )
    assert status == 200
    assert headers["access-control-allow-origin"] == UI
    assert [p.data for p in _payloads(body)] == [SECRET, SECRET]


def test_codec_server_token_in_path_for_browsers(server: CodecServer, codec: AesGcmCodec) -> None:
    status, _, body = request(server, "POST", f"/{TOKEN}/decode", _body(_sealed(codec)))
    assert status == 200
    assert [p.data for p in _payloads(body)] == [SECRET]


def test_codec_server_encodes(server: CodecServer, codec: AesGcmCodec) -> None:
    plain = Payload(metadata={"encoding": b"json/plain"}, data=SECRET)
    status, _, body = request(
        server, "POST", "/encode", _body(plain), Authorization=f"Bearer {TOKEN}"
    )
    assert status == 200
    [sealed] = _payloads(body)
    assert sealed.metadata["encoding"] == ENCODING and SECRET not in sealed.data
    assert codec.decode_payload(sealed) == plain


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/decode", {}),
        ("/decode", {"Authorization": "Bearer wrong-token-wrong-token"}),
        ("/decode", {"Authorization": f"Bearer {TOKEN[:-1]}"}),
        ("/decode", {"Authorization": TOKEN}),  # not a bearer credential
        ("/wrong-token-wrong-token/decode", {}),
        (f"/{TOKEN}x/decode", {}),
    ],
)
def test_codec_server_refuses_missing_or_wrong_token(
    server: CodecServer, codec: AesGcmCodec, path: str, headers: dict[str, str]
) -> None:
    status, _, body = request(server, "POST", path, _body(_sealed(codec)), Origin=UI, **headers)
    assert status == 401
    assert SECRET not in body


def test_codec_server_cors_preflight_for_the_ui_only(server: CodecServer) -> None:
    status, headers, _ = request(
        server,
        "OPTIONS",
        "/decode",
        Origin=UI,
        Access_Control_Request_Method="POST",
        Access_Control_Request_Headers="content-type,x-namespace",
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == UI
    assert {"content-type", "x-namespace"} <= set(
        headers["access-control-allow-headers"].split(",")
    )
    status, headers, _ = request(
        server,
        "OPTIONS",
        "/decode",
        Origin="http://evil.test",
        Access_Control_Request_Method="POST",
    )
    assert status == 403
    assert not [h for h in headers if h.startswith("access-control-")]


def test_codec_server_refuses_wrong_origin_even_with_token(
    server: CodecServer, codec: AesGcmCodec
) -> None:
    status, headers, body = request(
        server,
        "POST",
        "/decode",
        _body(_sealed(codec)),
        Authorization=f"Bearer {TOKEN}",
        Origin="http://localhost:8234",
    )
    assert status == 403
    assert not [h for h in headers if h.startswith("access-control-")]
    assert SECRET not in body


def test_codec_server_rejects_tampered_payload(server: CodecServer, codec: AesGcmCodec) -> None:
    sealed = _sealed(codec)
    tampered = Payload(metadata=dict(sealed.metadata), data=sealed.data[:-1] + b"\x00")
    status, _, body = request(
        server, "POST", "/decode", _body(tampered), Authorization=f"Bearer {TOKEN}"
    )
    assert status == 400
    assert b"failed authentication" in body


def test_codec_server_needs_a_long_token(codec: AesGcmCodec) -> None:
    with pytest.raises(ValueError, match="POSTLANE_CODEC_TOKEN"):
        CodecServer(codec, token="short", origins=frozenset({UI}), port=0)


async def test_codec_server_cli_refuses_without_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTLANE_")}
    env["POSTLANE_ENCRYPTION_KEYS"] = f"k1:{new_key()}"
    rc, _, err = await run_command([str(POSTLANE_SCRIPT), "codec-server", "--port", "0"], env)
    assert rc == 2
    assert "POSTLANE_CODEC_TOKEN" in err


def _shown(out: str) -> str:
    """What `temporal workflow show -o json` printed, with every payload's data decoded."""
    if not out.strip():
        return ""
    texts = [out]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, str) and "metadata" in node:
                texts.append(base64.b64decode(data).decode("utf-8", "replace"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(out))
    return "\n".join(texts)


@pytest.mark.devserver
@pytest.mark.timeout(180)
async def test_codec_server_decodes_history_for_temporal_cli(tmp_path: Any) -> None:
    """`postlane codec-server` (the console script) lets `temporal workflow show` read an
    encrypted email's history, and only with the token."""
    keys = _keys(k1=new_key())
    async with dev_server(EncryptionSettings(keys=keys)) as env:  # type: ignore[arg-type]
        with SmtpCatcher() as smtp:
            settings = Settings(lanes=[new_lane(smtp)])
            email, _ = _email("cli")
            async with running_workers(env, settings):
                handle = await PostlaneClient(env.client, settings).send(email, key="codec-cli")
                await handle.result()
        # The CLI reads it with the keys, and without them says which setting is missing.
        cli_env = postlane_env(
            address_of(env), write_config(tmp_path / "postlane.toml", settings.lanes)
        )
        rc, out, err = await run_command(
            [str(POSTLANE_SCRIPT), "status", "codec-cli"],
            {**cli_env, "POSTLANE_ENCRYPTION_KEYS": keys},
        )
        assert rc == 0, err
        assert json.loads(out)["subject"] == email.subject
        rc, out, err = await run_command([str(POSTLANE_SCRIPT), "status", "codec-cli"], cli_env)
        assert rc == 1
        assert err.strip().splitlines() == [
            "error: PayloadDecryptionError: payload sealed with key 'k1', and this process has"
            " no keys: set POSTLANE_ENCRYPTION_KEYS or POSTLANE_ENCRYPTION_KEY_FILE"
        ]
        port = free_port()
        server_env = postlane_env(
            address_of(env),
            tmp_path / "none.toml",
            POSTLANE_ENCRYPTION_KEYS=keys,
            POSTLANE_CODEC_TOKEN=TOKEN,
        )
        proc = await asyncio.create_subprocess_exec(
            str(POSTLANE_SCRIPT),
            "codec-server",
            "--port",
            str(port),
            cwd=REPO_ROOT,
            env=server_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert f":{port}" in line.decode()
            show = [
                dev_server_path(),
                "workflow",
                "show",
                "--address",
                address_of(env),
                "--namespace",
                env.client.namespace,
                "--workflow-id",
                "email:codec-cli",
                "--output",
                "json",
            ]
            codec_flags = ["--codec-endpoint", f"http://127.0.0.1:{port}"]
            bare_env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}
            rc, out, err = await run_command(
                [*show, *codec_flags, "--codec-auth", f"Bearer {TOKEN}"], bare_env
            )
            assert rc == 0, err
            text = _shown(out)
            assert email.subject in text and email.to[0] in text
            rc, out, _ = await run_command(show, bare_env)
            assert rc == 0
            assert email.subject not in _shown(out) and email.to[0] not in _shown(out)
            rc, out, _ = await run_command(
                [*show, *codec_flags, "--codec-auth", "Bearer wrong-token-wrong"], bare_env
            )
            assert email.subject not in _shown(out)
        finally:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 30)
        assert proc.returncode == 0
        # The bare client sees the sealed start input too (the ground truth above).
        bare = await Client.connect(address_of(env), namespace=env.client.namespace)
        history = await bare.get_workflow_handle("email:codec-cli").fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        assert started.input.payloads[0].metadata["encoding"] == ENCODING
