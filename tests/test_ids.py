"""Workflow IDs and Message-IDs."""

from __future__ import annotations

import pytest

from postlane.ids import (
    email_workflow_id,
    key_from_workflow_id,
    lane_task_queue,
    message_id,
    validate_key,
    workflow_id_from_message_id,
)


@pytest.mark.parametrize("workflow_id", ["email:verify-bob-1", "sequence:camp:bob@x.test", "é/ü:1"])
def test_message_id_round_trips_to_workflow_id(workflow_id: str) -> None:
    mid = message_id(workflow_id, "acme.test")
    assert mid.startswith("<pl.") and mid.endswith("@acme.test>")
    assert workflow_id_from_message_id(mid) == workflow_id


def test_message_id_foreign_is_none() -> None:
    assert workflow_id_from_message_id("<CAF=abc@mail.gmail.com>") is None


def test_workflow_id_and_lane_queue_names() -> None:
    assert email_workflow_id("k") == "email:k"
    assert key_from_workflow_id("email:k") == "k"
    assert lane_task_queue("acme") == "postlane.lane.acme"


@pytest.mark.parametrize("bad", ["", "a b", "x\ny", "k" * 201])
def test_validate_key_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_key(bad)
