"""``postlane lanes --domains``: receiving domains in backoff, and each lane's circuit."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import UTC, datetime

from postlane.lanes.models import LaneReport


def add_arguments(lanes: argparse.ArgumentParser) -> None:
    """The routing options of ``postlane lanes``."""
    lanes.add_argument(
        "--domains",
        action="store_true",
        help="list the receiving domains in backoff on each lane, and the lanes' circuits",
    )


def format_domains(reports: Sequence[LaneReport]) -> str:
    """One row per domain in backoff, then one line per lane whose circuit is not closed."""
    rows = [("LANE", "DOMAIN", "WEIGHT", "RATE/s", "SINCE", "REASON", "NEXT STEP")]
    circuits: list[str] = []
    for report in reports:
        st = report.status
        if st is None:
            continue
        for d in st.domains:
            rows.append(
                (
                    report.name,
                    d.domain,
                    f"{d.weight:.3g}",
                    f"{d.effective_rate:.3g}",
                    _utc(d.since),
                    f"{d.reason}: {d.last_reply}"[:60],
                    _utc(d.recover_at) if d.recover_at else "-",
                )
            )
        if st.failover is not None:
            since = f" since {_utc(st.circuit_since)}" if st.circuit_since else ""
            line = f"lane {report.name}: circuit {st.circuit}{since}"
            if st.circuit != "closed":
                line += f", sends go to lane {st.failover} ({st.circuit_reason})"
            circuits.append(line)
    if len(rows) == 1:
        lines = ["no domain is in backoff"]
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
    return "\n".join([*lines, *circuits])


def _utc(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
