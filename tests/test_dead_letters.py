"""The dead-letter queue from the CLI, on the real dev server (visibility queries need it)."""

from __future__ import annotations

import asyncio
import re
import signal
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from postlane.client import CancelOutcome, EmailHandle, PostlaneClient
from postlane.config import Settings
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import EmailStatus, RetrySettings
from postlane.errors import ActionRefused, EmailCancelled, PermanentDeliveryError
from postlane.testing import running_workers
from tests.procs import (
    WorkerProcess,
    assert_eventually,
    postlane_env,
    run_postlane,
    wait_for_pollers,
    write_config,
)
from tests.test_integration import address_of, an_email, new_lane

pytestmark = pytest.mark.devserver

OUTAGE = "451 4.3.0 mailbox temporarily unavailable"


async def statuses(pl: PostlaneClient, keys: Sequence[str]) -> list[EmailStatus]:
    return [await pl.status(k) for k in keys]


async def all_in(pl: PostlaneClient, keys: Sequence[str], status: EmailStatus) -> bool:
    return all(s == status for s in await statuses(pl, keys))


def table_rows(out: str) -> list[str]:
    """The rows of a CLI table, header dropped."""
    return out.strip().splitlines()[1:]


@pytest.mark.timeout(180)
async def test_dlq_list_and_retry_all_deliver_each_once(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, retry=RetrySettings(maximum_attempts=2))
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(dev_env.client, settings)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        smtp.fail("data", "451 4.3.0 mailbox temporarily unavailable", times=6)  # 3 emails x 2
        async with running_workers(dev_env, settings):
            handles = [await pl.send(an_email(f"#{n}"), key=f"{key}-{n}") for n in range(3)]

            async def parked() -> bool:
                return len(await pl.dlq.list(lane=lane.name)) == 3

            await assert_eventually(parked, within=60, what="three emails dead-lettered")
            rc, out, err = await run_postlane(["dlq", "list", "--lane", lane.name], env)
            assert rc == 0, err
            for n in range(3):
                assert f"{key}-{n}" in out
            assert "451 4.3.0 mailbox temporarily unavailable" in out
            assert smtp.messages == []

            rc, out, err = await run_postlane(["dlq", "retry", "--all", "--lane", lane.name], env)
            assert rc == 0, err
            assert "retry: 3 of 3 parked emails signalled (0 errors)" in out  # one batch job
            assert "dlq retry [" in err and "] 3/3  batch job" in err  # its progress, on stderr
            receipts = await asyncio.gather(*(asyncio.wait_for(h.result(), 60) for h in handles))
            rc, out, err = await run_postlane(["dlq", "retry", f"{key}-0"], env)  # safe twice
            assert rc == 0, err
            assert "retry: 0 of 1 going out again (1 unchanged, 0 errors)" in out
            assert f"{key}-0: unchanged: sent" in err
    assert sorted(m.message_id for m in smtp.messages) == sorted(r.message_id for r in receipts)
    assert all(r.attempts == 3 for r in receipts)
    assert await pl.status(f"{key}-0") == EmailStatus.SENT


async def test_retry_failed_email_after_operator_fixed_cause(
    dev_env: WorkflowEnvironment, key: str
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp)
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(dev_env.client, settings)
        smtp.reject_recipient("bob@example.test", "550 5.1.1 no such user")
        async with running_workers(dev_env, settings):
            handle = await pl.send(an_email(), key=key)
            with pytest.raises(PermanentDeliveryError):
                await handle.result()
            assert await pl.status(key) == EmailStatus.FAILED
            smtp.clear()  # the operator created the mailbox
            assert await pl.retry(key, reason="mailbox created") is True

            async def sent() -> bool:
                return await pl.status(key) == EmailStatus.SENT

            await assert_eventually(sent, within=60, what="the failed email sent on retry")
            again = await pl.send(an_email(), key=key)  # the key still deduplicates
            receipt = await asyncio.wait_for(again.result(), 30)
    assert [m.message_id for m in smtp.messages] == [receipt.message_id]


