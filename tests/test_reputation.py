"""The reputation guard and suppression for all mail, against real parts: the Temporal dev
server, in-process workers, the SMTP catcher scripted to refuse recipients (5xx), and
dovecot over IMAP for spam complaints (ARF, RFC 5965).

Ground truth is what the SMTP server saw (RCPT commands counted at the socket, the raw
bytes of each DATA) and the workflows on the server, never Postlane's report of itself.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from postlane import ConfigurationError, Email, EmailStatus, load_settings
from postlane.client import PostlaneClient
from postlane.config import InboxConfig, LaneConfig, Settings
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import RetrySettings
from postlane.errors import ActionRefused, InvalidInput, RecipientSuppressed
from postlane.ids import email_workflow_id, lane_workflow_id, message_id
from postlane.inbound.classify import classify, route
from postlane.lanes import guard
from postlane.lanes.guard import GuardSettings, OutcomeReport, PauseKind
from postlane.sequences.models import InboundKind, Suppression
from postlane.sequences.suppressions import parse_csv
from postlane.testing import catcher_lane, running_workers
from tests.imap import Dovecot
from tests.procs import POSTLANE_SCRIPT, REPO_ROOT, assert_eventually, lanes_toml, postlane_env

SENDER = "news@rep.test"
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)

# -- the guard's arithmetic (pure) -----------------------------------------------------------


def _window(**counts: int) -> dict[str, list[int]]:
    buckets: dict[str, list[int]] = {}
    guard.record(buckets, NOW, OutcomeReport(**counts))
    return buckets


def test_guard_judges_no_rate_below_the_minimum_sample() -> None:
    settings = GuardSettings(min_sample=100)
    # One bounce in three sends is a 33% rate, but three recipients say nothing yet.
    assert guard.verdict(guard.totals(_window(sent=2, hard_bounces=1)), settings) is None
    found = guard.verdict(guard.totals(_window(sent=95, hard_bounces=5)), settings)
    assert found is not None and found[0] == PauseKind.HARD_BOUNCE
    assert "5.0% (5 of 100)" in found[1]


def test_guard_defaults_follow_the_published_bulk_sender_limits() -> None:
    settings = GuardSettings()
    assert settings.complaint_rate == 0.003  # Google and Yahoo: never reach 0.3%
    assert settings.hard_bounce_rate == 0.05
    assert guard.verdict(guard.totals(_window(sent=1000, complaints=2)), settings) is None
    found = guard.verdict(guard.totals(_window(sent=1000, complaints=3)), settings)
    assert found is not None and found[0] == PauseKind.COMPLAINT


def test_guard_forgets_outcomes_that_left_the_window() -> None:
    settings = GuardSettings(window_minutes=60, min_sample=1)
    buckets = _window(hard_bounces=10)
    guard.record(buckets, NOW + timedelta(minutes=30), OutcomeReport(sent=1))
    guard.prune(buckets, NOW + timedelta(minutes=61), settings)
    assert guard.totals(buckets) == guard.GuardTotals(sent=1)
    assert guard.verdict(guard.totals(buckets), settings) is None


def test_guard_forgets_counted_reports_with_their_window() -> None:
    """A report is known (counted once) while its bucket is in the window, then forgotten."""
    settings = GuardSettings(window_minutes=60)
    counted = {
        "early": guard.bucket_key(NOW),
        "late": guard.bucket_key(NOW + timedelta(minutes=30)),
    }
    guard.forget_reports(counted, NOW + timedelta(minutes=59), settings)
    assert sorted(counted) == ["early", "late"]
    guard.forget_reports(counted, NOW + timedelta(minutes=61), settings)
    assert sorted(counted) == ["late"]


def test_guard_table_in_postlane_toml(tmp_path: Path) -> None:
    path = tmp_path / "postlane.toml"
    base = '[[lanes]]\nname = "bulk"\nsenders = ["*"]\nsmtp_host = "smtp.test"\n[lanes.guard]\n'
    path.write_text(base + "min_sample = 500\ncomplaint_rate = 0.001\n")
    lane = load_settings(path).lane("bulk")
    assert lane.guard.min_sample == 500 and lane.limits().guard == lane.guard
    path.write_text(base + "complaint_rate = 3\n")
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(f"{path}:6: lanes.0.guard.complaint_rate:")


# -- ARF complaints (pure classification) ----------------------------------------------------


def arf_complaint(original_id: str, *, recipient: str, sender: str = SENDER) -> bytes:
    """A feedback report as a mailbox provider sends it (RFC 5965, with the message)."""
    return (
        "From: feedback@fbl.example\r\n"
        "To: complaints@rep.test\r\n"
        "Subject: FW: spam report\r\n"
        f"Message-ID: <arf-{uuid.uuid4().hex}@fbl.example>\r\n"
        "Date: Fri, 27 Nov 2026 12:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="b1"\r\n'
        "\r\n"
        "--b1\r\n"
        "Content-Type: text/plain\r\n\r\n"
        "This is an email abuse report for an email message received from IP 192.0.2.1.\r\n"
        "--b1\r\n"
        "Content-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\n"
        "User-Agent: SomeGenerator/1.0\r\n"
        "Version: 1\r\n"
        f"Original-Mail-From: <{sender}>\r\n"
        f"Original-Rcpt-To: <{recipient}>\r\n"
        "Reported-Domain: rep.test\r\n"
        "--b1\r\n"
        "Content-Type: message/rfc822\r\n\r\n"
        f"From: {sender}\r\n"
        f"To: {recipient}\r\n"
        "Subject: Our news\r\n"
        f"Message-ID: {original_id}\r\n"
        "\r\n"
        "hello\r\n"
        "--b1--\r\n"
    ).encode()


def test_arf_report_is_a_complaint_about_the_returned_message() -> None:
    original = message_id(email_workflow_id("k-1"), "rep.test")
    event = classify(arf_complaint(original, recipient="Carol@Example.test"))
    assert event is not None and event.kind == InboundKind.COMPLAINT
    assert event.refers_to == original and event.refers_to_workflow == "email:k-1"
    assert (event.original_sender, event.original_recipient) == (SENDER, "carol@example.test")
    assert event.status == "abuse"
    assert route(event) is None  # the guard's, not a sequence's


def test_arf_report_about_foreign_mail_is_ignored() -> None:
    assert classify(arf_complaint("<x@elsewhere.test>", recipient="c@example.test")) is None


def test_suppression_csv_bad_row_names_its_line() -> None:
    text = "sender,address,reason,source\na@rep.test,b@example.test,,\na@rep.test,nope,,\n"
    with pytest.raises(InvalidInput) as caught:
        parse_csv(text)
    assert caught.value.field == "csv: line 3: address"
    # Blank lines and rows of empty cells count as lines of the file.
    with pytest.raises(InvalidInput) as caught:
        parse_csv(text.replace("\na@rep.test,nope", "\n\n,,,\n\na@rep.test,nope"))
    assert caught.value.field == "csv: line 6: address"
    with pytest.raises(InvalidInput, match="missing column"):
        parse_csv("who,what\n")


# -- end to end on the dev server ------------------------------------------------------------

devserver = pytest.mark.devserver


@pytest.fixture
def smtp() -> Iterator[SmtpCatcher]:
    with SmtpCatcher() as catcher:
        yield catcher


def rep_lane(smtp: SmtpCatcher, **fields: object) -> LaneConfig:
    return catcher_lane(
        LaneConfig(
            **{
                "name": f"rep-{uuid.uuid4().hex[:6]}",
                "senders": [SENDER],
                "smtp_host": "127.0.0.1",
                "rate_per_second": 4,
                "max_concurrent": 1,
                "retry": RetrySettings(initial_interval=timedelta(seconds=1)),
                **fields,
            }
        ),
        smtp,
    )


@pytest_asyncio.fixture
async def stack(
    dev_env: WorkflowEnvironment, smtp: SmtpCatcher
) -> AsyncIterator[tuple[PostlaneClient, LaneConfig]]:
    lane = rep_lane(smtp, guard=GuardSettings(min_sample=5, hard_bounce_rate=0.5))
    settings = Settings(lanes=[lane])
    async with running_workers(dev_env, settings):
        yield PostlaneClient(dev_env.client, settings), lane


def cli_for(
    dev_env: WorkflowEnvironment, tmp_path: Path, lane: LaneConfig
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the ``postlane`` command (a real process) against the dev server."""
    config = tmp_path / "postlane.toml"
    config.write_text(lanes_toml([lane]))
    env = postlane_env(dev_env.client.service_client.config.target_host, config)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(POSTLANE_SCRIPT), *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return cli


