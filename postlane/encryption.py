"""Encryption at rest: an AES-256-GCM payload codec with a key ring.

Every payload Postlane's clients and workers hand to Temporal (workflow and activity inputs
and results, signals, queries, memos, the Web UI's summaries and failure messages) is
serialised, optionally compressed, and sealed with AES-256-GCM under the ring's active key.
The server stores only ciphertext; the key ID travels in the payload's metadata, so any key
still on the ring opens what it sealed, and keys can be rotated without rewriting history.

Keys come only from the environment of the processes that hold them, never from Temporal:

- ``POSTLANE_ENCRYPTION_KEYS``: ``id:base64key`` entries separated by commas or newlines;
- ``POSTLANE_ENCRYPTION_KEY_FILE``: a file with one ``id:base64key`` per line (``#`` comments);
- ``POSTLANE_ENCRYPTION_ACTIVE_KEY``: the ID that seals new payloads (default: the first key);
- ``POSTLANE_ENCRYPTION_COMPRESS``: zlib-compress before sealing (default off).

With neither keys nor a key file, encryption is off and payloads are stored as before.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from postlane.errors import ConfigurationError, PostlaneError

ENCODING = b"binary/encrypted"
"""The ``encoding`` metadata of a sealed payload."""
KEY_ID_METADATA = "encryption-key-id"
"""Metadata naming the key that sealed a payload."""
COMPRESSION_METADATA = "encryption-compression"
"""Metadata present (``zlib``) when the plaintext was compressed before sealing."""
NONCE_SIZE = 12
KEY_SIZE = 32
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_AAD_PREFIX = b"postlane-payload/v1"

KEYS_VAR = "POSTLANE_ENCRYPTION_KEYS"
KEY_FILE_VAR = "POSTLANE_ENCRYPTION_KEY_FILE"
ACTIVE_KEY_VAR = "POSTLANE_ENCRYPTION_ACTIVE_KEY"


class PayloadDecryptionError(PostlaneError):
    """A sealed payload could not be opened: unknown key ID, or altered ciphertext."""


class EncryptionSettings(BaseSettings):
    """Where the key ring comes from (``POSTLANE_ENCRYPTION_*``; environment only)."""

    model_config = SettingsConfigDict(env_prefix="POSTLANE_ENCRYPTION_", extra="ignore")

    keys: SecretStr | None = None
    """``id:base64key`` entries, comma- or newline-separated; each key is 32 random bytes."""
    key_file: Path | None = None
    """A file of ``id:base64key`` lines, read by every process that encrypts or decrypts."""
    active_key: str | None = None
    """The key ID that seals new payloads; default the first key listed."""
    compress: bool = False
    """zlib-compress each payload before sealing it."""

    @property
    def enabled(self) -> bool:
        """Keys are configured: payloads are sealed."""
        return bool(self.keys and self.keys.get_secret_value().strip()) or bool(self.key_file)


class KeyRing:
    """Keys by ID: the active one seals, every one opens.

    Args:
        keys: key ID to 32-byte AES-256 key, in order of listing.
        active: the ID that seals; default the first.

    Raises:
        ConfigurationError: no keys, a bad ID, a key that is not 32 bytes, or an active ID
            that is not on the ring.
    """

    def __init__(self, keys: Mapping[str, bytes], active: str | None = None) -> None:
        if not keys:
            raise ConfigurationError(f"{KEYS_VAR}: no keys given")
        for key_id, key in keys.items():
            if not _KEY_ID_RE.match(key_id):
                raise ConfigurationError(
                    f"{KEYS_VAR}: key ID {key_id!r}: use 1-64 letters, digits, '.', '_', '-'"
                )
            if len(key) != KEY_SIZE:
                raise ConfigurationError(
                    f"{KEYS_VAR}: key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_SIZE}"
                )
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.active = active if active is not None else next(iter(keys))
        if self.active not in self._ciphers:
            raise ConfigurationError(
                f"{ACTIVE_KEY_VAR}: {self.active!r} is not among the configured keys"
                f" ({', '.join(self._ciphers)})"
            )

    @property
    def key_ids(self) -> list[str]:
        """The IDs on the ring, in order of listing."""
        return list(self._ciphers)

    def cipher(self, key_id: str) -> AESGCM:
        """The cipher for `key_id`.

        Raises:
            PayloadDecryptionError: the ring has no such key.
        """
        try:
            return self._ciphers[key_id]
        except KeyError:
            raise PayloadDecryptionError(
                f"payload sealed with key {key_id!r}, which is not in {KEYS_VAR} or"
                f" {KEY_FILE_VAR} (keys here: {', '.join(self._ciphers)})"
            ) from None

    def __repr__(self) -> str:
        # Never the key material: IDs only.
        return f"KeyRing(active={self.active!r}, keys={self.key_ids!r})"

    @classmethod
    def from_settings(cls, settings: EncryptionSettings) -> KeyRing | None:
        """The ring `settings` describe, or None when encryption is off.

        Raises:
            ConfigurationError: a malformed entry, naming the setting it came from.
        """
        if not settings.enabled:
            return None
        keys: dict[str, bytes] = {}
        sources: list[tuple[str, str]] = []
        if settings.keys is not None:
            sources.append((KEYS_VAR, settings.keys.get_secret_value()))
        if settings.key_file is not None:
            try:
                text = settings.key_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(
                    f"{KEY_FILE_VAR}: {settings.key_file}: cannot read: {exc.strerror or exc}"
                ) from None
            sources.append((KEY_FILE_VAR, text))
        for var, text in sources:
            for key_id, key in _parse_keys(var, text):
                if key_id in keys and keys[key_id] != key:
                    raise ConfigurationError(f"{var}: key ID {key_id!r} given twice, differently")
                keys[key_id] = key
        if not keys:
            raise ConfigurationError(f"{KEYS_VAR}: no keys given")
        active = settings.active_key.strip() if settings.active_key else None
        return cls(keys, active or None)


def _parse_keys(var: str, text: str) -> list[tuple[str, bytes]]:
    entries = []
    for n, raw in enumerate(re.split(r"[,\n]", text), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        key_id, sep, encoded = entry.partition(":")
        key_id = key_id.strip()
        if not sep or not key_id:
            # The entry itself may be a key: say where, never what.
            raise ConfigurationError(f"{var}: entry {n}: expected 'id:base64key'")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"{var}: key {key_id!r}: not valid base64") from None
        if len(key) != KEY_SIZE:
            raise ConfigurationError(
                f"{var}: key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_SIZE}"
                " (make one with: postlane keygen)"
            )
        entries.append((key_id, key))
    return entries


def new_key() -> str:
    """A fresh random AES-256 key, base64-encoded, for ``POSTLANE_ENCRYPTION_KEYS``."""
    return base64.b64encode(os.urandom(KEY_SIZE)).decode("ascii")


class AesGcmCodec(PayloadCodec):
    """Seals payloads with AES-256-GCM under the ring's active key.

    Each payload gets a random 96-bit nonce. The key ID and the compression flag are bound
    to the ciphertext as associated data, so neither can be swapped without detection.
    Payloads that are not sealed (written before encryption was switched on) pass through
    `decode` unchanged.

    Args:
        ring: the keys.
        compress: zlib-compress each payload before sealing it (only kept when smaller).
    """

    def __init__(self, ring: KeyRing, *, compress: bool = False) -> None:
        self.ring = ring
        self.compress = compress

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Seal each payload."""
        return [self.encode_payload(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Open each sealed payload; others pass through.

        Raises:
            PayloadDecryptionError: unknown key ID or altered ciphertext or metadata.
        """
        return [self.decode_payload(p) for p in payloads]

    def encode_payload(self, payload: Payload) -> Payload:
        """Seal one payload (synchronous, for the codec server's threads)."""
        plain = payload.SerializeToString()
        compression = b""
        if self.compress:
            packed = zlib.compress(plain)
            if len(packed) < len(plain):
                plain, compression = packed, b"zlib"
        key_id = self.ring.active
        nonce = os.urandom(NONCE_SIZE)
        sealed = self.ring.cipher(key_id).encrypt(nonce, plain, _aad(key_id, compression))
        metadata = {"encoding": ENCODING, KEY_ID_METADATA: key_id.encode("ascii")}
        if compression:
            metadata[COMPRESSION_METADATA] = compression
        return Payload(metadata=metadata, data=nonce + sealed)

    def decode_payload(self, payload: Payload) -> Payload:
        """Open one payload (synchronous); an unsealed one is returned as it is.

        Raises:
            PayloadDecryptionError: unknown key ID or altered ciphertext or metadata.
        """
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode("ascii", "replace")
        compression = payload.metadata.get(COMPRESSION_METADATA, b"")
        if compression not in (b"", b"zlib"):
            raise PayloadDecryptionError(f"unknown payload compression {compression!r}")
        cipher = self.ring.cipher(key_id)
        data = payload.data
        if len(data) < NONCE_SIZE + 16:
            raise PayloadDecryptionError(f"sealed payload (key {key_id!r}) is truncated")
        try:
            plain = cipher.decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], _aad(key_id, compression))
        except InvalidTag:
            raise PayloadDecryptionError(
                f"sealed payload (key {key_id!r}) failed authentication: altered, or sealed"
                " by another key with the same ID"
            ) from None
        if compression:
            plain = zlib.decompress(plain)
        return Payload.FromString(plain)


class SealedPayloadGuard(PayloadCodec):
    """The codec of a process without keys: payloads pass as they are, and a sealed one
    fails with an error that says which setting is missing (instead of the SDK's
    ``KeyError: 'Unknown payload encoding binary/encrypted'``)."""

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Leave payloads as they are."""
        return list(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Leave unsealed payloads as they are.

        Raises:
            PayloadDecryptionError: a payload is sealed.
        """
        for payload in payloads:
            if payload.metadata.get("encoding") == ENCODING:
                key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode("ascii", "replace")
                raise PayloadDecryptionError(
                    f"payload sealed with key {key_id!r}, and this process has no keys: set"
                    f" {KEYS_VAR} or {KEY_FILE_VAR}"
                )
        return list(payloads)


def _aad(key_id: str, compression: bytes) -> bytes:
    return b"\x00".join((_AAD_PREFIX, key_id.encode("ascii"), compression))


def codec_from_environment(settings: EncryptionSettings | None = None) -> AesGcmCodec | None:
    """The codec the environment configures, or None when encryption is off.

    Raises:
        ConfigurationError: a bad key, key file or active key ID, naming the setting.
    """
    settings = settings if settings is not None else EncryptionSettings()
    ring = KeyRing.from_settings(settings)
    return AesGcmCodec(ring, compress=settings.compress) if ring is not None else None
