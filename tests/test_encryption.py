"""The AES-256-GCM payload codec and its key ring, on their own."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter

from postlane.connection import data_converter
from postlane.encryption import (
    COMPRESSION_METADATA,
    ENCODING,
    KEY_ID_METADATA,
    AesGcmCodec,
    EncryptionSettings,
    KeyRing,
    PayloadDecryptionError,
    SealedPayloadGuard,
    codec_from_environment,
    new_key,
)
from postlane.errors import ConfigurationError

SECRET = b'{"subject":"Your code is 847291","to":["bob@example.test"]}'


def _payload(data: bytes = SECRET) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=data)


def _ring(*ids: str, active: str | None = None) -> KeyRing:
    return KeyRing({i: os.urandom(32) for i in ids}, active)


async def test_encryption_round_trip_hides_plaintext() -> None:
    codec = AesGcmCodec(_ring("k1"))
    [sealed] = await codec.encode([_payload()])
    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID_METADATA] == b"k1"
    assert b"847291" not in sealed.SerializeToString()
    assert b"bob" not in sealed.SerializeToString()
    [opened] = await codec.decode([sealed])
    assert opened == _payload()


async def test_encryption_nonce_is_fresh_per_payload() -> None:
    codec = AesGcmCodec(_ring("k1"))
    first, second = await codec.encode([_payload(), _payload()])
    assert first.data[:12] != second.data[:12]
    assert first.data != second.data


async def test_encryption_flipped_bit_is_detected() -> None:
    codec = AesGcmCodec(_ring("k1"))
    [sealed] = await codec.encode([_payload()])
    for index in (0, 12, len(sealed.data) - 1):  # nonce, ciphertext, tag
        data = bytearray(sealed.data)
        data[index] ^= 0x01
        tampered = Payload(metadata=dict(sealed.metadata), data=bytes(data))
        with pytest.raises(PayloadDecryptionError, match="failed authentication"):
            await codec.decode([tampered])


async def test_encryption_metadata_is_authenticated() -> None:
    keys = {"k1": os.urandom(32)}
    keys["k2"] = keys["k1"]  # same key under another ID: only the bound ID tells them apart
    codec = AesGcmCodec(KeyRing(keys, "k1"), compress=True)
    [sealed] = await codec.encode([_payload(SECRET * 20)])
    assert sealed.metadata[COMPRESSION_METADATA] == b"zlib"
    relabelled = Payload(metadata={**sealed.metadata, KEY_ID_METADATA: b"k2"}, data=sealed.data)
    with pytest.raises(PayloadDecryptionError, match="failed authentication"):
        await codec.decode([relabelled])
    stripped = {k: v for k, v in sealed.metadata.items() if k != COMPRESSION_METADATA}
    with pytest.raises(PayloadDecryptionError, match="failed authentication"):
        await codec.decode([Payload(metadata=stripped, data=sealed.data)])


async def test_encryption_unknown_key_id_names_it() -> None:
    [sealed] = await AesGcmCodec(_ring("old")).encode([_payload()])
    with pytest.raises(PayloadDecryptionError, match="'old'.*POSTLANE_ENCRYPTION_KEYS"):
        await AesGcmCodec(_ring("new")).decode([sealed])


async def test_encryption_ring_rotation_opens_old_keys() -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    [old] = await AesGcmCodec(KeyRing({"k1": k1})).encode([_payload()])
    rotated = AesGcmCodec(KeyRing({"k1": k1, "k2": k2}, "k2"))
    [new] = await rotated.encode([_payload()])
    assert new.metadata[KEY_ID_METADATA] == b"k2"
    assert await rotated.decode([old, new]) == [_payload(), _payload()]


async def test_encryption_compression_shrinks_and_round_trips() -> None:
    big = _payload(SECRET * 100)
    plain = AesGcmCodec(_ring("k1"))
    packed = AesGcmCodec(plain.ring, compress=True)
    [a] = await plain.encode([big])
    [b] = await packed.encode([big])
    assert len(b.data) < len(a.data) / 5
    assert await packed.decode([b]) == [big]
    assert await plain.decode([b]) == [big]  # the flag travels with the payload


async def test_encryption_passes_unsealed_payloads_through() -> None:
    codec = AesGcmCodec(_ring("k1"))
    assert await codec.decode([_payload()]) == [_payload()]


def test_encryption_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KEYS", "KEY_FILE", "ACTIVE_KEY", "COMPRESS"):
        monkeypatch.delenv(f"POSTLANE_ENCRYPTION_{var}", raising=False)
    assert codec_from_environment() is None
    converter = data_converter()
    assert converter.payload_converter_class is pydantic_data_converter.payload_converter_class
    assert converter.failure_converter_class is pydantic_data_converter.failure_converter_class
    assert isinstance(converter.payload_codec, SealedPayloadGuard)


async def test_encryption_off_names_the_setting_for_a_sealed_payload() -> None:
    [sealed] = await AesGcmCodec(_ring("k1")).encode([_payload()])
    with pytest.raises(PayloadDecryptionError, match="'k1'.*POSTLANE_ENCRYPTION_KEYS"):
        await SealedPayloadGuard().decode([_payload(), sealed])
    assert await SealedPayloadGuard().decode([_payload()]) == [_payload()]
    assert await SealedPayloadGuard().encode([_payload()]) == [_payload()]


def test_encryption_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text(f"# rotated 2026-11\nk0:{new_key()}\n")
    k1 = new_key()
    monkeypatch.setenv("POSTLANE_ENCRYPTION_KEYS", f"k1:{k1}, k2:{new_key()}")
    monkeypatch.setenv("POSTLANE_ENCRYPTION_KEY_FILE", str(file))
    monkeypatch.setenv("POSTLANE_ENCRYPTION_ACTIVE_KEY", "k2")
    converter = data_converter()
    codec = converter.payload_codec
    assert isinstance(codec, AesGcmCodec)
    assert codec.ring.active == "k2"
    assert codec.ring.key_ids == ["k1", "k2", "k0"]
    assert repr(codec.ring) == "KeyRing(active='k2', keys=['k1', 'k2', 'k0'])"
    assert k1 not in repr(EncryptionSettings())  # SecretStr: the keys never print


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KEYS": "k1:" + base64.b64encode(b"short").decode()}, r"KEYS: key 'k1' is 5 bytes"),
        ({"KEYS": "k1:not*base64"}, r"POSTLANE_ENCRYPTION_KEYS: key 'k1': not valid base64"),
        ({"KEYS": new_key()}, r"POSTLANE_ENCRYPTION_KEYS: entry 1: expected 'id:base64key'"),
        (
            {"KEYS": f"k1:{new_key()}", "ACTIVE_KEY": "k9"},
            r"POSTLANE_ENCRYPTION_ACTIVE_KEY: 'k9' is not among the configured keys \(k1\)",
        ),
        ({"KEY_FILE": "/nonexistent/keys"}, r"POSTLANE_ENCRYPTION_KEY_FILE: .*cannot read"),
        ({"KEYS": "bad id!:" + new_key()}, r"key ID 'bad id!'"),
    ],
)
def test_encryption_bad_key_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for var, value in env.items():
        monkeypatch.setenv(f"POSTLANE_ENCRYPTION_{var}", value)
    with pytest.raises(ConfigurationError, match=message) as caught:
        data_converter()
    key = env.get("KEYS", "").partition(":")[2] or env.get("KEYS", "")
    if len(key) > 8:
        assert key not in str(caught.value)  # a rejected key is never echoed


def test_encryption_settings_explicit() -> None:
    settings = EncryptionSettings(keys=f"a:{new_key()}", compress=True)  # type: ignore[arg-type]
    codec = codec_from_environment(settings)
    assert codec is not None and codec.compress and codec.ring.active == "a"
