"""Rolling upgrades: a newer client's extra fields reach older workers' workflows without
breaking them (wire models ignore unknown fields), while a spec file's misspelt field is
still refused by name."""

from __future__ import annotations

from typing import Any

import pytest

from postlane.errors import InvalidSpec
from postlane.ids import WORKFLOW_TASK_QUEUE, email_workflow_id, sequence_workflow_id
from postlane.names import SequenceMessages, WorkflowType
from postlane.sequences.models import SequenceReport, SequenceStatus
from postlane.sequences.spec import Recipient, load_spec, spec_from_dict
from postlane.testing import PostlaneTestEnv
from tests.procs import assert_eventually

SPEC: dict[str, Any] = {
    "name": "tolerant",
    "sender": "ada@acme.test",
    "templates": {"intro": {"subject": "Hello {{ first_name }}", "text": "Hi there"}},
    "steps": [
        {"type": "send", "id": "intro", "template": "intro"},
        {"type": "wait_for_reply", "id": "wait", "timeout": "4d"},
        {"type": "send", "id": "never", "template": "intro"},
    ],
}


async def test_sequence_start_and_signal_with_unknown_fields_run(
    pl: PostlaneTestEnv, key: str
) -> None:
    inp = pl.client.sequences.prepare(
        spec_from_dict(SPEC), Recipient(address="bob@example.test", name="Bob"), key=key
    )
    raw = inp.model_dump(mode="json")
    raw["added_in_a_later_version"] = {"anything": 1}
    raw["spec"]["colour"] = "blue"
    raw["spec"]["steps"][0]["tracking"] = True
    raw["spec"]["templates"]["intro"]["preheader"] = "hi"
    raw["recipient"]["nickname"] = "Bobby"
    handle = await pl.client.temporal.start_workflow(
        WorkflowType.SEQUENCE,
        raw,
        id=sequence_workflow_id(key),
        task_queue=WORKFLOW_TASK_QUEUE,
        result_type=SequenceReport,
    )

    async def waiting() -> SequenceReport | None:
        report = await pl.client.sequences.status(key)
        return report if report.step == "wait" and len(report.sent) == 1 else None

    first = await assert_eventually(waiting, what="first email sent, waiting for a reply")
    reply = {
        "kind": "reply",
        "message_id": f"<reply-{key}@example.test>",
        "refers_to": first.sent[0].message_id,
        "from_address": "bob@example.test",
        "subject": "Re: Hello",
        "text": "Yes please.",
        "spam_score": 0.1,  # a field this worker's InboundEvent does not have
    }
    await handle.signal(SequenceMessages.INBOUND, reply)
    final = await handle.result()
    assert final.status == SequenceStatus.REPLIED
    assert [m.step for m in final.sent] == ["intro"]
    mine = [m for m in pl.outbox if m.recipients == ["bob@example.test"]]
    assert [m.message_id for m in mine] == [first.sent[0].message_id]


async def test_send_email_start_with_unknown_fields_is_sent(pl: PostlaneTestEnv, key: str) -> None:
    raw = {
        "email": {
            "sender": "ada@acme.test",
            "to": ["carol@example.test"],
            "subject": "From a newer client",
            "text": "Hello",
            "ai_summary": "an email field this worker does not know",
        },
        "key": key,
        "delivery_window": "tomorrow",
    }
    handle = await pl.client.temporal.start_workflow(
        WorkflowType.SEND_EMAIL, raw, id=email_workflow_id(key), task_queue=WORKFLOW_TASK_QUEUE
    )
    await handle.result()
    caught = [m for m in pl.outbox if m.recipients == ["carol@example.test"]]
    assert [m.subject for m in caught] == ["From a newer client"]


def test_spec_file_with_a_misspelt_field_is_refused_by_name(tmp_path: Any) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(
        'name = "typo"\nsender = "ada@acme.test"\n'
        '[templates.intro]\nsubject = "Hi"\ntext = "Hello"\n'
        '[[steps]]\ntype = "send"\nid = "intro"\ntemplate = "intro"\nnxt = "stop"\n'
    )
    with pytest.raises(InvalidSpec) as caught:
        load_spec(path)
    assert caught.value.field == f"{path}: steps.0.send.nxt"
    assert "unknown field" in caught.value.reason
