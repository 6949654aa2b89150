"""The public surface is deliberate: adding or removing a name is a visible change."""

from __future__ import annotations

import postlane

EXPECTED = [
    "ActionRefused",
    "Approval",
    "Attachment",
    "AttemptRecord",
    "CancelOutcome",
    "CancelResult",
    "ComposeRequest",
    "ConfigurationError",
    "DeliveryError",
    "DeliveryReceipt",
    "Draft",
    "Email",
    "EmailCancelled",
    "EmailHandle",
    "EmailNotFound",
    "EmailReport",
    "EmailStatus",
    "ErrorType",
    "IdempotencyConflict",
    "InboundEvent",
    "InboundKind",
    "InvalidEmail",
    "LaneConfig",
    "PermanentDeliveryError",
    "PostlaneClient",
    "PostlaneError",
    "Priority",
    "Recipient",
    "RecipientSuppressed",
    "RetrySettings",
    "SequenceHandle",
    "SequenceNotFound",
    "SequenceReport",
    "SequenceSpec",
    "SequenceStatus",
    "Settings",
    "UnknownSender",
    "load_settings",
    "load_spec",
]


def test_public_api_exports_exactly_the_contract() -> None:
    assert postlane.__all__ == EXPECTED
    for name in EXPECTED:
        assert getattr(postlane, name).__module__.startswith("postlane.")


def test_public_api_statuses_are_the_documented_set() -> None:
    assert [s.value for s in postlane.EmailStatus] == [
        "queued",
        "scheduled",
        "sending",
        "sent",
        "retrying",
        "dead_letter",
        "failed",
        "cancelled",
    ]


def test_import_postlane_leaves_smtp_libraries_to_the_worker() -> None:
    import subprocess
    import sys

    code = (
        "import sys, postlane; "
        "heavy = {'aiosmtplib', 'aiosmtpd', 'activities'}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
