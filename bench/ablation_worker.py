"""Postlane's worker (``worker.py``) with parts switched off, for bench/ablation.py only.

``BENCH_NO_HEARTBEAT=1``: `temporalio.activity.heartbeat` does nothing (no heartbeat RPC).
``BENCH_QUIET_LOGS=1``: the worker logs at WARNING instead of INFO (no line per email).
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

    def _quiet(*, json: bool = False, level: str = "INFO") -> None:
        _configure(json=json, level="WARNING")

    postlane.logs.configure_logging = _quiet

from postlane.cli.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