async def test_dlq_discard_all_twice_ends_each_cancelled(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, retry=RetrySettings(maximum_attempts=1))
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(dev_env.client, settings)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        smtp.fail("rcpt", OUTAGE, times=2)
        keys = [f"{key}-{n}" for n in range(2)]
        async with running_workers(dev_env, settings):
            handles = [await pl.send(an_email(f"#{n}"), key=k) for n, k in enumerate(keys)]
            await assert_eventually(
                lambda: all_in(pl, keys, EmailStatus.DEAD_LETTER), within=60, what="parked"
            )

            async def listed() -> bool:  # visibility catches up with the parked status
                return sorted(await pl.dlq.keys(lane=lane.name)) == keys

            await assert_eventually(listed, within=30, what="both listed by the server")
            args = ["dlq", "discard", "--all", "--lane", lane.name]
            rc, out, err = await run_postlane(args, env)
            assert rc == 0, err
            assert "discard: 2 of 2 parked emails signalled (0 errors)" in out  # one batch job
            assert "dlq discard [" in err and "] 2/2  batch job" in err
            await assert_eventually(
                lambda: all_in(pl, keys, EmailStatus.CANCELLED), within=30, what="cancelled"
            )
            rc, out, err = await run_postlane(args, env)  # the second run changes nothing
            assert rc == 0, err
            # Visibility may still list some as parked: those ignore the signal (not parked).
            assert re.search(r"discard: (\d) of \1 parked emails signalled \(0 errors\)", out)
            for handle in handles:
                with pytest.raises(EmailCancelled, match="discarded"):
                    await asyncio.wait_for(handle.result(), 30)
    assert smtp.messages == []


