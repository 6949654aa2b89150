"""Replies, out-of-office answers and bounces, end to end: the real Temporal dev server,
``python worker.py`` and ``postlane inbound`` processes, the SMTP catcher as the outbound
server and dovecot as the inbox (messages are APPENDed over IMAP, as a delivery would).

Waits poll what Temporal can observe (`assert_eventually`); nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from postlane.client import PostlaneClient
from postlane.config import InboxConfig, LaneConfig, Settings
from postlane.connection import data_converter
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import RetrySettings
from postlane.ids import INBOUND_TASK_QUEUE, inbox_workflow_id, sequence_workflow_id
from postlane.inbound.inboxes import watcher_status
from postlane.inbound.models import WatcherReport
from postlane.sequences.models import InboundEvent, SequenceReport, SequenceStatus
from postlane.sequences.spec import Recipient, SequenceSpec
from postlane.testing import catcher_lane
from tests.imap import Dovecot
from tests.procs import (
    POSTLANE_SCRIPT,
    REPO_ROOT,
    WorkerProcess,
    activity_pollers,
    assert_eventually,
    lanes_toml,
    postlane_env,
)
from tests.test_inbound import EXCHANGE_OOO, FIRST, POSTFIX_DSN, simple_reply
from tests.test_inbound import FOLLOW_UP as RETURNED_ID
from tests.test_inbox_watcher import CONVERSATION, SENDER
from tests.test_inbox_watcher import FOLLOW_UP as STOP_ON_REPLY

pytestmark = pytest.mark.devserver

USER_ENV, PASS_ENV = "E2E_IMAP_USER", "E2E_IMAP_PASS"


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with Dovecot() as server:
        yield server


@pytest.fixture
def smtp() -> Iterator[SmtpCatcher]:
    with SmtpCatcher() as catcher:
        yield catcher


class Stack:
    """Config file, environment and client for one test's lane and inbox."""

    def __init__(
        self, env: WorkflowEnvironment, smtp: SmtpCatcher, dovecot: Dovecot, tmp: Path
    ) -> None:
        self.env = env
        self.smtp = smtp
        self.dovecot = dovecot
        self.tmp = tmp
        self.lane = catcher_lane(
            LaneConfig(
                name=f"in-{uuid.uuid4().hex[:6]}",
                senders=[SENDER],
                smtp_host="127.0.0.1",
                rate_per_second=50,
                retry=RetrySettings(initial_interval=timedelta(seconds=1)),
            ),
            smtp,
        )
        self.inbox = InboxConfig(
            name=f"in-{uuid.uuid4().hex[:6]}",
            imap_host=dovecot.host,
            imap_port=dovecot.port,
            imap_tls="none",
            username_env=USER_ENV,
            password_env=PASS_ENV,
            folder=f"e2e-{uuid.uuid4().hex[:6]}",
            poll_interval=timedelta(seconds=1),
        )
        config = tmp / "postlane.toml"
        config.write_text(lanes_toml([self.lane]) + inbox_toml(self.inbox))
        address = env.client.service_client.config.target_host
        self.process_env = postlane_env(
            address, config, **{USER_ENV: dovecot.user, PASS_ENV: dovecot.password}
        )
        self.client = PostlaneClient(env.client, Settings(lanes=[self.lane], inboxes=[self.inbox]))

    def worker(self, *args: str, name: str = "worker") -> WorkerProcess:
        return WorkerProcess.start(self.process_env, self.tmp / "logs", *args, name=name)

    def inbound(self, name: str = "inbound") -> WorkerProcess:
        """``postlane inbound``, the way a host dedicated to inbound mail runs it."""
        logs = self.tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{name}.out").open("wb") as out, (logs / f"{name}.err").open("wb") as err:
            proc = subprocess.Popen(
                [str(POSTLANE_SCRIPT), "inbound"],
                cwd=REPO_ROOT,
                env=self.process_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        return WorkerProcess(proc, logs, name)

    async def enroll(self, spec: SequenceSpec, key: str) -> str:
        """Enroll a recipient of the key's own; the Message-ID the catcher saw go out."""
        address = f"{key}@example.test"
        await self.client.sequences.start(spec, Recipient(address=address), key=key)

        def sent() -> str | None:
            for message in self.smtp.messages:
                if address in message.recipients:
                    return message.message_id
            return None

        return await assert_eventually(sent, within=60, what=f"first email of {key}")

    async def sequence(self, key: str) -> SequenceReport:
        return await self.client.sequences.status(key)

    async def watcher(self) -> WatcherReport:
        return await watcher_status(self.env.client, self.inbox.name)

    async def stop_watcher(self) -> None:
        handle = self.env.client.get_workflow_handle(inbox_workflow_id(self.inbox.name))
        try:
            if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
                await handle.terminate("test over")
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:  # it may never have started
                raise

    async def inbound_signals(self, key: str) -> list[str] | None:
        """Message-IDs of the ``inbound`` signals the sequence received, in order, once it
        has run them all (None while a workflow task is pending)."""
        handle = self.env.client.get_workflow_handle(sequence_workflow_id(key))
        desc = await handle.describe()
        if desc.raw_description.HasField("pending_workflow_task"):
            return None
        found = []
        async for event in handle.fetch_history_events():
            attrs = event.workflow_execution_signaled_event_attributes
            if event.HasField("workflow_execution_signaled_event_attributes"):
                if attrs.signal_name == "inbound":
                    [signal] = await data_converter().decode(attrs.input.payloads, [InboundEvent])
                    found.append(signal.message_id)
        return found


def inbox_toml(inbox: InboxConfig) -> str:
    data = inbox.model_dump(mode="json", exclude_none=True)
    data["poll_interval"] = f"{int(inbox.poll_interval.total_seconds())}s"
    return "[[inboxes]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in data.items())


@pytest.fixture
def stack(
    dev_env: WorkflowEnvironment, smtp: SmtpCatcher, dovecot: Dovecot, tmp_path: Path
) -> Stack:
    return Stack(dev_env, smtp, dovecot, tmp_path)


async def test_inbound_reply_stops_sequence_ooo_does_not_dsn_bounces(
    stack: Stack, key: str
) -> None:
    with stack.worker() as worker:
        replied = await stack.enroll(STOP_ON_REPLY, f"{key}-reply")
        away = await stack.enroll(STOP_ON_REPLY, f"{key}-away")
        bounced = await stack.enroll(STOP_ON_REPLY, f"{key}-bounce")
        folder = stack.inbox.folder
        try:
            await stack.dovecot.append(simple_reply(f"In-Reply-To: {replied}"), folder)
            await stack.dovecot.append(EXCHANGE_OOO.replace(FIRST.encode(), away.encode()), folder)
            dsn = POSTFIX_DSN.replace(RETURNED_ID.encode(), bounced.encode())
            await stack.dovecot.append(dsn, folder)

            async def routed() -> bool:
                assert worker.running, worker.describe_exit()
                return (await stack.watcher()).cursor.last_uid == 3

            await assert_eventually(routed, within=60, what="three messages read")

            async def status_of(suffix: str, want: SequenceStatus) -> SequenceReport | None:
                report = await stack.sequence(f"{key}-{suffix}")
                return report if report.status == want else None

            reply = await assert_eventually(
                lambda: status_of("reply", SequenceStatus.REPLIED), what="replied"
            )
            assert [m.step for m in reply.sent] == ["first"]  # stopped before the follow-up
            assert [r.from_address for r in reply.replies] == ["zoe@example.test"]
            bounce = await assert_eventually(
                lambda: status_of("bounce", SequenceStatus.BOUNCED), what="bounced"
            )
            assert bounce.stop_reason == "bounced 5.1.1"

            async def counted() -> SequenceReport | None:
                report = await stack.sequence(f"{key}-away")
                return report if report.auto_replies == 1 and report.step == "pause" else None

            ooo = await assert_eventually(counted, what="the out-of-office counted")
            assert ooo.status == SequenceStatus.ACTIVE  # an out-of-office is not a reply
            assert ooo.replies == []
            assert len(stack.smtp.messages) == 3  # no follow-up went out
        finally:
            await stack.stop_watcher()


async def test_inbound_restarted_watcher_does_not_apply_twice(stack: Stack, key: str) -> None:
    # Sends and workflows on one host, inbound mail on another (`postlane inbound`).
    with stack.worker("--no-inbound") as worker:
        first = await stack.enroll(CONVERSATION, key)
        folder = stack.inbox.folder
        ooo = simple_reply(
            f"In-Reply-To: {first}", subject="Out of Office: Your trial", message_id="<ooo@x.test>"
        )
        await stack.dovecot.append(ooo, folder)
        await stack.dovecot.append(simple_reply(f"In-Reply-To: {first}"), folder)
        try:
            with stack.inbound() as inbound:

                async def thanked() -> SequenceReport | None:
                    assert inbound.running, inbound.describe_exit()
                    report = await stack.sequence(key)
                    return report if report.step == "linger" else None

                before = await assert_eventually(thanked, within=60, what="reply → thanks")
                pollers = await activity_pollers(stack.env.client, INBOUND_TASK_QUEUE)
                assert any(inbound.owns(p) for p in pollers)
                assert not any(worker.owns(p) for p in pollers)  # --no-inbound
                inbound.kill()

            # The watcher is lost with its cursor: a new one reads the folder from UID 1.
            await stack.stop_watcher()
            with stack.inbound("inbound-again") as again:

                async def reread() -> WatcherReport | None:
                    assert again.running, again.describe_exit()
                    report = await stack.watcher()
                    return report if report.runs == 1 and report.cursor.last_uid == 2 else None

                report = await assert_eventually(reread, within=60, what="the folder re-read")
                assert report.delivered == 2  # both signalled again...

                async def repeated() -> list[str] | None:
                    signals = await stack.inbound_signals(key)
                    return signals if signals and len(signals) == 4 else None

                signals = await assert_eventually(repeated, what="the repeats handled")
                # in mailbox order, twice: the out-of-office came before the reply
                assert signals == ["<ooo@x.test>", "<r-1@example.test>"] * 2

            after = await stack.sequence(key)  # ...and both ignored
            assert worker.running
            assert after.status == SequenceStatus.ACTIVE and after.step == "linger"
            assert len(after.replies) == len(before.replies) == 1
            assert after.auto_replies == before.auto_replies == 1
            assert [m.step for m in after.sent] == ["first", "thanks"]
            assert len(stack.smtp.messages) == 2
        finally:
            await stack.stop_watcher()
