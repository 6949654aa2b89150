"""``postlane sequence`` on the real dev server: bulk enrollment, status, pause, unsubscribe,
and a reply recorded from raw RFC 5322 bytes stopping a sequence before its next send."""

from __future__ import annotations

import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.dev.catcher import CaughtMessage, SmtpCatcher
from postlane.errors import ActionRefused, SequenceNotFound
from postlane.sequences.models import SequenceReport, SequenceStatus
from postlane.sequences.spec import Recipient, load_spec
from postlane.testing import fake_compose, running_workers
from tests.procs import assert_eventually, postlane_env, run_postlane, write_config
from tests.test_integration import address_of, new_lane

pytestmark = pytest.mark.devserver

SPEC = """
name = "{name}"
sender = "ada@it.test"
timezone = "Europe/Paris"

[templates.intro]
subject = "A note for {{{{ company }}}}"
text = "Hi {{{{ first_name }}}}, a question about {{{{ company }}}}."

[[steps]]
type = "send"
id = "intro"
template = "intro"

[[steps]]
type = "wait_for_reply"
id = "wait"
timeout = "3d"

[[steps]]
type = "send"
id = "follow"
subject = "Re: A note"
text = "Following up."
"""


def eve_replies(intro: CaughtMessage, message_id: str, text: str) -> bytes:
    """Eve's reply to `intro` (sent by ada@it.test), threaded by its Message-ID."""
    reply = EmailMessage()
    reply["From"] = "Eve <eve@example.test>"
    reply["To"] = "ada@it.test"
    reply["Subject"] = f"Re: {intro.subject}"
    reply["Message-ID"] = message_id
    reply["In-Reply-To"] = intro.message_id
    reply.set_content(text)
    return reply.as_bytes()


def files(tmp_path: Path, rows: list[str]) -> tuple[Path, Path, str]:
    name = f"camp-{uuid.uuid4().hex[:6]}"
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(name=name))
    people = tmp_path / "people.csv"
    people.write_text("email,name,timezone,company\n" + "\n".join(rows) + "\n")
    return spec, people, name


ROWS = [
    "ann@example.test,Ann Lee,America/New_York,Acme",
    "ben@example.test,Ben Ode,,Globex",
    "cat@example.test,Cat Ruiz,Asia/Tokyo,Initech",
]


@pytest.mark.timeout(180)
async def test_bulk_enrollment_validates_first_and_never_enrolls_twice(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, senders=["*@it.test"])
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(dev_env.client, settings)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))

        # One bad row (no company for the template, a made-up zone): nothing starts.
        spec, people, name = files(
            tmp_path, [*ROWS, "dan@example.test,Dan,Mars/Olympus,", "not-an-address,X,,Y"]
        )
        rc, out, err = await run_postlane(
            ["sequence", "start", "--spec", str(spec), "--recipients", str(people)], env
        )
        assert rc == 2, (out, err)
        assert f"{people}:5: timezone: 'Mars/Olympus' is not an IANA time zone" in err
        assert f"{people}:6: address:" in err
        assert "nothing was enrolled" in err
        with pytest.raises(SequenceNotFound):
            await pl.sequences.status(f"{name}:ann@example.test")

        people.write_text("email,name,timezone,company\n" + "\n".join(ROWS) + "\n")
        async with running_workers(dev_env, settings):
            for run in range(2):
                rc, out, err = await run_postlane(
                    ["sequence", "start", "--spec", str(spec), "--recipients", str(people)], env
                )
                assert rc == 0, err
                if run == 0:
                    assert "3 enrolled, 0 already enrolled" in out
                    assert "enrolling [" in err and "3/3" in err
                else:
                    assert "0 enrolled, 3 already enrolled" in out

            async def intros() -> bool:
                return len(smtp.messages) == 3

            await assert_eventually(intros, within=60, what="three intros delivered")
            assert sorted(m.subject for m in smtp.messages) == [
                "A note for Acme",
                "A note for Globex",
                "A note for Initech",
            ]
            count = await dev_env.client.count_workflows(
                f'WorkflowType="Sequence" AND PostlaneTag="sequence:{name}"'
            )
            assert count.count == 3

            key = f"{name}:ben@example.test"
            rc, out, _ = await run_postlane(["sequence", "status", key], env)
            assert rc == 0
            assert "step       wait" in out and "next       wait for a reply at" in out
            assert "sent" in out and "intro: A note for Globex" in out

            rc, out, _ = await run_postlane(["sequence", "pause", key], env)
            assert rc == 0 and "pause sent" in out

            async def paused() -> bool:
                return (await pl.sequences.status(key)).status == SequenceStatus.PAUSED

            await assert_eventually(paused, what="sequence paused")

            async def listed() -> str | None:
                rc, out, _ = await run_postlane(
                    ["sequence", "list", "--campaign", name, "--status", "paused"], env
                )
                return out if rc == 0 and key in out else None

            out = await assert_eventually(listed, what="the paused sequence listed")
            assert out.split() == ["paused", key]
            rc, _, _ = await run_postlane(["sequence", "unsubscribe", key], env)
            assert rc == 0
            await assert_eventually(
                lambda: pl.suppressions.is_suppressed("ada@it.test", "ben@example.test"),
                what="suppressed",
            )
            # A new campaign from the same sender skips Ben.
            rc, out, err = await run_postlane(
                [
                    "sequence",
                    "start",
                    "--spec",
                    str(spec),
                    "--recipients",
                    str(people),
                    "--campaign",
                    f"{name}-2",
                ],
                env,
            )
            assert rc == 0, err
            assert "2 enrolled, 0 already enrolled, 1 suppressed" in out
            for address in ("ann@example.test", "cat@example.test"):
                await pl.sequences.cancel(f"{name}:{address}")
                await pl.sequences.cancel(f"{name}-2:{address}")


