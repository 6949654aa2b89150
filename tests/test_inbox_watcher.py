"""The inbox watcher workflow in the time-skipping environment, with real sequences and a
scripted ``poll_inbox`` (the IMAP side is tested against dovecot elsewhere).

The fake poll keeps the real activity's contract: it returns the mailbox's messages above
the cursor, at most ``max_messages``, each classified from raw bytes and routed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest_asyncio
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from postlane.config import InboxConfig, Settings
from postlane.connection import data_converter
from postlane.errors import ErrorType
from postlane.ids import INBOUND_TASK_QUEUE, sequence_workflow_id, unsubscribe_token
from postlane.inbound.classify import classify, route
from postlane.inbound.inboxes import mark_finished, start_inbox_watcher, watcher_status
from postlane.inbound.models import (
    InboundItem,
    InboxCursor,
    PollRequest,
    PollResult,
    UnsubscribeRequest,
    WatcherReport,
)
from postlane.sequences.models import InboundEvent, SequenceReport, SequenceStatus
from postlane.sequences.spec import (
    Recipient,
    SendStep,
    SequenceSpec,
    WaitForReplyStep,
    WaitStep,
)
from postlane.testing import PostlaneTestEnv
from postlane.tokens import TokenKeys
from tests.procs import assert_eventually
from tests.test_inbound import FOLLOW_UP as RETURNED_ID
from tests.test_inbound import POSTFIX_DSN, simple_reply, unsubscribe_mail

SENDER = "agent@acme.test"


def recipient(key: str) -> Recipient:
    """Zoë, under an address of the test's own (an unsubscribe suppresses the address)."""
    return Recipient(address=f"zoe.{key}@example.test", name="Zoë")


FOLLOW_UP = SequenceSpec(
    name="trial",
    sender=SENDER,
    steps=[
        SendStep(id="first", subject="Your trial", text="How is it going?"),
        WaitStep(id="pause", duration=timedelta(hours=1)),
        SendStep(id="follow-up", subject="Your trial", text="Any thoughts?"),
    ],
)
"""Stops at a reply (the default): the follow-up must never go out after one."""

CONVERSATION = SequenceSpec(
    name="chat",
    sender=SENDER,
    steps=[
        SendStep(id="first", subject="Your trial", text="How is it going?"),
        WaitForReplyStep(id="listen", timeout=timedelta(hours=1), on_reply="thanks"),
        SendStep(id="nudge", subject="Your trial", text="Any thoughts?", next="stop"),
        SendStep(id="thanks", subject="Thanks", text="Thanks for your answer!"),
        WaitStep(id="linger", duration=timedelta(days=30)),
    ],
)
"""Goes on after a reply (thanks, then a long wait): a reply applied twice would show."""


@dataclass
class FakeImap:
    """Mailboxes by inbox name; the fake activities read them and record their calls."""

    mailboxes: dict[str, list[bytes]] = field(default_factory=dict)
    failures: dict[str, list[ApplicationError]] = field(default_factory=dict)
    polls: list[PollRequest] = field(default_factory=list)
    unsubscribes: list[UnsubscribeRequest] = field(default_factory=list)
    client: Client | None = None
    keys: TokenKeys = field(default_factory=lambda: TokenKeys.from_settings(Settings()))
    """The workers' keys (the tests' ``POSTLANE_TOKEN_SECRET``), as the real poll has."""

    @activity.defn(name="poll_inbox")
    async def poll_inbox(self, req: PollRequest) -> PollResult:
        self.polls.append(req)
        if self.failures.get(req.inbox):
            raise self.failures[req.inbox].pop(0)
        messages = self.mailboxes.get(req.inbox, [])
        start = req.cursor.last_uid if req.cursor.uidvalidity == 1 else 0
        uids = list(range(start + 1, len(messages) + 1))
        batch = uids[: req.max_messages]
        items = []
        for uid in batch:
            event = classify(messages[uid - 1], keys=self.keys)
            target = route(event, self.keys) if event else None
            if event is not None and target is not None:
                items.append(InboundItem(uid=uid, event=event, target=target))
        assert self.client is not None
        items = await mark_finished(self.client, items)  # as the real activity does
        return PollResult(
            cursor=InboxCursor(uidvalidity=1, last_uid=batch[-1] if batch else start),
            items=items,
            fetched=len(batch),
            ignored=len(batch) - len(items),
            more=len(uids) > len(batch),
        )

    @activity.defn(name="record_unsubscribe")
    async def record_unsubscribe(self, req: UnsubscribeRequest) -> bool:
        self.unsubscribes.append(req)
        return True


