"""``postlane mcp``: the MCP SDK's own client drives the real command, over stdio (a
subprocess it starts) and over streamable HTTP, against the dev server, a worker and a
real SMTP server. Assertions are on the raw bytes the SMTP server received and on the
workflows the Temporal server holds, not on what the tools say about themselves.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult
from temporalio.client import Client as TemporalClient
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from postlane.client import PostlaneClient
from postlane.config import LaneConfig, RouteConfig, Settings
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import Email, EmailStatus, RetrySettings
from postlane.mcp_tools import TOOL_NAMES
from postlane.testing import running_workers
from tests.procs import (
    POSTLANE_SCRIPT,
    REPO_ROOT,
    assert_eventually,
    free_port,
    postlane_env,
    run_postlane,
    write_config,
)
from tests.test_integration import address_of, new_lane
from tests.test_sequence_cli import SPEC, eve_replies

pytestmark = pytest.mark.devserver

SENDER = "agent@it.test"


def mcp_env(dev_env: WorkflowEnvironment, tmp_path: Path, lane: LaneConfig) -> dict[str, str]:
    return postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))


@contextlib.asynccontextmanager
async def stdio_mcp(env: dict[str, str], tmp_path: Path, *args: str) -> AsyncIterator[Client]:
    """The SDK's client, having started ``postlane mcp *args`` over stdio."""
    params = StdioServerParameters(
        command=str(POSTLANE_SCRIPT), args=["mcp", *args], env=env, cwd=str(tmp_path)
    )
    with (tmp_path / "mcp.err").open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=60) as client:
            yield client


def ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def problem(result: CallToolResult) -> dict[str, Any]:
    assert result.is_error, result.structured_content
    assert result.structured_content is not None, result.content
    return result.structured_content


async def workflow_exists(client: TemporalClient, workflow_id: str) -> bool:
    try:
        await client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


async def runs_of(client: TemporalClient, workflow_id: str) -> int:
    """How many executions the server has for this workflow ID (visibility)."""

    async def listed() -> int:
        found = [w async for w in client.list_workflows(f'WorkflowId="{workflow_id}"')]
        return len(found)

    return await assert_eventually(listed, within=20, what=f"{workflow_id} in visibility")


def an_email(key: str, **fields: Any) -> dict[str, Any]:
    return {
        "key": key,
        "sender": SENDER,
        "to": ["bob@example.test"],
        "subject": "Your code",
        "text": "847291",
        **fields,
    }


