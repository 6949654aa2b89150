"""`postlane codec-server`: Temporal's remote-codec HTTP API, for people allowed to read.

The Web UI (``--ui-codec-endpoint``, or a user's own "Codec Server" setting) and
``temporal --codec-endpoint`` send sealed payloads here and get them back readable:

- ``POST /decode`` and ``POST /encode``, also under ``/{namespace}/``; the body is
  ``{"payloads": [{"metadata": {...}, "data": "<base64>"}]}`` both ways.
- Every ``POST`` needs the token (``POSTLANE_CODEC_TOKEN``), as ``Authorization: Bearer
  <token>`` (the CLI: ``--codec-auth "Bearer <token>"``) or as the endpoint's first path
  segment, ``http://host:port/<token>``: the Web UI cannot add a header of its own, so a
  browser is given that URL. A wrong or missing token gets ``401``.
- CORS answers only the configured origins (``POSTLANE_CODEC_ORIGINS``, the Web UI's):
  a preflight or request from any other origin gets ``403`` and no ``Access-Control-*``
  header. Requests with no ``Origin`` (the CLI, scripts) are not browsers and need only
  the token.

It holds the same key ring as the workers (``POSTLANE_ENCRYPTION_*``) and never logs a
payload, a token or a request path.
"""

from __future__ import annotations

import hmac
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from google.protobuf import json_format
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from temporalio.api.common.v1 import Payloads

from postlane.encryption import AesGcmCodec, PayloadDecryptionError, codec_from_environment
from postlane.errors import ConfigurationError

log = structlog.get_logger(__name__)

DEFAULT_PORT = 8081
DEFAULT_ORIGIN = "http://localhost:8233"
MAX_BODY = 16 * 1024 * 1024
"""Bytes a request may carry; Temporal's own payload limit is 2 MiB per payload."""
TOKEN_VAR = "POSTLANE_CODEC_TOKEN"
_ALLOW_HEADERS = "authorization,content-type,x-namespace"


class CodecServerSettings(BaseSettings):
    """The codec server's access rules (``POSTLANE_CODEC_*``, environment only)."""

    model_config = SettingsConfigDict(env_prefix="POSTLANE_CODEC_", extra="ignore")

    token: SecretStr | None = None
    """The bearer token every request must carry (at least 16 characters)."""
    origins: str = DEFAULT_ORIGIN
    """Comma-separated browser origins allowed by CORS: the Web UI's, e.g.
    ``https://temporal-ui.internal``."""

    def allowed_origins(self) -> frozenset[str]:
        """The configured origins, without trailing slashes."""
        return frozenset(o.strip().rstrip("/") for o in self.origins.split(",") if o.strip())


class CodecServer:
    """The HTTP server, in a thread of its own.

    Args:
        codec: the key ring's codec.
        token: the bearer token (at least 16 characters).
        origins: browser origins CORS allows.
        host: address to bind.
        port: port to bind; 0 picks a free one.

    Raises:
        ConfigurationError: the token is missing or short.
    """

    def __init__(
        self,
        codec: AesGcmCodec,
        *,
        token: str,
        origins: frozenset[str],
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
    ) -> None:
        if len(token) < 16:
            raise ConfigurationError(
                f"{TOKEN_VAR}: the codec server needs a token of at least 16 characters"
            )
        self.token = token
        """The bearer token (the owner hands it to the Web UI in its endpoint URL)."""
        handler = type(
            "_BoundHandler",
            (_Handler,),
            {"codec": codec, "token": token.encode(), "origins": origins},
        )
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._httpd.server_address[1])

    def start(self) -> CodecServer:
        """Serve from a background thread."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="postlane-codec-server", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until `stop` (from another thread) or KeyboardInterrupt."""
        self._httpd.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> CodecServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @classmethod
    def from_environment(cls, *, host: str, port: int) -> CodecServer:
        """A server with the environment's key ring, token and origins.

        Raises:
            ConfigurationError: encryption is off, or the token is missing.
        """
        codec = codec_from_environment()
        if codec is None:
            raise ConfigurationError(
                "POSTLANE_ENCRYPTION_KEYS: the codec server needs the key ring"
                " (POSTLANE_ENCRYPTION_KEYS or POSTLANE_ENCRYPTION_KEY_FILE)"
            )
        settings = CodecServerSettings()
        if settings.token is None or not settings.token.get_secret_value():
            raise ConfigurationError(f"{TOKEN_VAR}: not set; the codec server needs a token")
        return cls(
            codec,
            token=settings.token.get_secret_value(),
            origins=settings.allowed_origins(),
            host=host,
            port=port,
        )


