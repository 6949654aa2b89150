"""A client in another language: the TypeScript example (examples/typescript) run with node.

It starts ``SendEmail`` with nothing but ``@temporalio/client`` and the contract in
docs/contract.md, against a real dev server and a real ``python worker.py``. The workers,
not the caller, decide the lane, its retry policy and its caps; bad input ends the email at
once as ``failed`` with a typed reason; the email is as visible (search attributes, memo)
as one the Python client sent, and a Python send with the same key and content finds it.

The example is installed (``npm ci``) and compiled by ``make test`` before the tests run:
`make examples/typescript/dist/send.js`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistory
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from postlane import search_attributes as sa
from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.connection import data_converter
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import DeliveryReceipt, Email, EmailStatus, RetrySettings
from postlane.errors import IdempotencyConflict, InvalidEmail
from postlane.idempotency import CONTENT_HASH
from postlane.ids import WORKFLOW_TASK_QUEUE, email_workflow_id
from postlane.testing import PostlaneTestEnv, catcher_lane
from postlane.tokens import TokenKeys
from tests.procs import (
    REPO_ROOT,
    WorkerProcess,
    assert_eventually,
    postlane_env,
    run_command,
    wait_for_pollers,
    write_config,
)
from tests.test_integration import address_of
from workflows import WORKFLOWS, workflow_runner

EXAMPLE = REPO_ROOT / "examples" / "typescript"
SEND_JS = EXAMPLE / "dist" / "send.js"
HISTORIES = Path(__file__).parent / "histories"
DOMAIN = "ts-capped.test"
SENDER = f"agent@{DOMAIN}"
LANE_RETRY = RetrySettings(
    initial_interval=timedelta(seconds=2), maximum_interval=timedelta(seconds=7), maximum_attempts=4
)
"""Unlike the defaults a caller's input would carry (5 s, 10 min, unlimited)."""


def capped_lane(smtp: SmtpCatcher) -> LaneConfig:
    """One email an hour: the second one must wait, ``scheduled``."""
    lane = LaneConfig(
        name=f"ts-{uuid.uuid4().hex[:6]}",
        senders=[f"*@{DOMAIN}"],
        smtp_host="127.0.0.1",
        rate_per_second=1,
        hourly_cap=1,
        retry=LANE_RETRY,
    )
    return catcher_lane(lane, smtp)


def node() -> str:
    found = shutil.which("node")
    assert found, "node is not installed: `make test` installs it (apt nodejs) when missing"
    assert SEND_JS.exists(), f"{SEND_JS} is missing: run `make {SEND_JS.relative_to(REPO_ROOT)}`"
    return found


async def ts_send(env: dict[str, str], key: str, *args: str, wait: bool = True) -> dict[str, Any]:
    """Run the TypeScript example; its one JSON line of output."""
    argv = [node(), str(SEND_JS), "--key", key, *args, *(["--wait"] if wait else [])]
    rc, out, err = await run_command(argv, env, within=90)
    assert rc == 0, f"rc={rc}\n{out}\n{err}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def listed(client: Client, query: str) -> set[str]:
    return {w.id async for w in client.list_workflows(query)}


