"""The pieces of bulk operations that need no server: row keys, bounded starts, the bar,
``send --csv``'s refusals."""

from __future__ import annotations

import asyncio
import io
import subprocess
from pathlib import Path

import pytest

from postlane.cli.bulk import bounded, row_key
from postlane.cli.progress import ProgressBar
from tests.procs import POSTLANE_SCRIPT, assert_eventually, postlane_env, write_config


def test_row_keys_are_stable_and_distinct() -> None:
    row = {"email": "a@example.test", "name": "Ann"}
    assert row_key("launch", row, None) == row_key("launch", dict(reversed(row.items())), None)
    assert row_key("launch", row, None) != row_key("launch", {**row, "name": "Anne"}, None)
    assert row_key("launch", row, None) != row_key("other", row, None)
    assert row_key("launch", {**row, "id": "42"}, "id") == "launch:42"


async def test_bounded_keeps_at_most_limit_in_flight_and_the_order() -> None:
    in_flight = peak = 0
    release = asyncio.Event()

    async def work(n: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if n == 0:
            await release.wait()
        await asyncio.sleep(0)
        in_flight -= 1
        return n * 2

    task = asyncio.ensure_future(bounded(range(20), work, limit=4))
    await assert_eventually(lambda: peak >= 4, within=5, interval=0.001, what="4 in flight")
    release.set()
    assert await task == [n * 2 for n in range(20)]
    assert peak == 4


def test_advance_follows_a_server_side_count() -> None:
    out = io.StringIO()
    bar = ProgressBar(0, "dlq retry", stream=out, width=8)
    bar.advance(0, "batch job j: running", total=4)
    bar.advance(2, "batch job j: running")
    bar.advance(2, "batch job j: running")  # no change, no line
    bar.advance(4, "batch job j: completed", total=4)
    bar.close()
    assert out.getvalue().splitlines() == [
        "dlq retry [--------] 0/4  batch job j: running",
        "dlq retry [####----] 2/4  batch job j: running",
        "dlq retry [########] 4/4  batch job j: completed",
    ]


@pytest.mark.parametrize(
    "extra",
    [
        ["--cc", "c@example.test"],
        ["--bcc", "b@example.test"],
        ["--reply-to", "r@x.test"],
        ["--header", "X-Campaign: launch"],
        ["--send-at", "2030-01-01T09:00:00+00:00"],
    ],
)
def test_send_csv_refuses_options_it_would_drop(tmp_path: Path, extra: list[str]) -> None:
    """Refused, naming the option, before any connection (the Temporal address is
    unreachable: trying to send would exit 1, not 2)."""
    result = _send_csv(tmp_path, [*extra, "--text", "Hi {{ name }}"], stdin="")
    assert result.returncode == 2, result.stderr
    assert f"InvalidInput: {extra[0]}: not with --csv" in result.stderr


def test_send_csv_reads_a_text_template_from_stdin(tmp_path: Path) -> None:
    """``--text -`` is the template read from stdin, not the literal "-": an undefined
    variable in it stops the run at row validation, before any connection."""
    result = _send_csv(tmp_path, ["--text", "-"], stdin="Hi {{ nope }}\n")
    assert result.returncode == 2, result.stderr
    assert "text: template does not render" in result.stderr


def _send_csv(tmp_path: Path, extra: list[str], *, stdin: str) -> subprocess.CompletedProcess[str]:
    rows = tmp_path / "people.csv"
    rows.write_text("email,name\nann@example.test,Ann\n", encoding="utf-8")
    config = write_config(
        tmp_path / "postlane.toml", [{"name": "l", "senders": ["*"], "smtp_host": "127.0.0.1"}]
    )
    env = postlane_env("127.0.0.1:1", config)
    argv = ["send", "--csv", str(rows), "--from", "a@example.test", "--subject", "Hi", *extra]
    return subprocess.run(
        [str(POSTLANE_SCRIPT), *argv],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