@pytest_asyncio.fixture
async def imap(pl: PostlaneTestEnv) -> AsyncIterator[FakeImap]:
    """The fake IMAP activities on ``postlane.inbound`` for one test; every watcher the
    test started is terminated afterwards (left running, it would hold time still)."""
    fake = FakeImap(client=pl.env.client)
    worker = Worker(
        pl.env.client,
        task_queue=INBOUND_TASK_QUEUE,
        activities=[fake.poll_inbox, fake.record_unsubscribe],
    )
    async with worker:
        yield fake
    for name in fake.mailboxes:
        handle = pl.env.client.get_workflow_handle(f"inbound:{name}")
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("test over")


def new_inbox(fake: FakeImap, poll_interval: timedelta = timedelta(days=1)) -> InboxConfig:
    name = f"box-{uuid.uuid4().hex[:8]}"
    fake.mailboxes[name] = []
    return InboxConfig(
        name=name,
        imap_host="imap.acme.test",
        username_env="U",
        password_env="P",
        poll_interval=poll_interval,
    )


async def status(pl: PostlaneTestEnv, inbox: InboxConfig) -> WatcherReport:
    return await watcher_status(pl.env.client, inbox.name)


async def polled(pl: PostlaneTestEnv, inbox: InboxConfig, polls: int) -> WatcherReport:
    """Wait until the watcher has finished `polls` polls (deliveries included)."""

    async def done() -> WatcherReport | None:
        report = await status(pl, inbox)
        return report if report.polls >= polls else None

    return await assert_eventually(done, what=f"{polls} polls of {inbox.name}")


async def enroll(pl: PostlaneTestEnv, spec: SequenceSpec, key: str) -> str:
    """Start the sequence; return the Message-ID of its first email, once it is out."""
    before = len(pl.outbox)
    await pl.client.sequences.start(spec, recipient(key), key=key)
    caught = await pl.smtp.wait_for_async(before + 1)
    return caught[before].message_id


async def test_watcher_reply_stops_sequence_before_its_next_send(
    pl: PostlaneTestEnv, imap: FakeImap, key: str
) -> None:
    first = await enroll(pl, FOLLOW_UP, key)
    inbox = new_inbox(imap)
    imap.mailboxes[inbox.name].append(simple_reply(f"In-Reply-To: {first}"))

    await start_inbox_watcher(pl.env.client, inbox)

    report = await pl.client.sequences.get(key).result()
    assert report.status == SequenceStatus.REPLIED
    assert [m.step for m in report.sent] == ["first"]
    assert [r.message_id for r in report.replies] == ["<r-1@example.test>"]
    assert len(pl.outbox) == 1  # the follow-up never went out
    watcher = await status(pl, inbox)
    assert watcher.delivered == 1 and watcher.cursor.last_uid == 1


async def test_watcher_out_of_office_does_not_stop_and_poll_now_cuts_the_wait(
    pl: PostlaneTestEnv, imap: FakeImap, key: str
) -> None:
    first = await enroll(pl, FOLLOW_UP, key)
    inbox = new_inbox(imap)
    await start_inbox_watcher(pl.env.client, inbox)
    await polled(pl, inbox, 1)

    ooo = simple_reply(f"In-Reply-To: {first}", subject="Out of Office: Your trial")
    imap.mailboxes[inbox.name].append(ooo)
    await pl.env.client.get_workflow_handle(f"inbound:{inbox.name}").signal("poll_now")
    watcher = await polled(pl, inbox, 2)  # the day-long interval did not have to pass

    assert watcher.delivered == 1
    seq = await pl.client.sequences.status(key)
    assert seq.status == SequenceStatus.ACTIVE
    assert seq.auto_replies == 1 and seq.replies == []
    await pl.sleep(timedelta(hours=1, minutes=1))  # the wait ends: the follow-up goes out
    report = await pl.client.sequences.get(key).result()
    assert report.status == SequenceStatus.COMPLETED
    assert [m.step for m in report.sent] == ["first", "follow-up"]