async def failure_of(client: Client, workflow_id: str) -> tuple[str, str, int]:
    """(type, message, workflow task failures) from the email's history on the server."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    task_failures = sum(
        e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED for e in history.events
    )
    last = history.events[-1]
    assert last.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED, last
    failure = last.workflow_execution_failed_event_attributes.failure
    return failure.application_failure_info.type, failure.message, task_failures


@pytest.mark.devserver
@pytest.mark.timeout(300)
async def test_typescript_client_gets_the_workers_lane_checks_and_visibility(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = capped_lane(smtp)
        config = write_config(tmp_path / "postlane.toml", [lane])
        env = postlane_env(address_of(dev_env), config)
        email = ["--from", SENDER, "--to", "bob@example.test", "--subject", "Your code"]
        with WorkerProcess.start(env, tmp_path) as worker:
            await wait_for_pollers(client, lane.task_queue, [worker])

            # 1. Valid, with no lane, retry or quota in the input: sent through the lane.
            first = await ts_send(env, f"{key}-1", *email, "--text", "847291")
            assert first["status"] == "sent", first
            # 2. The lane's cap (1/h) holds for it too: the next one waits, scheduled.
            second_input = {
                "email": {
                    "sender": SENDER,
                    "to": ["carol@example.test"],
                    "subject": "Second",
                    "text": "hello",
                    "tags": ["ts-example"],
                },
                "priority": "bulk",
                # Worker-owned fields a caller might set: overridden by the lane's own.
                "quota": False,
                "retry": {"maximum_attempts": 99},
            }
            second = await ts_send(env, f"{key}-2", "--input", json.dumps(second_input), wait=False)
            assert second["status"] == "started", second
            # 3. Invalid ones, each failing at once with a typed reason.
            bad_to = {"email": {**second_input["email"], "to": ["not-an-address"]}}
            no_to = {"email": {"sender": SENDER, "subject": "x", "text": "y"}}
            unknown_lane = {"email": second_input["email"], "lane": "no-such-lane"}
            outcomes = await asyncio.gather(
                ts_send(env, f"{key}-bad-to", "--input", json.dumps(bad_to)),
                ts_send(env, f"{key}-no-to", "--input", json.dumps(no_to)),
                ts_send(env, f"{key}-lane", "--input", json.dumps(unknown_lane)),
                ts_send(
                    env,
                    f"{key}-sender",
                    *["--from", "agent@nowhere.test", "--to", "bob@example.test"],
                    *["--subject", "x", "--text", "y"],
                ),
            )

            scheduled = (
                f'WorkflowId="{email_workflow_id(f"{key}-2")}" AND PostlaneStatus="scheduled"'
            )
            await assert_eventually(
                lambda: listed(client, scheduled), within=60, what="the second email scheduled"
            )
            # The same key and content from Python: the existing emails, sent and waiting.
            pl = PostlaneClient(client, Settings(lanes=[lane]))
            same = Email(sender=SENDER, to=["bob@example.test"], subject="Your code", text="847291")
            again = await pl.send(same, key=f"{key}-1")
            receipt = await again.result()
            waiting = await pl.send(
                Email(**second_input["email"]),  # type: ignore[arg-type]
                key=f"{key}-2",
                priority="bulk",
            )
            assert waiting.workflow_id == email_workflow_id(f"{key}-2")
            with pytest.raises(IdempotencyConflict):
                await pl.send(same.model_copy(update={"subject": "Other"}), key=f"{key}-1")
            sent = smtp.messages
            histories = {
                name: await client.get_workflow_handle(
                    email_workflow_id(f"{key}-{k}")
                ).fetch_history()
                for name, k in (("sent", "1"), ("invalid", "bad-to"), ("unknown_lane", "lane"))
            }
            assert await pl.status(f"{key}-2") == EmailStatus.SCHEDULED
            await waiting.cancel()
            with pytest.raises(InvalidEmail) as refused:  # what a Python caller sees of it
                await pl.handle(f"{key}-lane").result()

    # The SMTP server got the first email once, and nothing of the second (over the cap).
    assert len(sent) == 1, [m.subject for m in sent]
    raw = sent[0].raw
    mid = TokenKeys.from_settings(Settings()).message_id(email_workflow_id(f"{key}-1"), DOMAIN)
    assert f"Message-ID: {mid}\r\n".encode() in raw
    assert b"Subject: Your code\r\n" in raw and b"847291" in raw
    assert receipt.message_id == mid and receipt.lane == lane.name
    assert first["receipt"]["message_id"] == mid

    # The send ran with the lane's retry policy, not the defaults the input would imply.
    [scheduled_send] = [
        e.activity_task_scheduled_event_attributes
        for e in histories["sent"].events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert scheduled_send.task_queue.name == lane.task_queue
    assert scheduled_send.retry_policy.maximum_attempts == 4
    assert scheduled_send.retry_policy.initial_interval.ToTimedelta() == timedelta(seconds=2)

    # As visible as a Python-sent email: search attributes and the idempotency memo.
    by_lane = await listed(client, f'PostlaneLane="{lane.name}"')
    assert {email_workflow_id(f"{key}-1"), email_workflow_id(f"{key}-2")} <= by_lane
    sent_query = (
        f'PostlaneStatus="sent" AND PostlaneRecipientDomain="example.test"'
        f' AND PostlaneLane="{lane.name}"'
    )
    assert await listed(client, sent_query) == {email_workflow_id(f"{key}-1")}
    tagged = await listed(client, 'PostlaneTag="ts-example"')
    assert email_workflow_id(f"{key}-2") in tagged
    desc = await client.get_workflow_handle(email_workflow_id(f"{key}-1")).describe()
    assert CONTENT_HASH in await desc.memo()

    # Each invalid email failed at once, typed, naming the field, PostlaneStatus=failed.
    assert [o["status"] for o in outcomes] == ["failed"] * 4, outcomes
    assert [o["type"] for o in outcomes] == [
        "InvalidEmail",
        "InvalidEmail",
        "UnknownLane",
        "UnknownSender",
    ]
    expected = {
        "bad-to": ("InvalidEmail", "email.to[0]: 'not-an-address' is not a valid email"),
        "no-to": ("InvalidEmail", "email.to: Field required"),
        "lane": ("UnknownLane", "lane: no lane named 'no-such-lane' is configured"),
        "sender": ("UnknownSender", "email.sender: no lane serves 'agent@nowhere.test'"),
    }
    failed = {w for w in await listed(client, 'PostlaneStatus="failed"') if key in w}
    assert failed == {email_workflow_id(f"{key}-{k}") for k in expected}
    for suffix, (kind, message) in expected.items():
        workflow_id = email_workflow_id(f"{key}-{suffix}")
        got_kind, got_message, task_failures = await failure_of(client, workflow_id)
        assert (got_kind, task_failures) == (kind, 0), workflow_id
        assert got_message.startswith(message), got_message
        desc = await client.get_workflow_handle(workflow_id).describe()
        assert desc.status == WorkflowExecutionStatus.FAILED

    assert refused.value.field == "lane" and "'no-such-lane'" in refused.value.reason

    # Today's code replays what it recorded; record with POSTLANE_RECORD_HISTORIES=1.
    for name, history in histories.items():
        await replay(history)
        if os.environ.get("POSTLANE_RECORD_HISTORIES"):
            (HISTORIES / f"send_email_foreign_{name}.json").write_text(history.to_json())


async def replay(history: WorkflowHistory) -> None:
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(history)


@pytest.mark.parametrize("name", ["sent", "invalid", "unknown_lane"])
async def test_replay_recorded_foreign_history(name: str) -> None:
    path = HISTORIES / f"send_email_foreign_{name}.json"
    assert path.exists(), f"record {path.name}: see tests/test_replay.py's docstring"
    await replay(WorkflowHistory.from_json("email:recorded", path.read_text()))


@pytest.mark.devserver
async def test_python_send_matches_a_foreign_start_no_worker_has_seen(
    dev_env: WorkflowEnvironment, key: str
) -> None:
    """Before any worker wrote the memo, the hash comes from the start's own input."""
    client = dev_env.client
    content = {"sender": SENDER, "to": ["bob@example.test"], "subject": "Hi", "text": "x"}
    # A task queue nobody polls: the workflow never runs, so it never writes its memo.
    foreign = await client.start_workflow(
        "SendEmail",
        {"email": content, "send_at": "2030-01-01T10:00:00+01:00"},
        id=email_workflow_id(key),
        task_queue=f"nobody-{uuid.uuid4().hex[:6]}",
    )
    try:
        assert CONTENT_HASH not in await (await foreign.describe()).memo()
        lane = LaneConfig(name="any", senders=["*"], smtp_host="127.0.0.1")
        pl = PostlaneClient(client, Settings(lanes=[lane]))
        at = datetime(2030, 1, 1, 9, tzinfo=UTC)
        same = await pl.send(Email(**content), key=key, send_at=at)  # type: ignore[arg-type]
        assert same.workflow_id == foreign.id
        with pytest.raises(IdempotencyConflict):
            await pl.send(Email(**{**content, "text": "y"}), key=key, send_at=at)  # type: ignore[arg-type]
        with pytest.raises(IdempotencyConflict):  # another send time is another email
            await pl.send(Email(**content), key=key)  # type: ignore[arg-type]
    finally:
        await foreign.terminate("test over")


