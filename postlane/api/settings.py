"""The ``[api]`` table of ``postlane.toml`` (pydantic and the standard library only, so
`postlane.config` can import it without pulling in the web stack)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from postlane.email.models import MAX_EMAIL_BYTES, MAX_RECIPIENTS


class ApiSettings(BaseModel):
    """How ``postlane api`` serves (``[api]`` in ``postlane.toml``, or ``POSTLANE_API__*``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keys_file: str = ".postlane/api-keys.json"
    """Where ``postlane api-key`` keeps the keys' hashes and scopes (never the keys)."""
    public_url: str | None = None
    """The API's public ``https://`` base URL, e.g. ``https://mail.acme.test``. When set,
    sequence emails whose spec has no ``unsubscribe_url`` offer ``<public_url>/u/<token>``
    as their RFC 8058 one-click unsubscribe."""
    specs_dir: str = "sequences"
    """Directory of sequence specs: ``POST /v1/sequences`` with ``"spec": "trial"`` reads
    ``<specs_dir>/trial.toml``, or the spec in the directory whose ``name`` is ``trial``, and
    ``"spec": "trial.toml"`` that file; nothing outside the directory."""
    max_body_bytes: int = Field(default=2 * MAX_EMAIL_BYTES, ge=1024)
    """Largest request body accepted; a larger one gets 413 before it is read in full.
    (JSON escapes and base64 attachments make a body larger than the email it holds.)"""
    max_recipients: int = Field(default=MAX_RECIPIENTS, ge=1, le=MAX_RECIPIENTS)
    """to + cc + bcc of one email sent through the API; more gets 422."""

    @field_validator("public_url")
    @classmethod
    def _https(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip().rstrip("/")
        if not v.startswith("https://") or len(v) <= len("https://"):
            raise ValueError(f"{v!r} must be an https:// URL (RFC 8058 one-click needs HTTPS)")
        return v
