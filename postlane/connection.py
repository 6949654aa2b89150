"""Connecting to Temporal the way Temporal users expect, with Postlane's data converter."""

from __future__ import annotations

import atexit
import dataclasses
import gc

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.envconfig import ClientConfig

from postlane.encryption import EncryptionSettings, SealedPayloadGuard, codec_from_environment

DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "postlane"


def data_converter(encryption: EncryptionSettings | None = None) -> DataConverter:
    """The converter every Postlane client and worker must share (pydantic v2 models).

    With encryption configured (``POSTLANE_ENCRYPTION_KEYS`` or ``_KEY_FILE``, see
    `postlane.encryption`), payloads are sealed by `AesGcmCodec`, and failure messages and
    stack traces move into the sealed part of the failure: an SMTP reply often quotes the
    recipient's address.

    Args:
        encryption: where the keys come from; default the environment.

    Raises:
        ConfigurationError: the keys are misconfigured (the message names the setting).
    """
    codec = codec_from_environment(encryption)
    if codec is None:
        return _UNSEALED
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


_UNSEALED = dataclasses.replace(pydantic_data_converter, payload_codec=SealedPayloadGuard())
"""Encryption off: payloads as before, and a clear error for one that is sealed."""


async def connect_temporal(address: str | None = None, namespace: str | None = None) -> Client:
    """Connect using ``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``, ``TEMPORAL_API_KEY``,
    ``TEMPORAL_TLS_*`` and Temporal's config profiles; arguments win over the environment.

    Defaults: ``localhost:7233`` and the ``postlane`` namespace that `postlane dev` creates.
    """
    config = ClientConfig.load_client_connect_config()
    if address:
        config["target_host"] = address
    if namespace:
        config["namespace"] = namespace
    config.setdefault("target_host", DEFAULT_ADDRESS)
    config.setdefault("namespace", DEFAULT_NAMESPACE)
    _release_clients_before_exit()
    try:
        return await Client.connect(**config, data_converter=data_converter())
    except RuntimeError as exc:
        hint = connection_hint(str(exc))
        if hint is None:
            raise
        raise RuntimeError(f"{exc} ({hint})") from exc


_HINTS = (
    (
        "Unauthenticated",
        "the server refused this process's credentials: it wants a client certificate"
        " (TEMPORAL_TLS_CLIENT_CERT_PATH and TEMPORAL_TLS_CLIENT_KEY_PATH) or an API key"
        " (TEMPORAL_API_KEY) that it accepts",
    ),
    (
        "UnknownIssuer",
        "the server's certificate is signed by a CA this process does not trust: set"
        " TEMPORAL_TLS_SERVER_CA_CERT_PATH to that CA",
    ),
    (
        "NotValidForName",
        "the server's certificate names another host: set TEMPORAL_TLS_SERVER_NAME to the"
        " name it holds",
    ),
    (
        "H2NotNegotiated",
        "the TLS endpoint does not offer HTTP/2 by ALPN, which Temporal's client requires:"
        " a plain TLS tunnel cannot front Temporal, a gRPC-aware proxy can",
    ),
)


def connection_hint(error: str) -> str | None:
    """What to set, in Temporal's variables, for a connection refused with `error`.

    The SDK's messages name the TLS or gRPC failure (``InvalidCertificate(UnknownIssuer)``,
    ``code: Unauthenticated``) but not the setting that fixes it.
    """
    return next((hint for marker, hint in _HINTS if marker in error), None)


def _release_clients_before_exit() -> None:
    """Free unreachable Temporal clients before the interpreter starts to finalize.

    A Temporal client sits in a reference cycle, so a short script's client is usually
    freed by the interpreter's last garbage collection, during finalization; its native
    side then touches the GIL from a thread that may no longer do so, and the process
    aborts ("PyGILState_Release ... must be current", temporalio/sdk-python#300): 9 of 60
    runs of `tests/test_client_exit.py`'s script. Collecting in an ``atexit`` hook frees it
    while the interpreter still runs: 0 of 60.
    """
    global _release_registered
    if not _release_registered:
        atexit.register(gc.collect)
        _release_registered = True


_release_registered = False
