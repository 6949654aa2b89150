"""Encryption at rest, end to end: what the Temporal server stores, read without the keys.

Each test runs its own dev server, so the namespace holds only its emails, and reads every
history back through a client that has no codec: the bytes the server keeps.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from postlane import search_attributes as sa
from postlane.client import PostlaneClient
from postlane.config import Settings
from postlane.connection import data_converter
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import Email, EmailStatus, RetrySettings
from postlane.encryption import (
    ENCODING,
    KEY_ID_METADATA,
    EncryptionSettings,
    PayloadDecryptionError,
    new_key,
)
from postlane.sequences.models import Recipient, SequenceSpec
from postlane.testing import running_workers
from tests.conftest import dev_server as shared_dev_server
from tests.procs import assert_eventually
from tests.test_integration import SENDER, address_of, new_lane
from workflows import WORKFLOWS

pytestmark = pytest.mark.devserver


def _keys(**keys: str) -> str:
    return ",".join(f"{key_id}:{key}" for key_id, key in keys.items())


@asynccontextmanager
async def dev_server(encryption: EncryptionSettings) -> AsyncIterator[WorkflowEnvironment]:
    async with shared_dev_server(data_converter(encryption)) as env:
        yield env


def _email(tag: str) -> tuple[Email, list[bytes]]:
    """An email whose subject, body and recipient's local-part are unique to this run."""
    secret = uuid.uuid4().hex[:10]
    local = f"rcpt{tag}{secret}"
    email = Email(
        sender=SENDER,
        to=[f"{local}@example.test"],
        subject=f"Subject {tag} {secret}",
        text=f"Body {tag} {secret}: your code is 847291",
    )
    return email, [
        f"Subject {tag} {secret}".encode(),
        f"Body {tag} {secret}".encode(),
        local.encode(),
    ]


async def stored_bytes(env: WorkflowEnvironment) -> tuple[list[bytes], list[Payload]]:
    """Everything the server keeps on each workflow of the namespace (histories, memos,
    summaries, search attributes), as the raw protobuf bytes a client without keys gets."""
    bare = await Client.connect(address_of(env), namespace=env.client.namespace)
    blobs: list[bytes] = []
    payloads: list[Payload] = []
    async for execution in bare.list_workflows():
        handle = bare.get_workflow_handle(execution.id, run_id=execution.run_id)
        history = await handle.fetch_history()
        for event in history.events:
            blobs.append(event.SerializeToString())
            if event.HasField("workflow_execution_started_event_attributes"):
                payloads.extend(event.workflow_execution_started_event_attributes.input.payloads)
            if event.HasField("activity_task_scheduled_event_attributes"):
                payloads.extend(event.activity_task_scheduled_event_attributes.input.payloads)
        blobs.append((await handle.describe()).raw_description.SerializeToString())
    return blobs, payloads


def leaks(blobs: Iterable[bytes], secrets: Iterable[bytes]) -> list[bytes]:
    joined = b"\n".join(blobs)
    return [secret for secret in secrets if secret in joined]


