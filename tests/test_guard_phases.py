"""Only a 5xx about the mail (at MAIL, RCPT or DATA) is a hard bounce for the lane guard.

On the real dev server with a real SMTP server that requires AUTH: a wrong password (535
at AUTH) fails the email but says nothing about its recipients, so the guard counts no
bounce and the lane stays open; a 550 at RCPT on the same lane still counts and pauses it.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from temporalio.testing import WorkflowEnvironment

from postlane import Email, PermanentDeliveryError
from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import RetrySettings
from postlane.lanes.guard import GuardSettings
from postlane.testing import running_workers
from tests.procs import assert_eventually

pytestmark = pytest.mark.devserver

SENDER = "news@guard-phase.test"


def mail(to: str) -> Email:
    return Email(sender=SENDER, to=[to], subject="news", text="hello")


@pytest.mark.timeout(120)
async def test_a_wrong_smtp_password_is_no_hard_bounce_but_a_rcpt_refusal_is(
    dev_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    suffix = uuid.uuid4().hex[:8].upper()
    user_var, password_var = f"GUARD_SMTP_USER_{suffix}", f"GUARD_SMTP_PASSWORD_{suffix}"
    monkeypatch.setenv(user_var, "mailer")
    monkeypatch.setenv(password_var, "wrong")
    with SmtpCatcher(logins={"mailer": "s3cret"}) as smtp:
        lane = LaneConfig(
            name=f"phase-{uuid.uuid4().hex[:6]}",
            senders=[SENDER],
            smtp_host=smtp.host,
            smtp_port=smtp.port,
            smtp_tls="none",
            smtp_username_env=user_var,
            smtp_password_env=password_var,
            retry=RetrySettings(initial_interval=timedelta(seconds=1)),
            # One bounce in one recipient is past this threshold.
            guard=GuardSettings(min_sample=1, hard_bounce_rate=0.5),
        )
        pl = PostlaneClient(dev_env.client, Settings(lanes=[lane]))
        async with running_workers(dev_env, pl.settings):
            run = uuid.uuid4().hex[:6]
            refused = await pl.send(mail(f"ann-{run}@example.test"), key=f"auth-{run}")
            with pytest.raises(PermanentDeliveryError, match="535"):
                await refused.result()
            # The send reported its failure to the lane before it failed: it is counted now.
            status = (await pl.lanes.get(lane.name)).status
            assert status is not None and status.guard is not None
            assert status.guard.hard_bounces == 0
            assert not status.paused
            assert smtp.messages == []
            # Refused at AUTH (seen at the socket): no MAIL was ever sent.
            assert sum(session.count("MAIL") for session in smtp.sessions) == 0

            monkeypatch.setenv(password_var, "s3cret")
            gone = f"gone-{run}@example.test"
            smtp.reject_recipient(gone, "550 5.1.1 no such user")
            bounced = await pl.send(mail(gone), key=f"rcpt-{run}")
            with pytest.raises(PermanentDeliveryError, match="550"):
                await bounced.result()

            async def paused() -> bool:
                status = (await pl.lanes.get(lane.name)).status
                return status is not None and status.paused

            await assert_eventually(paused, within=60, what="the RCPT bounce pauses the lane")
            status = (await pl.lanes.get(lane.name)).status
            assert status is not None and status.guard is not None
            assert status.guard.hard_bounces == 1
            assert status.pause_reason is not None and "hard-bounce rate" in status.pause_reason