class _Handler(BaseHTTPRequestHandler):
    codec: AesGcmCodec
    token: bytes
    origins: frozenset[str]
    protocol_version = "HTTP/1.1"
    server_version = "postlane-codec"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # the default logs the path, which may hold the token; see _done

    def do_OPTIONS(self) -> None:  # noqa: N802
        origin = self.headers.get("Origin")
        if origin is None or origin.rstrip("/") not in self.origins:
            self._reply(HTTPStatus.FORBIDDEN, {"error": "origin not allowed"}, cors=False)
            return
        self._reply(HTTPStatus.NO_CONTENT, None, cors=True)

    def do_POST(self) -> None:  # noqa: N802
        origin = self.headers.get("Origin")
        if origin is not None and origin.rstrip("/") not in self.origins:
            self._reply(HTTPStatus.FORBIDDEN, {"error": "origin not allowed"}, cors=False)
            return
        action, authorised = self._route()
        if not authorised:
            self._reply(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong token"}, cors=True)
            return
        if action is None:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "POST /encode or /decode"}, cors=True)
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "too large"}, cors=True)
            return
        try:
            payloads = json_format.Parse(self.rfile.read(length), Payloads())
            transform = (
                self.codec.decode_payload if action == "decode" else self.codec.encode_payload
            )
            result = Payloads(payloads=[transform(p) for p in payloads.payloads])
        except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": f"bad body: {exc}"}, cors=True)
            return
        except PayloadDecryptionError as exc:
            log.warning("codec.decode_refused", reason=str(exc))
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)}, cors=True)
            return
        body = json_format.MessageToDict(result)
        self._reply(HTTPStatus.OK, {"payloads": body.get("payloads", [])}, cors=True)
        log.debug("codec.request", action=action, payloads=len(payloads.payloads))

    def _route(self) -> tuple[str | None, bool]:
        """(encode | decode | None, authorised) from the path and the Authorization header."""
        parts = [p for p in self.path.split("?", 1)[0].split("/") if p]
        authorised = False
        header = self.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credential.strip().encode(), self.token
        ):
            authorised = True
        if parts and hmac.compare_digest(parts[0].encode(), self.token):
            authorised, parts = True, parts[1:]
        if parts and parts[-1] in ("encode", "decode") and len(parts) <= 2:
            return parts[-1], authorised
        return None, authorised

    def _reply(self, status: HTTPStatus, body: dict[str, Any] | None, *, cors: bool) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if cors:
            # Only reached for an allowed origin, or for a request with none.
            origin = self.headers.get("Origin")
            if origin is not None:
                self.send_header("Access-Control-Allow-Origin", origin)
                self.send_header("Vary", "Origin")
                self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
                self.send_header("Access-Control-Allow-Headers", _ALLOW_HEADERS)
                self.send_header("Access-Control-Max-Age", "600")
        if body is not None:
            self.send_header("Content-Type", "application/json")
        if status >= 400:
            # The body may be unread: this connection cannot carry another request.
            self.close_connection = True
            self.send_header("Connection", "close")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if status >= 400:
            log.info("codec.refused", method=self.command, status=int(status))
