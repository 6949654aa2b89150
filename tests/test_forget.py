"""Erasure: ``pl.forget`` and ``postlane forget`` on the real dev server.

What is checked is the server's own view (describe, list, count by search attribute) and the
SMTP catcher's, never forget's report alone.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistory
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from postlane import search_attributes as sa
from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.connection import data_converter
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import Email
from postlane.erasure import HASH_CHARS, RecipientHasher, normalise_recipient
from postlane.errors import InvalidInput
from postlane.ids import (
    WORKFLOW_TASK_QUEUE,
    email_workflow_id,
    sequence_workflow_id,
    suppression_workflow_id,
)
from postlane.sequences.spec import Recipient, SequenceSpec, spec_from_dict
from postlane.testing import PostlaneTestEnv, running_workers
from tests.procs import assert_eventually, postlane_env, run_postlane, write_config
from tests.test_integration import address_of, new_lane
from tests.test_sequences import at_step, bob, finished, three_step_spec
from workflows import WORKFLOWS, workflow_runner
from workflows.send_email import RECIPIENT_HASH_PATCH
from workflows.sequence import RECIPIENT_HASH_PATCH as SEQUENCE_RECIPIENT_HASH_PATCH

SENDER = "ada@it.test"
SECRET = b"a-test-token-secret-of-at-least-32-bytes"


def test_recipient_hash_normalises_and_depends_on_the_secret() -> None:
    hasher = RecipientHasher(SECRET)
    h = hasher.hash("bob@example.test")
    assert len(h) == HASH_CHARS and h.isalnum()
    assert hasher.hash("  Bob@EXAMPLE.test ") == h
    assert hasher.hash("bob@bücher.example") == hasher.hash("bob@xn--bcher-kva.example")
    assert hasher.hash("bob2@example.test") != h
    assert RecipientHasher(SECRET + b"x").hash("bob@example.test") != h
    assert "bob" not in h
    with pytest.raises(InvalidInput) as err:
        normalise_recipient("not-an-address")
    assert err.value.field == "address"


def _spec(name: str) -> SequenceSpec:
    return spec_from_dict(
        {
            "name": name,
            "sender": SENDER,
            "steps": [
                {"type": "send", "id": "intro", "subject": "Hello", "text": "Hi there"},
                {"type": "wait_for_reply", "id": "wait", "timeout": "3d"},
                {"type": "send", "id": "follow", "subject": "Again", "text": "Following up"},
            ],
        }
    )


async def _exists(client: Client, workflow_id: str) -> WorkflowExecutionStatus | None:
    """The workflow's status on the server, or None once its history is deleted."""
    try:
        return (await client.get_workflow_handle(workflow_id).describe()).status
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return None
        raise


async def _count(client: Client, digest: str) -> int:
    return (await client.count_workflows(f'{sa.RECIPIENT_HASH.name} = "{digest}"')).count


def _email(to: str, subject: str = "Hello") -> Email:
    return Email(sender=SENDER, to=[to], subject=subject, text="a message")


