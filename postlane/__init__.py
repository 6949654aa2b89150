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

__all__ = [
    "Attachment",
    "AttemptRecord",
    "ConfigurationError",
    "DeliveryError",
    "DeliveryReceipt",
    "Email",
    "EmailCancelled",
    "EmailHandle",
    "EmailNotFound",
    "EmailReport",
    "EmailStatus",
    "ErrorType",
    "IdempotencyConflict",
    "InvalidEmail",
    "LaneConfig",
    "PermanentDeliveryError",
    "PostlaneClient",
    "PostlaneError",
    "Priority",
    "RetrySettings",
    "Settings",
    "UnknownSender",
    "load_settings",
]
