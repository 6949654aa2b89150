"""Message-IDs and unsubscribe tokens that a recipient can neither read nor forge.

Both are deterministic authenticated encryption (AES-SIV, RFC 5297) under keys derived from
the token secret the workers hold (``POSTLANE_TOKEN_SECRET`` or ``token_secret_file``):

- A Message-ID, ``<pl1.<base32>@domain>``, seals the email's workflow ID. The same workflow
  gives the same Message-ID on every attempt (no random nonce), so retries and duplicates
  stay one message to the receiving side, while the idempotency key inside is unreadable.
- An unsubscribe token, ``pl1-<base32>``, seals the sender and the sequence's workflow ID:
  it names one sequence, and counts only in mail to the sender it was issued for.

Anything that fails to open (a flipped bit, a made-up value, another secret) is ignored and
logged as ``tokens.rejected`` with a short fingerprint of the value, never the secret.

The forms used before (``<pl.<base32>@domain>`` and ``pl-<base32>``, plain base32 of the
workflow ID, see `postlane.ids`) are still accepted while ``accept_legacy_tokens`` is on,
so replies to mail sent before the change keep routing.

Only worker-side code (activities, the inbound poller, an app's own unsubscribe endpoint)
uses this module: workflow code never sees the secret.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import SecretStr

from postlane.email.models import Email
from postlane.errors import ConfigurationError
from postlane.ids import (
    sequence_from_unsubscribe_token,
    sequence_of_email,
    workflow_id_from_message_id,
)

if TYPE_CHECKING:
    from postlane.config import Settings

log = structlog.get_logger(__name__)

SECRET_ENV = "POSTLANE_TOKEN_SECRET"
"""The environment variable that holds the token secret."""

MIN_SECRET_LENGTH = 32
"""Characters (bytes) a token secret needs at least, e.g. ``openssl rand -base64 48``."""

UNSUBSCRIBE_TOKEN_PLACEHOLDER = "plunsubscribetokenpending"
"""What a sequence's rendered content carries where its unsubscribe token goes: the send
activity puts the real token in its place, so the token is made where the secret is and
never enters the workflow's history. Letters only, so URL and HTML escaping leave it be."""

_MESSAGE_ID_RE = re.compile(r"^<pl1\.([a-z2-7]+)@[^>]+>$")
_TOKEN_RE = re.compile(r"\bpl1-([a-z2-7]+)\b")
_SEP = "\n"


def load_secret(settings: Settings) -> bytes | None:
    """The token secret: ``token_secret`` (``POSTLANE_TOKEN_SECRET``), else the file
    ``token_secret_file`` names. None when neither is set.

    Raises:
        ConfigurationError: the file cannot be read, or the secret is too short; the
            message names the setting.
    """
    if settings.token_secret is not None:
        secret = settings.token_secret.get_secret_value().encode()
        where = f"token_secret ({SECRET_ENV})"
    elif settings.token_secret_file is not None:
        path = Path(settings.token_secret_file)
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigurationError(
                f"token_secret_file: cannot read {path}: {exc.strerror or exc}"
            ) from None
        where = f"token_secret_file ({path})"
    else:
        return None
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigurationError(
            f"{where}: must be at least {MIN_SECRET_LENGTH} characters"
            " (e.g. the output of `openssl rand -base64 48`)"
        )
    return secret


def ephemeral_secret() -> SecretStr:
    """``POSTLANE_TOKEN_SECRET`` if set, else a random secret for this process only: for
    `postlane dev` and the testing environment, whose mail does not outlive them."""
    return SecretStr(os.environ.get(SECRET_ENV) or secrets.token_urlsafe(48))