async def test_watcher_redelivered_reply_is_applied_once(
    pl: PostlaneTestEnv, imap: FakeImap, key: str
) -> None:
    first = await enroll(pl, CONVERSATION, key)
    inbox = new_inbox(imap)
    reply = simple_reply(f"In-Reply-To: {first}")
    # The same message twice (as after a UIDVALIDITY change or a watcher started afresh).
    imap.mailboxes[inbox.name] += [reply, reply]

    await start_inbox_watcher(pl.env.client, inbox)
    watcher = await polled(pl, inbox, 1)
    assert watcher.delivered == 2

    async def thanked() -> SequenceReport | None:
        report = await pl.client.sequences.status(key)
        return report if report.step == "linger" else None

    report = await assert_eventually(thanked, what="the thanks sent")
    assert report.status == SequenceStatus.ACTIVE
    assert len(report.replies) == 1
    assert [m.step for m in report.sent] == ["first", "thanks"]
    assert [m.subject for m in pl.outbox] == ["Your trial", "Thanks"]


async def test_watcher_skips_events_for_unknown_or_finished_sequences(
    pl: PostlaneTestEnv, imap: FakeImap, key: str
) -> None:
    first = await enroll(pl, FOLLOW_UP, key)
    await pl.client.sequences.cancel(key)

    # Closed, not just reporting "cancelled": a cancelled sequence first stops its email in
    # flight, and the watcher rightly signals a sequence that is still running.
    handle = pl.client.temporal.get_workflow_handle(sequence_workflow_id(key))

    async def closed() -> bool:
        return (await handle.describe()).status == WorkflowExecutionStatus.CANCELED

    await assert_eventually(closed, what="the sequence closed as cancelled")
    assert (await pl.client.sequences.status(key)).status == SequenceStatus.CANCELLED
    inbox = new_inbox(imap)
    ghost = sequence_workflow_id("never-enrolled")
    imap.mailboxes[inbox.name] += [
        simple_reply(f"In-Reply-To: {first}"),  # its sequence was cancelled
        unsubscribe_mail(unsubscribe_token(ghost)),  # no such sequence
        simple_reply(""),  # answers nothing of ours
    ]

    await start_inbox_watcher(pl.env.client, inbox)
    watcher = await polled(pl, inbox, 1)

    assert (watcher.delivered, watcher.skipped, watcher.ignored) == (0, 2, 1)
    assert watcher.cursor.last_uid == 3  # it went on past them
    # an unsubscribe that reached no running sequence is recorded all the same
    assert imap.unsubscribes == [
        UnsubscribeRequest(key="never-enrolled", reason="mail from zoe@example.test")
    ]


async def test_watcher_unsubscribe_stops_sequence_and_suppresses(
    pl: PostlaneTestEnv, imap: FakeImap, key: str
) -> None:
    await enroll(pl, FOLLOW_UP, key)
    inbox = new_inbox(imap)
    token = unsubscribe_token(sequence_workflow_id(key))
    imap.mailboxes[inbox.name].append(unsubscribe_mail(token))

    await start_inbox_watcher(pl.env.client, inbox)

    report = await pl.client.sequences.get(key).result()
    assert report.status == SequenceStatus.UNSUBSCRIBED
    assert report.stop_reason == "unsubscribed mail from zoe@example.test"
    assert len(pl.outbox) == 1
    assert await pl.client.suppressions.is_suppressed(SENDER, recipient(key).address)
    assert imap.unsubscribes == []


async def test_watcher_failed_poll_is_recorded_and_tried_again(
    pl: PostlaneTestEnv, imap: FakeImap
) -> None:
    inbox = new_inbox(imap)
    imap.failures[inbox.name] = [
        ApplicationError("login refused", type=ErrorType.IMAP_AUTH, non_retryable=True)
    ]
    await start_inbox_watcher(pl.env.client, inbox)

    async def failed() -> WatcherReport | None:
        report = await status(pl, inbox)
        return report if report.last_error else None

    report = await assert_eventually(failed, what="the failure recorded")
    assert "login refused" in (report.last_error or "")
    assert report.polls == 0 and report.cursor == InboxCursor()

    await pl.env.client.get_workflow_handle(f"inbound:{inbox.name}").signal("poll_now")
    report = await polled(pl, inbox, 1)
    assert report.last_error is None
    assert len(imap.polls) == 2  # non-retryable: one attempt, then the next poll


