"""The HTTP API end to end: ``postlane api`` as a process (uvicorn over HTTPS with a test
CA), httpx as the client, the real dev server, a ``python worker.py`` process and the SMTP
catcher.

What was started is asked of the Temporal server (a refused request leaves no workflow:
describe answers NOT_FOUND); what went out is read from the bytes the catcher received.
The API process reaches Temporal through a TCP relay the in-flight test can hold, so a
request can be caught mid-way for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import trustme
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from postlane.api.keys import KeyStore
from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.dev.catcher import CaughtMessage, SmtpCatcher
from postlane.email.models import RetrySettings
from postlane.ids import email_workflow_id, sequence_workflow_id
from postlane.sequences.models import SequenceStatus
from postlane.testing import catcher_lane
from tests.procs import (
    POSTLANE_SCRIPT,
    REPO_ROOT,
    WorkerProcess,
    assert_eventually,
    free_port,
    lanes_toml,
    postlane_env,
    run_command,
    run_postlane,
)
from tests.test_inbound import simple_reply

pytestmark = pytest.mark.devserver

SENDER = "agent@acme.test"
OPS_SENDER = "alerts@ops.acme.test"
OTHER_SENDER = "agent@other.test"
HELD_DOMAIN = "held.acme.test"
MAX_RECIPIENTS = 5
MAX_BODY = 20_000

TRIAL_SPEC = f"""\
name = "trial"
sender = "{SENDER}"

[[steps]]
type = "send"
id = "first"
subject = "Your trial"
text = "How is it going?"

[[steps]]
type = "wait"
id = "pause"
duration = "1h"

