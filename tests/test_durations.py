"""One duration syntax everywhere a duration is written: specs, postlane.toml, CLI options."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from postlane.config import load_settings
from postlane.durations import Duration, format_duration, parse_duration
from postlane.sequences.spec import WaitStep


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("45s", timedelta(seconds=45)),
        ("30m", timedelta(minutes=30)),
        ("1h30m", timedelta(minutes=90)),
        ("3d", timedelta(days=3)),
        ("1w", timedelta(weeks=1)),
        ("1w2d3h4m5s", timedelta(weeks=1, days=2, hours=3, minutes=4, seconds=5)),
        (" 2h ", timedelta(hours=2)),
    ],
)
def test_short_forms(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert TypeAdapter(Duration).validate_python(text) == expected


@pytest.mark.parametrize("text", ["", "2", "h", "2 hours", "-2h", "2y", "30m1h", "2h 30m", "1h1h"])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_fields_still_take_iso_8601_and_seconds() -> None:
    adapter = TypeAdapter(Duration)
    assert adapter.validate_python("PT1H30M") == timedelta(minutes=90)
    assert adapter.validate_python(90) == timedelta(seconds=90)
    with pytest.raises(ValidationError):
        adapter.validate_python("2 hours")


def test_a_spec_wait_takes_the_same_forms() -> None:
    step = WaitStep.model_validate({"id": "w", "type": "wait", "duration": "1w2d"})
    assert step.duration == timedelta(weeks=1, days=2)


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(days=3, hours=5), "3d"),
        (timedelta(hours=5, minutes=59), "5h"),
        (timedelta(minutes=12), "12m"),
        (timedelta(seconds=40), "40s"),
        (timedelta(seconds=-5), "0s"),
    ],
)
def test_format_duration_shows_the_largest_whole_unit(delta: timedelta, text: str) -> None:
    assert format_duration(delta) == text


def test_postlane_toml_retry_durations_take_the_same_forms(tmp_path: Path) -> None:
    config = tmp_path / "postlane.toml"
    config.write_text(
        '[[lanes]]\nname = "a"\nsenders = ["*@a.test"]\nsmtp_host = "127.0.0.1"\n'
        'rate_per_second = 1\n[lanes.retry]\ninitial_interval = "5s"\nretry_window = "1w"\n'
    )
    retry = load_settings(config).lane("a").retry
    assert (retry.initial_interval, retry.retry_window) == (
        timedelta(seconds=5),
        timedelta(weeks=1),
    )