async def test_watcher_start_is_idempotent_and_takes_new_settings(
    pl: PostlaneTestEnv, imap: FakeImap
) -> None:
    inbox = new_inbox(imap)
    await start_inbox_watcher(pl.env.client, inbox)
    await polled(pl, inbox, 1)
    changed = inbox.model_copy(update={"poll_interval": timedelta(minutes=5)})
    await start_inbox_watcher(pl.env.client, changed)  # a worker restarted, config edited

    async def reconfigured() -> bool:
        return (await status(pl, inbox)).config.poll_interval == timedelta(minutes=5)

    await assert_eventually(reconfigured, what="the new poll interval")
    report = await status(pl, inbox)
    assert report.runs == 1 and report.polls == 1  # the same watcher, cursor kept


async def test_watcher_hard_bounce_stops_sequence(
    pl: PostlaneTestEnv, imap: FakeImap, key: str
) -> None:
    first = await enroll(pl, FOLLOW_UP, key)
    inbox = new_inbox(imap)
    dsn = POSTFIX_DSN.replace(RETURNED_ID.encode(), first.encode())
    imap.mailboxes[inbox.name].append(dsn)

    await start_inbox_watcher(pl.env.client, inbox)

    report = await pl.client.sequences.get(key).result()
    assert report.status == SequenceStatus.BOUNCED
    assert report.stop_reason == "bounced 5.1.1"
    assert len(pl.outbox) == 1


async def test_watcher_delivers_in_mailbox_order_per_sequence(
    pl: PostlaneTestEnv, imap: FakeImap, key: str
) -> None:
    first = await enroll(pl, CONVERSATION, key)
    other = await enroll(pl, CONVERSATION, f"{key}-other")
    inbox = new_inbox(imap)
    ids = [f"<m{n}@example.test>" for n in range(5)]
    imap.mailboxes[inbox.name] += [
        simple_reply(f"In-Reply-To: {first}", subject="Auto: away", message_id=ids[0]),
        simple_reply(f"In-Reply-To: {other}", message_id=ids[1]),
        simple_reply(f"In-Reply-To: {first}", message_id=ids[2]),
        simple_reply(f"In-Reply-To: {first}", subject="Auto: away", message_id=ids[3]),
        simple_reply(f"In-Reply-To: {other}", subject="Auto: away", message_id=ids[4]),
    ]

    await start_inbox_watcher(pl.env.client, inbox)
    await polled(pl, inbox, 1)

    async def received(seq_key: str) -> list[str]:
        handle = pl.env.client.get_workflow_handle(sequence_workflow_id(seq_key))
        found = []
        async for event in handle.fetch_history_events():
            attrs = event.workflow_execution_signaled_event_attributes
            if event.HasField("workflow_execution_signaled_event_attributes"):
                [payload] = await data_converter().decode(attrs.input.payloads, [InboundEvent])
                found.append(payload.message_id)
        return found

    assert await received(key) == [ids[0], ids[2], ids[3]]
    assert await received(f"{key}-other") == [ids[1], ids[4]]


async def test_record_reply_routes_raw_mail_like_the_watcher(pl: PostlaneTestEnv, key: str) -> None:
    """The webhook path: an app hands Postlane the raw message it received."""
    first = await enroll(pl, CONVERSATION, key)
    ooo = simple_reply(f"In-Reply-To: {first}", subject="Automatic reply: x", message_id="<a@x>")
    reply = simple_reply(f"In-Reply-To: {first}", message_id="<b@x>")

    assert await pl.client.sequences.record_reply(ooo) == key
    assert (
        await pl.client.sequences.record_reply(simple_reply("")) is None
    )  # answers nothing of ours
    assert await pl.client.sequences.record_reply(reply) == key
    assert await pl.client.sequences.record_reply(reply.decode()) == key  # the same again, as str

    async def thanked() -> SequenceReport | None:
        report = await pl.client.sequences.status(key)
        return report if report.step == "linger" else None

    report = await assert_eventually(thanked, what="the thanks sent")
    assert report.auto_replies == 1
    assert [r.message_id for r in report.replies] == ["<b@x>"]
    assert [m.step for m in report.sent] == ["first", "thanks"]

    token = unsubscribe_token(sequence_workflow_id(key))
    assert await pl.client.sequences.record_reply(unsubscribe_mail(token)) == key
    final = await pl.client.sequences.get(key).result()
    assert final.status == SequenceStatus.UNSUBSCRIBED
