"""Postlane's worker (``worker.py``) with parts switched off, for bench/ablation.py only.

``BENCH_NO_HEARTBEAT=1``: `temporalio.activity.heartbeat` does nothing (no heartbeat RPC).
``BENCH_QUIET_LOGS=1``: the worker logs at WARNING instead of INFO (no line per email).
``BENCH_NO_PATCH_MARKERS=1``: `temporalio.workflow.patched` answers True without a command, so
a new email records no patch marker (and no ``TemporalChangeVersion`` upsert with it). Only
for fresh workflows in a throwaway server: a replay of a history with markers would differ.
``BENCH_NO_SUPPRESSION_CHECK=1``: the send guard reads no suppression (one describe per
recipient before each send).
``BENCH_NO_ACCEPTED_SIGNAL=1``: the send activity does not signal ``delivery_accepted`` to its
workflow after the server accepted DATA.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if os.environ.get("BENCH_NO_HEARTBEAT") == "1":
    import temporalio.activity

    def _no_heartbeat(*details: Any) -> None:
        return None

    temporalio.activity.heartbeat = _no_heartbeat

if os.environ.get("BENCH_QUIET_LOGS") == "1":
    import postlane.logs

    _configure = postlane.logs.configure_logging

    def _quiet(**options: Any) -> None:
        _configure(**{**options, "level": "WARNING"})

    postlane.logs.configure_logging = _quiet

if os.environ.get("BENCH_NO_PATCH_MARKERS") == "1":
    import temporalio.workflow

    def _always_patched(id: str, **options: Any) -> bool:
        return True

    temporalio.workflow.patched = _always_patched

if os.environ.get("BENCH_NO_SUPPRESSION_CHECK") == "1":
    import activities.guard

    async def _never_suppressed(*args: Any, **kwargs: Any) -> bool:
        return False

    setattr(activities.guard, "is_suppressed", _never_suppressed)  # noqa: B010

if os.environ.get("BENCH_NO_ACCEPTED_SIGNAL") == "1":
    import activities.smtp

    async def _not_recorded(*args: Any, **kwargs: Any) -> None:
        return None

    activities.smtp.SmtpActivities._record_acceptance = _not_recorded  # type: ignore[method-assign]

from postlane.cli.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
