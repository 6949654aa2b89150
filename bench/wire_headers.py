"""What writing headers ourselves and checking every message on the wire cost per message.

Three figures, in microseconds per message, on this machine's one core:

- ``render``: `activities.mime.render_message` (Postlane writes the header fields, Python's
  email package writes the MIME body);
- ``python_email``: the path it replaced, an `EmailMessage` with every header set on it and
  serialised with ``policy.SMTP`` (which refolded long msg-ids into encoded-words);
- ``check``: `postlane.dev.wire.check_message`, which `SmtpCatcher` runs on every message.

Usage: ``.venv/bin/python bench/wire_headers.py [--rounds N]``; writes
``bench/results/wire_headers.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

from activities.mime import render_message
from postlane.dev.wire import check_message
from postlane.email.models import Email
from postlane.ids import email_workflow_id, message_id

RESULTS = Path(__file__).parent / "results"
MID = message_id(email_workflow_id("q4-outreach:ann@example.test:follow"), "acme.test")
THREAD = [
    message_id(email_workflow_id(f"q4-outreach:ann@example.test:{n}"), "acme.test")
    for n in range(3)
]
EMAIL = Email(
    sender="Ada Lovelace <ada@acme.test>",
    to=["Ann Lee <ann@example.test>"],
    subject="Re: Durable email for Acme",
    text="Hi Ann,\n\nAny thoughts on durable email?\n\nAda\n" * 5,
    html="<p>Hi Ann,</p><p>Any thoughts on durable email?</p><p>Ada</p>" * 5,
    headers={
        "List-Unsubscribe": "<mailto:ada@acme.test?subject=unsubscribe%20pl-onsxc5lfnzrwkotr>, "
        "<https://acme.test/unsubscribe?t=pl-onsxc5lfnzrwkotr>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "In-Reply-To": THREAD[-1],
        "References": " ".join(THREAD),
    },
)


def python_email() -> bytes:
    msg = EmailMessage(policy=policy.default.clone(cte_type="7bit"))
    msg["From"] = "Ada Lovelace <ada@acme.test>"
    msg["To"] = "Ann Lee <ann@example.test>"
    msg["Subject"] = EMAIL.subject
    msg["Message-ID"] = MID
    msg["Date"] = format_datetime(datetime.now(UTC))
    for name, value in EMAIL.headers.items():
        msg[name] = value
    msg.set_content(EMAIL.text or "")
    msg.add_alternative(EMAIL.html or "", subtype="html")
    return msg.as_bytes(policy=policy.SMTP)


def per_message(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000, help="messages per round")
    args = parser.parse_args()
    raw = render_message(EMAIL, MID, datetime.now(UTC))
    assert check_message(raw) == []
    cases: dict[str, Callable[[], object]] = {
        "render": lambda: render_message(EMAIL, MID, datetime.now(UTC)),
        "python_email": python_email,
        "check": lambda: check_message(raw),
    }
    rounds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            rounds[name].append(per_message(fn, args.n))
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "message_bytes": len(raw),
        "messages_per_round": args.n,
        "rounds_us": rounds,
        "median_us": medians,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "wire_headers.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Writing and checking headers: cost per message",
        "",
        f"{result['when']}, Python {result['python']}, {args.rounds} rounds of {args.n}"
        f" messages ({len(raw)} bytes: text + html, List-Unsubscribe, In-Reply-To, References"
        " of 3 long Message-IDs); 2 shared cores, other sessions running.",
        "",
        "| step | median µs/message | rounds |",
        "|---|---|---|",
    ]
    for name, values in rounds.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        lines.append(f"| {name} | {medians[name]:.0f} | {shown} |")
    (RESULTS / "wire_headers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