@pytest.mark.timeout(240)
async def test_encryption_history_holds_no_plaintext(monkeypatch: pytest.MonkeyPatch) -> None:
    encryption = EncryptionSettings(keys=_keys(k1=new_key()))  # type: ignore[arg-type]
    async with dev_server(encryption) as env:
        with SmtpCatcher() as smtp:
            lane = new_lane(
                smtp,
                retry=RetrySettings(
                    initial_interval=timedelta(seconds=1),
                    maximum_interval=timedelta(seconds=1),
                    maximum_attempts=2,
                ),
            )
            settings = Settings(lanes=[lane])
            pl = PostlaneClient(env.client, settings)
            secrets: list[bytes] = []
            async with running_workers(env, settings):
                # Sent at once.
                sent, s = _email("sent")
                secrets += s
                await (await pl.send(sent, key="enc-sent")).result()

                # Refused once, quoting the recipient (as servers do), then sent.
                retried, s = _email("retried")
                secrets += s
                smtp.fail("data", f"451 4.3.0 <{retried.to[0]}> mailbox busy", times=1)
                await (await pl.send(retried, key="enc-retried")).result()

                # Refused on every attempt: parked as a dead letter, and left there.
                parked, s = _email("parked")
                secrets += s
                smtp.fail("data", f"451 4.3.0 <{parked.to[0]}> mailbox busy", times=2)
                await pl.send(parked, key="enc-parked")
                await assert_eventually(
                    lambda: _is(pl, "enc-parked", EmailStatus.DEAD_LETTER),
                    within=60,
                    what="enc-parked dead-lettered",
                )
                report = await pl.describe("enc-parked")
                # The client, holding the key, still reads the sealed failure and summary.
                assert report.subject == parked.subject
                assert report.last_error is not None and parked.to[0] in report.last_error

                # Parked, then retried by an operator, then sent.
                revived, s = _email("revived")
                secrets += s
                smtp.fail("data", f"451 4.3.0 <{revived.to[0]}> mailbox busy", times=2)
                await pl.send(revived, key="enc-revived")
                await assert_eventually(
                    lambda: _is(pl, "enc-revived", EmailStatus.DEAD_LETTER),
                    within=60,
                    what="enc-revived dead-lettered",
                )
                await pl.retry("enc-revived")
                await assert_eventually(
                    lambda: _is(pl, "enc-revived", EmailStatus.SENT),
                    within=60,
                    what="enc-revived sent after retry",
                )

                # A sequence (opaque key: a default key holds the address), whose template
                # text, variables and rendered email are sealed too.
                seq_secret = uuid.uuid4().hex[:10]
                seq_local = f"rcptseq{seq_secret}"
                spec = SequenceSpec.model_validate(
                    {
                        "name": "crypt",
                        "sender": SENDER,
                        "templates": {
                            "intro": {
                                "subject": "Seq subject {{ pitch }}",
                                "text": f"Template text tmpl{seq_secret}, {{{{ pitch }}}}",
                            }
                        },
                        "steps": [{"type": "send", "id": "intro", "template": "intro"}],
                    }
                )
                recipient = Recipient(
                    address=f"{seq_local}@example.test", variables={"pitch": f"var{seq_secret}"}
                )
                secrets += [seq_local.encode(), f"tmpl{seq_secret}".encode()]
                secrets.append(f"var{seq_secret}".encode())
                await pl.sequences.start(spec, recipient, key="enc-seq")

                async def sequence_done() -> bool:
                    return (await pl.sequences.status("enc-seq")).status.finished

                await assert_eventually(sequence_done, within=60, what="enc-seq finished")

            # The SMTP server got every delivered email whole.
            got = {m.recipients[0]: m for m in smtp.messages}
            seq_message = got[f"{seq_local}@example.test"]
            assert seq_message.subject == f"Seq subject var{seq_secret}"
            for email in (sent, retried, revived):
                message = got[email.to[0]]
                assert message.subject == email.subject
                body = message.message.get_body(("plain",))
                assert body is not None and email.text in body.get_content()
            assert parked.to[0] not in got

        blobs, payloads = await stored_bytes(env)
        assert len(blobs) > 20
        # The scan reads what is in clear: the lane's name is a search attribute.
        assert leaks(blobs, [lane.name.encode(), b"enc-parked"]) == [
            lane.name.encode(),
            b"enc-parked",
        ]
        assert leaks(blobs, secrets) == []
        assert payloads and all(
            p.metadata["encoding"] == ENCODING and p.metadata[KEY_ID_METADATA] == b"k1"
            for p in payloads
        )


async def _is(pl: PostlaneClient, key: str, status: EmailStatus) -> bool:
    return await pl.status(key) == status


