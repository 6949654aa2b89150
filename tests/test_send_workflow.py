"""SendEmailWorkflow end to end in the time-skipping environment, against a real SMTP server."""

from __future__ import annotations

from datetime import timedelta

import pytest
from temporalio.api.enums.v1 import EventType

from postlane import (
    Email,
    EmailCancelled,
    EmailNotFound,
    EmailStatus,
    IdempotencyConflict,
    InvalidEmail,
    PermanentDeliveryError,
    PostlaneClient,
    Settings,
    UnknownLane,
    UnknownSender,
)
from postlane.client import CancelOutcome
from postlane.config import LaneConfig
from postlane.errors import ActionRefused
from postlane.ids import email_workflow_id
from postlane.testing import PostlaneTestEnv
from postlane.tokens import TokenKeys


def email(subject: str = "Your code", *, sender: str = "agent@acme.test", **kw: object) -> Email:
    return Email(sender=sender, to=["bob@example.test"], subject=subject, text="847291", **kw)  # type: ignore[arg-type]


async def wait_status(pl: PostlaneTestEnv, key: str, status: EmailStatus) -> None:
    """Advance virtual time until the email reaches `status` (retries need time to pass)."""
    for _ in range(60):
        if await pl.client.status(key) == status:
            return
        await pl.sleep(timedelta(seconds=30))
    raise AssertionError(f"{key} never reached {status}; last {await pl.client.status(key)}")


async def test_send_delivers_once_with_receipt(pl: PostlaneTestEnv, key: str) -> None:
    handle = await pl.client.send(email(), key=key)
    receipt = await handle.result()
    assert receipt.accepted == ["bob@example.test"]
    assert receipt.rejected == {}
    assert receipt.attempts == 1
    assert receipt.smtp_reply.startswith("250")
    keys = TokenKeys.from_settings(pl.settings)
    assert receipt.message_id == keys.message_id(email_workflow_id(key), "acme.test")
    [caught] = pl.outbox
    assert caught.message_id == receipt.message_id
    assert caught.subject == "Your code"
    assert await pl.client.status(key) == EmailStatus.SENT


async def test_send_same_key_after_completion_returns_same_receipt(
    pl: PostlaneTestEnv, key: str
) -> None:
    first = await (await pl.client.send(email(), key=key)).result()
    second = await (await pl.client.send(email(), key=key)).result()
    assert second == first
    assert len(pl.outbox) == 1


async def test_send_same_key_while_running_attaches_to_it(pl: PostlaneTestEnv, key: str) -> None:
    later = await pl.now() + timedelta(hours=1)
    first = await pl.client.send(email(), key=key, send_at=later)
    second = await pl.client.send(email(), key=key, send_at=later)
    assert second.workflow_id == first.workflow_id
    assert await first.result() == await second.result()
    assert len(pl.outbox) == 1


async def test_send_same_key_different_content_raises_conflict(
    pl: PostlaneTestEnv, key: str
) -> None:
    later = await pl.now() + timedelta(hours=1)
    handle = await pl.client.send(email(), key=key, send_at=later)
    with pytest.raises(IdempotencyConflict):  # while running
        await pl.client.send(email("Another subject"), key=key, send_at=later)
    await handle.result()
    with pytest.raises(IdempotencyConflict):  # after completion
        await pl.client.send(email("Another subject"), key=key)
    assert [m.subject for m in pl.outbox] == ["Your code"]


async def test_send_at_waits_durably_for_days(pl: PostlaneTestEnv, key: str) -> None:
    start = await pl.now()
    handle = await pl.client.send(email(), key=key, send_at=start + timedelta(days=3))
    report = await pl.client.describe(key)
    assert report.status == EmailStatus.SCHEDULED
    assert report.scheduled_for is not None
    await pl.sleep(timedelta(days=2))
    assert pl.outbox == []
    assert await pl.client.status(key) == EmailStatus.SCHEDULED
    receipt = await handle.result()
    assert receipt.sent_at is not None
    assert len(pl.outbox) == 1


async def test_cancel_scheduled_email_sends_nothing(pl: PostlaneTestEnv, key: str) -> None:
    handle = await pl.client.send(email(), key=key, send_at=await pl.now() + timedelta(days=1))
    assert (await pl.client.cancel(key)).outcome == CancelOutcome.CANCELLED
    with pytest.raises(EmailCancelled):
        await handle.result()
    await pl.sleep(timedelta(days=2))
    assert pl.outbox == []
    assert await pl.client.status(key) == EmailStatus.CANCELLED


async def test_cancel_sent_email_changes_nothing(pl: PostlaneTestEnv, key: str) -> None:
    receipt = await (await pl.client.send(email(), key=key)).result()
    cancelled = await pl.client.cancel(key)
    assert (cancelled.outcome, cancelled.already, cancelled.receipt) == (
        CancelOutcome.SENT,
        True,
        receipt,
    )
    assert await pl.client.handle(key).result() == receipt
    assert await pl.client.status(key) == EmailStatus.SENT


