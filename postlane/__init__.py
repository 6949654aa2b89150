"""Postlane: durable outbound email for AI agents and applications, on Temporal."""

from postlane.client import EmailHandle, PostlaneClient
from postlane.config import LaneConfig, Settings, load_settings
from postlane.errors import (
    ConfigurationError,
    DeliveryError,
    EmailCancelled,
    EmailNotFound,
    ErrorType,
    IdempotencyConflict,
    InvalidEmail,
    PermanentDeliveryError,
    PostlaneError,
    RecipientSuppressed,
    SequenceNotFound,
    UnknownSender,
)
from postlane.models import (
    Attachment,
    AttemptRecord,
    DeliveryReceipt,
    Email,
    EmailReport,
    EmailStatus,
    Priority,
    RetrySettings,
)
from postlane.sequence_client import SequenceHandle
from postlane.sequence_models import (
    Approval,
    ComposeRequest,
    Draft,
    InboundEvent,
    InboundKind,
    SequenceReport,
    SequenceStatus,
)
from postlane.sequence_spec import Recipient, SequenceSpec, load_spec

__all__ = [
    "Approval",
    "Attachment",
    "AttemptRecord",
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
