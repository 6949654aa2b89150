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
    "InvalidInput",
    "InvalidRecipients",
    "InvalidSpec",
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
    "UnknownLane",
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
        "suppressed",
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


def test_workflow_code_imports_no_client_jinja_or_settings() -> None:
    """Workflows import models through ``postlane``; the lazy surface must not drag in the
    client, Jinja2 or pydantic-settings, which the sandbox then need not pass through."""
    import subprocess
    import sys

    code = (
        "import sys, workflows, workflows.sequence, workflows.send_email, workflows.lane, "
        "workflows.inbox, workflows.suppression\n"
        "from postlane import Email, EmailStatus, InvalidEmail, SequenceSpec\n"
        "heavy = ('postlane.client', 'postlane.config', 'jinja2', 'pydantic_settings')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
        "import postlane\n"
        "postlane.PostlaneClient\n"
        "print('postlane.client' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True"]


def test_workflow_sandbox_passes_through_only_named_modules() -> None:
    from workflows import PASSTHROUGH_MODULES, workflow_runner

    restrictions = workflow_runner().restrictions
    assert not restrictions.passthrough_all_modules
    assert {"postlane", "workflows"} <= set(PASSTHROUGH_MODULES)
    assert "jinja2" not in restrictions.passthrough_modules


def test_unknown_public_name_is_an_attribute_error() -> None:
    import pytest

    with pytest.raises(AttributeError, match="NoSuchThing"):
        _ = postlane.NoSuchThing  # type: ignore[attr-defined]


def test_client_keeps_five_email_verbs_and_composes_the_rest() -> None:
    """`PostlaneClient` sends and steers one email; sequences, dead letters, lanes and
    suppressions are parts sharing its connection."""
    from postlane.client import PostlaneClient
    from postlane.config import Settings
    from postlane.email.dlq import DeadLetters
    from postlane.lanes.client import Lanes
    from postlane.sequences.client import Sequences
    from postlane.sequences.suppressions import Suppressions

    public = {
        name
        for name in vars(PostlaneClient)
        if callable(getattr(PostlaneClient, name)) and not name.startswith("_")
    }
    # forget erases a recipient (issue 12): the one verb about a person rather than an email.
    assert public == {
        "connect",
        "send",
        "status",
        "describe",
        "retry",
        "cancel",
        "handle",
        "forget",
    }
    sentinel = object()
    pl = PostlaneClient(sentinel, Settings())  # type: ignore[arg-type]
    assert isinstance(pl.sequences, Sequences) and pl.sequences.temporal is sentinel
    assert isinstance(pl.dlq, DeadLetters)
    assert isinstance(pl.lanes, Lanes) and pl.lanes.temporal is sentinel
    assert isinstance(pl.suppressions, Suppressions) and pl.suppressions.temporal is sentinel
