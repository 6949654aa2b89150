"""Failed attempts and the retry window, in the time-skipping environment (virtual time).

Temporal's history keeps only the last failure of a retried activity; the send activity
signals every failed attempt to its email's workflow, which keeps the recent ones. The Java
test server jumps far ahead in virtual time once a workflow returns its result, so waiting
states are observed (with `pl.sleep` steps) before any result is awaited.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.testing import WorkflowEnvironment

from postlane import Email, EmailStatus, PermanentDeliveryError, PostlaneClient, Settings
from postlane.cli.app import format_attempts
from postlane.dev.catcher import Phase, SmtpCatcher
from postlane.email.models import MAX_ATTEMPT_HISTORY, RetrySettings
from postlane.errors import ErrorType
from postlane.ids import email_workflow_id
from postlane.testing import PostlaneTestEnv, running_workers
from tests.conftest import PATIENT_LANE
from tests.procs import assert_eventually, postlane_env, run_postlane, write_config
from tests.test_integration import address_of, an_email, new_lane

OUTAGE = "451 4.3.0 Mail server temporarily unavailable"


def email(sender: str) -> Email:
    return Email(sender=sender, to=["bob@example.test"], subject="Your code", text="847291")


def attempts_within_window(retry: RetrySettings) -> int:
    """How many attempts the retry policy starts before `retry_window` runs out.

    Attempt 1 starts at 0; each next one after the backoff interval; an attempt that would
    start after the window is not made (attempts themselves take no virtual time here).
    """
    start, interval, attempts = timedelta(0), retry.initial_interval, 1
    while start + interval < retry.retry_window:
        start += interval
        attempts += 1
        interval = min(interval * retry.backoff, retry.maximum_interval)
    return attempts


async def send_summaries(pl: PostlaneTestEnv, workflow_id: str) -> list[str]:
    """The Web UI summaries of the email's scheduled send activities, in order."""
    history = await pl.client.temporal.get_workflow_handle(workflow_id).fetch_history()
    converter = pl.client.temporal.data_converter.payload_converter
    return [
        converter.from_payload(e.user_metadata.summary, str)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


async def test_retry_window_dead_letters_after_72_hours_then_retry_sends(
    pl: PostlaneTestEnv, key: str
) -> None:
    retry = PATIENT_LANE.retry
    assert retry.retry_window == timedelta(hours=72) and retry.maximum_attempts == 0
    expected = attempts_within_window(retry)
    pl.smtp.fail("data", OUTAGE, times=10_000)  # the provider is down for days
    start = await pl.now()
    handle = await pl.client.send(email("ops@patient.test"), key=key)

    await pl.sleep(timedelta(hours=48))
    report = await pl.client.describe(key)
    assert report.status in (EmailStatus.RETRYING, EmailStatus.SENDING), report
    assert report.parked_at is None
    assert 1 < report.attempts < expected

    for _ in range(10):  # at most 40 more hours, in 4-hour steps
        report = await pl.client.describe(key)
        if report.status == EmailStatus.DEAD_LETTER:
            break
        await pl.sleep(timedelta(hours=4))
    assert report.status == EmailStatus.DEAD_LETTER, report
    assert report.parked_at is not None
    parked_after = report.parked_at - start
    # The last attempt is the one whose next backoff would end past the window.
    assert retry.retry_window - retry.maximum_interval < parked_after <= retry.retry_window
    assert report.last_error == OUTAGE
    assert report.attempts == expected
    history = report.attempt_history
    assert len(history) == MAX_ATTEMPT_HISTORY  # the most recent ones
    assert [a.attempt for a in history] == list(range(expected - len(history) + 1, expected + 1))
    assert {a.reply for a in history} == {OUTAGE}
    assert {a.smtp_server for a in history} == {f"{pl.smtp.host}:{pl.smtp.port}"}
    assert all(a.phase == "data" and a.error_type == ErrorType.SMTP_TRANSIENT for a in history)
    assert pl.outbox == []

    pl.smtp.clear()  # the provider is back
    assert await pl.client.retry(key, reason="provider is back") is True
    receipt = await handle.result()
    assert receipt.attempts == expected + 1
    assert [m.message_id for m in pl.outbox] == [receipt.message_id]
    assert await send_summaries(pl, handle.workflow_id) == [
        "SMTP send via lane patient, attempt 1",
        f"SMTP send via lane patient, attempt {expected + 1}",
    ]


async def test_each_failed_attempt_kept_with_its_reply_and_server(
    pl: PostlaneTestEnv, key: str
) -> None:
    pl.smtp.fail("mail", "451 4.3.0 greylisted, come back later")
    pl.smtp.fail("rcpt", "452 4.2.2 mailbox full")
    pl.smtp.drop("data")  # the connection goes away mid-transaction
    handle = await pl.client.send(email("agent@acme.test"), key=key)
    receipt = await handle.result()

    assert receipt.attempts == 4
    report = await pl.client.describe(key)  # a finished email: its workflow still answers
    assert report.status == EmailStatus.SENT
    first_two = report.attempt_history[:2]
    assert [(a.attempt, a.phase, a.reply, a.error_type) for a in first_two] == [
        (1, "mail", "451 4.3.0 greylisted, come back later", ErrorType.SMTP_TRANSIENT),
        (2, "rcpt", "452 4.2.2 mailbox full", ErrorType.SMTP_TRANSIENT),
    ]
    assert len(report.attempt_history) == 3
    dropped = report.attempt_history[2]
    assert (dropped.attempt, dropped.phase, dropped.error_type) == (
        3,
        "data",
        ErrorType.SMTP_TRANSIENT,
    )
    assert "SMTPServerDisconnected during data" in dropped.reply
    server = f"{pl.smtp.host}:{pl.smtp.port}"
    assert all(a.smtp_server == server and "@" in a.worker for a in report.attempt_history)
    table = format_attempts(report)
    for a in report.attempt_history:
        assert f"{a.attempt}  " in table and a.reply in table
    assert "sent on attempt 4 at " in table
    assert await send_summaries(pl, handle.workflow_id) == ["SMTP send via lane test, attempt 1"]


async def test_attempts_numbered_across_dead_letter_retries(pl: PostlaneTestEnv, key: str) -> None:
    pl.smtp.fail("data", OUTAGE, times=4)  # the fragile lane gives up after 3 attempts
    handle = await pl.client.send(email("ops@fragile.test"), key=key)
    for _ in range(60):
        report = await pl.client.describe(key)
        if report.status == EmailStatus.DEAD_LETTER:
            break
        await pl.sleep(timedelta(seconds=30))
    assert report.status == EmailStatus.DEAD_LETTER
    assert [a.attempt for a in report.attempt_history] == [1, 2, 3]
    assert report.parked_at is not None

    assert await pl.client.retry(key) is True
    receipt = await handle.result()
    assert receipt.attempts == 5
    report = await pl.client.describe(key)
    assert [a.attempt for a in report.attempt_history] == [1, 2, 3, 4]
    assert await send_summaries(pl, handle.workflow_id) == [
        "SMTP send via lane fragile, attempt 1",
        "SMTP send via lane fragile, attempt 4",
    ]


class CountingCatcher(SmtpCatcher):
    """An SmtpCatcher that also counts the transactions (MAIL FROM) that reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.transactions = 0

    async def _fault(self, phase: Phase, server: SMTP) -> str | None:
        if phase == "mail":
            self.transactions += 1
        return await super()._fault(phase, server)


async def current_details(pl: PostlaneClient, key: str) -> str:
    """The workflow's current details, as the Web UI shows them."""
    handle = pl.temporal.get_workflow_handle(email_workflow_id(key))
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return metadata.current_details


@pytest.mark.devserver
@pytest.mark.timeout(180)
async def test_every_attempt_count_matches_the_transactions_the_server_saw(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    """Refused (550), sent after 451s, dead-lettered after 451s: describe(), ``status
    --attempts``, ``dlq list``, the Web UI's current details and the receipt all count the
    transactions the SMTP server saw, and show the last reply in the same bare form."""
    refused, retried, parked = (f"count-{uuid.uuid4().hex[:8]}-{n}" for n in range(3))
    with CountingCatcher() as smtp:
        lane = new_lane(
            smtp, retry=RetrySettings(initial_interval=timedelta(seconds=1), maximum_attempts=3)
        )
        pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        async with running_workers(dev_env, pl.settings):
            # 550 at RCPT: failed after one transaction.
            smtp.reject_recipient("nobody@example.test", "550 5.1.1 no such user")
            handle = await pl.send(an_email(to="nobody@example.test"), key=refused)
            with pytest.raises(PermanentDeliveryError):
                await handle.result()
            assert smtp.transactions == 1
            report = await pl.describe(refused)
            assert (report.status, report.attempts) == (EmailStatus.FAILED, 1)
            assert report.last_error == "550 5.1.1 no such user"
            assert [a.reply for a in report.attempt_history] == ["550 5.1.1 no such user"]
            assert await current_details(pl, refused) == (
                "status: failed; attempts: 1; last SMTP reply: 550 5.1.1 no such user"
            )
            rc, out, err = await run_postlane(["status", refused, "--attempts"], env)
            assert rc == 0, err
            assert out.startswith(f"{refused}: failed, lane {lane.name}, 1 attempts\n")
            assert out.rstrip().endswith("last reply: 550 5.1.1 no such user")

            # Two 451s at DATA, then accepted: sent on the third transaction.
            smtp.fail("data", OUTAGE, times=2)
            receipt = await (await pl.send(an_email(), key=retried)).result()
            assert smtp.transactions == 1 + 3
            assert receipt.attempts == 3
            assert [m.message_id for m in smtp.messages] == [receipt.message_id]
            report = await pl.describe(retried)
            assert (report.status, report.attempts) == (EmailStatus.SENT, 3)
            assert [a.attempt for a in report.attempt_history] == [1, 2]
            assert await current_details(pl, retried) == (
                f"status: sent; attempts: 3; last SMTP reply: {receipt.smtp_reply}"
            )
            rc, out, err = await run_postlane(["status", retried, "--attempts"], env)
            assert rc == 0, err
            assert out.startswith(f"{retried}: sent, lane {lane.name}, 3 attempts\n")
            assert "sent on attempt 3 at " in out

            # Three 451s and the lane gives up: dead-lettered after three transactions.
            smtp.fail("data", OUTAGE, times=3)
            await pl.send(an_email(), key=parked)

            async def is_parked() -> bool:
                return await pl.status(parked) == EmailStatus.DEAD_LETTER

            await assert_eventually(is_parked, within=60, what="dead-lettered")
            assert smtp.transactions == 4 + 3
            report = await pl.describe(parked)
            assert (report.attempts, report.last_error) == (3, OUTAGE)
            details = await current_details(pl, parked)
            assert details.startswith(
                f"status: dead_letter; attempts: 3; last SMTP reply: {OUTAGE}"
            )
            rc, out, err = await run_postlane(["status", parked, "--attempts"], env)
            assert rc == 0, err
            assert out.startswith(f"{parked}: dead_letter, lane {lane.name}, 3 attempts")

            async def listed() -> str:
                rc, out, err = await run_postlane(["dlq", "list", "--lane", lane.name], env)
                assert rc == 0 and parked in out, (out, err)
                return out

            row = (await assert_eventually(listed, within=30, what="dlq list")).splitlines()[1]
            assert re.split(r"\s{2,}", row)[3::2] == ["3", OUTAGE]  # attempts, last reply
            await pl.dlq.discard(parked)

        # Without a worker the server alone still says one attempt and the bare reply.
        report = await pl.describe(refused)
        assert (report.status, report.attempts) == (EmailStatus.FAILED, 1)
        assert report.last_error == "550 5.1.1 no such user"