async def test_foreign_start_with_odd_search_attributes_still_sends(
    pl: PostlaneTestEnv, key: str
) -> None:
    """A status no Postlane client sets, and a wrong lane, are put right, not fatal."""
    handle = await pl.client.temporal.start_workflow(
        "SendEmail",
        {
            "email": {
                "sender": "agent@acme.test",
                "to": ["bob@example.test"],
                "subject": "s",
                "text": "t",
            }
        },
        id=email_workflow_id(key),
        task_queue=WORKFLOW_TASK_QUEUE,
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(sa.STATUS, "bogus"), SearchAttributePair(sa.LANE, "elsewhere")]
        ),
    )
    receipt = DeliveryReceipt.model_validate(await handle.result())
    assert receipt.lane == "test" and len(pl.outbox) == 1
    attributes = (await handle.describe()).typed_search_attributes
    assert (attributes.get(sa.STATUS), attributes.get(sa.LANE)) == ("sent", "test")


async def test_plain_foreign_start_gets_attributes_memo_and_headline(
    pl: PostlaneTestEnv, key: str
) -> None:
    email = {"sender": "agent@acme.test", "to": ["bob@example.test"], "subject": "s", "text": "t"}
    handle = await pl.client.temporal.start_workflow(
        "SendEmail",
        {"email": {**email, "tags": ["t1"]}},
        id=email_workflow_id(key),
        task_queue=WORKFLOW_TASK_QUEUE,
    )
    await handle.result()
    desc = await handle.describe()
    attributes = desc.typed_search_attributes
    assert attributes.get(sa.STATUS) == "sent" and attributes.get(sa.LANE) == "test"
    assert attributes.get(sa.RECIPIENT_DOMAIN) == ["example.test"]
    assert attributes.get(sa.TAG) == ["t1"]
    assert CONTENT_HASH in await desc.memo()
    # No static summary from this start: the Web UI's current details carry the headline.
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert metadata.current_details.startswith("s → bob@example.test\nstatus: sent")


async def test_foreign_start_without_any_input_fails_at_once(pl: PostlaneTestEnv, key: str) -> None:
    handle = await pl.client.temporal.start_workflow(
        "SendEmail", id=email_workflow_id(key), task_queue=WORKFLOW_TASK_QUEUE
    )
    with pytest.raises(InvalidEmail) as caught:
        await pl.client.handle(key).result()
    assert caught.value.field == "input"
    assert (await handle.describe()).typed_search_attributes.get(sa.STATUS) == "failed"
    assert pl.outbox == []