@pytest.mark.timeout(180)
async def test_mcp_stdio_sends_once_per_key_and_reports_status(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, senders=["*@it.test"])
        env = mcp_env(dev_env, tmp_path, lane)
        key = f"mcp-{uuid.uuid4().hex[:10]}"
        async with (
            running_workers(dev_env, Settings(lanes=[lane])),
            stdio_mcp(env, tmp_path) as mcp,
        ):
            listed = {tool.name: tool for tool in (await mcp.list_tools()).tools}
            assert sorted(listed) == sorted(TOOL_NAMES)
            assert {"key", "sender", "to", "subject"} <= set(
                listed["send_email"].input_schema["required"]
            )
            for name in ("email_status", "retry_email", "cancel_email", "sequence_status"):
                assert listed[name].input_schema["required"] == ["key"], name
            assert {"spec", "to"} <= set(listed["start_sequence"].input_schema["required"])
            for tool in listed.values():
                assert tool.description and len(tool.description) > 80, tool.name
                assert tool.output_schema is not None, tool.name
                assert tool.input_schema["additionalProperties"] is False, tool.name
            key_help = listed["send_email"].input_schema["properties"]["key"]["description"]
            assert "never sends twice" in key_help
            status_out = listed["email_status"].output_schema or {}
            assert status_out["properties"]["key"]["description"] == "The email's idempotency key."

            sent = ok(await mcp.call_tool("send_email", an_email(key)))
            assert sent["key"] == key and sent["workflow_id"] == f"email:{key}"
            assert sent["duplicate"] is False

            [caught] = await assert_eventually(lambda: smtp.messages, within=60, what="delivery")
            raw = message_from_bytes(caught.raw, policy=policy.SMTP)
            assert caught.sender == SENDER and caught.recipients == ["bob@example.test"]
            assert raw["From"] == SENDER and raw["To"] == "bob@example.test"
            assert raw["Subject"] == "Your code"
            assert raw.get_content().strip() == "847291"

            async def status_sent() -> dict[str, Any] | None:
                report = ok(await mcp.call_tool("email_status", {"key": key}))
                return report if report["status"] == "sent" else None

            report = await assert_eventually(status_sent, within=60, what="status sent")
            assert report["receipt"]["message_id"] == raw["Message-ID"]
            assert report["receipt"]["accepted"] == ["bob@example.test"]

            # The same key again: nothing new is sent, the tool says so.
            again = ok(await mcp.call_tool("send_email", an_email(key)))
            assert again["duplicate"] is True and again["status"] == "sent"
            # The same key with other content is refused, naming the key.
            conflict = problem(await mcp.call_tool("send_email", an_email(key, subject="Another")))
            assert conflict["error"] == "IdempotencyConflict" and conflict["field"] == "key"
            assert len(smtp.messages) == 1
            assert await runs_of(dev_env.client, f"email:{key}") == 1

            # A bad address: a tool error naming the field, and nothing on the server.
            bad_key = f"mcp-bad-{uuid.uuid4().hex[:8]}"
            result = await mcp.call_tool("send_email", an_email(bad_key, to=["x"]))
            bad = problem(result)
            assert bad["field"] == "to[0]" and bad["error"] == "InvalidEmail"
            assert result.content[0].text.startswith("to[0]: 'x' is not a valid email address")  # type: ignore[union-attr]
            assert not await workflow_exists(dev_env.client, f"email:{bad_key}")
            # A schema violation (a string for a list) is a tool error naming the field too.
            wrong = problem(await mcp.call_tool("send_email", an_email(bad_key, to="bob")))
            assert wrong["field"] == "to"
            missing = problem(await mcp.call_tool("email_status", {"key": bad_key}))
            assert missing["error"] == "EmailNotFound" and missing["field"] == "key"
            assert not await workflow_exists(dev_env.client, f"email:{bad_key}")
            # A misspelt argument is refused, naming it: not dropped (sendAt ignored would
            # send at once).
            later = "2099-01-01T09:00:00+00:00"
            misspelt = problem(await mcp.call_tool("send_email", an_email(bad_key, sendAt=later)))
            assert misspelt["error"] == "InvalidInput" and misspelt["field"] == "sendAt"
            assert "did you mean 'send_at'?" in misspelt["reason"]
            stray = problem(await mcp.call_tool("list_dead_letters", {"lanes": lane.name}))
            assert stray["field"] == "lanes"
            assert not await workflow_exists(dev_env.client, f"email:{bad_key}")

            # The server survived every error: still answers, and nothing of this lane parked.
            assert ok(await mcp.call_tool("list_dead_letters", {"lane": lane.name})) == {
                "count": 0,
                "emails": [],
            }
        assert len(smtp.messages) == 1


@pytest.mark.timeout(180)
async def test_mcp_cancel_and_sender_scope(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, senders=["*@it.test"])
        env = mcp_env(dev_env, tmp_path, lane)
        later = f"mcp-later-{uuid.uuid4().hex[:8]}"
        outside = f"mcp-outside-{uuid.uuid4().hex[:8]}"
        async with (
            running_workers(dev_env, Settings(lanes=[lane])),
            stdio_mcp(env, tmp_path, "--senders", "agent@it.test") as mcp,
        ):
            scheduled = ok(
                await mcp.call_tool(
                    "send_email", an_email(later, send_at="2099-01-01T09:00:00+01:00")
                )
            )
            assert scheduled["status"] == "scheduled"
            assert scheduled["send_at"].startswith("2099-01-01T08:00:00")
            cancelled = ok(await mcp.call_tool("cancel_email", {"key": later}))
            assert cancelled["outcome"] == "cancelled"
            assert ok(await mcp.call_tool("email_status", {"key": later}))["status"] == "cancelled"
            refused = problem(await mcp.call_tool("retry_email", {"key": later}))
            assert refused["error"] == "ActionRefused" and refused["field"] == "key"

            # --senders: another sender a lane serves is still refused, before anything starts.
            scoped = problem(
                await mcp.call_tool("send_email", an_email(outside, sender="ops@it.test"))
            )
            assert scoped["error"] == "SenderNotAllowed" and scoped["field"] == "sender"
            assert not await workflow_exists(dev_env.client, f"email:{outside}")

            # The display-name form of an allowed sender is the allowed sender.
            named = f"mcp-named-{uuid.uuid4().hex[:8]}"
            later_named = an_email(
                named, sender="Agent <agent@it.test>", send_at="2099-01-01T00:00:00Z"
            )
            assert ok(await mcp.call_tool("send_email", later_named))["status"] == "scheduled"
            assert ok(await mcp.call_tool("cancel_email", {"key": named}))["outcome"] == "cancelled"

            # Nor may it stop (or retry) an email someone else sent as another sender.
            theirs = f"mcp-theirs-{uuid.uuid4().hex[:8]}"
            pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
            await pl.send(
                Email(sender="ops@it.test", to=["ann@example.test"], subject="S", text="T"),
                key=theirs,
                send_at=datetime(2099, 1, 1, tzinfo=UTC),
            )
            for tool in ("cancel_email", "retry_email"):
                denied = problem(await mcp.call_tool(tool, {"key": theirs}))
                assert denied["error"] == "SenderNotAllowed" and denied["field"] == "key"
            assert await pl.status(theirs) == EmailStatus.SCHEDULED
            await pl.cancel(theirs)
        assert smtp.messages == []


