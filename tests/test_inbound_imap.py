"""The ``poll_inbox`` activity against a real IMAP server (dovecot on loopback)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aioimaplib
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.inbound import InboundActivities
from postlane.config import InboxConfig, Settings
from postlane.errors import ErrorType
from postlane.ids import email_workflow_id, message_id, sequence_workflow_id
from postlane.inbound.models import InboxCursor, PollRequest, PollResult
from postlane.sequences.models import InboundKind
from tests.imap import Dovecot
from tests.test_inbound import EXCHANGE_OOO, GMAIL_REPLY, POSTFIX_DSN, simple_reply

USER_ENV, PASS_ENV = "TEST_IMAP_USER", "TEST_IMAP_PASS"


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with Dovecot() as server:
        yield server


@pytest.fixture(scope="module")
def dovecot_tls() -> Iterator[Dovecot]:
    with Dovecot(tls=True) as server:
        yield server


@pytest.fixture
def login(monkeypatch: pytest.MonkeyPatch, dovecot: Dovecot) -> None:
    monkeypatch.setenv(USER_ENV, dovecot.user)
    monkeypatch.setenv(PASS_ENV, dovecot.password)


def inbox_for(server: Dovecot, **fields: Any) -> InboxConfig:
    """An inbox on `server` reading a folder of its own (tests share the mailbox)."""
    return InboxConfig(
        **{
            "name": "replies",
            "imap_host": server.host,
            "imap_port": server.port,
            "imap_tls": "none",
            "username_env": USER_ENV,
            "password_env": PASS_ENV,
            "folder": f"t-{uuid.uuid4().hex[:8]}",
            "imap_timeout": 10.0,
            **fields,
        }
    )


async def poll(inbox: InboxConfig, cursor: InboxCursor | None = None, **req: Any) -> PollResult:
    activities = InboundActivities(Settings(inboxes=[inbox]))
    request = PollRequest(inbox=inbox.name, cursor=cursor or InboxCursor(), **req)
    result: PollResult = await ActivityEnvironment().run(activities.poll_inbox, request)
    return result


async def flags(server: Dovecot, folder: str) -> list[bytes]:
    client = aioimaplib.IMAP4(host=server.host, port=server.port, timeout=10)
    await client.wait_hello_from_server()
    await client.login(server.user, server.password)
    try:
        await client.select(folder)
        response = await client.fetch("1:*", "(FLAGS)")
        return [bytes(line) for line in response.lines[:-1]]
    finally:
        await client.logout()


async def test_poll_inbox_classifies_new_mail_and_leaves_it_untouched(
    dovecot: Dovecot, login: None
) -> None:
    inbox = inbox_for(dovecot)
    # A delivery time far from the Date header and in another zone: INTERNALDATE wins.
    arrived = datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=-7)))
    for message in (GMAIL_REPLY, EXCHANGE_OOO, simple_reply(""), POSTFIX_DSN):
        await dovecot.append(message, inbox.folder, arrived=arrived)

    result = await poll(inbox)

    assert [(i.uid, i.event.kind) for i in result.items] == [
        (1, InboundKind.REPLY),
        (2, InboundKind.AUTO_REPLY),
        (4, InboundKind.BOUNCE),
    ]
    assert {i.target for i in result.items} == {sequence_workflow_id("trial-zoe")}
    assert result.fetched == 4 and result.ignored == 1  # the third answers nothing of ours
    assert result.cursor.last_uid == 4 and result.cursor.uidvalidity is not None
    assert not result.more and not result.reset
    reply = result.items[0].event
    assert reply.received_at == datetime(2026, 3, 29, 8, 30, tzinfo=UTC)
    # read-only: nothing marked \Seen, nothing deleted
    seen = await flags(dovecot, inbox.folder)
    assert len(seen) == 4
    assert not any(b"\\Seen" in line for line in seen), seen

    again = await poll(inbox, result.cursor)
    assert again.items == [] and again.fetched == 0
    assert again.cursor == result.cursor


async def test_poll_inbox_reads_a_backlog_in_batches(dovecot: Dovecot, login: None) -> None:
    inbox = inbox_for(dovecot)
    for n in range(13):
        mid = message_id(email_workflow_id(f"seq-{n}:first"), "acme.test")
        await dovecot.append(simple_reply(f"In-Reply-To: {mid}"), inbox.folder)

    first = await poll(inbox, max_messages=12)  # fetched in two chunks
    assert [i.uid for i in first.items] == list(range(1, 13)) and first.more
    second = await poll(inbox, first.cursor, max_messages=12)
    assert [i.uid for i in second.items] == [13] and not second.more
    assert [i.target for i in first.items + second.items] == [
        sequence_workflow_id(f"seq-{n}") for n in range(13)
    ]


async def test_poll_inbox_uidvalidity_change_reads_folder_again(
    dovecot: Dovecot, login: None
) -> None:
    inbox = inbox_for(dovecot)
    await dovecot.append(GMAIL_REPLY, inbox.folder)
    first = await poll(inbox)
    assert first.cursor.last_uid == 1

    assert first.cursor.uidvalidity is not None
    dovecot.change_uidvalidity(first.cursor.uidvalidity + 1000, inbox.folder)
    again = await poll(inbox, first.cursor)

    assert again.reset
    assert again.cursor.uidvalidity == first.cursor.uidvalidity + 1000
    # the same message again: its Message-ID lets the sequence ignore it
    assert [i.event.message_id for i in again.items] == [first.items[0].event.message_id]


async def test_poll_inbox_wrong_password_is_not_retried_and_not_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with Dovecot() as server:  # its own: dovecot slows later logins after a failure
        monkeypatch.setenv(USER_ENV, server.user)
        monkeypatch.setenv(PASS_ENV, "not-the-password")
        with pytest.raises(ApplicationError) as caught:
            await poll(inbox_for(server, folder="INBOX"))
    assert caught.value.type == ErrorType.IMAP_AUTH
    assert caught.value.non_retryable
    assert "refused the login of $TEST_IMAP_USER" in str(caught.value)
    assert "not-the-password" not in str(caught.value)


async def test_poll_inbox_unreachable_server_is_retried(dovecot: Dovecot, login: None) -> None:
    from tests.procs import free_port

    with pytest.raises(ApplicationError) as caught:
        await poll(inbox_for(dovecot, imap_port=free_port()))
    assert caught.value.type == ErrorType.IMAP_TRANSIENT
    assert not caught.value.non_retryable


async def test_poll_inbox_missing_folder_is_retried(dovecot: Dovecot, login: None) -> None:
    with pytest.raises(ApplicationError) as caught:
        await poll(inbox_for(dovecot, folder="No-Such-Folder"))
    assert caught.value.type == ErrorType.IMAP_TRANSIENT
    assert "EXAMINE" in str(caught.value)


async def test_poll_inbox_missing_login_variable_is_a_configuration_error(
    dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(USER_ENV, raising=False)
    with pytest.raises(ApplicationError) as caught:
        await poll(inbox_for(dovecot))
    assert caught.value.type == ErrorType.CONFIGURATION
    assert f"{USER_ENV} is not set" in str(caught.value)


async def test_poll_inbox_unknown_inbox_is_left_for_another_host() -> None:
    activities = InboundActivities(Settings())
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(activities.poll_inbox, PollRequest(inbox="elsewhere"))
    assert caught.value.type == ErrorType.INBOX_UNKNOWN
    assert not caught.value.non_retryable


@pytest.mark.parametrize("mode", ["tls", "starttls"])
async def test_poll_inbox_over_tls(
    dovecot_tls: Dovecot, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv(USER_ENV, dovecot_tls.user)
    monkeypatch.setenv(PASS_ENV, dovecot_tls.password)
    port = dovecot_tls.tls_port if mode == "tls" else dovecot_tls.port
    inbox = inbox_for(
        dovecot_tls, imap_tls=mode, imap_port=port, imap_ca_file=str(dovecot_tls.ca_file)
    )
    await dovecot_tls.append(GMAIL_REPLY, inbox.folder)
    result = await poll(inbox)
    assert [i.event.kind for i in result.items] == [InboundKind.REPLY]


@pytest.mark.parametrize("mode", ["tls", "starttls"])
async def test_poll_inbox_untrusted_certificate_is_a_configuration_error(
    dovecot_tls: Dovecot, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv(USER_ENV, dovecot_tls.user)
    monkeypatch.setenv(PASS_ENV, dovecot_tls.password)
    port = dovecot_tls.tls_port if mode == "tls" else dovecot_tls.port
    with pytest.raises(ApplicationError) as caught:
        await poll(inbox_for(dovecot_tls, imap_tls=mode, imap_port=port))
    assert caught.value.type == ErrorType.CONFIGURATION
    assert caught.value.non_retryable