@pytest.mark.devserver
@pytest.mark.timeout(240)
async def test_forget_deletes_an_address_workflows_and_keeps_its_suppression(
    dev_env: WorkflowEnvironment,
) -> None:
    uid = uuid.uuid4().hex[:8]
    target, other = f"erin-{uid}@example.test", f"olaf-{uid}@example.test"
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, senders=["*@it.test"])
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(client, settings)
        hasher = RecipientHasher.from_settings(settings)
        assert hasher is not None
        mine, theirs = hasher.hash(target), hasher.hash(other)
        far = "2099-01-01T00:00:00+00:00"
        async with running_workers(dev_env, settings):
            sent = await pl.send(_email(target), key=f"sent-{uid}")
            await sent.result()
            await pl.send(
                _email(target.upper().replace("EXAMPLE", "example"), "Later"),
                key=f"later-{uid}",
                send_at=datetime.fromisoformat(far),
            )
            await (await pl.send(_email(other), key=f"other-{uid}")).result()
            # Another client, in another language say: no search attributes at all.
            foreign = await client.start_workflow(
                "SendEmail",
                {"email": {"sender": SENDER, "to": [target], "subject": "Hi", "text": "x"}},
                id=email_workflow_id(f"foreign-{uid}"),
                task_queue=WORKFLOW_TASK_QUEUE,
            )
            await foreign.result()
            spec = _spec(f"camp-{uid}")
            # It continues as new after its first step: two runs, two histories.
            mine_seq = await pl.sequences.start(spec, Recipient(address=target), history_limit=10)
            their_seq = await pl.sequences.start(spec, Recipient(address=other))
            # An app without the token secret: its sequence has no hash, only its default
            # key (the address) in its workflow ID; its email is hashed by the workers.
            with pytest.MonkeyPatch.context() as env:
                env.delenv("POSTLANE_TOKEN_SECRET")
                blind = PostlaneClient(client, Settings(lanes=[lane]))
            assert blind.settings.token_secret is None
            blind_seq = await blind.sequences.start(
                _spec(f"blind-{uid}"), Recipient(address=target)
            )
            assert mine_seq.workflow_id == sequence_workflow_id(f"camp-{uid}:{target}")

            async def intros_out() -> bool:
                return sum(m.subject == "Hello" for m in smtp.messages) == 5

            await assert_eventually(intros_out, within=90, what="every Hello delivered")
            assert {r for m in smtp.messages for r in m.recipients} == {target, other}
            # Suppressed once its emails are out: from then on none would go (reputation.md).
            await pl.suppressions.add(SENDER, target, reason="asked")
            suppression = suppression_workflow_id(SENDER, target)

            target_ids = {
                email_workflow_id(f"sent-{uid}"),
                email_workflow_id(f"later-{uid}"),
                foreign.id,
                mine_seq.workflow_id,
                email_workflow_id(f"camp-{uid}:{target}:intro"),
                email_workflow_id(f"blind-{uid}:{target}:intro"),
            }
            other_ids = {
                email_workflow_id(f"other-{uid}"),
                their_seq.workflow_id,
                email_workflow_id(f"camp-{uid}:{other}:intro"),
            }

            async def indexed() -> bool:
                runs = await client.count_workflows(f'WorkflowId = "{mine_seq.workflow_id}"')
                # forget finds suppressions by listing them: wait until this one is listed.
                held = await client.count_workflows(f'WorkflowId = "{suppression}"')
                listed = {
                    e.id async for e in client.list_workflows(f'PostlaneRecipientHash="{mine}"')
                }
                # The foreign start and the sequences' emails included; the sequence has
                # continued as new, and both its runs are listed.
                return (
                    listed == target_ids
                    and runs.count == 2
                    and held.count == 1
                    and await _count(client, theirs) == 3
                )

            await assert_eventually(indexed, within=30, what="hashes indexed")
            desc = await client.get_workflow_handle(blind_seq.workflow_id).describe()
            assert desc.typed_search_attributes.get(sa.RECIPIENT_HASH) is None
            target_ids.add(blind_seq.workflow_id)

            result = await pl.forget(target)

            assert set(result.deleted) == target_ids
            assert set(result.cancelled) == {
                email_workflow_id(f"later-{uid}"),
                mine_seq.workflow_id,
                blind_seq.workflow_id,
            }
            assert result.suppressions_kept == [suppression]
            assert result.recipient_hash == mine and result.not_stopped == []
            for wid in target_ids:
                assert await _exists(client, wid) is None, wid

            async def no_run_left() -> bool:
                query = f'WorkflowId = "{mine_seq.workflow_id}"'
                return (await client.count_workflows(query)).count == 0

            await assert_eventually(no_run_left, within=30, what="every run of it deleted")

            async def unlisted() -> bool:
                return await _count(client, mine) == 0

            await assert_eventually(unlisted, within=30, what="visibility forgets them")
            for wid in other_ids:
                assert await _exists(client, wid) is not None, wid
            assert await _count(client, theirs) == 3
            assert await _exists(client, suppression) == WorkflowExecutionStatus.RUNNING
            assert await pl.suppressions.is_suppressed(SENDER, target)
            # The other person's sequence still runs and still answers.
            assert (await pl.sequences.status(their_seq.key)).status == "active"

            again = await pl.forget(target)
            assert again.deleted == [] and again.cancelled == []
            assert again.suppressions_kept == [suppression]

            dropped = await pl.forget(target, drop_suppression=True)
            assert dropped.deleted == [suppression] and dropped.suppressions_kept == []
            assert await _exists(client, suppression) is None
            assert not await pl.suppressions.is_suppressed(SENDER, target)
            last = await pl.forget(target, drop_suppression=True)
            assert last.found == 0

            with pytest.raises(InvalidInput) as err:
                await pl.forget("erin@")
            assert err.value.field == "address"


@pytest.mark.devserver
@pytest.mark.timeout(240)
async def test_cli_forget_reports_and_is_safe_to_run_twice(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:8]
    target = f"fay-{uid}@example.test"
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, senders=["*@it.test"])
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(client, settings)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        async with running_workers(dev_env, settings):
            await (await pl.send(_email(target), key=f"cli-{uid}")).result()
            hasher = RecipientHasher.from_settings(settings)
            assert hasher is not None

            async def indexed() -> bool:
                return await _count(client, hasher.hash(target)) == 1

            await assert_eventually(indexed, within=30, what="hash indexed")

            rc, out, err = await run_postlane(["forget", target], env)
            assert rc == 0, err
            report: dict[str, Any] = json.loads(out)
            assert report["deleted"] == [email_workflow_id(f"cli-{uid}")]
            assert target not in err  # the address is not logged
            assert await _exists(client, email_workflow_id(f"cli-{uid}")) is None

            rc, out, err = await run_postlane(["forget", target], env)
            assert rc == 0, err
            assert json.loads(out)["deleted"] == []

            rc, out, err = await run_postlane(["forget", "fay@"], env)
            assert rc == 2
            assert err.startswith("error: InvalidInput: address: 'fay@' is not a valid")

            no_secret = {k: v for k, v in env.items() if k != "POSTLANE_TOKEN_SECRET"}
            rc, out, err = await run_postlane(["forget", target], no_secret)
            assert rc == 2
            assert "error: ConfigurationError: token_secret: not set" in err