@pytest.mark.timeout(180)
async def test_mcp_dead_letter_listed_then_retried_to_a_corrected_address(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(
            smtp,
            senders=["*@it.test"],
            retry=RetrySettings(initial_interval=timedelta(seconds=1), maximum_attempts=2),
        )
        env = mcp_env(dev_env, tmp_path, lane)
        key = f"mcp-dlq-{uuid.uuid4().hex[:8]}"
        smtp.fail("rcpt", "451 4.3.0 mailbox temporarily unavailable", times=2)
        async with (
            running_workers(dev_env, Settings(lanes=[lane])),
            stdio_mcp(env, tmp_path) as mcp,
        ):
            ok(await mcp.call_tool("send_email", an_email(key)))

            async def parked() -> dict[str, Any] | None:
                listed = ok(await mcp.call_tool("list_dead_letters", {"lane": lane.name}))
                return listed if listed["count"] else None

            listed = await assert_eventually(parked, within=60, what="dead-lettered")
            [email] = listed["emails"]
            assert email["key"] == key and email["status"] == "dead_letter"
            assert email["attempts"] == 2 and "451 4.3.0" in email["last_error"]
            assert smtp.messages == []
            unknown = problem(await mcp.call_tool("list_dead_letters", {"lane": "nope"}))
            assert unknown["field"] == "lane"

            retried = ok(
                await mcp.call_tool("retry_email", {"key": key, "to": ["bob.new@example.test"]})
            )
            assert retried["retried"] is True
            [caught] = await assert_eventually(lambda: smtp.messages, within=60, what="resent")
            assert caught.recipients == ["bob.new@example.test"]
            assert caught.header("To") == "bob.new@example.test"

            async def sent() -> bool:
                report = ok(await mcp.call_tool("email_status", {"key": key}))
                return bool(report["status"] == "sent")

            await assert_eventually(sent, within=60, what="status sent")
            again = problem(await mcp.call_tool("retry_email", {"key": key}))
            assert again["error"] == "ActionRefused" and "sent" in again["reason"]

            async def none_parked() -> bool:  # visibility catches up with the send
                listed = ok(await mcp.call_tool("list_dead_letters", {"lane": lane.name}))
                return bool(listed["count"] == 0)

            await assert_eventually(none_parked, within=30, what="no dead letter listed")
        assert len(smtp.messages) == 1


@pytest.mark.timeout(180)
async def test_mcp_dead_letters_beyond_the_limit_shows_the_longest_parked(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(
            smtp,
            senders=["*@it.test"],
            retry=RetrySettings(initial_interval=timedelta(seconds=1), maximum_attempts=1),
        )
        env = mcp_env(dev_env, tmp_path, lane)
        keys = [f"mcp-dlq{n}-{uuid.uuid4().hex[:8]}" for n in range(3)]
        smtp.fail("rcpt", "451 4.3.0 mailbox temporarily unavailable", times=len(keys))
        async with (
            running_workers(dev_env, Settings(lanes=[lane])),
            stdio_mcp(env, tmp_path) as mcp,
        ):
            # One after the other, so they park in this order (the server lists the
            # newest started first).
            for n, key in enumerate(keys, start=1):
                ok(await mcp.call_tool("send_email", an_email(key)))

                async def parked(n: int = n) -> dict[str, Any] | None:
                    listed = ok(
                        await mcp.call_tool("list_dead_letters", {"lane": lane.name, "limit": 5})
                    )
                    return listed if listed["count"] == n else None

                await assert_eventually(parked, within=60, what=f"{n} dead-lettered")

            pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
            stamps = {r.key: r.parked_at for r in await pl.dlq.list(lane=lane.name)}
            assert (
                sorted(stamps, key=lambda k: stamps[k] or datetime.max.replace(tzinfo=UTC)) == keys
            )
            listed = ok(await mcp.call_tool("list_dead_letters", {"lane": lane.name, "limit": 2}))
            assert listed["count"] == 3
            assert [e["key"] for e in listed["emails"]] == keys[:2]
            assert [e["status"] for e in listed["emails"]] == ["dead_letter"] * 2
            for key in keys:
                await pl.cancel(key)
        assert smtp.messages == []


@pytest.mark.timeout(180)
async def test_mcp_sends_as_a_sender_only_a_route_serves(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, senders=["*@it.test"])
        routed = "news@routed.test"  # no lane's senders match it; a [[routes]] rule does
        config = write_config(tmp_path / "postlane.toml", [lane])
        with config.open("a") as out:
            out.write(f'[[routes]]\nlane = "{lane.name}"\nsender = "{routed}"\n')
        env = postlane_env(address_of(dev_env), config)
        settings = Settings(lanes=[lane], routes=[RouteConfig(lane=lane.name, sender=routed)])
        key = f"mcp-routed-{uuid.uuid4().hex[:8]}"
        nowhere = f"mcp-nowhere-{uuid.uuid4().hex[:8]}"
        async with (
            running_workers(dev_env, settings),
            stdio_mcp(env, tmp_path) as mcp,
        ):
            sent = ok(await mcp.call_tool("send_email", an_email(key, sender=routed)))
            assert sent["duplicate"] is False
            [caught] = await assert_eventually(lambda: smtp.messages, within=60, what="sent")
            assert caught.sender == routed and caught.recipients == ["bob@example.test"]
            # A sender neither a route nor a lane serves is still refused, naming it.
            unknown = problem(
                await mcp.call_tool("send_email", an_email(nowhere, sender="a@nowhere.test"))
            )
            assert unknown["error"] == "UnknownSender" and unknown["field"] == "sender"
            assert not await workflow_exists(dev_env.client, f"email:{nowhere}")
        assert len(smtp.messages) == 1


@pytest.mark.timeout(180)
async def test_mcp_sequence_tools_show_the_reply(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, senders=["*@it.test"])
        settings = Settings(lanes=[lane])
        env = mcp_env(dev_env, tmp_path, lane)
        name = f"camp-{uuid.uuid4().hex[:6]}"
        specs = tmp_path / "specs"
        specs.mkdir()
        (specs / "outreach.toml").write_text(SPEC.format(name=name))
        pl = PostlaneClient(dev_env.client, settings)
        async with (
            running_workers(dev_env, settings),
            stdio_mcp(env, tmp_path, "--specs", str(specs)) as mcp,
        ):
            # A template variable missing: nothing starts, the field is named.
            missing = problem(
                await mcp.call_tool("start_sequence", {"spec": name, "to": "eve@example.test"})
            )
            assert "company" in missing["reason"], missing
            key = f"{name}:eve@example.test"
            assert not await workflow_exists(dev_env.client, f"sequence:{key}")
            escape = problem(
                await mcp.call_tool(
                    "start_sequence", {"spec": "../postlane.toml", "to": "eve@example.test"}
                )
            )
            assert escape["field"] == "spec"

            enroll = {
                "spec": name,
                "to": "eve@example.test",
                "name": "Eve",
                "variables": {"company": "Umbra"},
            }
            started = ok(await mcp.call_tool("start_sequence", enroll))
            assert started["key"] == key and started["created"] is True
            again = ok(await mcp.call_tool("start_sequence", {**enroll, "spec": "outreach.toml"}))
            assert again["key"] == key and again["created"] is False

            async def waiting() -> dict[str, Any] | None:
                report = ok(await mcp.call_tool("sequence_status", {"key": key}))
                return report if report["step"] == "wait" else None

            await assert_eventually(waiting, within=60, what="intro sent, waiting for a reply")
            [intro] = smtp.messages
            assert intro.header("Subject") == "A note for Umbra"
            assert ok(await mcp.call_tool("list_replies", {"key": key}))["replies"] == []

            reply = eve_replies(intro, "<reply-mcp@example.test>", "Yes, Monday works.")
            assert await pl.sequences.record_reply(reply) == key

            async def replied() -> dict[str, Any] | None:
                found = ok(await mcp.call_tool("list_replies", {"key": key}))
                return found if found["replies"] else None

            found = await assert_eventually(replied, within=60, what="the reply listed")
            [r] = found["replies"]
            assert r["from_address"] == "eve@example.test"
            assert r["message_id"] == "<reply-mcp@example.test>"
            assert "Monday" in r["text"]
            assert found["status"] == "replied"
        assert len(smtp.messages) == 1


@contextlib.contextmanager
def mcp_http(env: dict[str, str], tmp_path: Path, port: int) -> Any:
    with (tmp_path / "mcp-http.err").open("wb") as err:
        proc = subprocess.Popen(
            [str(POSTLANE_SCRIPT), "mcp", "--http", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


@pytest.mark.timeout(180)
async def test_mcp_streamable_http_needs_the_token(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, senders=["*@it.test"])
        env = {**mcp_env(dev_env, tmp_path, lane), "POSTLANE_MCP_TOKEN": token}
        key = f"mcp-http-{uuid.uuid4().hex[:8]}"
        async with running_workers(dev_env, Settings(lanes=[lane])):
            with mcp_http(env, tmp_path, port) as proc:

                async def refused_without_token() -> int:
                    assert proc.poll() is None, (tmp_path / "mcp-http.err").read_text()
                    try:
                        async with httpx.AsyncClient() as http:
                            response = await http.post(url, json={})
                    except httpx.TransportError:
                        return 0
                    return response.status_code

                assert await assert_eventually(refused_without_token, within=60) == 401
                async with httpx.AsyncClient() as http:
                    wrong = await http.post(url, json={}, headers={"Authorization": "Bearer no"})
                assert wrong.status_code == 401

                headers = {"Authorization": f"Bearer {token}"}
                async with (
                    httpx2.AsyncClient(headers=headers) as authed,
                    Client(streamable_http_client(url, http_client=authed)) as mcp,
                ):
                    tools = (await mcp.list_tools()).tools
                    assert sorted(t.name for t in tools) == sorted(TOOL_NAMES)
                    sent = ok(await mcp.call_tool("send_email", an_email(key)))
                    assert sent["duplicate"] is False
                    [caught] = await assert_eventually(
                        lambda: smtp.messages, within=60, what="delivery over HTTP"
                    )
                    assert caught.header("Subject") == "Your code"
                    again = ok(await mcp.call_tool("send_email", an_email(key)))
                    assert again["duplicate"] is True
                    bad = problem(await mcp.call_tool("send_email", an_email("a b")))
                    assert bad["field"] == "key"
        assert len(smtp.messages) == 1


@pytest.mark.timeout(60)
async def test_mcp_refuses_an_open_http_bind_without_a_token(tmp_path: Path) -> None:
    env = postlane_env("127.0.0.1:1", write_config(tmp_path / "postlane.toml", [new_lane()]))
    args = ["mcp", "--http", "--host", "0.0.0.0", "--port", str(free_port())]
    rc, out, err = await run_postlane(args, env)
    assert rc == 2, (out, err)
    assert "host: serving on 0.0.0.0 needs a token; set POSTLANE_MCP_TOKEN" in err
    rc, out, err = await run_postlane(["mcp", "--specs", str(tmp_path / "none")], env)
    assert rc == 2 and "specs: " in err, (out, err)


@pytest.mark.timeout(90)
async def test_mcp_without_temporal_answers_tool_errors_and_stays_up(tmp_path: Path) -> None:
    lane = new_lane()
    refused = postlane_env(f"127.0.0.1:{free_port()}", write_config(tmp_path / "pl.toml", [lane]))
    async with stdio_mcp(refused, tmp_path) as mcp:
        assert len((await mcp.list_tools()).tools) == len(TOOL_NAMES)
        for _ in range(2):  # connects again on every call, and still answers
            down = problem(await mcp.call_tool("send_email", an_email("k-1")))
            assert down["error"] == "Unavailable" and down["field"] == "temporal"
            assert "connect" in down["reason"]
        # Bad input is refused before any connection is tried.
        bad = problem(await mcp.call_tool("send_email", an_email("k-1", send_at="tomorrow")))
        assert bad["field"] == "send_at"
