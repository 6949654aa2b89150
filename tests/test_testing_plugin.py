"""The `postlane_env` pytest fixture users get from the postlane plugin."""

from __future__ import annotations

from datetime import timedelta

from postlane import Email, EmailStatus
from postlane.testing import PostlaneTestEnv


async def test_postlane_env_fixture_skips_days_and_captures_mail(
    postlane_env: PostlaneTestEnv,
) -> None:
    send_at = await postlane_env.now() + timedelta(days=7)
    handle = await postlane_env.client.send(
        Email(sender="a@acme.test", to=["b@example.test"], subject="In a week", text="hi"),
        key="week-1",
        send_at=send_at,
    )
    assert await postlane_env.client.status("week-1") == EmailStatus.SCHEDULED
    receipt = await handle.result()
    [caught] = postlane_env.outbox
    assert caught.message_id == receipt.message_id
    assert caught.subject == "In a week"
