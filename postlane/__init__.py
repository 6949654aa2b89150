"""Postlane: durable outbound email for AI agents and applications, on Temporal.

Every public name is importable from here (``from postlane import PostlaneClient, Email``),
but each is imported only when first used: workflow code that imports a model must not
pull in the client, Jinja2 or pydantic-settings (see tests/test_public_api.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from postlane.client import CancelOutcome, CancelResult, EmailHandle, PostlaneClient
    from postlane.config import LaneConfig, Settings, load_settings
    from postlane.email.models import (
        Attachment,
        AttemptRecord,
        DeliveryReceipt,
        Email,
        EmailReport,
        EmailStatus,
        Priority,
        RetrySettings,
    )
    from postlane.errors import (
        ActionRefused,
        ConfigurationError,
        DeliveryError,
        EmailCancelled,
        EmailNotFound,
        ErrorType,
        IdempotencyConflict,
        InvalidEmail,
        InvalidInput,
        InvalidRecipients,
        InvalidSpec,
        PermanentDeliveryError,
        PostlaneError,
        RecipientSuppressed,
        SequenceNotFound,
        UnknownLane,
        UnknownSender,
    )
    from postlane.sequences.client import SequenceHandle
    from postlane.sequences.models import (
        Approval,
        ComposeRequest,
        Draft,
        InboundEvent,
        InboundKind,
        SequenceReport,
        SequenceStatus,
    )
    from postlane.sequences.spec import Recipient, SequenceSpec, load_spec

_WHERE: dict[str, str] = {
    "ActionRefused": "postlane.errors",
    "Approval": "postlane.sequences.models",
    "Attachment": "postlane.email.models",
    "AttemptRecord": "postlane.email.models",
    "CancelOutcome": "postlane.client",
    "CancelResult": "postlane.client",
    "ComposeRequest": "postlane.sequences.models",
    "ConfigurationError": "postlane.errors",
    "DeliveryError": "postlane.errors",
    "DeliveryReceipt": "postlane.email.models",
    "Draft": "postlane.sequences.models",
    "Email": "postlane.email.models",
    "EmailCancelled": "postlane.errors",
    "EmailHandle": "postlane.client",
    "EmailNotFound": "postlane.errors",
    "EmailReport": "postlane.email.models",
    "EmailStatus": "postlane.email.models",
    "ErrorType": "postlane.errors",
    "IdempotencyConflict": "postlane.errors",
    "InboundEvent": "postlane.sequences.models",
    "InboundKind": "postlane.sequences.models",
    "InvalidEmail": "postlane.errors",
    "InvalidInput": "postlane.errors",
    "InvalidRecipients": "postlane.errors",
    "InvalidSpec": "postlane.errors",
    "LaneConfig": "postlane.config",
    "PermanentDeliveryError": "postlane.errors",
    "PostlaneClient": "postlane.client",
    "PostlaneError": "postlane.errors",
    "Priority": "postlane.email.models",
    "Recipient": "postlane.sequences.spec",
    "RecipientSuppressed": "postlane.errors",
    "RetrySettings": "postlane.email.models",
    "SequenceHandle": "postlane.sequences.client",
    "SequenceNotFound": "postlane.errors",
    "SequenceReport": "postlane.sequences.models",
    "SequenceSpec": "postlane.sequences.spec",
    "SequenceStatus": "postlane.sequences.models",
    "Settings": "postlane.config",
    "UnknownLane": "postlane.errors",
    "UnknownSender": "postlane.errors",
    "load_settings": "postlane.config",
    "load_spec": "postlane.sequences.spec",
}
"""Public name -> the module that defines it."""

__all__ = [
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


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'postlane' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