@pytest.mark.timeout(300)
async def test_outage_parks_across_worker_kill_then_retry_all_delivers_each_once(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    """The lane's provider is down: emails park in dead_letter while the only worker is
    SIGKILLed and replaced; once the provider is back, ``dlq retry --all`` sends each once
    and ``dlq discard`` ends the others. Nothing is lost, nothing sent twice."""
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = new_lane(
            smtp,
            retry=RetrySettings(
                initial_interval=timedelta(seconds=2),
                maximum_interval=timedelta(seconds=8),
                maximum_attempts=4,  # attempts at about 0, 2, 6 and 14 s, then parked
            ),
        )
        pl = PostlaneClient(client, Settings(lanes=[lane]))
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        smtp.fail("data", OUTAGE, times=1_000_000)  # the provider is down until cleared
        early = [f"{key}-early-{n}" for n in range(3)]
        late = [f"{key}-late-{n}" for n in range(3)]
        handles: dict[str, EmailHandle] = {}

        with WorkerProcess.start(env, tmp_path, "--lanes", lane.name, name="first") as first:
            await wait_for_pollers(client, lane.task_queue, [first])
            for k in early:
                handles[k] = await pl.send(an_email(k), key=k)
            await assert_eventually(
                lambda: all_in(pl, early, EmailStatus.DEAD_LETTER), within=90, what="early parked"
            )
            for k in late:
                handles[k] = await pl.send(an_email(k), key=k)

            async def late_failed_once() -> bool:
                return all([(await pl.describe(k)).attempt_history for k in late])

            await assert_eventually(late_failed_once, within=60, what="late ones failed once")
            first.kill()  # in the middle: three parked, three between retries
            assert await first.wait() == -signal.SIGKILL
        assert EmailStatus.DEAD_LETTER not in await statuses(pl, late)

        with WorkerProcess.start(env, tmp_path, "--lanes", lane.name, name="second") as second:
            everyone = early + late
            await assert_eventually(
                lambda: all_in(pl, everyone, EmailStatus.DEAD_LETTER), within=120, what="parked"
            )

            async def listed() -> list[str]:
                rc, out, err = await run_postlane(["dlq", "list", "--lane", lane.name], env)
                assert rc == 0, err
                rows = table_rows(out)
                assert sorted(r.split()[0] for r in rows) == sorted(everyone), out
                return rows

            rows = await assert_eventually(listed, within=30, what="dlq list shows all six")
            for row in rows:
                _, row_lane, recipients, attempts, parked, reply = re.split(r"\s{2,}", row)
                assert (row_lane, recipients, attempts, reply) == (
                    lane.name,
                    "bob@example.test",
                    "4",
                    OUTAGE,
                )
                assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ \(\d+[sm] ago\)", parked)
            rc, out, err = await run_postlane(
                ["dlq", "list", "--lane", lane.name, "--since", "1h"], env
            )
            assert rc == 0, err
            assert sorted(r.split()[0] for r in table_rows(out)) == sorted(everyone)
            later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
            rc, out, err = await run_postlane(
                ["dlq", "list", "--lane", lane.name, "--since", later], env
            )
            assert rc == 0, err
            assert table_rows(out) == []
            # The server filters on PostlaneParkedAt (dead_letter_keys does not filter again).
            assert await pl.dlq.keys(lane=lane.name, since=datetime.fromisoformat(later)) == []
            hour_ago = datetime.now(UTC) - timedelta(hours=1)
            assert sorted(await pl.dlq.keys(lane=lane.name, since=hour_ago)) == sorted(everyone)

            # Each late email's attempts: the first by the killed worker, the last by its
            # replacement; every one with the provider's reply and its SMTP server.
            for k in late:
                report = await pl.describe(k)
                history = report.attempt_history
                assert history[-1].attempt == report.attempts == 4
                assert {a.reply for a in history} == {OUTAGE}
                assert {a.smtp_server for a in history} == {f"{smtp.host}:{smtp.port}"}
                assert first.owns(history[0].worker) and second.owns(history[-1].worker)
            rc, out, err = await run_postlane(["status", late[0], "--attempts"], env)
            assert rc == 0, err
            assert out.startswith(f"{late[0]}: dead_letter, lane {lane.name}, 4 attempts")
            assert out.count(OUTAGE) == len((await pl.describe(late[0])).attempt_history)
            assert f"{smtp.host}:{smtp.port}" in out and second.identity_prefix in out

            smtp.clear_script()  # the provider is back
            discarded, retried = [early[0], late[0]], [early[1], early[2], late[1], late[2]]
            rc, out, err = await run_postlane(["dlq", "discard", *discarded], env)
            assert rc == 0, err
            assert "discard: 2 of 2 discarded" in out
            await assert_eventually(
                lambda: all_in(pl, discarded, EmailStatus.CANCELLED), within=30, what="discarded"
            )

            args = ["dlq", "retry", "--all", "--lane", lane.name]

            async def only_retried_listed() -> bool:
                return sorted(await pl.dlq.keys(lane=lane.name)) == sorted(retried)

            await assert_eventually(only_retried_listed, within=30, what="visibility caught up")
            rc, out, err = await run_postlane(args, env)
            assert rc == 0, err
            assert "retry: 4 of 4 parked emails signalled (0 errors)" in out
            receipts = [await asyncio.wait_for(handles[k].result(), 90) for k in retried]
            rc, out, err = await run_postlane(args, env)  # a second run changes nothing
            assert rc == 0, err
            # Visibility may still list some as parked: those ignore the signal (not parked).
            assert re.search(r"retry: (\d) of \1 parked emails signalled \(0 errors\)", out)
            for k in discarded:
                with pytest.raises(EmailCancelled, match="discarded"):
                    await asyncio.wait_for(handles[k].result(), 30)
            assert second.running, second.describe_exit()

    assert all(r.attempts == 5 for r in receipts)
    delivered = Counter(m.message_id for m in smtp.messages)
    assert delivered == Counter({r.message_id: 1 for r in receipts})  # each once, no other
    assert await statuses(pl, retried) == [EmailStatus.SENT] * 4
    assert await statuses(pl, discarded) == [EmailStatus.CANCELLED] * 2


@pytest.mark.timeout(120)
async def test_retry_and_discard_of_an_email_that_is_not_parked_are_refused(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    """The workflow's update validator refuses them with the email's status: the client
    raises ActionRefused, the CLI prints it and exits 2, ``dlq`` counts it unchanged."""
    with SmtpCatcher() as smtp:
        lane = new_lane(
            smtp,
            retry=RetrySettings(
                initial_interval=timedelta(minutes=10), maximum_interval=timedelta(minutes=10)
            ),
        )
        pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        smtp.fail("data", OUTAGE)
        async with running_workers(dev_env, pl.settings):
            await pl.send(an_email(), key=key)

            async def retrying() -> bool:
                return (await pl.describe(key)).status == EmailStatus.RETRYING

            await assert_eventually(retrying, within=60, what="waiting between attempts")
            rc, out, err = await run_postlane(["retry", key], env)
            assert rc == 2, (out, err)
            assert err.strip() == (
                f"error: ActionRefused: {key}: cannot retry: the email is queued, not dead_letter"
            )
            with pytest.raises(ActionRefused) as refused:
                await pl.dlq.discard(key)
            assert (refused.value.action, refused.value.reason) == (
                "discard",
                "cannot discard: the email is queued, not dead_letter",
            )
            rc, out, err = await run_postlane(["dlq", "discard", key], env)
            assert rc == 0, err
            assert "discard: 0 of 1 discarded (1 unchanged, 0 errors)" in out
            assert f"{key}: unchanged: retrying" in err
            assert await pl.status(key) == EmailStatus.RETRYING  # nothing changed

            assert (await pl.cancel(key)).outcome == CancelOutcome.CANCELLED
            rc, out, err = await run_postlane(["retry", key], env)
            assert rc == 2, (out, err)
            assert (
                err.strip() == f"error: ActionRefused: {key}: cannot retry: the email is cancelled"
            )
    assert smtp.messages == []
