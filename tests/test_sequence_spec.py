"""Sequence specs, templates and local-time arithmetic: pure, no server."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest

from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.email.models import MAX_HEADER_LENGTH
from postlane.errors import (
    InvalidEmail,
    InvalidRecipients,
    InvalidSpec,
    UnknownLane,
    UnknownSender,
)
from postlane.sequences.models import references, sequence_email
from postlane.sequences.spec import Recipient, load_spec, spec_from_dict
from postlane.tokens import UNSUBSCRIBE_TOKEN_PLACEHOLDER
from workflows._calendar import next_local_time, next_opening

EXAMPLES = Path(__file__).parent.parent / "examples"


def spec(*steps: dict[str, object], **fields: object) -> dict[str, object]:
    return {"name": "s", "sender": "ada@acme.test", "steps": list(steps), **fields}


SEND = {"type": "send", "id": "a", "subject": "Hi", "text": "Hello"}


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (spec(), "steps", "at least 1"),
        (spec(SEND, {**SEND, "id": "a"}), "steps.1.id", "used twice"),
        (spec({**SEND, "next": "a"}), "steps.0.next", "not after this step"),
        (spec({**SEND, "next": "zz"}), "steps.0.next", "no step 'zz'"),
        (spec({"type": "send", "id": "a", "template": "nope"}), "steps.0.template", "no template"),
        (spec({"type": "wait", "id": "w"}), "steps.0.wait.duration", "exactly one"),
        (
            spec({"type": "wait", "id": "w", "duration": "soon"}),
            "steps.0.wait.duration",
            "duration",
        ),
        (spec({"type": "wait", "id": "w", "until": "25:00"}), "steps.0.wait.until", "25:00"),
        (spec({"type": "wait_for_reply", "id": "r"}), "steps.0.wait_for_reply.timeout", "required"),
        (spec({"type": "dance", "id": "d"}), "steps.0", "dance"),
        (spec(SEND, timezone="Mars/Olympus"), "timezone", "IANA"),
        (spec(SEND, sending_hours="17:00-09:00"), "sending_hours", "end after it starts"),
        (spec(SEND, sender="nobody"), "sender", "not a valid email address"),
    ],
)
def test_invalid_specs_name_the_field(data: dict[str, object], field: str, reason: str) -> None:
    with pytest.raises(InvalidSpec) as err:
        spec_from_dict(data)
    assert not isinstance(err.value, InvalidEmail)  # a spec is not an email
    assert err.value.field == field
    assert reason in err.value.reason


def test_durations_read_like_people_write_them() -> None:
    s = spec_from_dict(spec(SEND, {"type": "wait", "id": "w", "duration": "2d12h"}))
    assert s.steps[1].duration == timedelta(days=2, hours=12)  # type: ignore[union-attr]


def test_load_spec_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "spec.toml"
    bad.write_text('name = "s"\nsender = "ada@acme.test"\n[[steps]]\ntype = "wait"\nid = "w"\n')
    with pytest.raises(InvalidSpec, match=rf"{bad}: steps.0.wait.duration"):
        load_spec(bad)
    bad.write_text("name = ")
    with pytest.raises(InvalidSpec, match=str(bad)) as err:
        load_spec(bad)
    assert err.value.field == str(bad) and err.value.reason.startswith("not TOML")


def test_unreadable_spec_file_is_an_invalid_spec_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(InvalidSpec) as err:
        load_spec(missing)
    assert not isinstance(err.value, InvalidEmail)
    assert err.value.field == str(missing)
    assert "No such file" in err.value.reason


def test_recipients_file_without_address_column_names_the_file(tmp_path: Path) -> None:
    from postlane.cli.sequence import read_recipients

    people = tmp_path / "people.csv"
    people.write_text("name,company\nBob,Acme\n")
    with pytest.raises(InvalidRecipients) as err:
        read_recipients(people)
    assert not isinstance(err.value, InvalidEmail)
    assert err.value.field == str(people)
    assert "'email' column" in err.value.reason and "name, company" in err.value.reason
    with pytest.raises(InvalidRecipients) as err:
        read_recipients(tmp_path / "missing.csv")
    assert err.value.field == str(tmp_path / "missing.csv")


async def test_retry_through_an_unknown_lane_is_unknown_lane() -> None:
    with pytest.raises(UnknownLane) as err:
        await client().retry("some-key", lane="nope")
    assert not isinstance(err.value, InvalidEmail)
    assert err.value.field == "lane" and err.value.lane == "nope"
    assert "'nope'" in err.value.reason and "lanes: a" in err.value.reason


def client() -> PostlaneClient:
    lane = LaneConfig(name="a", senders=["*@acme.test"], smtp_host="127.0.0.1")
    return PostlaneClient(None, Settings(lanes=[lane]))  # type: ignore[arg-type]


def test_example_spec_renders_for_every_example_row() -> None:
    from postlane.cli.sequence import read_recipients

    example = load_spec(EXAMPLES / "sequence.toml")
    rows = read_recipients(EXAMPLES / "people.csv")
    assert len(rows) == 3
    for _, row in rows:
        assert isinstance(row, Recipient)
        inp = client().sequences.prepare(example, row)
        assert inp.key == f"q4-outreach:{row.address}"
        assert row.variables["company"] in inp.rendered["intro"].subject
        assert (
            inp.one_click
            and f"https://acme.test/unsubscribe?t={UNSUBSCRIBE_TOKEN_PLACEHOLDER}"
            in inp.list_unsubscribe
        )
        assert "Write a short, friendly last note" in inp.instructions["last"]


def test_templates_are_sandboxed_and_strict() -> None:
    templates = {"t": {"subject": "Hi {{ name }}", "text": "{{ ''.__class__.__mro__ }}"}}
    unsafe = spec_from_dict(spec({"type": "send", "id": "a", "template": "t"}, templates=templates))
    with pytest.raises(InvalidEmail) as err:
        client().sequences.prepare(unsafe, Recipient(address="bob@example.test"))
    assert err.value.field == "templates.t.text"
    html = {"t": {"subject": "Hi", "html": "<p>{{ company }}</p>"}}
    escaped = spec_from_dict(spec({"type": "send", "id": "a", "template": "t"}, templates=html))
    inp = client().sequences.prepare(
        escaped, Recipient(address="bob@example.test", variables={"company": "<b>A&B</b>"})
    )
    assert inp.rendered["a"].html == "<p>&lt;b&gt;A&amp;B&lt;/b&gt;</p>"


def test_rendered_email_is_validated_and_sender_needs_a_lane() -> None:
    templates = {"t": {"subject": "Hi {{ company }}", "text": "x"}}
    s = spec_from_dict(spec({"type": "send", "id": "a", "template": "t"}, templates=templates))
    with pytest.raises(InvalidEmail) as err:
        client().sequences.prepare(
            s, Recipient(address="bob@example.test", variables={"company": "A\nBcc: x@y.test"})
        )
    assert err.value.field == "steps.a.subject"
    other = spec_from_dict(spec(SEND, sender="ada@elsewhere.test"))
    with pytest.raises(UnknownSender):
        client().sequences.prepare(other, Recipient(address="bob@example.test"))


def test_next_local_time_follows_the_zone_across_dst() -> None:
    # Paris leaves summer time on 2026-10-25: 09:00 is 07:00 UTC before, 08:00 UTC after.
    before = datetime(2026, 10, 24, 12, 0, tzinfo=UTC)
    assert next_local_time(before, time(9), "Europe/Paris") == datetime(
        2026, 10, 25, 8, 0, tzinfo=UTC
    )
    assert next_local_time(before, time(9), "Europe/Paris", ["mon"]) == datetime(
        2026, 10, 26, 8, 0, tzinfo=UTC
    )


def test_next_opening_waits_for_the_window_and_days() -> None:
    window = (time(9), time(17))
    friday_evening = datetime(2026, 11, 27, 18, 0, tzinfo=UTC)  # 19:00 in Paris
    assert next_opening(friday_evening, window, "Europe/Paris", ["mon", "tue"]) == datetime(
        2026, 11, 30, 8, 0, tzinfo=UTC
    )
    monday_noon = datetime(2026, 11, 30, 11, 0, tzinfo=UTC)
    assert next_opening(monday_noon, window, "Europe/Paris", None) == monday_noon
    assert next_opening(monday_noon, None, "Asia/Tokyo", None) == monday_noon


def test_references_keep_root_and_latest_within_one_header_line() -> None:
    ids = [f"<pl.{'x' * 90}{n:03d}@acme.test>" for n in range(30)]
    kept = references(ids)
    assert kept[0] == ids[0] and kept[-1] == ids[-1]
    assert kept[1:] == ids[len(ids) - len(kept) + 1 :]  # the newest, in order
    assert len(" ".join(kept)) <= MAX_HEADER_LENGTH < len(" ".join(ids))
    assert references(ids[:3]) == ids[:3]
    assert references(ids[:1]) == ids[:1]


def test_a_long_thread_still_makes_a_valid_email() -> None:
    s = spec_from_dict(spec(SEND))
    inp = client().sequences.prepare(s, Recipient(address="bob@example.test"))
    ids = [f"<pl.{'y' * 90}{n:03d}@acme.test>" for n in range(30)]
    email = sequence_email(inp, inp.rendered["a"], ids)
    assert email.headers["In-Reply-To"] == ids[-1]
    assert email.headers["References"].split()[0] == ids[0]
    assert email.headers["List-Unsubscribe"] == inp.list_unsubscribe
