"""Every failure type the send activity raises is one the worker's logs expect."""

from __future__ import annotations

import re
from pathlib import Path

from postlane.errors import SEND_FAILURES, ErrorType

ROOT = Path(__file__).resolve().parent.parent


def test_every_failure_the_send_activity_raises_is_listed() -> None:
    # Listed failures get one `email.attempt_failed` line instead of the SDK's traceback.
    raised = set()
    for source in sorted((ROOT / "activities").glob("smtp*.py")):
        raised |= set(re.findall(r"ErrorType\.([A-Z0-9_]+)", source.read_text()))
    assert raised, "no ApplicationError types found in activities/smtp*.py"
    assert {ErrorType[name] for name in raised} <= SEND_FAILURES