def rcpts(smtp: SmtpCatcher) -> int:
    """RCPT commands the server received, counted at the socket."""
    return sum(session.count("RCPT") for session in smtp.sessions)


def mail(to: str, subject: str = "news") -> Email:
    return Email(sender=SENDER, to=[to], subject=subject, text="hello")


@devserver
@pytest.mark.timeout(120)
async def test_a_refusal_before_mail_is_no_deferral_and_one_at_data_is(
    dev_env: WorkflowEnvironment, smtp: SmtpCatcher
) -> None:
    """A 4xx to EHLO (TLS or the server unavailable for now) says nothing about the
    recipients, so the guard's deferral rate leaves it out; a 4xx to DATA counts."""
    lane = rep_lane(smtp, guard=GuardSettings(min_sample=1000))
    settings = Settings(lanes=[lane])
    # Twice: the client falls back from a refused EHLO to HELO.
    smtp.fail("ehlo", "454 4.3.0 TLS not available due to temporary reason", times=2)
    smtp.fail("data", "451 4.3.0 mailbox temporarily unavailable", times=1)
    async with running_workers(dev_env, settings):
        pl = PostlaneClient(dev_env.client, settings)
        receipt = await (await pl.send(mail("dora@example.test"), key=uuid.uuid4().hex)).result()
        assert receipt.attempts == 3
        # Ground truth at the socket: the first session refused at EHLO and HELO before any
        # MAIL; then two transactions (the refused one reset, its session kept), one kept.
        first, *others = smtp.sessions
        assert first.count("EHLO") == first.count("HELO") == 1 and first.count("MAIL") == 0
        assert sum(s.count("MAIL") for s in others) == sum(s.count("DATA") for s in others) == 2
        assert len(smtp.messages) == 1
        handle = dev_env.client.get_workflow_handle(lane_workflow_id(lane.name))

        async def settled() -> bool:
            # Each failed attempt reported (or not) before it failed: the signals are in
            # the lane's history; once no task is in flight, its state has them all.
            last = (await handle.fetch_history()).events[-1].event_type
            return last not in (
                EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
                EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
            )

        await assert_eventually(settled, what="the lane's task done")
        status = (await pl.lanes.get(lane.name)).status
        assert status is not None and status.guard is not None
        assert status.guard.deferrals == 1