[[steps]]
type = "send"
id = "follow-up"
subject = "Your trial"
text = "Any thoughts?"
"""

OTHER_SPEC = TRIAL_SPEC.replace('name = "trial"', 'name = "other"').replace(SENDER, OTHER_SENDER)


class Relay:
    """A TCP relay to Temporal that can hold what the API sends (`hold`/`release`)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.open = asyncio.Event()
        self.open.set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, gated: bool) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if gated:
                        await self.open.wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        for task in (
            asyncio.create_task(pipe(reader, up_writer, True)),
            asyncio.create_task(pipe(up_reader, writer, False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        self.open.set()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()


@dataclass
class Api:
    """One ``postlane api`` process and what a test needs around it."""

    url: str
    http: httpx.AsyncClient
    pl: PostlaneClient
    smtp: SmtpCatcher
    relay: Relay
    keys: dict[str, str]
    env: dict[str, str]
    ca: Path
    logs: Path
    proc: subprocess.Popen[bytes]
    created: list[str] = field(default_factory=list)

    def auth(self, name: str = "agent") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}

    async def send(
        self, key: str | None, body: Any, *, who: str = "agent", **kw: Any
    ) -> httpx.Response:
        headers = {**self.auth(who), **({"Idempotency-Key": key} if key is not None else {})}
        return await self.http.post("/v1/emails", json=body, headers=headers, **kw)

    async def exists(self, workflow_id: str) -> bool:
        try:
            await self.pl.temporal.get_workflow_handle(workflow_id).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        return True

    def sent_to(self, address: str) -> list[CaughtMessage]:
        return [m for m in self.smtp.messages if address in m.recipients]

    def log_text(self) -> str:
        return "".join(
            (self.logs / name).read_text(errors="replace")
            for name in ("api.out", "api.err", "worker.out", "worker.err")
            if (self.logs / name).exists()
        )


def email_body(to: str, **extra: Any) -> dict[str, Any]:
    return {"sender": SENDER, "to": [to], "subject": "Code", "text": "847291", **extra}


async def create_key(env: dict[str, str], senders: str) -> str:
    rc, out, err = await run_postlane(["api-key", "create", "--senders", senders], env)
    assert rc == 0, err
    [plaintext] = out.split()
    return plaintext


def start_api(env: dict[str, str], logs: Path, port: int, pem: Path) -> subprocess.Popen[bytes]:
    """``postlane api`` over HTTPS on `port`, its output in `logs`."""
    with (logs / "api.out").open("wb") as out, (logs / "api.err").open("wb") as err:
        return subprocess.Popen(
            [
                str(POSTLANE_SCRIPT),
                "api",
                "--port",
                str(port),
                "--ssl-certfile",
                str(pem),
                "--ssl-keyfile",
                str(pem),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )


@pytest_asyncio.fixture(scope="module")
async def api(
    dev_env: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    tmp = tmp_path_factory.mktemp("api")
    logs = tmp / "logs"
    logs.mkdir()
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp / "server.pem")
    ca.cert_pem.write_to_path(tmp / "ca.pem")
    (tmp / "specs").mkdir()
    (tmp / "specs" / "trial.toml").write_text(TRIAL_SPEC)
    (tmp / "specs" / "other.toml").write_text(OTHER_SPEC)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    relay = await Relay(dev_env.client.service_client.config.target_host).start()
    with SmtpCatcher() as smtp:
        lane = catcher_lane(
            LaneConfig(
                name=f"api-{uuid.uuid4().hex[:6]}",
                senders=["*@acme.test", "*@ops.acme.test", "*@other.test"],
                smtp_host="127.0.0.1",
                rate_per_second=50,
                retry=RetrySettings(initial_interval=timedelta_seconds(1)),
            ),
            smtp,
        )
        # A lane only the pause test sends on, so no worker holds a fresh "not paused".
        held = catcher_lane(
            LaneConfig(
                name=f"api-held-{uuid.uuid4().hex[:6]}",
                senders=[f"*@{HELD_DOMAIN}"],
                smtp_host="127.0.0.1",
                rate_per_second=50,
            ),
            smtp,
        )
        config = tmp / "postlane.toml"
        config.write_text(
            lanes_toml([lane, held])
            + "[api]\n"
            + f'keys_file = "{tmp / "keys.json"}"\n'
            + f'public_url = "{url}"\n'
            + f'specs_dir = "{tmp / "specs"}"\n'
            + f"max_body_bytes = {MAX_BODY}\n"
            + f"max_recipients = {MAX_RECIPIENTS}\n"
        )
        address = dev_env.client.service_client.config.target_host
        env = postlane_env(address, config)
        # The way an operator makes one; the others straight in the file (the same code).
        keys = {"agent": await create_key(env, f"{SENDER},*@ops.acme.test")}
        store = KeyStore(tmp / "keys.json")
        for name, senders in (("other", [OTHER_SENDER]), ("any", ["*"]), ("revoked", ["*"])):
            keys[name] = store.create(senders, name=name)[1]
        store.revoke(keys["revoked"].split("_")[1])
        api_env = {**env, "TEMPORAL_ADDRESS": f"127.0.0.1:{relay.port}"}
        proc = start_api(api_env, logs, port, tmp / "server.pem")
        settings = Settings(lanes=[lane, held])
        try:
            with WorkerProcess.start(env, logs, name="worker"):
                async with httpx.AsyncClient(
                    base_url=url, verify=trusting(tmp / "ca.pem"), timeout=30
                ) as http:

                    async def up() -> bool:
                        assert proc.poll() is None, (logs / "api.err").read_text()
                        try:
                            return (await http.get("/healthz")).status_code == 200
                        except httpx.TransportError:
                            return False

                    await assert_eventually(up, within=60, what="postlane api up")
                    yield Api(
                        url=url,
                        http=http,
                        pl=PostlaneClient(dev_env.client, settings),
                        smtp=smtp,
                        relay=relay,
                        keys=keys,
                        env=env,
                        ca=tmp / "ca.pem",
                        logs=logs,
                        proc=proc,
                    )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            await relay.stop()


def timedelta_seconds(n: int) -> Any:
    from datetime import timedelta

    return timedelta(seconds=n)


def trusting(ca: Path) -> ssl.SSLContext:
    """A client TLS context that trusts the test CA only."""
    return ssl.create_default_context(cafile=ca)


def assert_problem(
    response: httpx.Response, status: int, slug: str, field: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["type"] == f"urn:postlane:problem:{slug}"
    assert problem["status"] == status
    assert problem["title"] and problem["detail"]
    assert problem["instance"] == response.request.url.path
    if field is not None:
        assert problem["field"] == field, problem
        assert problem["detail"].startswith(f"{field}: "), problem
    return problem


async def status_of(api: Api, key: str, kind: str = "emails") -> str:
    """The ``status`` that ``GET /v1/{kind}/{key}`` reports."""
    response = await api.http.get(f"/v1/{kind}/{key}", headers=api.auth())
    assert response.status_code == 200, response.text
    return str(response.json()["status"])


async def start_once(
    api: Api, path: str, key: str, body: dict[str, Any], changed: dict[str, Any]
) -> httpx.Response:
    """POST `body` to `path` under Idempotency-Key `key` (202), again (the same answer,
    marked replayed), then `changed` under the same key (422); the first answer."""
    headers = {**api.auth(), "Idempotency-Key": key}
    first = await api.http.post(path, json=body, headers=headers)
    assert first.status_code == 202, first.text
    assert first.headers["Idempotent-Replayed"] == "false"
    again = await api.http.post(path, json=body, headers=headers)
    assert (again.status_code, again.json()) == (202, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"
    conflict = await api.http.post(path, json=changed, headers=headers)
    problem = assert_problem(conflict, 422, "idempotency-conflict", "Idempotency-Key")
    assert key in problem["detail"], problem
    return first


# -- idempotency -----------------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_same_key_same_body_sends_once_another_body_is_422(api: Api) -> None:
    key = f"api-{uuid.uuid4().hex[:10]}"
    to = f"{key}@example.test"
    first = await start_once(
        api, "/v1/emails", key, email_body(to), email_body(to, subject="Another code")
    )
    assert first.headers["Location"] == f"/v1/emails/{key}"
    assert first.json() == {
        "key": key,
        "workflow_id": email_workflow_id(key),
        "status_url": f"/v1/emails/{key}",
    }

    async def sent() -> bool:
        return await status_of(api, key) == "sent"

    await assert_eventually(sent, within=60, what="sent")
    again = await api.send(key, email_body(to))  # after it went out: the same answer
    assert (again.status_code, again.json()) == (202, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"
    changed = await api.send(key, email_body(to, subject="Another code"))
    assert_problem(changed, 422, "idempotency-conflict", "Idempotency-Key")

    report = (await api.http.get(f"/v1/emails/{key}", headers=api.auth())).json()
    assert report["receipt"]["accepted"] == [to]
    [message] = api.sent_to(to)  # once, whatever was asked after
    assert message.message_id == report["receipt"]["message_id"]
    assert message.subject == "Code"


@pytest.mark.timeout(240)
async def test_a_request_in_flight_answers_its_twin_and_refuses_another_body(api: Api) -> None:
    key = f"api-{uuid.uuid4().hex[:10]}"
    to = f"{key}@example.test"
    api.relay.open.clear()  # Temporal stops hearing from the API: the first start hangs
    try:
        first = asyncio.create_task(api.send(key, email_body(to)))

        async def in_flight() -> bool:
            health = await api.http.get("/healthz")
            return bool(health.json()["in_flight"] == 1)

        await assert_eventually(in_flight, within=30, what="the first request in flight")
        twin = asyncio.create_task(api.send(key, email_body(to)))
        other = await api.send(key, email_body(to, subject="Changed"))
        assert_problem(other, 422, "idempotency-conflict", "Idempotency-Key")
        assert not first.done() and not twin.done()
    finally:
        api.relay.open.set()
    one, two = await first, await twin
    assert (one.status_code, two.status_code) == (202, 202), (one.text, two.text)
    assert one.json() == two.json()
    assert one.headers["Idempotent-Replayed"] == "false"
    assert two.headers["Idempotent-Replayed"] == "true"
    await assert_eventually(lambda: len(api.sent_to(to)) >= 1, within=60, what="the catcher got it")
    assert len(api.sent_to(to)) == 1
    assert api.sent_to(to)[0].subject == "Code"


# -- auth and sender scope -------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_wrong_key_is_401_foreign_sender_is_403_and_nothing_starts(api: Api) -> None:
    base = f"api-{uuid.uuid4().hex[:10]}"
    refused: list[str] = []
    good = api.keys["agent"]
    tampered = good[:-1] + ("A" if good[-1] != "A" else "B")
    cases: list[tuple[dict[str, str], dict[str, Any], int, str]] = [
        ({}, email_body("a@example.test"), 401, "unauthorized"),
        ({"Authorization": "Bearer pl_00000000_" + "x" * 43}, email_body("a@x.test"), 401, ""),
        ({"Authorization": "Basic " + "YTpi"}, email_body("a@example.test"), 401, ""),
        (api.auth("revoked"), email_body("a@example.test"), 401, ""),
        ({"Authorization": f"Bearer {tampered}"}, email_body("a@example.test"), 401, ""),
        (api.auth("agent"), {**email_body("a@example.test"), "sender": OTHER_SENDER}, 403, ""),
        (api.auth("other"), email_body("a@example.test"), 403, ""),
    ]
    for i, (headers, body, status, _) in enumerate(cases):
        key = f"{base}-{i}"
        response = await api.http.post(
            "/v1/emails", json=body, headers={**headers, "Idempotency-Key": key}
        )
        if status == 401:
            assert_problem(response, 401, "unauthorized", "Authorization")
            assert response.headers["www-authenticate"].startswith("Bearer")
        else:
            problem = assert_problem(response, 403, "sender-forbidden", "sender")
            assert body["sender"] in problem["detail"]
        refused.append(key)

    # A sequence whose spec sends as a sender outside the key's scope: 403 too.
    seq_key = f"{base}-seq"
    response = await api.http.post(
        "/v1/sequences",
        json={"spec": "other", "recipient": {"address": "zoe@example.test"}},
        headers={**api.auth("agent"), "Idempotency-Key": seq_key},
    )
    assert_problem(response, 403, "sender-forbidden", "spec")

    # Inside the scope: the wildcard domain of the same key works.
    ok_key = f"{base}-ok"
    ok = await api.send(ok_key, {**email_body(f"{ok_key}@example.test"), "sender": OPS_SENDER})
    assert ok.status_code == 202, ok.text

    for key in refused:
        assert not await api.exists(email_workflow_id(key)), key
    assert not await api.exists(sequence_workflow_id(seq_key))
    assert await api.exists(email_workflow_id(ok_key))
    await assert_eventually(
        lambda: bool(api.sent_to(f"{ok_key}@example.test")), within=60, what="the catcher got it"
    )
    for i in range(len(cases)):
        assert not api.sent_to("a@example.test") and not api.sent_to("a@x.test"), i
    text = api.log_text()
    for plaintext in api.keys.values():
        assert plaintext not in text
        assert plaintext.split("_", 2)[2] not in text


# -- problem+json per bad input class --------------------------------------------------------


@pytest.mark.timeout(240)
async def test_every_bad_input_is_a_problem_naming_the_field(api: Api) -> None:
    base = f"api-{uuid.uuid4().hex[:10]}"
    to = f"{base}@example.test"
    auth = api.auth("any")
    keys: list[str] = []

    def k(n: str) -> dict[str, str]:
        keys.append(f"{base}-{n}")
        return {**auth, "Idempotency-Key": f"{base}-{n}"}

    post = api.http.post
    missing = await post("/v1/emails", json=email_body(to), headers=auth)
    assert_problem(missing, 400, "idempotency-key-missing", "Idempotency-Key")

    bad_key = await post(
        "/v1/emails", json=email_body(to), headers={**auth, "Idempotency-Key": "a b"}
    )
    assert_problem(bad_key, 400, "idempotency-key-invalid", "Idempotency-Key")

    malformed = await post(
        "/v1/emails",
        content=b'{"sender": ',
        headers={**k("json"), "content-type": "application/json"},
    )
    assert_problem(malformed, 400, "malformed-body", "body")

    not_object = await post("/v1/emails", json=[1, 2], headers=k("list"))
    assert_problem(not_object, 422, "invalid-input", "body")

    bad_address = await post("/v1/emails", json=email_body("x"), headers=k("addr"))
    problem = assert_problem(bad_address, 422, "invalid-input", "to[0]")
    assert problem["detail"].startswith("to[0]: 'x' is not a valid email address")
    assert problem["errors"] == [{"field": "to[0]", "detail": problem["detail"][7:]}]

    no_sender = {k_: v for k_, v in email_body(to).items() if k_ != "sender"}
    crowd = [f"p{i}@example.test" for i in range(MAX_RECIPIENTS + 1)]
    # (Idempotency-Key suffix, body, status, problem, field, a phrase of the detail)
    cases: list[tuple[str, dict[str, Any], int, str, str, str]] = [
        ("nosender", no_sender, 422, "invalid-input", "sender", ""),
        ("nobody", {**email_body(to), "text": ""}, 422, "invalid-input", "text", ""),
        (
            "hdr",
            {**email_body(to), "headers": {"List-Unsubscribe": "https://x"}},
            422,
            "invalid-input",
            "headers.List-Unsubscribe",
            "",
        ),
        (
            "naive",
            {**email_body(to), "send_at": "2030-01-01T09:00:00"},
            422,
            "invalid-input",
            "send_at",
            "",
        ),
        ("prio", {**email_body(to), "priority": "urgent"}, 422, "invalid-input", "priority", ""),
        (
            "lane",
            {**email_body(to), "sender": "agent@nowhere.test"},
            422,
            "invalid-input",
            "sender",
            "no lane serves",
        ),
        (
            "crowd",
            {**email_body(to), "to": crowd},
            422,
            "invalid-input",
            "to",
            f"limit of {MAX_RECIPIENTS}",
        ),
        # A misspelt field is refused, never ignored: "sendAt" ignored would send at once.
        (
            "sendat",
            {**email_body(to), "sendAt": "2099-01-01T09:00:00+00:00"},
            422,
            "invalid-input",
            "sendAt",
            "did you mean 'send_at'?",
        ),
        ("To", {**email_body(to), "To": [f"x.{to}"]}, 422, "invalid-input", "To", "not a field"),
        (
            "attach",
            {
                **email_body(to),
                "attachments": [{"filename": "a.txt", "content": "aGk=", "contentType": "x/y"}],
            },
            422,
            "invalid-input",
            "attachments[0].contentType",
            "did you mean 'content_type'?",
        ),
        (
            "huge",
            {**email_body(to), "text": "x" * (MAX_BODY + 1)},
            413,
            "body-too-large",
            "body",
            str(MAX_BODY),
        ),
    ]
    for name, body, status, slug, field_name, says in cases:
        response = await post("/v1/emails", json=body, headers=k(name))
        problem = assert_problem(response, status, slug, field_name)
        assert says in problem["detail"], (name, problem)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        yield b'{"sender": "agent@acme.test", "to": ["a@example.test"], "text": "'
        for _ in range(MAX_BODY // 1000 + 1):
            yield b"x" * 1000
        yield b'", "subject": "Big"}'

    chunked = await post(
        "/v1/emails", content=chunks(), headers={**k("chunked"), "content-type": "application/json"}
    )
    assert "content-length" not in chunked.request.headers
    assert_problem(chunked, 413, "body-too-large", "body")

    unknown_spec = await post(
        "/v1/sequences", json={"spec": "nope", "recipient": {"address": to}}, headers=k("spec")
    )
    problem = assert_problem(unknown_spec, 422, "invalid-input", "spec")
    assert "other, trial" in problem["detail"]
    # Specs come from specs_dir only, by the rules the MCP tools use too.
    escape = await post(
        "/v1/sequences",
        json={"spec": "../postlane.toml", "recipient": {"address": to}},
        headers=k("escape"),
    )
    assert (
        "outside the spec directory"
        in assert_problem(escape, 422, "invalid-input", "spec")["detail"]
    )
    bad_recipient = await post(
        "/v1/sequences",
        json={"spec": "trial", "recipient": {"address": "zoe"}},
        headers=k("rcpt"),
    )
    assert_problem(bad_recipient, 422, "invalid-input", "recipient.address")
    misspelt = await post(
        "/v1/sequences",
        json={"spec": "trial", "recipient": {"address": to, "varaibles": {"plan": "pro"}}},
        headers=k("vars"),
    )
    problem = assert_problem(misspelt, 422, "invalid-input", "recipient.varaibles")
    assert "did you mean 'variables'?" in problem["detail"]
    stray = await post(
        "/v1/sequences",
        json={"spec": "trial", "recipient": {"address": to}, "key": "x"},
        headers=k("stray"),
    )
    assert_problem(stray, 422, "invalid-input", "key")
    retry_typo = await post(f"/v1/emails/{base}-none/retry", json={"lanes": "x"}, headers=auth)
    assert_problem(retry_typo, 422, "invalid-input", "lanes")

    assert_problem(await api.http.get(f"/v1/emails/{base}-none", headers=auth), 404, "not-found")
    assert_problem(await api.http.get(f"/v1/sequences/{base}-none", headers=auth), 404, "not-found")
    assert_problem(await api.http.get("/v1/nothing-here", headers=auth), 404, "not-found")
    assert_problem(
        await api.http.post(f"/v1/emails/{base}-none/retry", headers=auth), 404, "not-found"
    )

    for key in keys:
        assert not await api.exists(email_workflow_id(key)), key
        assert not await api.exists(sequence_workflow_id(key)), key
    assert not api.sent_to(to)


# -- sequences: one-click unsubscribe and inbound replies ------------------------------------


async def start_trial(api: Api, key: str, address: str) -> CaughtMessage:
    body = {"spec": "trial", "recipient": {"address": address, "name": "Zoë"}}
    other = {"spec": "trial", "recipient": {"address": f"other.{address}"}}
    response = await start_once(api, "/v1/sequences", key, body, other)
    assert response.json()["workflow_id"] == sequence_workflow_id(key)
    await assert_eventually(
        lambda: bool(api.sent_to(address)), within=60, what="the catcher got it"
    )
    [message] = api.sent_to(address)
    return message


@pytest.mark.timeout(240)
async def test_one_click_unsubscribe_from_the_link_the_mail_carried(api: Api) -> None:
    key = f"api-{uuid.uuid4().hex[:10]}"
    address = f"zoe.{key}@example.test"
    message = await start_trial(api, key, address)

    parsed = message_from_bytes(message.raw)
    assert str(parsed["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    unsubscribe = re.sub(r"\s+", "", str(parsed["List-Unsubscribe"]))
    [link] = re.findall(r"<(https://[^>]+)>", unsubscribe)
    assert link.startswith(f"{api.url}/u/pl1-"), link
    assert key not in link

    # What a mailbox provider does (RFC 8058 3.2), with no API key and no redirects.
    async with httpx.AsyncClient(verify=trusting(api.ca), follow_redirects=False) as provider:
        page = await provider.get(link)  # a link scanner's GET changes nothing
        assert page.status_code == 200 and "One-Click" in page.text
        wrong = await provider.post(link, content=b"", headers={"content-type": "text/plain"})
        assert_problem(wrong, 400, "not-one-click", "body")
        boundless = await provider.post(
            link,
            content=b"List-Unsubscribe=One-Click",
            headers={"content-type": "multipart/form-data"},  # no boundary: unparseable
        )
        assert_problem(boundless, 400, "not-one-click", "body")
        forged = await provider.post(
            link[:-3] + ("a" if link[-3] != "a" else "b") + link[-2:],
            data={"List-Unsubscribe": "One-Click"},
        )
        assert_problem(forged, 404, "not-found")
        assert await status_of(api, key, "sequences") == SequenceStatus.ACTIVE

        response = await provider.post(link, data={"List-Unsubscribe": "One-Click"})
        assert response.status_code == 200, response.text
        assert not response.is_redirect and "location" not in response.headers

    async def unsubscribed() -> bool:
        return await status_of(api, key, "sequences") == SequenceStatus.UNSUBSCRIBED

    await assert_eventually(unsubscribed, within=60, what="unsubscribed")
    assert await api.pl.suppressions.is_suppressed(SENDER, address)
    async with httpx.AsyncClient(verify=trusting(api.ca), follow_redirects=False) as provider:
        again = await provider.post(
            link,
            files={"List-Unsubscribe": (None, "One-Click")},  # multipart, once more
        )
        assert again.status_code == 200, again.text
    assert len(api.sent_to(address)) == 1


@pytest.mark.timeout(240)
async def test_inbound_reply_posted_to_the_api_stops_the_sequence(api: Api) -> None:
    key = f"api-{uuid.uuid4().hex[:10]}"
    address = f"zoe.{key}@example.test"
    message = await start_trial(api, key, address)
    reply = simple_reply(
        f"In-Reply-To: {message.message_id}", message_id=f"<reply-{key}@example.test>"
    )
    unrelated = simple_reply("In-Reply-To: <someone-else@example.test>", message_id="<u@x.test>")

    nothing = await api.http.post(
        "/v1/inbound", content=unrelated, headers={**api.auth(), "content-type": "message/rfc822"}
    )
    assert nothing.status_code == 200 and nothing.json() == {"routed": False, "sequence": None}
    empty = await api.http.post("/v1/inbound", content=b"", headers=api.auth())
    assert_problem(empty, 400, "malformed-body", "body")
    assert await status_of(api, key, "sequences") == SequenceStatus.ACTIVE

    rfc822 = {**api.auth(), "content-type": "message/rfc822"}
    routed = await api.http.post("/v1/inbound", content=reply, headers=rfc822)
    assert routed.status_code == 200, routed.text
    assert routed.json() == {"routed": True, "sequence": key}

    async def replied() -> dict[str, Any] | None:
        report = (await api.http.get(f"/v1/sequences/{key}", headers=api.auth())).json()
        return report if report["status"] == SequenceStatus.REPLIED else None

    report = await assert_eventually(replied, within=60, what="replied")
    assert [r["from_address"] for r in report["replies"]] == ["zoe@example.test"]

    # A provider that delivers its webhook twice: the stopped sequence changes no more.
    again = await api.http.post("/v1/inbound", content=reply, headers=rfc822)
    assert again.status_code == 200, again.text
    report = (await api.http.get(f"/v1/sequences/{key}", headers=api.auth())).json()
    assert report["status"] == SequenceStatus.REPLIED and len(report["replies"]) == 1
    assert len(api.sent_to(address)) == 1  # the follow-up never goes out


# -- the curl example, OpenAPI and the reference ----------------------------------------------


@pytest.mark.timeout(240)
async def test_curl_example_sends_through_a_live_api(api: Api) -> None:
    key = f"curl-{uuid.uuid4().hex[:10]}"
    to = f"{key}@example.test"
    env = {
        **os.environ,
        "POSTLANE_API_URL": api.url,
        "POSTLANE_API_KEY": api.keys["agent"],
        "CURL_CA_BUNDLE": str(api.ca),
        "KEY": key,
        "FROM": SENDER,
        "TO": to,
    }
    rc, out, err = await run_command(["sh", "examples/curl/send.sh"], env, within=90)
    assert rc == 0, out + err
    assert '"status":"sent"' in out.replace(" ", ""), out
    [message] = api.sent_to(to)
    assert message.message.get_content().strip() == "Sent with curl through Postlane's HTTP API."


@pytest.mark.timeout(240)
async def test_openapi_is_served_and_docs_reference_matches_it(api: Api) -> None:
    from postlane.api.reference import render, replace_generated

    document = (await api.http.get("/openapi.json")).json()
    for path in (
        "/v1/emails",
        "/v1/emails/{key}",
        "/v1/emails/{key}/cancel",
        "/v1/emails/{key}/retry",
        "/v1/dead-letters",
        "/v1/sequences",
        "/v1/sequences/{key}",
        "/v1/inbound",
        "/u/{token}",
        "/healthz",
    ):
        assert path in document["paths"], path
    assert "SendEmailRequest" in document["components"]["schemas"]
    docs = await api.http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    current = (REPO_ROOT / "docs" / "api.md").read_text()
    assert replace_generated(current, render(document)) == current, (
        "docs/api.md is out of date: run python -m postlane.api.reference"
    )


@pytest.mark.timeout(240)
async def test_cancel_retry_and_dead_letters_through_the_api(api: Api) -> None:
    key = f"api-{uuid.uuid4().hex[:10]}"
    to = f"{key}@example.test"
    later = await api.send(key, email_body(to, send_at="2099-01-01T09:00:00+00:00"))
    assert later.status_code == 202, later.text

    async def scheduled() -> bool:
        return await status_of(api, key) == "scheduled"

    await assert_eventually(scheduled, within=60, what="scheduled")
    # A key scoped to another sender may read it, but neither stop nor resend it.
    handle = api.pl.temporal.get_workflow_handle(email_workflow_id(key))
    events_before = len([e async for e in handle.fetch_history_events()])
    for action in ("cancel", "retry"):
        foreign = await api.http.post(f"/v1/emails/{key}/{action}", headers=api.auth("other"))
        problem = assert_problem(foreign, 403, "sender-forbidden", "key")
        assert SENDER in problem["detail"], problem
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    assert len([e async for e in handle.fetch_history_events()]) == events_before
    assert await status_of(api, key) == "scheduled"
    missing = await api.http.post("/v1/emails/api-no-such-email/cancel", headers=api.auth("other"))
    assert_problem(missing, 404, "not-found")

    cancelled = await api.http.post(f"/v1/emails/{key}/cancel", headers=api.auth())
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["outcome"] == "cancelled" and not cancelled.json()["already"]
    again = await api.http.post(f"/v1/emails/{key}/cancel", headers=api.auth())
    assert again.json()["outcome"] == "cancelled" and again.json()["already"]
    assert await status_of(api, key) == "cancelled"

    refused = await api.http.post(f"/v1/emails/{key}/retry", headers=api.auth())
    problem = assert_problem(refused, 409, "action-refused")
    assert "cancelled" in problem["detail"]
    assert await status_of(api, key) == "cancelled"

    anonymous = await api.http.get("/v1/dead-letters")
    assert_problem(anonymous, 401, "unauthorized", "Authorization")
    parked = await api.http.get("/v1/dead-letters", headers=api.auth())
    assert parked.status_code == 200 and isinstance(parked.json(), list)
    lane = api.pl.settings.lanes[0].name
    of_lane = await api.http.get(f"/v1/dead-letters?lane={lane}", headers=api.auth())
    assert of_lane.status_code == 200, of_lane.text
    unknown = await api.http.get("/v1/dead-letters?lane=no-such-lane", headers=api.auth())
    problem = assert_problem(unknown, 422, "invalid-input", "lane")
    assert lane in problem["detail"]  # names the lanes there are
    naive = await api.http.get("/v1/dead-letters?since=2020-01-01T00:00:00", headers=api.auth())
    assert_problem(naive, 422, "invalid-input", "since")
    assert not api.sent_to(to)
    api_log = (api.logs / "api.err").read_text() + (api.logs / "api.out").read_text()
    assert "route=/v1/emails/{key:path}/cancel" in api_log  # the route, not the path
    assert f"/v1/emails/{key}" not in api_log


@pytest.mark.timeout(240)
async def test_an_operator_key_pauses_and_resumes_a_lane_and_what_waited_goes_once(
    api: Api,
) -> None:
    held = api.pl.settings.lanes[1].name
    scoped = await api.http.post(f"/v1/lanes/{held}/pause", headers=api.auth())
    assert_problem(scoped, 403, "operator-only", "name")
    status = (await api.pl.lanes.get(held)).status
    assert status is not None and not status.paused  # the refused key changed nothing
    unknown = await api.http.post("/v1/lanes/no-such-lane/pause", headers=api.auth("any"))
    assert_problem(unknown, 404, "not-found")
    not_paused = await api.http.post(f"/v1/lanes/{held}/resume", headers=api.auth("any"))
    assert_problem(not_paused, 409, "action-refused")

    paused = await api.http.post(
        f"/v1/lanes/{held}/pause", json={"reason": "checking a list"}, headers=api.auth("any")
    )
    assert paused.status_code == 200, paused.text
    try:

        async def lane_paused() -> bool:
            status = (await api.pl.lanes.get(held)).status
            return status is not None and status.paused and status.paused_by == "operator"

        await assert_eventually(lane_paused, within=60, what="the lane paused on the server")
        listed = await api.http.get("/v1/lanes", headers=api.auth())
        [row] = [r for r in listed.json() if r["name"] == held]
        assert row["status"]["pause_reason"] == "checking a list"

        key = f"api-{uuid.uuid4().hex[:10]}"
        to = f"{key}@example.test"
        sent = await api.send(key, email_body(to, sender=f"ops@{HELD_DOMAIN}"), who="any")
        assert sent.status_code == 202, sent.text

        async def held_back() -> bool:
            report = await api.pl.describe(key)
            return report.status == "scheduled" and "checking a list" in (report.last_error or "")

        await assert_eventually(held_back, within=60, what="the email held by the paused lane")
        assert not api.sent_to(to)
    finally:
        resumed = await api.http.post(
            f"/v1/lanes/{held}/resume", json={"reason": "list is clean"}, headers=api.auth("any")
        )
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["reason"] == "checking a list"

    async def delivered() -> bool:
        return await status_of(api, key) == "sent"

    await assert_eventually(delivered, within=60, what="sent after the resume")
    [message] = api.sent_to(to)  # once
    receipt = (await api.pl.describe(key)).receipt
    assert receipt is not None and message.message_id == receipt.message_id
