"""Reading inbound mail: what a message is (reply, auto-reply, bounce, unsubscribe) and
which Postlane message it answers. Pure functions of the raw bytes."""

from __future__ import annotations

from datetime import datetime

from postlane.sequence_models import InboundEvent


def classify(raw: bytes, *, received_at: datetime | None = None) -> InboundEvent | None:
    """The event an inbound message means, or None if it answers nothing of ours."""
    raise NotImplementedError("inbound classification lands with the IMAP watcher")