@devserver
@pytest.mark.timeout(240)
async def test_bounce_burst_pauses_the_lane_and_nothing_goes_until_resumed(
    stack: tuple[PostlaneClient, LaneConfig],
    smtp: SmtpCatcher,
    tmp_path: Path,
    dev_env: WorkflowEnvironment,
) -> None:
    pl, lane = stack
    run = uuid.uuid4().hex[:6]
    bad = [f"gone{n}-{run}@bounce.test" for n in range(14)]
    for address in bad:
        smtp.reject_recipient(address, "550 5.1.1 no such user")
    burst = [await pl.send(mail(a), key=f"{run}-bad{n}") for n, a in enumerate(bad)]

    async def paused() -> bool:
        status = (await pl.lanes.get(lane.name)).status
        return status is not None and status.paused

    await assert_eventually(paused, within=90, what="the lane paused by the guard")
    status = (await pl.lanes.get(lane.name)).status
    assert status is not None and status.paused_by == "guard"
    assert status.pause_reason is not None and "hard-bounce rate" in status.pause_reason

    async def settled() -> list[EmailStatus]:
        reports = [await pl.describe(h.key) for h in burst]
        states = [r.status for r in reports]
        if any(s not in (EmailStatus.FAILED, EmailStatus.SCHEDULED) for s in states):
            raise AssertionError(f"not settled: {states}")
        return states

    states = await assert_eventually(settled, within=90, what="the burst failed or waiting")
    waiting = [h for h, s in zip(burst, states, strict=True) if s == EmailStatus.SCHEDULED]
    assert waiting, "the pause came after the whole burst had gone"
    report = await pl.describe(waiting[0].key)
    assert report.last_error is not None and "is paused (guard)" in report.last_error
    assert report.attempts == 0  # refused before any SMTP transaction

    # The list is fixed (the server now takes every address), but the lane stays paused.
    smtp.clear_script()
    seen = rcpts(smtp)
    assert seen == len(burst) - len(waiting)  # one RCPT per email that went out
    later = [await pl.send(mail(f"fine{n}-{run}@ok.test"), key=f"{run}-ok{n}") for n in range(3)]

    async def all_waiting() -> bool:
        reports = [await pl.describe(h.key) for h in later]
        return all(
            r.status == EmailStatus.SCHEDULED and "paused" in (r.last_error or "") for r in reports
        )

    await assert_eventually(all_waiting, within=60, what="new emails wait for the paused lane")
    assert rcpts(smtp) == seen and smtp.messages == []  # nothing went out while paused

    cli = cli_for(dev_env, tmp_path, lane)
    shown = await asyncio.to_thread(cli, "lanes")
    assert shown.returncode == 0, shown.stderr
    assert f"PAUSED {lane.name} since " in shown.stdout and "hard-bounce rate" in shown.stdout
    resumed = await asyncio.to_thread(cli, "lanes", "resume", lane.name, "--note", "cleaned")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed (was paused by guard: hard-bounce rate" in resumed.stdout
    with pytest.raises(ActionRefused):
        await pl.lanes.resume(lane.name)
    queued = [*waiting, *later]
    for h in queued:
        await asyncio.wait_for(h.result(), timeout=120)
    # Exactly once each: every queued email's Message-ID arrived once, nothing else did.
    arrived = collections.Counter(m.message_id for m in smtp.messages)
    assert len(arrived) == len(queued) and set(arrived.values()) == {1}
    assert {m.recipients[0] for m in smtp.messages} == {
        (await pl.describe(h.key)).recipients[0] for h in queued
    }
    # The bounced addresses are suppressed for the sender (hard bounce at RCPT).
    failed = [a for a, s in zip(bad, states, strict=True) if s == EmailStatus.FAILED]
    for address in failed:
        assert await pl.suppressions.is_suppressed(SENDER, address)


@devserver
@pytest.mark.timeout(120)
async def test_operator_pause_holds_emails_scheduled_until_resume(
    stack: tuple[PostlaneClient, LaneConfig], smtp: SmtpCatcher
) -> None:
    pl, lane = stack
    await pl.lanes.pause(lane.name, reason="investigating a complaint")

    async def paused() -> bool:
        status = (await pl.lanes.get(lane.name)).status
        return status is not None and status.paused and status.paused_by == "operator"

    await assert_eventually(paused, what="the lane paused by the operator")
    handle = await pl.send(
        mail(f"erin-{uuid.uuid4().hex[:6]}@example.test"), key=f"op-{uuid.uuid4().hex[:6]}"
    )

    async def held() -> bool:
        report = await pl.describe(handle.key)
        return report.status == EmailStatus.SCHEDULED and "investigating" in (
            report.last_error or ""
        )

    await assert_eventually(held, what="the email held by the paused lane")
    assert rcpts(smtp) == 0
    ended = await pl.lanes.resume(lane.name)
    assert ended.kind == PauseKind.OPERATOR
    receipt = await asyncio.wait_for(handle.result(), timeout=60)
    assert [m.message_id for m in smtp.messages] == [receipt.message_id]


@devserver
@pytest.mark.timeout(120)
async def test_one_off_email_to_a_suppressed_address_ends_suppressed(
    stack: tuple[PostlaneClient, LaneConfig], smtp: SmtpCatcher
) -> None:
    pl, _ = stack
    address = f"dave-{uuid.uuid4().hex[:6]}@example.test"
    await pl.suppressions.add(SENDER, address, reason="asked by phone")
    handle = await pl.send(mail(address), key=f"sup-{uuid.uuid4().hex[:6]}")
    with pytest.raises(RecipientSuppressed) as caught:
        await asyncio.wait_for(handle.result(), timeout=60)
    assert caught.value.address == address
    report = await pl.describe(handle.key)
    assert report.status == EmailStatus.SUPPRESSED and report.attempts == 0
    query = 'PostlaneStatus="suppressed" AND WorkflowType="SendEmail"'
    query = f'{query} AND WorkflowId="{handle.workflow_id}"'

    async def counted() -> bool:
        # Visibility indexes the final status a moment after the workflow closes.
        return (await pl.temporal.count_workflows(query)).count == 1

    # Countable by status, like every other outcome.
    await assert_eventually(counted, what="the email counted as suppressed")
    assert rcpts(smtp) == 0 and smtp.messages == []


@devserver
@pytest.mark.timeout(180)
async def test_suppression_csv_round_trips_through_export_and_import(
    stack: tuple[PostlaneClient, LaneConfig], tmp_path: Path, dev_env: WorkflowEnvironment
) -> None:
    pl, lane = stack
    sender = f"ops-{uuid.uuid4().hex[:6]}@rep.test"
    rows = {
        f"a@{uuid.uuid4().hex[:4]}.test": 'complained, "spam"',
        f"b@{uuid.uuid4().hex[:4]}.test": "550 5.1.1 no such user",
        f"c@{uuid.uuid4().hex[:4]}.test": "",
    }
    for address, reason in rows.items():
        await pl.suppressions.add(sender, address, reason=reason)

    async def listed() -> list[tuple[str, str]]:
        found = [(s.address, s.reason) for s in await pl.suppressions.list(sender)]
        assert len(found) == len(rows)
        return found

    before = await assert_eventually(listed, what="three suppressions visible")
    assert sorted(before) == sorted(rows.items())

    exported = tmp_path / "suppressions.csv"
    postlane = cli_for(dev_env, tmp_path, lane)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return postlane("suppressions", *args)

    done = await asyncio.to_thread(cli, "export", "--sender", sender, "-o", str(exported))
    assert done.returncode == 0, done.stderr
    assert exported.read_text().splitlines()[0] == "sender,address,reason,source"

    # The workflows are lost (terminated, as a namespace wipe would); import recreates them.
    for address in rows:
        await pl.temporal.get_workflow_handle(f"suppressed:{sender}/{address}").terminate()
    for address in rows:
        assert not await pl.suppressions.is_suppressed(sender, address)
    done = await asyncio.to_thread(cli, "import", str(exported))
    assert done.returncode == 0, done.stderr
    assert "imported 3" in done.stdout
    for address in rows:
        assert await pl.suppressions.is_suppressed(sender, address)
    after = await assert_eventually(listed, what="three suppressions visible again")
    assert sorted(after) == sorted(before)

    bad = tmp_path / "bad.csv"
    bad.write_text("sender,address\nops@rep.test,not-an-address\n")
    done = await asyncio.to_thread(cli, "import", str(bad))
    assert done.returncode == 2 and "line 2: address" in done.stderr


# -- ARF over IMAP (dovecot) -----------------------------------------------------------------

USER_ENV, PASS_ENV = "REP_IMAP_USER", "REP_IMAP_PASS"


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with Dovecot() as server:
        yield server


@devserver
@pytest.mark.timeout(180)
async def test_arf_complaint_read_over_imap_suppresses_the_address(
    dev_env: WorkflowEnvironment,
    smtp: SmtpCatcher,
    dovecot: Dovecot,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(USER_ENV, dovecot.user)
    monkeypatch.setenv(PASS_ENV, dovecot.password)
    lane = rep_lane(smtp)
    inbox = InboxConfig(
        name=f"fbl-{uuid.uuid4().hex[:6]}",
        imap_host=dovecot.host,
        imap_port=dovecot.port,
        imap_tls="none",
        username_env=USER_ENV,
        password_env=PASS_ENV,
        folder=f"fbl-{uuid.uuid4().hex[:6]}",
        poll_interval=timedelta(seconds=1),
    )
    settings = Settings(lanes=[lane], inboxes=[inbox])
    address = f"carol-{uuid.uuid4().hex[:6]}@example.test"
    async with running_workers(dev_env, settings):
        pl = PostlaneClient(dev_env.client, settings)
        first = await pl.send(mail(address), key=f"arf-{uuid.uuid4().hex[:6]}")
        await asyncio.wait_for(first.result(), timeout=60)
        [sent] = smtp.messages
        # The provider's feedback loop returns our message, as it went over the wire.
        report = arf_complaint(sent.message_id, recipient=address)
        await dovecot.append(report, inbox.folder)
        await assert_eventually(
            lambda: pl.suppressions.is_suppressed(SENDER, address),
            within=60,
            what="the complaint suppressed the address",
        )

        async def listed() -> list[Suppression]:
            # list() reads visibility, which trails is_suppressed (a describe) by a moment.
            return [s for s in await pl.suppressions.list(SENDER) if s.address == address]

        [held] = await assert_eventually(listed, what="the suppression listed")
        assert held.source == "complaint" and "abuse" in held.reason

        async def counted() -> bool:
            status = (await pl.lanes.get(lane.name)).status
            return status is not None and status.guard is not None and status.guard.complaints == 1

        await assert_eventually(counted, what="the lane counted the complaint")

        # The same report read again (a provider resending it, or a poll retried after it
        # reported): the lane is told twice, and counts it once.
        await dovecot.append(report, inbox.folder)
        lane_handle = dev_env.client.get_workflow_handle(lane_workflow_id(lane.name))

        async def told_twice_and_settled() -> bool:
            events = (await lane_handle.fetch_history()).events
            reports = [
                e.workflow_execution_signaled_event_attributes
                for e in events
                if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
            ]
            complaints = [r for r in reports if r.signal_name == "record_outcomes"]
            complaints = [r for r in complaints if b'"complaints":1' in r.input.payloads[0].data]
            settled = events[-1].event_type not in (
                EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
                EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
            )
            return len(complaints) == 2 and settled

        await assert_eventually(told_twice_and_settled, what="the lane told the report twice")
        status = (await pl.lanes.get(lane.name)).status
        assert status is not None and status.guard is not None
        assert status.guard.complaints == 1
        again = await pl.send(mail(address, "more news"), key=f"arf-{uuid.uuid4().hex[:6]}")
        with pytest.raises(RecipientSuppressed):
            await asyncio.wait_for(again.result(), timeout=60)
        assert len(smtp.messages) == 1  # the second email never reached the server
