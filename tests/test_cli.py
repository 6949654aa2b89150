"""The CLI's own pieces that need no server: --since, the progress bar, the tables."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone

import pyte  # type: ignore[import-untyped]
import pytest

from postlane.cli.app import _report_cancel, format_attempts, format_dead_letters, parse_since
from postlane.cli.progress import ProgressBar
from postlane.client import CancelOutcome, CancelResult
from postlane.email.models import AttemptRecord, DeliveryReceipt, EmailReport, EmailStatus
from postlane.errors import InvalidEmail, InvalidInput

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30m", NOW - timedelta(minutes=30)),
        ("2h", NOW - timedelta(hours=2)),
        ("3d", NOW - timedelta(days=3)),
        ("1w", NOW - timedelta(weeks=1)),
        ("1h30m", NOW - timedelta(minutes=90)),
        ("45s", NOW - timedelta(seconds=45)),
        ("2026-03-09T08:00:00+01:00", datetime(2026, 3, 9, 7, 0, tzinfo=UTC)),
        ("2026-03-09T08:00:00Z", datetime(2026, 3, 9, 8, 0, tzinfo=UTC)),
        ("2026-03-09T08:00", datetime(2026, 3, 9, 8, 0, tzinfo=UTC)),  # no zone: UTC
        ("2026-03-09", datetime(2026, 3, 9, tzinfo=UTC)),
    ],
)
def test_parse_since_durations_and_times(value: str, expected: datetime) -> None:
    assert parse_since(value, NOW) == expected


@pytest.mark.parametrize("value", ["", "2", "h", "2 hours", "-2h", "2y", "yesterday", "2h 30m"])
def test_parse_since_rejects_other_text(value: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_since(value, NOW)
    assert not isinstance(caught.value, InvalidEmail)  # an option, not an email's field
    assert caught.value.field == "since"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_in_a_log_one_line_per_item() -> None:
    out = io.StringIO()
    bar = ProgressBar(4, "dlq retry", out, width=8)
    for n in range(4):
        bar.step(f"k{n}", "going out again" if n else "unchanged: sent")
    bar.close()
    assert out.getvalue().splitlines() == [
        "dlq retry [##------] 1/4  k0: unchanged: sent",
        "dlq retry [####----] 2/4  k1: going out again",
        "dlq retry [######--] 3/4  k2: going out again",
        "dlq retry [########] 4/4  k3: going out again",
    ]


def test_progress_bar_on_a_terminal_is_a_live_bar_below_the_results() -> None:
    out = _Tty()
    bar = ProgressBar(2, "dlq discard", out, width=4)
    bar.step("first-key", "discarded")
    bar.step("k2", "unchanged: sent")
    bar.close()
    # What a terminal shows once the bar is done: the results, then the finished bar.
    screen = pyte.Screen(60, 6)
    pyte.Stream(screen).feed(out.getvalue().replace("\n", "\r\n"))
    shown = [line.rstrip() for line in screen.display if line.strip()]
    assert shown[:2] == ["first-key: discarded", "k2: unchanged: sent"]
    assert len(shown) == 3 and shown[2].startswith("dlq discard") and shown[2].endswith("2/2")


def test_progress_bar_with_nothing_to_do_says_so() -> None:
    out = io.StringIO()
    ProgressBar(0, "dlq retry", out, width=4).close()
    assert out.getvalue() == "dlq retry [####] 0/0  nothing to do\n"


def test_dead_letter_table_has_parked_since_and_last_reply() -> None:
    parked = NOW - timedelta(hours=2, minutes=5)
    report = EmailReport(
        key="k-1",
        status=EmailStatus.DEAD_LETTER,
        lane="acme",
        recipients=["bob@example.test", "carol@example.test"],
        attempts=7,
        last_error="451 4.3.0 try later",
        parked_at=parked.astimezone(timezone(timedelta(hours=2))),
    )
    header, row = format_dead_letters([report], NOW).splitlines()
    assert header.split() == [
        "KEY",
        "LANE",
        "RECIPIENTS",
        "ATTEMPTS",
        "PARKED",
        "SINCE",
        "LAST",
        "REPLY",
    ]
    assert row.split("  ")[0] == "k-1"
    for text in (
        "acme",
        "bob@example.test, carol@example.test",
        " 7 ",
        "2026-03-10 09:55:00Z (2h ago)",
        "451 4.3.0 try later",
    ):
        assert text in row


def test_attempts_table_lists_each_failed_attempt_then_the_send() -> None:
    at = NOW - timedelta(minutes=3)
    report = EmailReport(
        key="k-2",
        status=EmailStatus.SENT,
        lane="acme",
        attempts=23,
        attempt_history=[
            AttemptRecord(
                attempt=n,
                at=at,
                reply=f"451 4.3.0 busy #{n}",
                smtp_server="smtp.acme.test:587",
                worker="42@host-a",
            )
            for n in range(3, 23)
        ],
        receipt=DeliveryReceipt(
            key="k-2",
            message_id="<m@acme.test>",
            lane="acme",
            accepted=["bob@example.test"],
            attempts=23,
            smtp_reply="250 2.0.0 OK",
            sent_at=NOW,
        ),
    )
    lines = format_attempts(report).splitlines()
    assert lines[0] == "k-2: sent, lane acme, 23 attempts"
    assert lines[1] == "(attempts before 3 are no longer kept)"
    assert lines[2].split() == ["ATTEMPT", "FAILED", "AT", "SMTP", "SERVER", "WORKER", "REPLY"]
    assert lines[3].split() == [
        "3",
        "2026-03-10",
        "11:57:00Z",
        "smtp.acme.test:587",
        "42@host-a",
        "451",
        "4.3.0",
        "busy",
        "#3",
    ]
    assert len(lines) == 3 + 20 + 1
    assert lines[-1] == "sent on attempt 23 at 2026-03-10 12:00:00Z: 250 2.0.0 OK"


@pytest.mark.parametrize(
    ("result", "rc", "first_line"),
    [
        (CancelResult(key="k", outcome=CancelOutcome.CANCELLED), 0, "k: cancelled"),
        (
            CancelResult(key="k", outcome=CancelOutcome.CANCELLED, already=True),
            0,
            "k: already cancelled",
        ),
        (
            CancelResult(
                key="k",
                outcome=CancelOutcome.SENT,
                already=True,
                receipt=DeliveryReceipt(
                    key="k",
                    message_id="<m@x>",
                    lane="l",
                    accepted=["bob@example.test"],
                    smtp_reply="250 2.0.0 OK",
                ),
            ),
            0,
            "k: already sent, message <m@x> (250 2.0.0 OK); nothing to cancel",
        ),
        (
            CancelResult(
                key="k", outcome=CancelOutcome.FAILED, already=True, reason="550 5.1.1 no"
            ),
            1,
            "k: already failed (550 5.1.1 no); nothing to cancel",
        ),
        (
            CancelResult(key="k", outcome=CancelOutcome.PENDING, reason="still running"),
            1,
            "k: cancel requested but not confirmed: still running",
        ),
    ],
)
def test_cancel_report_and_exit_code_per_outcome(
    result: CancelResult, rc: int, first_line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """0 when the email ends cancelled or was already sent (not an error); 1 otherwise."""
    assert _report_cancel(result) == rc
    out = capsys.readouterr().out
    assert out.splitlines()[0] == first_line
    if result.receipt is not None:
        assert DeliveryReceipt.model_validate_json(out.split("\n", 1)[1]) == result.receipt


def test_tables_align_columns_and_print_text_verbatim() -> None:
    from postlane.cli.app import _table

    text = _table([["KEY", "LAST REPLY"], ["k1", "550 [bold]no[/bold] <a@b>"], ["key-22", "421"]])
    assert text.splitlines() == [
        "KEY     LAST REPLY",
        "k1      550 [bold]no[/bold] <a@b>",
        "key-22  421",
    ]


def test_lanes_table_shows_the_window_the_next_slot_and_the_ceiling() -> None:
    from postlane.cli.app import format_lanes
    from postlane.lanes.models import LaneReport, LaneStatus

    capped = LaneStatus(
        name="capped",
        configured_rate=8,
        effective_rate=2,
        backing_off=True,
        last_throttle="421 4.7.0 slow down",
        hourly_cap=500,
        used_last_hour=500,
        waiting=1500,
        window=500,
        next_slot_at=datetime(2026, 3, 10, 13, 0, 30, tzinfo=UTC),
        ceiling=6,
    )
    reports = [
        LaneReport(name="capped", status=capped, backlog=3, backlog_age=timedelta(minutes=4)),
        LaneReport(name="idle"),
    ]
    header, first, second = (line.split("  ") for line in format_lanes(reports).splitlines())
    cells = dict(
        zip([h.strip() for h in header if h], [c.strip() for c in first if c], strict=True)
    )
    assert cells["BACKPRESSURE"] == "backing off: 421 4.7.0 slow down (recovers to 6/s)"
    assert cells["WAITING"] == "1500 (500 planned)"
    assert cells["NEXT SLOT"] == "2026-03-10 13:00:30Z"
    assert (cells["HOUR"], cells["AGE"]) == ("500/500", "4m")
    assert [c.strip() for c in second if c] == ["idle", *["-"] * 10]
