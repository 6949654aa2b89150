"""What encryption at rest costs per payload: `AesGcmCodec` sealing and opening.

Figures in microseconds per payload on one core, for a typical email's workflow input
(a short text body) and a large one (a 40 KB HTML body), with and without compression,
plus the stored size against the plain payload's.

Usage: ``.venv/bin/python bench/codec.py [--rounds N]``; writes ``bench/results/codec.md``
and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter

from postlane.email.models import Email
from postlane.encryption import AesGcmCodec, KeyRing

RESULTS = Path(__file__).parent / "results"
SMALL = Email(
    sender="agent@acme.test",
    to=["bob@example.test"],
    subject="Your verification code",
    text="Your code is 847291. It expires in 10 minutes.\n",
    tags=["verify"],
)
LARGE = SMALL.model_copy(
    update={"html": "<p>" + "Quarterly figures, region by region. " * 1000 + "</p>"}
)


def _payload(email: Email) -> Payload:
    return pydantic_data_converter.payload_converter.to_payloads([{"email": email}])[0]


def _per_payload_us(fn: Callable[[Payload], Payload], payload: Payload, rounds: int) -> float:
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            fn(payload)
        samples.append((time.perf_counter() - start) / rounds * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    ring = KeyRing({"k1": os.urandom(32)})
    rows = []
    for name, email in (("typical (short text)", SMALL), ("large (40 KB HTML)", LARGE)):
        plain = _payload(email)
        for compress in (False, True):
            codec = AesGcmCodec(ring, compress=compress)
            sealed = codec.encode_payload(plain)
            rows.append(
                {
                    "payload": name,
                    "compress": compress,
                    "plain_bytes": plain.ByteSize(),
                    "stored_bytes": sealed.ByteSize(),
                    "seal_us": round(_per_payload_us(codec.encode_payload, plain, args.rounds), 1),
                    "open_us": round(_per_payload_us(codec.decode_payload, sealed, args.rounds), 1),
                }
            )
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()},
        "rounds": args.rounds,
        "rows": rows,
    }
    lines = [
        "# Encryption at rest: cost per payload",
        "",
        f"`bench/codec.py`, {result['when']}, Python {platform.python_version()},"
        f" {os.cpu_count()} cores (shared), median of 5 x {args.rounds} rounds.",
        "",
        "| payload | compress | plain bytes | stored bytes | seal µs | open µs |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['payload']} | {'yes' if r['compress'] else 'no'} | {r['plain_bytes']}"
            f" | {r['stored_bytes']} | {r['seal_us']} | {r['open_us']} |"
            for r in rows
        ),
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "codec.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "codec.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
