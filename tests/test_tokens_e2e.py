"""Sealed Message-IDs and unsubscribe tokens end to end: the real dev server, a
``python worker.py`` process (sends and inbound), the SMTP catcher and dovecot.

What went out is read from the bytes the SMTP server received; what came back is APPENDed
to the IMAP folder; what it did is the sequences' state on the server.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from email import message_from_bytes
from email.header import decode_header, make_header
from pathlib import Path
from urllib.parse import unquote

import pytest
from temporalio.testing import WorkflowEnvironment

from postlane.dev.catcher import CaughtMessage, SmtpCatcher
from postlane.email.models import Email
from postlane.ids import email_workflow_id, message_id, sequence_workflow_id, unsubscribe_token
from postlane.sequences.models import SequenceReport, SequenceStatus
from postlane.tokens import TokenKeys
from tests.imap import Dovecot
from tests.procs import assert_eventually, run_command
from tests.test_inbound import simple_reply
from tests.test_inbound_e2e import Stack, dovecot, smtp  # noqa: F401 (fixtures)
from tests.test_inbox_watcher import FOLLOW_UP as STOP_ON_REPLY
from tests.test_inbox_watcher import SENDER

pytestmark = pytest.mark.devserver


@pytest.fixture
def stack(
    dev_env: WorkflowEnvironment,
    smtp: SmtpCatcher,  # noqa: F811 (the fixture imported above)
    dovecot: Dovecot,  # noqa: F811
    tmp_path: Path,
) -> Stack:
    return Stack(dev_env, smtp, dovecot, tmp_path)


def unsubscribe_to(to: str, token: str, n: int) -> bytes:
    """The mail a client sends for ``List-Unsubscribe: <mailto:...>``, to `to`."""
    return (
        f"From: zoe@example.test\r\nTo: {to}\r\nSubject: unsubscribe {token}\r\n"
        f"Message-ID: <unsub-{n}@example.test>\r\nDate: Mon, 24 Nov 2025 11:00:00 +0000\r\n"
        "Content-Type: text/plain\r\n\r\nSent by the mail client.\r\n"
    ).encode()


def flip_bit(value: str, at: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return value[:at] + alphabet[alphabet.index(value[at]) ^ 1] + value[at + 1 :]


def b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def unb32(text: str) -> bytes:
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


def mailto_token(message: CaughtMessage) -> str:
    header = str(make_header(decode_header(message.header("List-Unsubscribe"))))
    found = re.search(r"subject=unsubscribe%20([a-z0-9-]+)", unquote(header).replace(" ", "%20"))
    assert found, header
    return found.group(1)


def sent_to(stack: Stack, key: str) -> CaughtMessage:
    [message] = [m for m in stack.smtp.messages if f"{key}@example.test" in m.recipients]
    return message


@pytest.mark.timeout(240)
async def test_wire_carries_no_key_and_forgeries_change_nothing(stack: Stack, key: str) -> None:
    keys = TokenKeys(os.environ["POSTLANE_TOKEN_SECRET"].encode())
    victim, other, old = f"{key}-victim", f"{key}-other", f"{key}-old"
    folder = stack.inbox.folder
    with stack.worker() as worker:
        try:
            victim_mid = await stack.enroll(STOP_ON_REPLY, victim)
            await stack.enroll(STOP_ON_REPLY, other)
            await stack.enroll(STOP_ON_REPLY, old)

            # -- on the wire: nothing a recipient can read the key from -----------------
            for name in (victim, other, old):
                message = sent_to(stack, name)
                workflow_id = email_workflow_id(f"{name}:first")
                legacy_mid = message_id(workflow_id, "acme.test")
                legacy_token = unsubscribe_token(sequence_workflow_id(name))
                headers = message_from_bytes(message.raw)
                mid, unsub = str(headers["Message-ID"]), str(headers["List-Unsubscribe"])
                assert mid.startswith("<pl1.") and keys.open_message_id(mid) == workflow_id
                for readable in (name, key, "trial", legacy_mid[4:-11], legacy_token[3:]):
                    assert readable not in mid and readable not in unsub
                # The old base32 forms are nowhere in the bytes the server received.
                assert legacy_mid[4:40].encode() not in message.raw
                assert legacy_token[3:40].encode() not in message.raw
                token = mailto_token(message)
                assert keys.open_unsubscribe_token(token) == (
                    SENDER,
                    sequence_workflow_id(name),
                )
            victim_token = mailto_token(sent_to(stack, victim))
            other_token = mailto_token(sent_to(stack, other))

            # -- forgeries: read, refused, logged; nothing changes ---------------------
            spliced = "pl1-" + b32(unb32(other_token[4:])[:16] + unb32(victim_token[4:])[16:])
            forged = [
                simple_reply(f"In-Reply-To: {flip_bit(victim_mid, 12)}", message_id="<f1@x.test>"),
                unsubscribe_to(SENDER, flip_bit(victim_token, 25), 1),
                unsubscribe_to(SENDER, spliced, 2),  # another sequence's token, re-aimed
                unsubscribe_to("billing@other.test", victim_token, 3),  # another sender
            ]
            for raw in forged:
                await stack.dovecot.append(raw, folder)

            async def read(n: int) -> bool:
                assert worker.running, worker.describe_exit()
                return (await stack.watcher()).cursor.last_uid == n

            await assert_eventually(lambda: read(len(forged)), within=60, what="forgeries read")
            report = await stack.watcher()
            assert report.ignored == len(forged) and report.delivered == 0
            for name in (victim, other):
                seq = await stack.sequence(name)
                assert seq.status == SequenceStatus.ACTIVE and seq.replies == []

            # -- the genuine ones, and a reply to the old form, still route -------------
            await stack.dovecot.append(
                simple_reply(f"In-Reply-To: {victim_mid}", message_id="<g1@x.test>"), folder
            )
            await stack.dovecot.append(unsubscribe_to(SENDER, other_token, 4), folder)
            legacy_mid = message_id(email_workflow_id(f"{old}:first"), "acme.test")
            await stack.dovecot.append(
                simple_reply(f"In-Reply-To: {legacy_mid}", message_id="<g2@x.test>"), folder
            )

            async def ended(name: str, want: SequenceStatus) -> SequenceReport | None:
                report = await stack.sequence(name)
                return report if report.status == want else None

            await assert_eventually(lambda: ended(victim, SequenceStatus.REPLIED), what="reply")
            await assert_eventually(
                lambda: ended(other, SequenceStatus.UNSUBSCRIBED), what="unsubscribe"
            )
            await assert_eventually(lambda: ended(old, SequenceStatus.REPLIED), what="legacy")
            assert len(stack.smtp.messages) == 3  # no follow-up went out to anyone
        finally:
            await stack.stop_watcher()
        worker.send_signal(15)
        await worker.wait(60)

    logs = worker.stdout + worker.stderr
    rejected = [line for line in logs.splitlines() if "tokens.rejected" in line]
    assert len(rejected) == len(forged), rejected
    assert sum("another sender" in line for line in rejected) == 1
    assert os.environ["POSTLANE_TOKEN_SECRET"] not in logs


@pytest.mark.timeout(180)
async def test_info_logs_of_a_send_carry_no_local_part(stack: Stack, key: str) -> None:
    local = f"zoe.{key}"
    # The default kind of key embeds the address, so IDs in the logs would carry it too.
    email_key = f"signup:{local}@example.test"
    with stack.worker() as worker:
        try:
            handle = await stack.client.send(
                Email(sender=SENDER, to=[f"{local}@example.test"], subject="Hi", text="Hello"),
                key=email_key,
            )
            receipt = await handle.result()
        finally:
            await stack.stop_watcher()
        worker.send_signal(15)
        await worker.wait(60)
    [message] = [m for m in stack.smtp.messages if f"{local}@example.test" in m.recipients]
    assert message.message_id == receipt.message_id
    logs = worker.stdout + worker.stderr
    sent = [line for line in logs.splitlines() if "email.sent" in line]
    assert len(sent) == 1 and "***@example.test" in sent[0], sent
    assert receipt.message_id in sent[0]  # Message-IDs stay, to tie a line to a message
    assert local not in logs


@pytest.mark.timeout(120)
async def test_worker_without_a_good_secret_stops_and_names_the_setting(stack: Stack) -> None:
    worker = [sys.executable, "worker.py"]
    env = dict(stack.process_env)
    del env["POSTLANE_TOKEN_SECRET"]
    rc, _out, err = await run_command(worker, env, within=60)
    assert rc == 2
    [line] = err.strip().splitlines()
    assert line.startswith("error: ConfigurationError: token_secret: not set; set ")
    assert "POSTLANE_TOKEN_SECRET" in line

    env["POSTLANE_TOKEN_SECRET"] = "short"
    rc, _out, err = await run_command(worker, env, within=60)
    assert rc == 2
    assert "token_secret (POSTLANE_TOKEN_SECRET): must be at least 32 characters" in err
    assert "short" not in err  # the value itself is never printed
    assert stack.smtp.messages == []  # nothing sent