@pytest.mark.timeout(180)
async def test_encryption_rotation_keeps_old_histories_readable() -> None:
    k1, k2 = new_key(), new_key()
    before = EncryptionSettings(keys=_keys(k1=k1))  # type: ignore[arg-type]
    after = EncryptionSettings(keys=_keys(k1=k1, k2=k2), active_key="k2")  # type: ignore[arg-type]
    async with dev_server(before) as env:
        with SmtpCatcher() as smtp:
            settings = Settings(lanes=[new_lane(smtp)])
            old, _ = _email("old")
            async with running_workers(env, settings):
                await (await PostlaneClient(env.client, settings).send(old, key="rot-old")).result()

            # Key 2 becomes active: a new client and new workers with both keys.
            config = env.client.config()
            config["data_converter"] = data_converter(after)
            rotated_client = Client(**config)
            rotated_env = _with_client(env, rotated_client)
            pl = PostlaneClient(rotated_client, settings)
            new, _ = _email("new")
            async with running_workers(rotated_env, settings):
                await (await pl.send(new, key="rot-new")).result()
                report = await pl.describe("rot-old")  # written under key 1
                assert report.status == EmailStatus.SENT
                assert report.subject == old.subject
                assert report.receipt is not None
            assert [m.subject for m in smtp.messages] == [old.subject, new.subject]

        bare = await Client.connect(address_of(env), namespace=env.client.namespace)
        key_ids = {}
        for key in ("rot-old", "rot-new"):
            history = await bare.get_workflow_handle(f"email:{key}").fetch_history()
            started = history.events[0].workflow_execution_started_event_attributes
            key_ids[key] = started.input.payloads[0].metadata[KEY_ID_METADATA]
            # The whole history (every payload, under whichever key) replays with the ring.
            replayer = Replayer(workflows=WORKFLOWS, data_converter=data_converter(after))
            await replayer.replay_workflow(history)
        assert key_ids == {"rot-old": b"k1", "rot-new": b"k2"}

        # A process still holding only key 1 cannot read what key 2 sealed, and says why.
        history = await bare.get_workflow_handle("email:rot-new").fetch_history()
        sealed = history.events[0].workflow_execution_started_event_attributes.input.payloads[0]
        with pytest.raises(PayloadDecryptionError, match="'k2'"):
            await data_converter(before).payload_codec.decode([sealed])  # type: ignore[union-attr]


class _with_client:  # noqa: N801 - reads as a function at the call site
    """`env` with another client (the one `running_workers` connects its workers through)."""

    def __init__(self, env: WorkflowEnvironment, client: Client) -> None:
        self._env = env
        self.client = client

    def __getattr__(self, name: str) -> object:
        return getattr(self._env, name)


@pytest.mark.timeout(120)
async def test_recipient_domain_attribute_can_be_left_out(dev_env: WorkflowEnvironment) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp)
        private = Settings(lanes=[lane], recipient_domain_attribute=False)
        async with running_workers(dev_env, private):
            # Client and workers both leave it out.
            email, _ = _email("private")
            handle = await PostlaneClient(dev_env.client, private).send(email, key=_key())
            await handle.result()
            raw = dev_env.client.get_workflow_handle(handle.workflow_id)
            history = await raw.fetch_history()
            started = history.events[0].workflow_execution_started_event_attributes
            assert "PostlaneRecipientDomain" not in started.search_attributes.indexed_fields
            assert "PostlaneStatus" in started.search_attributes.indexed_fields
            # Its history (the workers' choice recorded by resolve_lane) replays.
            await Replayer(workflows=WORKFLOWS, data_converter=data_converter()).replay_workflow(
                history
            )
            desc = await dev_env.client.get_workflow_handle(handle.workflow_id).describe()
            assert desc.typed_search_attributes.get(sa.RECIPIENT_DOMAIN) is None
            assert desc.typed_search_attributes.get(sa.STATUS) == "sent"

            # A client that still indexes it: the workers' setting removes it at start.
            email, _ = _email("indexed")
            public = Settings(lanes=[lane])
            handle = await PostlaneClient(dev_env.client, public).send(email, key=_key())
            await handle.result()
            desc = await dev_env.client.get_workflow_handle(handle.workflow_id).describe()
            assert desc.typed_search_attributes.get(sa.RECIPIENT_DOMAIN) is None
            assert desc.typed_search_attributes.get(sa.LANE) == lane.name
            removed = await dev_env.client.get_workflow_handle(handle.workflow_id).fetch_history()
            upserted = [
                name
                for e in removed.events
                if e.HasField("upsert_workflow_search_attributes_event_attributes")
                for name in _upserted(e)
            ]
            # The removal is a command in its history, and that history replays.
            assert "PostlaneRecipientDomain" in upserted
            await Replayer(workflows=WORKFLOWS, data_converter=data_converter()).replay_workflow(
                removed
            )

        async with running_workers(dev_env, Settings(lanes=[lane])):
            # The default indexes it, as before.
            email, _ = _email("default")
            handle = await PostlaneClient(dev_env.client, Settings(lanes=[lane])).send(
                email, key=_key()
            )
            await handle.result()
            desc = await dev_env.client.get_workflow_handle(handle.workflow_id).describe()
            assert desc.typed_search_attributes.get(sa.RECIPIENT_DOMAIN) == ["example.test"]


def _upserted(event: HistoryEvent) -> list[str]:
    return list(
        event.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
    )


def _key() -> str:
    return f"domain-{uuid.uuid4().hex[:10]}"