class TokenKeys:
    """Seals and opens Message-IDs and unsubscribe tokens with one secret.

    Args:
        secret: the token secret (at least `MIN_SECRET_LENGTH` bytes), or None: then only
            legacy forms open, and sealing raises `ConfigurationError`.
        accept_legacy: open the unauthenticated forms used before sealing (replies to old
            mail); turn off once such mail no longer matters.
    """

    def __init__(self, secret: bytes | None, *, accept_legacy: bool = True) -> None:
        if secret is not None and len(secret) < MIN_SECRET_LENGTH:
            raise ConfigurationError(
                f"token_secret: must be at least {MIN_SECRET_LENGTH} characters"
            )
        self.accept_legacy = accept_legacy
        self._message_ids = _siv(secret, b"postlane message-id v1") if secret else None
        self._unsubscribes = _siv(secret, b"postlane unsubscribe v1") if secret else None

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenKeys:
        """The keys the configuration (or ``POSTLANE_TOKEN_SECRET``) gives.

        Raises:
            ConfigurationError: the secret is malformed or its file unreadable.
        """
        return cls(load_secret(settings), accept_legacy=settings.accept_legacy_tokens)

    @property
    def can_seal(self) -> bool:
        """A secret is set, so new Message-IDs and tokens can be made."""
        return self._message_ids is not None

    def require(self) -> None:
        """Raise unless a secret is set (for processes that must make tokens).

        Raises:
            ConfigurationError: names the settings that would provide it.
        """
        if not self.can_seal:
            raise ConfigurationError(
                f"token_secret: not set; set {SECRET_ENV} (at least {MIN_SECRET_LENGTH}"
                " characters, e.g. `openssl rand -base64 48`) or token_secret_file, the same"
                " on every worker"
            )

    def message_id(self, workflow_id: str, domain: str) -> str:
        """The Message-ID every attempt of this email workflow's send carries.

        Raises:
            ConfigurationError: no token secret.
        """
        self.require()
        assert self._message_ids is not None
        return f"<pl1.{_b32(self._message_ids.encrypt(workflow_id.encode(), None))}@{domain}>"

    def open_message_id(self, value: str) -> str | None:
        """The workflow ID a Postlane Message-ID names, or None.

        None for a foreign Message-ID, and (logged) for one that fails to authenticate or
        a legacy one while legacy forms are refused.
        """
        value = value.strip()
        match = _MESSAGE_ID_RE.match(value)
        if match is None:
            legacy = workflow_id_from_message_id(value)
            if legacy is None:
                return None
            if not self.accept_legacy:
                _rejected("message_id", value, "legacy form refused (accept_legacy_tokens off)")
                return None
            return legacy
        return self._open(self._message_ids, match.group(1), "message_id", value)

    def unsubscribe_token(self, sender: str, sequence_id: str) -> str:
        """The token naming `sequence_id` in unsubscribe links and mailto subjects, valid
        only for mail to `sender`.

        Raises:
            ConfigurationError: no token secret.
        """
        self.require()
        assert self._unsubscribes is not None
        plain = f"{sender.lower()}{_SEP}{sequence_id}".encode()
        return "pl1-" + _b32(self._unsubscribes.encrypt(plain, None))

    def open_unsubscribe_token(self, text: str) -> tuple[str | None, str] | None:
        """The sender and sequence workflow ID a token in `text` names, or None.

        The sender is None for a legacy token (it names none). None for text without a
        token, and (logged) for a token that fails to authenticate or a legacy one while
        legacy forms are refused.
        """
        lowered = text.strip().lower()
        match = _TOKEN_RE.search(lowered)
        if match is None:
            legacy = sequence_from_unsubscribe_token(lowered)
            if legacy is None:
                return None
            if not self.accept_legacy:
                _rejected("unsubscribe", lowered, "legacy form refused (accept_legacy_tokens off)")
                return None
            return None, legacy
        opened = self._open(self._unsubscribes, match.group(1), "unsubscribe", match.group(0))
        if opened is None or _SEP not in opened:
            return None
        sender, sequence_id = opened.split(_SEP, 1)
        return sender, sequence_id

    def _open(self, siv: AESSIV | None, encoded: str, kind: str, value: str) -> str | None:
        if siv is None:
            _rejected(kind, value, "no token secret on this worker to check it")
            return None
        try:
            data = base64.b32decode(encoded.upper() + "=" * (-len(encoded) % 8))
            return siv.decrypt(data, None).decode()
        except (InvalidTag, ValueError, UnicodeDecodeError):
            _rejected(kind, value, "not authentic (altered, forged, or another secret)")
            return None


def fill_unsubscribe_token(email: Email, workflow_id: str, keys: TokenKeys) -> Email:
    """`email` with its sequence's unsubscribe token where `UNSUBSCRIBE_TOKEN_PLACEHOLDER`
    stands (headers, subject, bodies); `email` itself when it has none.

    Args:
        email: what the send activity is about to render.
        workflow_id: the email's workflow (``email:<sequence key>:<step>``).
        keys: the worker's keys.

    Raises:
        ConfigurationError: a token is needed and no token secret is configured.
    """
    mark = UNSUBSCRIBE_TOKEN_PLACEHOLDER
    texts = [email.subject, email.text or "", email.html or "", *email.headers.values()]
    if not any(mark in text for text in texts):
        return email
    sequence_id = sequence_of_email(workflow_id)
    if sequence_id is None:
        return email  # not a sequence's email: no token to give
    token = keys.unsubscribe_token(email.sender, sequence_id)
    return email.model_copy(
        update={
            "subject": email.subject.replace(mark, token),
            "text": email.text.replace(mark, token) if email.text is not None else None,
            "html": email.html.replace(mark, token) if email.html is not None else None,
            "headers": {k: v.replace(mark, token) for k, v in email.headers.items()},
        }
    )


def rejected_token(kind: str, value: str, reason: str) -> None:
    """Log a token or Message-ID refused for another reason (e.g. the wrong sender)."""
    _rejected(kind, value, reason)


def fingerprint(value: str) -> str:
    """A short, stable digest of a value for logs: enough to match two lines, no more."""
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def _rejected(kind: str, value: str, reason: str) -> None:
    log.warning("tokens.rejected", kind=kind, reason=reason, fingerprint=fingerprint(value))


def _siv(secret: bytes, purpose: bytes) -> AESSIV:
    # One key per purpose: a Message-ID never opens as a token, nor the other way round.
    key = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=purpose).derive(secret)
    return AESSIV(key)


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()
