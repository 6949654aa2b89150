"""Sequences in the time-skipping environment: real workflows, real SMTP catcher, fake clock.

The 14-day sequence: intro on day 0; wait up to 4 days for a reply; follow-up on day 4;
wait up to 5 days; last nudge on day 9; wait up to 5 days more (ends day 14).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from postlane.errors import (
    EmailNotFound,
    IdempotencyConflict,
    InvalidEmail,
    RecipientSuppressed,
    SequenceNotFound,
)
from postlane.ids import sequence_email_key
from postlane.sequences.models import InboundEvent, InboundKind, SequenceReport, SequenceStatus
from postlane.sequences.spec import Recipient, SequenceSpec, spec_from_dict
from postlane.testing import PostlaneTestEnv
from tests.procs import assert_eventually

DAY = timedelta(days=1)


def three_step_spec(**overrides: object) -> SequenceSpec:
    data: dict[str, object] = {
        "name": "onboarding",
        "sender": "ada@acme.test",
        "templates": {
            "intro": {
                "subject": "Hello {{ first_name }}",
                "text": "Hi {{ first_name }}, {{ pitch }}",
            },
            "follow": {
                "subject": "Re: Hello {{ first_name }}",
                "text": "Any thoughts on {{ pitch }}?",
            },
            "last": {"subject": "Re: Hello {{ first_name }}", "text": "Last note from me."},
        },
        "steps": [
            {"type": "send", "id": "intro", "template": "intro"},
            {"type": "wait_for_reply", "id": "wait1", "timeout": "4d", "on_timeout": "follow"},
            {"type": "send", "id": "follow", "template": "follow"},
            {"type": "wait_for_reply", "id": "wait2", "timeout": "5d"},
            {"type": "send", "id": "last", "template": "last"},
            {"type": "wait_for_reply", "id": "wait3", "timeout": "5d"},
        ],
    }
    data.update(overrides)
    return spec_from_dict(data)


def bob(address: str = "bob@example.test", **kw: object) -> Recipient:
    return Recipient(address=address, name="Bob Stone", variables={"pitch": "durable email"}, **kw)  # type: ignore[arg-type]


async def report(pl: PostlaneTestEnv, key: str) -> SequenceReport:
    return await pl.client.sequences.status(key)


async def at_step(pl: PostlaneTestEnv, key: str, step: str, sent: int) -> SequenceReport:
    """Wait (real time, no skipping) until the sequence sits in `step` with `sent` emails."""

    async def probe() -> SequenceReport | None:
        r = await report(pl, key)
        return r if r.step == step and len(r.sent) == sent else None

    return await assert_eventually(probe, what=f"{key} at {step} with {sent} sent")


async def finished(pl: PostlaneTestEnv, key: str) -> SequenceReport | None:
    r = await report(pl, key)
    return r if r.status.finished else None


def reply_event(
    r: SequenceReport, kind: InboundKind = InboundKind.REPLY, n: int = 1
) -> InboundEvent:
    return InboundEvent(
        kind=kind,
        message_id=f"<reply-{n}-{r.key}@example.test>",
        refers_to=r.sent[-1].message_id,
        from_address="bob@example.test",
        subject=f"Re: {r.sent[-1].subject}",
        text="Sounds good, let's talk.",
    )


async def test_no_reply_walks_all_three_steps_threaded(pl: PostlaneTestEnv, key: str) -> None:
    start = await pl.now()
    handle = await pl.client.sequences.start(three_step_spec(), bob(), key=key)
    first = await at_step(pl, key, "wait1", 1)
    assert first.next_action == "wait for a reply"
    assert first.next_at is not None and first.next_at - start >= 4 * DAY - timedelta(minutes=1)
    final = await handle.result()
    assert final.status == SequenceStatus.COMPLETED
    assert [m.step for m in final.sent] == ["intro", "follow", "last"]
    sent_days = [(m.sent_at - start) / DAY for m in final.sent if m.sent_at]
    assert [round(d) for d in sent_days] == [0, 4, 9]
    mine = [m for m in pl.outbox if m.recipients == ["bob@example.test"]]
    assert [m.subject for m in mine] == ["Hello Bob", "Re: Hello Bob", "Re: Hello Bob"]
    intro, follow, last = (m.message for m in mine)
    assert intro["In-Reply-To"] is None
    assert follow["In-Reply-To"] == final.sent[0].message_id
    assert last["In-Reply-To"] == final.sent[1].message_id
    assert last["References"].split() == [final.sent[0].message_id, final.sent[1].message_id]
    assert intro["List-Unsubscribe"].startswith("<mailto:ada@acme.test?subject=unsubscribe%20pl1-")
    assert [m.message_id for m in mine] == [s.message_id for s in final.sent]
    # Each send is its own email workflow, keyed <sequence key>:<step>.
    assert (await pl.client.describe(sequence_email_key(key, "follow"))).status == "sent"


async def test_reply_on_day_5_stops_before_step_3(pl: PostlaneTestEnv, key: str) -> None:
    handle = await pl.client.sequences.start(three_step_spec(), bob(), key=key)
    await at_step(pl, key, "wait1", 1)
    await pl.sleep(5 * DAY)
    waiting = await at_step(pl, key, "wait2", 2)
    await pl.client.sequences.record_reply(reply_event(waiting))
    final = await handle.result()
    assert final.status == SequenceStatus.REPLIED
    assert [m.step for m in final.sent] == ["intro", "follow"]
    assert final.replies[0].text == "Sounds good, let's talk."
    assert len([m for m in pl.outbox if m.recipients == ["bob@example.test"]]) == 2
    with pytest.raises(EmailNotFound):  # the last step's email never existed
        await pl.client.describe(sequence_email_key(key, "last"))


async def test_out_of_office_does_not_stop(pl: PostlaneTestEnv, key: str) -> None:
    handle = await pl.client.sequences.start(three_step_spec(), bob(), key=key)
    waiting = await at_step(pl, key, "wait1", 1)
    ooo = reply_event(waiting, InboundKind.AUTO_REPLY)
    assert await pl.client.sequences.record_reply(ooo) == key
    assert await pl.client.sequences.record_reply(ooo) == key  # the same message twice counts once
    final = await handle.result()
    assert final.status == SequenceStatus.COMPLETED
    assert len(final.sent) == 3
    assert final.auto_replies == 1
    assert final.replies == []


async def test_unsubscribe_stops_and_blocks_a_second_enrollment(
    pl: PostlaneTestEnv, key: str
) -> None:
    address = f"u-{key}@example.test"
    await pl.client.sequences.start(three_step_spec(), bob(address), key=key)
    await at_step(pl, key, "wait1", 1)
    assert await pl.client.sequences.unsubscribe(key, reason="clicked the link")
    # Not handle.result(): the test server would skip virtual time past the suppression
    # workflow's default 10-year execution timeout (real servers have none).
    final = await assert_eventually(
        lambda: finished(pl, key), what="sequence stopped by the unsubscribe"
    )
    assert final.status == SequenceStatus.UNSUBSCRIBED
    assert len(final.sent) == 1
    await assert_eventually(
        lambda: pl.client.suppressions.is_suppressed("ada@acme.test", address),
        what="suppression recorded",
    )
    with pytest.raises(RecipientSuppressed):
        await pl.client.sequences.start(three_step_spec(), bob(address), key=f"{key}-again")
    with pytest.raises(SequenceNotFound):
        await pl.client.sequences.status(f"{key}-again")
    # Another sender may still write to them; lifting the suppression re-allows this one.
    assert not await pl.client.suppressions.is_suppressed("grace@acme.test", address)
    assert await pl.client.suppressions.lift("ada@acme.test", address)
    assert not await pl.client.suppressions.is_suppressed("ada@acme.test", address)


async def test_hard_bounce_stops_soft_bounce_does_not(pl: PostlaneTestEnv, key: str) -> None:
    handle = await pl.client.sequences.start(three_step_spec(), bob(), key=key)
    waiting = await at_step(pl, key, "wait1", 1)
    soft = reply_event(waiting, InboundKind.BOUNCE, n=1).model_copy(
        update={"hard": False, "status": "4.2.2"}
    )
    await pl.client.sequences.record_reply(soft)
    assert (await report(pl, key)).status == SequenceStatus.ACTIVE
    hard = reply_event(waiting, InboundKind.BOUNCE, n=2).model_copy(update={"status": "5.1.1"})
    await pl.client.sequences.record_reply(hard)
    final = await handle.result()
    assert final.status == SequenceStatus.BOUNCED
    assert final.stop_reason == "bounced 5.1.1"
    assert len(final.sent) == 1


async def test_pause_across_a_step_delays_it(pl: PostlaneTestEnv, key: str) -> None:
    start = await pl.now()
    handle = await pl.client.sequences.start(three_step_spec(), bob(), key=key)
    await at_step(pl, key, "wait1", 1)
    assert await pl.client.sequences.pause(key)
    paused = await report(pl, key)
    assert paused.status == SequenceStatus.PAUSED
    await pl.sleep(7 * DAY)  # the follow-up was due on day 4
    still = await report(pl, key)
    assert still.status == SequenceStatus.PAUSED
    assert len(still.sent) == 1
    assert await pl.client.sequences.resume(key)
    resumed = await at_step(pl, key, "wait2", 2)
    follow_day = (resumed.sent[1].sent_at - start) / DAY  # type: ignore[operator]
    assert follow_day >= 7
    final = await handle.result()
    assert final.status == SequenceStatus.COMPLETED
    assert len(final.sent) == 3


async def test_continue_as_new_keeps_state(pl: PostlaneTestEnv, key: str) -> None:
    handle = await pl.client.sequences.start(three_step_spec(), bob(), key=key, history_limit=10)
    final = await handle.result()
    assert final.runs > 1
    assert [m.step for m in final.sent] == ["intro", "follow", "last"]
    mine = [m for m in pl.outbox if m.recipients == ["bob@example.test"]]
    refs = mine[-1].message["References"].split()
    assert refs == [final.sent[0].message_id, final.sent[1].message_id]


async def test_enrollment_is_idempotent(pl: PostlaneTestEnv, key: str) -> None:
    spec = three_step_spec(steps=[{"type": "send", "id": "only", "template": "intro"}])
    first = await pl.client.sequences.start(spec, bob(), key=key)
    await first.result()
    again = await pl.client.sequences.start(spec, bob(), key=key)
    assert (await again.result()).status == SequenceStatus.COMPLETED
    assert len([m for m in pl.outbox if m.recipients == ["bob@example.test"]]) == 1
    with pytest.raises(IdempotencyConflict):
        await pl.client.sequences.start(spec, bob("carol@example.test"), key=key)


async def test_template_that_does_not_render_starts_nothing(pl: PostlaneTestEnv, key: str) -> None:
    no_pitch = Recipient(address="dan@example.test", name="Dan")
    with pytest.raises(InvalidEmail) as err:
        await pl.client.sequences.start(three_step_spec(), no_pitch, key=key)
    assert err.value.field == "templates.intro.text"
    assert "pitch" in err.value.reason
    with pytest.raises(SequenceNotFound):
        await pl.client.sequences.status(key)
    assert pl.outbox == []


async def test_reply_branch_sends_a_thank_you(pl: PostlaneTestEnv, key: str) -> None:
    spec = three_step_spec(
        steps=[
            {"type": "send", "id": "intro", "template": "intro"},
            {"type": "wait_for_reply", "id": "wait1", "timeout": "4d", "on_reply": "thanks"},
            {"type": "send", "id": "follow", "template": "follow", "next": "stop"},
            {"type": "send", "id": "thanks", "subject": "Re: Hello", "text": "Thank you!"},
        ]
    )
    handle = await pl.client.sequences.start(spec, bob(), key=key)
    waiting = await at_step(pl, key, "wait1", 1)
    await pl.client.sequences.record_reply(reply_event(waiting))
    final = await handle.result()
    assert final.status == SequenceStatus.COMPLETED
    assert [m.step for m in final.sent] == ["intro", "thanks"]
    thanks = [m for m in pl.outbox if m.recipients == ["bob@example.test"]][-1]
    # The thank-you answers their reply, not only our intro.
    assert thanks.message["In-Reply-To"] == final.replies[0].message_id


async def test_sending_hours_hold_a_send_until_the_window_opens(
    pl: PostlaneTestEnv, key: str
) -> None:
    now = await pl.now()
    zone = "Asia/Tokyo"
    spec = three_step_spec(
        sending_hours="09:00-10:00",
        steps=[{"type": "send", "id": "intro", "template": "intro"}],
    )
    handle = await pl.client.sequences.start(spec, bob(timezone=zone), key=key)
    final = await handle.result()
    from zoneinfo import ZoneInfo

    sent_at = final.sent[0].sent_at
    assert sent_at is not None
    local = sent_at.astimezone(ZoneInfo(zone))
    assert local.hour == 9 or (local.hour == 10 and local.minute == 0)
    assert sent_at - now < DAY + timedelta(hours=1)
    assert sent_at >= now.astimezone(UTC) - timedelta(seconds=1)
    assert isinstance(sent_at, datetime)


def compose_spec(**compose: object) -> SequenceSpec:
    return three_step_spec(
        steps=[
            {"type": "send", "id": "intro", "template": "intro"},
            {"type": "wait_for_reply", "id": "wait1", "timeout": "2d"},
            {"type": "compose", "id": "nudge", "instructions": "Ask about {{ pitch }}.", **compose},
        ]
    )


async def test_compose_step_sends_the_agents_draft_in_thread(pl: PostlaneTestEnv, key: str) -> None:
    handle = await pl.client.sequences.start(compose_spec(), bob(), key=key)
    final = await handle.result()
    assert final.status == SequenceStatus.COMPLETED
    assert [m.step for m in final.sent] == ["intro", "nudge"]
    nudge = [m for m in pl.outbox if m.recipients == ["bob@example.test"]][-1]
    assert nudge.subject == "Re: Hello Bob"
    body = nudge.message.get_content()
    assert "Hi Bob Stone" in body and "Ask about durable email." in body
    assert "(draft 1, after 1 messages)" in body  # the agent saw the thread so far
    assert nudge.message["In-Reply-To"] == final.sent[0].message_id


async def test_invalid_draft_is_asked_again_then_held_for_approval(
    pl: PostlaneTestEnv, key: str
) -> None:
    spec = compose_spec(instructions="[[invalid]] Ask about {{ pitch }}.", approval=True)
    await pl.client.sequences.start(spec, bob(), key=key)
    await pl.sleep(3 * DAY)

    async def held() -> SequenceReport | None:
        r = await report(pl, key)
        return r if r.status == SequenceStatus.AWAITING_APPROVAL else None

    waiting = await assert_eventually(held, what="draft held for approval")
    assert waiting.draft is not None
    assert waiting.draft.subject == "Re: Hello Bob"  # the second draft, after the feedback
    assert "(draft 2," in (waiting.draft.text or "")
    assert waiting.next_action == "approval of nudge"
    assert len([m for m in pl.outbox if m.recipients == ["bob@example.test"]]) == 1
    assert await pl.client.sequences.approve(key, "nudge", text="Edited by a person.", by="ops")
    final = await assert_eventually(lambda: finished(pl, key), what="approved draft sent")
    assert final.status == SequenceStatus.COMPLETED
    sent = [m for m in pl.outbox if m.recipients == ["bob@example.test"]][-1]
    assert sent.message.get_content().strip() == "Edited by a person."


async def test_rejected_draft_is_never_sent(pl: PostlaneTestEnv, key: str) -> None:
    await pl.client.sequences.start(compose_spec(approval=True), bob(), key=key)
    await pl.sleep(3 * DAY)

    async def held() -> bool:
        return (await report(pl, key)).status == SequenceStatus.AWAITING_APPROVAL

    await assert_eventually(held, what="draft held for approval")
    assert await pl.client.sequences.approve(key, "nudge", approved=False, by="ops")
    final = await assert_eventually(lambda: finished(pl, key), what="sequence stopped")
    assert final.status == SequenceStatus.CANCELLED
    assert [m.step for m in final.sent] == ["intro"]
    assert len([m for m in pl.outbox if m.recipients == ["bob@example.test"]]) == 1


async def test_smtp_refusal_of_a_send_ends_the_sequence_bounced(
    pl: PostlaneTestEnv, key: str
) -> None:
    pl.smtp.fail("data", "550 5.1.1 <bob@example.test>: no such user")
    handle = await pl.client.sequences.start(three_step_spec(), bob(), key=key)
    final = await handle.result()
    assert final.status == SequenceStatus.BOUNCED
    assert "550 5.1.1" in (final.stop_reason or "")
    assert final.sent == []


async def test_cancel_stops_a_waiting_sequence(pl: PostlaneTestEnv, key: str) -> None:
    await pl.client.sequences.start(three_step_spec(), bob(), key=key)
    await at_step(pl, key, "wait1", 1)
    assert await pl.client.sequences.cancel(key)

    async def cancelled() -> SequenceReport | None:
        r = await report(pl, key)
        return r if r.status == SequenceStatus.CANCELLED else None

    final = await assert_eventually(cancelled, what="sequence cancelled")
    assert len(final.sent) == 1
    assert not await pl.client.sequences.cancel(key)  # already over: nothing changes
    assert not await pl.client.sequences.pause(key)
