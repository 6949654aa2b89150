"""Cancel ends an email ``cancelled`` (or ``sent``, if its transaction got through), never
``dead_letter``: on the real dev server, with a real SMTP server and the CLI.

Each test checks the final status, the workflow's history on the server, the messages the
SMTP server received (raw), and that a ``dlq retry --all`` afterwards sends nothing. Each
history is also replayed against today's workflow code.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from datetime import timedelta
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from postlane.client import CancelOutcome, PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.connection import data_converter
from postlane.dev.catcher import CaughtMessage, SmtpCatcher
from postlane.email.models import EmailStatus, RetrySettings
from postlane.errors import ActionRefused, EmailNotFound
from postlane.ids import email_workflow_id
from postlane.sequences.models import SequenceStatus
from postlane.sequences.spec import Recipient, load_spec
from postlane.testing import catcher_lane, running_workers
from tests.conftest import TINY_LANE
from tests.procs import assert_eventually, postlane_env, run_postlane, write_config
from tests.test_integration import address_of, an_email, new_lane, send_in_data
from workflows import WORKFLOWS, workflow_runner

pytestmark = pytest.mark.devserver

OUTAGE = "451 4.3.0 mailbox temporarily unavailable"
SLOW_RETRIES = RetrySettings(
    initial_interval=timedelta(minutes=10), maximum_interval=timedelta(minutes=10)
)
"""The backoff outlasts any test: a cancel after the first failure lands between attempts."""


def cli_env(
    dev_env: WorkflowEnvironment, tmp_path: Path, lanes: Sequence[LaneConfig]
) -> dict[str, str]:
    return postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", lanes))


async def closing_event(pl: PostlaneClient, workflow_id: str) -> EventType.ValueType:
    """The type of the workflow's last history event (how the server says it ended)."""
    history = await pl.temporal.get_workflow_handle(workflow_id).fetch_history()
    return history.events[-1].event_type


