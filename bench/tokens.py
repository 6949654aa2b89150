"""What sealing and opening Message-IDs and unsubscribe tokens cost (`postlane.tokens`).

Figures in microseconds per value, on this machine's one core:

- ``seal_message_id`` / ``open_message_id``: a README-sized email workflow ID
  (``email:q4-outreach:ann@example.test:follow``), AES-SIV under keys derived once;
- ``seal_token`` / ``open_token``: the sender and sequence workflow ID;
- ``open_forged``: a Message-ID with one bit flipped (refused, and logged: the log call is
  part of the cost, with structlog's default configuration printing to a null sink);
- ``legacy_message_id``: the base32 form it replaced, for scale.

Usage: ``.venv/bin/python bench/tokens.py [--rounds N]``; writes ``bench/results/tokens.md``
and ``.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog

from postlane.ids import email_workflow_id, message_id, sequence_workflow_id
from postlane.tokens import TokenKeys

RESULTS = Path(__file__).parent / "results"
PER_ROUND = 5000
KEYS = TokenKeys(b"bench-secret-0123456789abcdefghijklmnopqrstuvwxyz")
WORKFLOW = email_workflow_id("q4-outreach:ann@example.test:follow")
SEQUENCE = sequence_workflow_id("q4-outreach:ann@example.test")
SEALED = KEYS.message_id(WORKFLOW, "acme.test")
TOKEN = KEYS.unsubscribe_token("ada@acme.test", SEQUENCE)
FORGED = SEALED[:12] + ("a" if SEALED[12] != "a" else "b") + SEALED[13:]


def _per_value(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    for _ in range(PER_ROUND):
        fn()
    return (time.perf_counter() - start) / PER_ROUND * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(io.StringIO()))
    steps: dict[str, Callable[[], object]] = {
        "seal_message_id": lambda: KEYS.message_id(WORKFLOW, "acme.test"),
        "open_message_id": lambda: KEYS.open_message_id(SEALED),
        "seal_token": lambda: KEYS.unsubscribe_token("ada@acme.test", SEQUENCE),
        "open_token": lambda: KEYS.open_unsubscribe_token(f"unsubscribe {TOKEN}"),
        "open_forged": lambda: KEYS.open_message_id(FORGED),
        "legacy_message_id": lambda: message_id(WORKFLOW, "acme.test"),
    }
    rounds = {name: [_per_value(fn) for _ in range(args.rounds)] for name, fn in steps.items()}
    when = datetime.now(UTC).isoformat(timespec="seconds")
    result = {
        "when": when,
        "python": platform.python_version(),
        "per_round": PER_ROUND,
        "message_id_length": len(SEALED),
        "token_length": len(TOKEN),
        "us_per_value": {name: statistics.median(r) for name, r in rounds.items()},
        "rounds": rounds,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tokens.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Sealed Message-IDs and unsubscribe tokens: cost per value",
        "",
        f"{when}, Python {result['python']}, {args.rounds} rounds of {PER_ROUND} values; a"
        f" sealed Message-ID is {len(SEALED)} characters, a token {len(TOKEN)}; 2 shared"
        " cores, other sessions running.",
        "",
        "| step | median µs/value | rounds |",
        "|---|---|---|",
        *(
            f"| {name} | {statistics.median(r):.1f} | {', '.join(f'{x:.1f}' for x in r)} |"
            for name, r in rounds.items()
        ),
        "",
    ]
    (RESULTS / "tokens.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