@pytest.mark.timeout(120)
async def test_raw_reply_stops_the_sequence_before_its_next_send(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, senders=["*@it.test"])
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(dev_env.client, settings)
        spec, _, name = files(tmp_path, [])
        from postlane.sequences.spec import Recipient

        async with running_workers(dev_env, settings):
            key = f"{name}:eve@example.test"
            handle = await pl.sequences.start(
                load_spec(spec),
                Recipient(address="eve@example.test", name="Eve", variables={"company": "Umbra"}),
                key=key,
            )

            async def waiting() -> SequenceReport | None:
                r = await pl.sequences.status(key)
                return r if r.step == "wait" else None

            await assert_eventually(waiting, within=60, what="intro sent, waiting for a reply")
            [intro] = smtp.messages
            reply = eve_replies(
                intro,
                "<reply-1@example.test>",
                "Yes, let's talk on Monday.\n\n> Hi Eve, a question about Umbra.",
            )
            assert await pl.sequences.record_reply(reply) == key
            final = await handle.result()
    assert final.status == SequenceStatus.REPLIED
    assert [m.step for m in final.sent] == ["intro"]
    assert final.replies[0].from_address == "eve@example.test"
    assert len(smtp.messages) == 1


APPROVAL_SPEC = """
name = "{name}"
sender = "ada@it.test"

[[steps]]
type = "compose"
id = "nudge"
instructions = "Ask {{{{ first_name }}}} about durable email."
approval = true

[[steps]]
type = "wait_for_reply"
id = "wait"
timeout = "3d"
"""


@pytest.mark.timeout(180)
async def test_refused_operator_actions_say_why_and_exit_2(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    """approve of the wrong step or with no draft, pause of a paused sequence, resume of a
    running one: each is refused with its reason (CLI: exit 2; client: ActionRefused) and
    changes nothing."""
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, senders=["*@it.test"])
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(dev_env.client, settings)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        name = f"appr-{uuid.uuid4().hex[:6]}"
        spec = tmp_path / "spec.toml"
        spec.write_text(APPROVAL_SPEC.format(name=name))
        key = f"{name}:fay@example.test"

        async def cli(*args: str) -> tuple[int, str, str]:
            return await run_postlane(["sequence", *args], env)

        async with running_workers(dev_env, settings, agents=[fake_compose]):
            await pl.sequences.start(
                load_spec(spec), Recipient(address="fay@example.test", name="Fay"), key=key
            )

            async def held() -> bool:
                status = (await pl.sequences.status(key)).status
                return status == SequenceStatus.AWAITING_APPROVAL

            await assert_eventually(held, within=60, what="the draft held for approval")
            rc, out, err = await cli("approve", key, "wait")
            assert rc == 2, (out, err)
            assert err.strip() == (
                f"error: ActionRefused: {key}: step 'wait' is not the current step (the"
                " sequence is at 'nudge'); only a draft awaiting approval can be approved"
            )
            with pytest.raises(ActionRefused, match="step 'intro' is not the current step"):
                await pl.sequences.approve(key, "intro")

            assert await cli("pause", key) == (0, f"{key}: pause sent\n", "")
            rc, out, err = await cli("pause", key)
            assert (rc, err.strip()) == (
                2,
                f"error: ActionRefused: {key}: the sequence is already paused",
            ), out
            with pytest.raises(ActionRefused, match="already paused") as refused:
                await pl.sequences.pause(key)
            assert (refused.value.key, refused.value.action) == (key, "pause")
            assert (await cli("resume", key))[0] == 0
            rc, out, err = await cli("resume", key)
            assert (rc, err.strip()) == (
                2,
                f"error: ActionRefused: {key}: the sequence is not paused",
            ), out
            with pytest.raises(ActionRefused, match="not paused"):
                await pl.sequences.resume(key)
            assert smtp.messages == []  # nothing refused has let the draft out

            assert await cli("approve", key, "nudge") == (0, f"{key}: approve sent\n", "")

            async def waiting() -> bool:
                return (await pl.sequences.status(key)).step == "wait"

            await assert_eventually(waiting, within=60, what="the approved draft sent")
            rc, out, err = await cli("approve", key, "nudge")  # decided already: no draft now
            assert rc == 2, (out, err)
            assert "step 'nudge' is not the current step (the sequence is at 'wait')" in err
            with pytest.raises(ActionRefused, match="step 'wait' has no draft awaiting approval"):
                await pl.sequences.approve(key, "wait")
            assert [m.recipients for m in smtp.messages] == [["fay@example.test"]]
            assert await pl.sequences.cancel(key)
            rc, out, err = await cli("approve", key, "wait")  # finished: refused as well
            assert rc == 2, (out, err)
            assert err.strip() == (
                f"error: ActionRefused: {key}: cannot approve: the sequence is cancelled"
            )