async def cancel_came_before_completion(pl: PostlaneClient, workflow_id: str) -> bool:
    """Did the server record the workflow's cancel (and the send's) before the send completed?"""
    history = await pl.temporal.get_workflow_handle(workflow_id).fetch_history()
    types = [e.event_type for e in history.events]
    completed = types.index(EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    return (
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED in types[:completed]
        and EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED in types[:completed]
    )


async def parked_ever(pl: PostlaneClient, workflow_id: str) -> bool:
    """Did the workflow ever upsert ``PostlaneStatus=dead_letter``?"""
    history = await pl.temporal.get_workflow_handle(workflow_id).fetch_history()
    return any(
        b"dead_letter" in e.upsert_workflow_search_attributes_event_attributes.SerializeToString()
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
    )


HISTORIES = Path(__file__).parent / "histories"
RECORDED = {
    "send_email_cancel_while_retrying": "email:cancel-while-retrying",
    "send_email_cancel_at_data_sent": "email:cancel-at-data-sent",
    "send_email_cancel_waiting_for_slot": "email:cancel-waiting-for-slot",
    "send_email_cancel_sequence_child": "email:cancel-sequence-child",
    "sequence_unsubscribed_child_cancelled": "sequence:unsubscribed-child-cancelled",
    "sequence_cancelled_child_sent": "sequence:cancelled-child-sent",
}
"""Histories of today's cancel paths, replayed by `test_recorded_cancel_histories_replay`.
Record again with ``POSTLANE_RECORD_HISTORIES=1`` (only for a deliberate, patched change)."""


async def replays(pl: PostlaneClient, workflow_id: str, record_as: str) -> None:
    """Replay the workflow's history against today's code (and record it if asked)."""
    history = await pl.temporal.get_workflow_handle(workflow_id).fetch_history()
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(history)
    if os.environ.get("POSTLANE_RECORD_HISTORIES"):
        (HISTORIES / f"{record_as}.json").write_text(history.to_json())


async def retry_all_sends_nothing(
    env: dict[str, str], lane: LaneConfig, smtp: SmtpCatcher, before: list[CaughtMessage]
) -> None:
    rc, out, err = await run_postlane(["dlq", "retry", "--all", "--lane", lane.name], env)
    assert rc == 0, err
    assert "retry: 0 of 0 parked emails signalled (0 errors)" in out
    assert smtp.messages == before


async def failed_once(pl: PostlaneClient, key: str) -> bool:
    report = await pl.describe(key)
    return report.status == EmailStatus.RETRYING and len(report.attempt_history) >= 1


def raw_message_ids(messages: Sequence[CaughtMessage]) -> list[str]:
    """Message-IDs read from the raw bytes the SMTP server received."""
    return [str(message_from_bytes(m.raw, policy=policy.SMTP)["Message-ID"]) for m in messages]


@pytest.mark.timeout(120)
async def test_cancel_during_retry_backoff_ends_cancelled(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, retry=SLOW_RETRIES)
        pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
        env = cli_env(dev_env, tmp_path, [lane])
        smtp.fail("data", OUTAGE, times=1_000)
        async with running_workers(dev_env, pl.settings):
            await pl.send(an_email(), key=key)
            await assert_eventually(lambda: failed_once(pl, key), within=60, what="retrying")

            rc, out, err = await run_postlane(["cancel", key], env)
            assert (rc, out.strip()) == (0, f"{key}: cancelled"), err
            assert await pl.status(key) == EmailStatus.CANCELLED
            workflow_id = email_workflow_id(key)
            assert await closing_event(pl, workflow_id) == (
                EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED
            )
            assert not await parked_ever(pl, workflow_id)
            assert smtp.messages == []
            await retry_all_sends_nothing(env, lane, smtp, [])

            rc, out, err = await run_postlane(["cancel", key], env)  # twice: says so, rc 0
            assert (rc, out.strip()) == (0, f"{key}: already cancelled"), err
            await replays(pl, workflow_id, "send_email_cancel_while_retrying")


@pytest.mark.timeout(120)
async def test_cancel_during_slow_data_that_the_server_accepts_ends_sent(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp)
        pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
        env = cli_env(dev_env, tmp_path, [lane])
        smtp.delay("data", 15.0)  # then it accepts
        async with running_workers(dev_env, pl.settings):
            handle = await pl.send(an_email(), key=key)
            await send_in_data(dev_env, handle.workflow_id)

            rc, out, err = await run_postlane(["cancel", key], env)
            assert rc == 0, err
            receipt = await handle.result()
            assert out.startswith(
                f"{key}: already sent, message {receipt.message_id} ({receipt.smtp_reply})"
            )
            assert await pl.status(key) == EmailStatus.SENT
            assert await closing_event(pl, handle.workflow_id) == (
                EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
            )
            assert await cancel_came_before_completion(pl, handle.workflow_id)
            assert not await parked_ever(pl, handle.workflow_id)
            assert raw_message_ids(smtp.messages) == [receipt.message_id]
            assert receipt.attempts == 1
            await retry_all_sends_nothing(env, lane, smtp, smtp.messages)

            again = await pl.cancel(key)  # through the client: already sent, with the receipt
            assert (again.outcome, again.already, again.receipt) == (
                CancelOutcome.SENT,
                True,
                receipt,
            )
            await replays(pl, handle.workflow_id, "send_email_cancel_at_data_sent")


@pytest.mark.timeout(120)
async def test_cancel_of_an_email_waiting_on_a_capped_lane_ends_cancelled(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        # TINY_LANE: 2 an hour. Its own name, so its quota workflow is this test's alone.
        tiny = catcher_lane(TINY_LANE, smtp).model_copy(
            update={"name": f"tiny-{uuid.uuid4().hex[:6]}", "senders": ["*@it.test"]}
        )
        pl = PostlaneClient(dev_env.client, Settings(lanes=[tiny]))
        env = cli_env(dev_env, tmp_path, [tiny])
        keys = [f"capped-{uuid.uuid4().hex[:8]}-{n}" for n in range(3)]
        async with running_workers(dev_env, pl.settings):
            for n, k in enumerate(keys):
                await pl.send(an_email(f"#{n}"), key=k)
            await smtp.wait_for_async(2)  # the lane lets any two of the three go first

            async def waiting_for_slot() -> str | None:
                for k in keys:
                    report = await pl.describe(k)
                    if report.status == EmailStatus.SCHEDULED and report.scheduled_for:
                        return k
                return None

            waiting = await assert_eventually(
                waiting_for_slot, within=60, what="the third waits for its slot"
            )
            sent = [await pl.handle(k).result() for k in keys if k != waiting]

            result = await pl.cancel(waiting)
            assert (result.outcome, result.already) == (CancelOutcome.CANCELLED, False)
            assert await pl.status(waiting) == EmailStatus.CANCELLED
            assert await closing_event(pl, email_workflow_id(waiting)) == (
                EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED
            )
            assert sorted(raw_message_ids(smtp.messages)) == sorted(r.message_id for r in sent)
            await retry_all_sends_nothing(env, tiny, smtp, smtp.messages)
            await replays(pl, email_workflow_id(waiting), "send_email_cancel_waiting_for_slot")


@pytest.mark.timeout(120)
async def test_cancel_of_a_dead_letter_ends_cancelled_and_retry_is_refused(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, retry=RetrySettings(maximum_attempts=1))
        pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
        env = cli_env(dev_env, tmp_path, [lane])
        smtp.fail("data", OUTAGE)
        async with running_workers(dev_env, pl.settings):
            await pl.send(an_email(), key=key)

            async def parked() -> bool:
                return await pl.status(key) == EmailStatus.DEAD_LETTER

            await assert_eventually(parked, within=60, what="dead-lettered")
            result = await pl.cancel(key)
            assert (result.outcome, result.already) == (CancelOutcome.CANCELLED, False)
            assert await closing_event(pl, email_workflow_id(key)) == (
                EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED
            )
            await retry_all_sends_nothing(env, lane, smtp, [])

            rc, out, err = await run_postlane(["retry", key], env)
            assert rc == 2, (out, err)
            assert err.strip() == (
                f"error: ActionRefused: {key}: cannot retry: the email is cancelled"
            )
            with pytest.raises(ActionRefused, match="cannot discard: the email is cancelled"):
                await pl.dlq.discard(key)
            assert smtp.messages == []


@pytest.mark.timeout(60)
async def test_cancel_reports_not_found_and_bad_keys(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    env = cli_env(dev_env, tmp_path, [new_lane()])
    rc, out, err = await run_postlane(["cancel", key], env)
    assert rc == 1, (out, err)
    assert err.strip() == f"error: EmailNotFound: no email with key {key!r}"
    rc, out, err = await run_postlane(["cancel", "no spaces allowed"], env)
    assert rc == 2, (out, err)
    assert err.startswith("error: InvalidEmail: key: ")


SEQUENCE = """
name = "{name}"
sender = "ada@it.test"

[[steps]]
type = "send"
id = "intro"
subject = "A note"
text = "Hello."

[[steps]]
type = "send"
id = "follow"
subject = "Re: A note"
text = "Following up."
"""


@pytest.mark.timeout(120)
async def test_unsubscribe_of_a_sequence_whose_email_is_retrying_cancels_the_email(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, retry=SLOW_RETRIES)
        pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
        env = cli_env(dev_env, tmp_path, [lane])
        spec_file = tmp_path / "spec.toml"
        spec_file.write_text(SEQUENCE.format(name=f"seq-{uuid.uuid4().hex[:6]}"))
        smtp.fail("data", OUTAGE, times=1_000)
        async with running_workers(dev_env, pl.settings):
            seq = await pl.sequences.start(
                load_spec(spec_file), Recipient(address=f"ann-{uuid.uuid4().hex[:6]}@example.test")
            )
            child = f"{seq.key}:intro"

            async def child_retrying() -> bool:
                try:
                    return await failed_once(pl, child)
                except EmailNotFound:  # the sequence has not started it yet
                    return False

            await assert_eventually(child_retrying, within=60, what="the step's email retrying")

            rc, out, err = await run_postlane(["sequence", "unsubscribe", seq.key], env)
            assert rc == 0, err
            report = await seq.result()
            assert report.status == SequenceStatus.UNSUBSCRIBED
            assert report.sent == []
            assert await pl.status(child) == EmailStatus.CANCELLED
            assert await closing_event(pl, email_workflow_id(child)) == (
                EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED
            )
            assert not await parked_ever(pl, email_workflow_id(child))
            assert smtp.messages == []
            await retry_all_sends_nothing(env, lane, smtp, [])
            await replays(pl, email_workflow_id(child), "send_email_cancel_sequence_child")
            await replays(pl, seq.workflow_id, "sequence_unsubscribed_child_cancelled")


@pytest.mark.timeout(120)
async def test_cancel_of_a_sequence_whose_email_is_at_data_records_it_sent(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp)
        pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
        env = cli_env(dev_env, tmp_path, [lane])
        spec_file = tmp_path / "spec.toml"
        spec_file.write_text(SEQUENCE.format(name=f"seq-{uuid.uuid4().hex[:6]}"))
        smtp.delay("data", 15.0)  # the cancel lands while the server holds DATA
        async with running_workers(dev_env, pl.settings):
            seq = await pl.sequences.start(
                load_spec(spec_file), Recipient(address=f"ann-{uuid.uuid4().hex[:6]}@example.test")
            )
            child = f"{seq.key}:intro"

            async def child_started() -> bool:
                try:
                    await pl.describe(child)
                except EmailNotFound:
                    return False
                return True

            await assert_eventually(child_started, within=30, what="the step's email started")
            await send_in_data(dev_env, email_workflow_id(child))
            assert await pl.sequences.cancel(seq.key)
            receipt = await pl.handle(child).result()
            assert await pl.status(child) == EmailStatus.SENT
            assert await cancel_came_before_completion(pl, email_workflow_id(child))

            async def cancelled() -> bool:
                return (await pl.sequences.status(seq.key)).status == SequenceStatus.CANCELLED

            await assert_eventually(cancelled, within=30, what="the sequence cancelled")
            report = await pl.sequences.status(seq.key)
            assert [m.message_id for m in report.sent] == [receipt.message_id]
            assert raw_message_ids(smtp.messages) == [receipt.message_id]
            await retry_all_sends_nothing(env, lane, smtp, smtp.messages)
            await replays(pl, seq.workflow_id, "sequence_cancelled_child_sent")


@pytest.mark.parametrize("name", sorted(RECORDED))
async def test_recorded_cancel_histories_replay(name: str) -> None:
    path = HISTORIES / f"{name}.json"
    assert path.exists(), f"record {path.name}: see RECORDED"
    history = WorkflowHistory.from_json(RECORDED[name], path.read_text())
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(history)


async def test_history_of_a_cancel_parked_by_older_code_still_replays() -> None:
    """Recorded before the cancel patches: a cancel while retrying parked the email in
    dead_letter (reply "Cancelled"), then an operator discarded it. Today's code must
    replay it unchanged; the patches keep that behaviour for such histories only."""
    path = HISTORIES / "send_email_cancel_parked_v0.json"
    history = WorkflowHistory.from_json("email:cancel-parked-v0", path.read_text())
    await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    ).replay_workflow(history)