async def test_permanent_failure_fails_at_once_keeping_reply(pl: PostlaneTestEnv, key: str) -> None:
    pl.smtp.fail("data", "554 5.7.1 Message rejected for policy reasons")
    handle = await pl.client.send(email(), key=key)
    with pytest.raises(PermanentDeliveryError) as caught:
        await handle.result()
    assert caught.value.smtp_code == 554
    assert "rejected for policy reasons" in caught.value.smtp_message
    report = await pl.client.describe(key)
    assert report.status == EmailStatus.FAILED
    assert "554" in (report.last_error or "")
    assert pl.outbox == []


async def test_transient_failures_retry_until_sent(pl: PostlaneTestEnv, key: str) -> None:
    pl.smtp.fail("rcpt", "451 4.3.0 Temporary local problem", times=2)
    receipt = await (await pl.client.send(email(), key=key)).result()
    assert receipt.attempts == 3
    assert len(pl.outbox) == 1


async def test_retries_exhausted_park_in_dead_letter_then_retry_sends(
    pl: PostlaneTestEnv, key: str
) -> None:
    pl.smtp.fail("data", "451 4.3.0 Mail server temporarily unavailable", times=3)
    handle = await pl.client.send(email(sender="ops@fragile.test"), key=key)
    await wait_status(pl, key, EmailStatus.DEAD_LETTER)
    report = await pl.client.describe(key)
    assert report.attempts == 3
    assert "451" in (report.last_error or "")
    assert report.lane == "fragile"
    assert pl.outbox == []
    assert await pl.client.retry(key, reason="provider is back") is True
    receipt = await handle.result()
    assert receipt.attempts == 4
    assert len(pl.outbox) == 1
    with pytest.raises(ActionRefused, match="cannot retry: the email is sent"):
        await pl.client.retry(key)  # sent: nothing to retry


async def test_dead_letter_discard_ends_cancelled(pl: PostlaneTestEnv, key: str) -> None:
    pl.smtp.fail("data", "421 4.7.0 Try again later", times=3)
    handle = await pl.client.send(email(sender="ops@fragile.test"), key=key)
    await wait_status(pl, key, EmailStatus.DEAD_LETTER)
    assert await pl.client.dlq.discard(key) is True
    with pytest.raises(EmailCancelled, match="discarded"):
        await handle.result()
    assert await pl.client.status(key) == EmailStatus.CANCELLED
    assert pl.outbox == []


async def test_priority_and_fairness_key_reach_the_lane(pl: PostlaneTestEnv, key: str) -> None:
    handle = await pl.client.send(email(), key=key, priority="high")
    await handle.result()
    history = await pl.client.temporal.get_workflow_handle(handle.workflow_id).fetch_history()
    scheduled = [
        e.activity_task_scheduled_event_attributes
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert len(scheduled) == 1
    assert scheduled[0].task_queue.name == "postlane.lane.test"
    assert scheduled[0].priority.priority_key == 1
    assert scheduled[0].priority.fairness_key == "example.test"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"key": "has space"}, "key"),
        ({"key": ""}, "key"),
        ({"priority": "urgent"}, "priority"),
    ],
)
async def test_send_invalid_options_start_nothing(
    pl: PostlaneTestEnv, kwargs: dict[str, str], field: str
) -> None:
    with pytest.raises(InvalidEmail) as caught:
        await pl.client.send(email(), **{"key": "k-valid", **kwargs})  # type: ignore[arg-type]
    assert caught.value.field == field
    with pytest.raises(EmailNotFound):
        await pl.client.status(kwargs.get("key") or "k-valid")


async def test_send_naive_send_at_rejected(pl: PostlaneTestEnv, key: str) -> None:
    from datetime import datetime

    with pytest.raises(InvalidEmail) as caught:
        await pl.client.send(email(), key=key, send_at=datetime(2030, 1, 1))
    assert caught.value.field == "send_at"
    with pytest.raises(EmailNotFound):
        await pl.client.status(key)


async def test_send_unknown_sender_starts_nothing(pl: PostlaneTestEnv, key: str) -> None:
    only_acme = Settings(
        lanes=[LaneConfig(name="acme", senders=["*@acme.test"], smtp_host="127.0.0.1")]
    )
    client = PostlaneClient(pl.client.temporal, only_acme)
    with pytest.raises(UnknownSender) as caught:
        await client.send(email(sender="someone@else.test"), key=key)
    assert caught.value.field == "sender"
    with pytest.raises(EmailNotFound):
        await client.status(key)


async def test_dead_letter_retry_with_new_recipient_and_lane(pl: PostlaneTestEnv, key: str) -> None:
    pl.smtp.reject_recipient("bob@example.test", "450 4.2.1 mailbox busy")
    handle = await pl.client.send(email(sender="ops@fragile.test"), key=key)
    await wait_status(pl, key, EmailStatus.DEAD_LETTER)
    with pytest.raises(InvalidEmail) as caught:
        await pl.client.retry(key, to=["not an address"])
    assert caught.value.field.startswith("to")
    with pytest.raises(UnknownLane):
        await pl.client.retry(key, lane="no-such-lane")
    assert await pl.client.retry(key, to=["carol@example.test"], lane="test") is True
    receipt = await handle.result()
    assert receipt.lane == "test"
    assert receipt.accepted == ["carol@example.test"]
    [caught_mail] = pl.outbox
    assert caught_mail.recipients == ["carol@example.test"]
    assert (await pl.client.describe(key)).lane == "test"  # the search attribute follows
