"""The wire contract without a server: `postlane schema`, and the checks SendEmail makes of
whatever input any client gives it (postlane.contract, activities.resolve)."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from activities.resolve import resolve
from postlane.config import LaneConfig, Settings
from postlane.contract import parse_send_email_input
from postlane.email.models import (
    DeliveryReceipt,
    Email,
    EmailReport,
    EmailStatus,
    LaneQuery,
    RetrySettings,
    SendEmailInput,
)
from postlane.errors import InvalidEmail
from postlane.idempotency import email_digest
from postlane.lanes.models import (
    Warmup,
)
from tests.procs import POSTLANE_SCRIPT, REPO_ROOT

FOREIGN_INPUT: dict[str, Any] = {
    "email": {"sender": "agent@acme.test", "to": ["bob@example.test"], "subject": "Hi", "text": "x"}
}
"""What the TypeScript example sends: no key, lane, retry or quota."""


def postlane_schema(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(POSTLANE_SCRIPT), "schema", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    done = postlane_schema()
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def test_schema_prints_valid_json_schemas_of_inputs_and_results(schemas: dict[str, Any]) -> None:
    assert set(schemas) == {
        "SendEmailInput",
        "RetryRequest",
        "DeliveryReceipt",
        "EmailReport",
        "AttemptRecord",
    }
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)
    assert schemas["SendEmailInput"]["required"] == ["email"]
    email = schemas["SendEmailInput"]["$defs"]["Email"]
    assert email["required"] == ["sender", "to", "subject"]
    # Field docs (attribute docstrings) reach the schema, as descriptions only.
    assert email["properties"]["to"]["description"] == "Recipient addresses (at least one)."
    report = schemas["EmailReport"]["properties"]
    assert report["parked_at"]["description"].startswith("When the email last parked")


def test_schema_accepts_what_clients_send_and_describes_what_they_get(
    schemas: dict[str, Any],
) -> None:
    inputs = Draft202012Validator(schemas["SendEmailInput"])
    python_client = SendEmailInput(
        email=Email(**FOREIGN_INPUT["email"]),
        key="k-1",
        lane="default",
        send_at=datetime(2030, 1, 1, tzinfo=UTC),
        retry=RetrySettings(),
    )
    assert list(inputs.iter_errors(FOREIGN_INPUT)) == []
    assert list(inputs.iter_errors(python_client.model_dump(mode="json"))) == []
    missing_to = {"email": {k: v for k, v in FOREIGN_INPUT["email"].items() if k != "to"}}
    [error] = inputs.iter_errors(missing_to)
    assert "'to' is a required property" in error.message

    receipt = DeliveryReceipt(
        key="k-1",
        message_id="<pl.x@acme.test>",
        lane="default",
        accepted=["bob@example.test"],
        sent_at=datetime(2030, 1, 1, tzinfo=UTC),
    )
    report = EmailReport(key="k-1", status=EmailStatus.SENT, receipt=receipt)
    for name, value in (("DeliveryReceipt", receipt), ("EmailReport", report)):
        results = Draft202012Validator(schemas[name])
        assert list(results.iter_errors(json.loads(value.model_dump_json()))) == []


def test_schema_of_one_model_and_of_an_unknown_one() -> None:
    one = postlane_schema("DeliveryReceipt")
    assert one.returncode == 0 and json.loads(one.stdout)["title"] == "DeliveryReceipt"
    unknown = postlane_schema("Nope")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: InvalidInput: model: 'Nope' is not one of")


# -- what SendEmail checks of any client's input ---------------------------------------------


def parse(value: Any, workflow_id: str = "email:k-1", encoding: bytes = b"json/plain") -> Any:
    return parse_send_email_input(json.dumps(value).encode(), encoding, workflow_id)


def test_contract_input_fills_key_from_the_workflow_id_and_normalises_send_at() -> None:
    req = parse({**FOREIGN_INPUT, "send_at": "2030-01-01T10:00:00+02:00"})
    assert req.key == "k-1"
    assert req.send_at == datetime(2030, 1, 1, 8, 0, tzinfo=UTC)
    assert req.send_at.utcoffset() == timedelta(0)
    assert req.lane == ""


@pytest.mark.parametrize(
    ("value", "workflow_id", "field", "reason"),
    [
        ({**FOREIGN_INPUT, "key": "other"}, "email:k-1", "key", "does not match"),
        (FOREIGN_INPUT, "k-1", "key", "is not email:<key>"),
        ({**FOREIGN_INPUT, "send_at": "2030-01-01T10:00:00"}, "email:k", "send_at", "time zone"),
        ({"email": {**FOREIGN_INPUT["email"], "to": []}}, "email:k", "email.to", "at least 1"),
        ({"email": {**FOREIGN_INPUT["email"], "text": ""}}, "email:k", "email.text", "body"),
        ({**FOREIGN_INPUT, "priority": "urgent"}, "email:k", "priority", "'high'"),
        ({"to": ["bob@example.test"]}, "email:k", "email", "Field required"),
        (["not", "an", "object"], "email:k", "input", "JSON object"),
    ],
)
def test_contract_input_errors_name_the_field(
    value: Any, workflow_id: str, field: str, reason: str
) -> None:
    with pytest.raises(InvalidEmail) as caught:
        parse(value, workflow_id)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_contract_input_that_is_not_json_or_absent() -> None:
    with pytest.raises(InvalidEmail, match="input: missing"):
        parse_send_email_input(None, None, "email:k")
    with pytest.raises(InvalidEmail, match="encoding 'binary/null'"):
        parse_send_email_input(b"", b"binary/null", "email:k")


def test_contract_digest_is_the_same_from_any_client() -> None:
    """A foreign client's JSON and the Python client's Email hash alike (idempotency)."""
    foreign = parse({**FOREIGN_INPUT, "send_at": "2030-01-01T09:00:00Z"})
    python = Email(**FOREIGN_INPUT["email"])
    at = datetime(2030, 1, 1, 10, tzinfo=UTC) - timedelta(hours=1)
    assert email_digest(foreign.email, foreign.send_at) == email_digest(python, at)
    assert email_digest(foreign.email, None) != email_digest(python, at)


# -- what the workers resolve --------------------------------------------------------------

CAPPED = LaneConfig(
    name="capped",
    senders=["*@acme.test"],
    smtp_host="127.0.0.1",
    hourly_cap=50,
    retry=RetrySettings(maximum_attempts=3),
)
WARM = LaneConfig(
    name="warm", senders=["news@acme.test"], smtp_host="127.0.0.1", warmup=Warmup(start_per_day=5)
)
OPEN = LaneConfig(name="open", senders=["*@open.test"], smtp_host="127.0.0.1")
SETTINGS = Settings(lanes=[CAPPED, WARM, OPEN])


def test_resolve_picks_the_senders_lane_with_its_retry_and_caps() -> None:
    capped = resolve(SETTINGS, LaneQuery(sender="agent@acme.test"))
    assert (capped.lane, capped.quota, capped.retry) == ("capped", True, CAPPED.retry)
    assert resolve(SETTINGS, LaneQuery(sender="news@acme.test")).lane == "warm"  # exact wins
    assert resolve(SETTINGS, LaneQuery(sender="news@acme.test")).quota is True  # warm-up
    assert resolve(SETTINGS, LaneQuery(sender="a@open.test")).quota is False


def test_resolve_checks_a_named_lane_and_refuses_unknown_ones() -> None:
    named = resolve(SETTINGS, LaneQuery(sender="a@open.test", lane="capped"))
    assert (named.lane, named.quota, named.error_type) == ("capped", True, None)
    unknown = resolve(SETTINGS, LaneQuery(sender="a@open.test", lane="nope"))
    assert unknown.error_type == "UnknownLane" and "'nope'" in unknown.error
    nobody = resolve(SETTINGS, LaneQuery(sender="a@else.test"))
    assert nobody.error_type == "UnknownSender" and "'a@else.test'" in nobody.error