# -- the attribute itself, and replay of the workflows that set it ------------------------

HISTORIES = Path(__file__).parent / "histories"


async def _replay(history: WorkflowHistory) -> None:
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(history)


def _patches(history: WorkflowHistory) -> str:
    """Every patch marker's recorded data, as text (the patch IDs are in it)."""
    return " ".join(
        payload.data.decode(errors="replace")
        for event in history.events
        if event.HasField("marker_recorded_event_attributes")
        for details in event.marker_recorded_event_attributes.details.values()
        for payload in details.payloads
    )


def _record(name: str, history: WorkflowHistory) -> None:
    if os.environ.get("POSTLANE_RECORD_HISTORIES"):
        (HISTORIES / f"{name}.json").write_text(history.to_json())


async def test_foreign_start_gets_its_recipient_hash_from_the_workers(
    pl: PostlaneTestEnv, key: str
) -> None:
    """An email started without the attribute (another language, a client without the
    secret) is indexed by its workers, behind `RECIPIENT_HASH_PATCH`."""
    handle = await pl.client.temporal.start_workflow(
        "SendEmail",
        {
            "email": {
                "sender": "agent@acme.test",
                "to": ["Bob@Example.test"],
                "cc": ["carol@example.test"],
                "subject": "s",
                "text": "t",
            }
        },
        id=email_workflow_id(key),
        task_queue=WORKFLOW_TASK_QUEUE,
    )
    await handle.result()
    hasher = RecipientHasher.from_settings(pl.client.settings)
    assert hasher is not None
    desc = await handle.describe()
    assert desc.typed_search_attributes.get(sa.RECIPIENT_HASH) == [
        hasher.hash("bob@example.test"),
        hasher.hash("carol@example.test"),
    ]
    history = await handle.fetch_history()
    assert RECIPIENT_HASH_PATCH in _patches(history)
    await _replay(history)
    _record("send_email_foreign_hashed", history)


async def test_client_started_email_records_no_patch(pl: PostlaneTestEnv, key: str) -> None:
    """The Python client with the secret sets the attribute at start: no extra commands."""
    handle = await pl.client.send(_email("bob@example.test"), key=key)
    await handle.result()
    desc = await pl.client.temporal.get_workflow_handle(handle.workflow_id).describe()
    hasher = RecipientHasher.from_settings(pl.client.settings)
    assert hasher is not None
    assert desc.typed_search_attributes.get(sa.RECIPIENT_HASH) == [hasher.hash("bob@example.test")]
    history = await pl.client.temporal.get_workflow_handle(handle.workflow_id).fetch_history()
    assert RECIPIENT_HASH_PATCH not in _patches(history)


async def test_sequence_emails_inherit_the_sequence_recipient_hash(
    pl: PostlaneTestEnv, key: str
) -> None:
    await pl.client.sequences.start(three_step_spec(), bob(), key=key)
    await at_step(pl, key, "wait1", 1)
    hasher = RecipientHasher.from_settings(pl.client.settings)
    assert hasher is not None
    expected = [hasher.hash("bob@example.test")]
    sequence = pl.client.temporal.get_workflow_handle(sequence_workflow_id(key))
    assert (await sequence.describe()).typed_search_attributes.get(sa.RECIPIENT_HASH) == expected
    child = pl.client.temporal.get_workflow_handle(email_workflow_id(f"{key}:intro"))
    assert (await child.describe()).typed_search_attributes.get(sa.RECIPIENT_HASH) == expected
    await pl.client.sequences.cancel(key)
    await assert_eventually(lambda: finished(pl, key))
    history = await sequence.fetch_history()
    assert SEQUENCE_RECIPIENT_HASH_PATCH in _patches(history)
    await _replay(history)
    _record("sequence_recipient_hash", history)


@pytest.mark.parametrize("name", ["send_email_foreign_hashed", "sequence_recipient_hash"])
async def test_replay_recorded_recipient_hash_history(name: str) -> None:
    path = HISTORIES / f"{name}.json"
    assert path.exists(), f"record {path.name}: see tests/test_replay.py's docstring"
    text = path.read_text()
    workflow_id = "sequence:recorded" if name.startswith("sequence") else "email:recorded"
    if not name.startswith("sequence"):
        started = json.loads(text)["events"][0]
        workflow_id = started["workflowExecutionStartedEventAttributes"].get(
            "workflowId", workflow_id
        )
    await _replay(WorkflowHistory.from_json(workflow_id, text))
