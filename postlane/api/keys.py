"""API keys: stored as SHA-256 hashes with the senders each may send as.

A key reads ``pl_<id>_<secret>``: the id (public, 8 hex digits) finds the record, the
secret (32 random bytes, URL-safe base64) proves possession. Keys are high-entropy, so one
SHA-256 is enough (no password stretching is needed against guessing), and the hash is
compared in constant time. The plaintext is shown once, by ``postlane api-key create``,
and never stored or logged.

The file (``[api] keys_file``) is JSON, written atomically with mode 0600; the server
re-reads it when it changes, so a revocation takes effect on the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from postlane.errors import ConfigurationError, InvalidInput
from postlane.senders import SenderScope

_KEY_RE = re.compile(r"^pl_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")


class ApiKey(BaseModel):
    """One API key's record (no secret in it)."""

    model_config = ConfigDict(frozen=True)

    id: str
    """Public identifier, the ``<id>`` of ``pl_<id>_<secret>``; safe to log."""
    sha256: str
    """Hex SHA-256 of the whole key."""
    senders: list[str] = Field(min_length=1)
    """Sender patterns this key may send as: ``agent@acme.test``, ``*@ops.acme.test`` or
    ``*`` (any)."""
    name: str = ""
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def scope(self) -> SenderScope:
        """The senders this key may act as (`postlane.senders`)."""
        return SenderScope(self.senders)

    def allows(self, sender: str) -> bool:
        """May this key send as `sender` (case-insensitive, as lanes match senders)?"""
        return self.scope.allows(sender)


class _KeyFile(BaseModel):
    keys: list[ApiKey] = Field(default_factory=list)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The API keys in one file.

    Args:
        path: the keys file (created by the first `create`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._loaded: tuple[int, int] | None = None  # (mtime_ns, size) of what we read
        self._keys: list[ApiKey] = []

    def keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first.

        Raises:
            ConfigurationError: the file is unreadable or malformed.
        """
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._loaded, self._keys = None, []
            return []
        except OSError as exc:
            raise ConfigurationError(f"keys_file: cannot read {self.path}: {exc}") from None
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen != self._loaded:
            try:
                self._keys = _KeyFile.model_validate_json(self.path.read_bytes()).keys
            except OSError as exc:
                raise ConfigurationError(f"keys_file: cannot read {self.path}: {exc}") from None
            except ValidationError as exc:
                raise ConfigurationError(
                    f"keys_file: {self.path} is not a Postlane keys file: {exc.errors()[0]['msg']}"
                ) from None
            self._loaded = seen
        return list(self._keys)

    def create(self, senders: list[str], *, name: str = "") -> tuple[ApiKey, str]:
        """Make a key for `senders`; returns its record and the plaintext (shown once)."""
        existing = self.keys()
        ids = {k.id for k in existing}
        key_id = secrets.token_hex(4)
        while key_id in ids:
            key_id = secrets.token_hex(4)
        plaintext = f"pl_{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(
            id=key_id,
            sha256=_digest(plaintext),
            senders=senders,
            name=name,
            created_at=datetime.now(UTC),
        )
        self._write([*existing, record])
        return record, plaintext

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke the key `key_id` (revoking twice changes nothing).

        Raises:
            InvalidInput: no key has that id (field ``id``).
        """
        keys = self.keys()
        for i, record in enumerate(keys):
            if record.id == key_id:
                if record.revoked_at is None:
                    record = record.model_copy(update={"revoked_at": datetime.now(UTC)})
                    keys[i] = record
                    self._write(keys)
                return record
        raise InvalidInput("id", f"no API key has the id {key_id!r}")

    def authenticate(self, presented: str) -> ApiKey | None:
        """The live key `presented` is, or None (malformed, unknown, wrong or revoked)."""
        match = _KEY_RE.match(presented)
        digest = _digest(presented)
        found: ApiKey | None = None
        for record in self.keys():
            # Compare against every record, in constant time, whatever the id says.
            if hmac.compare_digest(record.sha256, digest) and match is not None:
                found = record
        if found is None or found.revoked_at is not None:
            return None
        return found

    def _write(self, keys: list[ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(
            {"keys": [k.model_dump(mode="json") for k in keys]}, indent=2, sort_keys=True
        )
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".api-keys.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(data + "\n")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._loaded = None
