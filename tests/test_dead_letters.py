"""The dead-letter queue from the CLI, on the real dev server (visibility queries need it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from postlane.catcher import SmtpCatcher
from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.errors import PermanentDeliveryError
from postlane.models import EmailStatus, RetrySettings
from postlane.testing import running_workers
from tests.procs import assert_eventually, postlane_env, run_postlane, write_config
from tests.test_integration import address_of, an_email, new_lane

pytestmark = pytest.mark.devserver


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
                return len(await pl.dead_letters(lane=lane.name)) == 3

            await assert_eventually(parked, within=60, what="three emails dead-lettered")
            rc, out, err = await run_postlane(["dlq", "list", "--lane", lane.name], env)
            assert rc == 0, err
            for n in range(3):
                assert f"{key}-{n}" in out
            assert "451 4.3.0 mailbox temporarily unavailable" in out
            assert smtp.messages == []

            rc, out, err = await run_postlane(["dlq", "retry", "--all", "--lane", lane.name], env)
            assert rc == 0, err
            assert "retry: 3 of 3" in out
            receipts = await asyncio.gather(*(asyncio.wait_for(h.result(), 60) for h in handles))
            _, out, _ = await run_postlane(["dlq", "retry", f"{key}-0"], env)  # safe twice
            assert "not dead-lettered, unchanged" in out
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
