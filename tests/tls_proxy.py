"""A TLS-terminating gRPC proxy (Debian's nginx) in front of the Temporal dev server.

The dev server (``temporal server start-dev``) has no TLS flags, so tests of mTLS and API
keys put nginx in front of it: it terminates TLS (HTTP/2 negotiated by ALPN, which the
Temporal SDK's Rust client insists on: stunnel 5.68 has no ALPN, and the client refuses it
with ``H2NotNegotiated``) and forwards plain gRPC to the dev server.

Two listeners:

- `mtls_port`: requires a client certificate issued by the test CA; without one, every call
  is answered ``UNAUTHENTICATED: client certificate required``.
- `api_key_port`: server TLS only; a call without ``authorization: Bearer <api_key>`` is
  answered ``UNAUTHENTICATED: API key required``.

Each call that reaches the dev server is logged as ``<client cert subject>|<method path>``
(`calls`), so a test can see which process made which call.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.procs import assert_eventually, free_port
from tests.sysdeps import require

_CONF = """\
daemon off;
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 512; }}
http {{
  client_body_temp_path {d}/tmp-body;
  proxy_temp_path {d}/tmp-proxy;
  fastcgi_temp_path {d}/tmp-fastcgi;
  uwsgi_temp_path {d}/tmp-uwsgi;
  scgi_temp_path {d}/tmp-scgi;
  client_max_body_size 0;
  keepalive_requests 1000000;
  map_hash_bucket_size 128;
  log_format calls '$ssl_client_s_dn|$uri|$status';
  map $ssl_client_verify $cert_ok {{ SUCCESS 1; default 0; }}
  map $http_authorization $key_ok {{ "Bearer {api_key}" 1; default 0; }}
  ssl_certificate {d}/server.pem;
  ssl_certificate_key {d}/server.pem;
  # Temporal's long polls last up to 70 s.
  grpc_read_timeout 300s;
  grpc_send_timeout 300s;

  server {{
    listen 127.0.0.1:{mtls_port} ssl http2;
    ssl_client_certificate {d}/ca.pem;
    ssl_verify_client optional;
    ssl_verify_depth 2;
    location / {{
      if ($cert_ok = 0) {{
        access_log {d}/refused.log calls;
        add_header content-type application/grpc always;
        add_header grpc-status 16 always;
        add_header grpc-message "client%20certificate%20required" always;
        return 200;
      }}
      access_log {d}/calls.log calls;
      grpc_pass grpc://{upstream};
    }}
  }}

  server {{
    listen 127.0.0.1:{api_key_port} ssl http2;
    location / {{
      if ($key_ok = 0) {{
        access_log {d}/refused.log calls;
        add_header content-type application/grpc always;
        add_header grpc-status 16 always;
        add_header grpc-message "API%20key%20required" always;
        return 200;
      }}
      access_log {d}/calls.log calls;
      grpc_pass grpc://{upstream};
    }}
  }}
}}
"""


@dataclass
class ClientFiles:
    """A client certificate and its key, as files (PEM)."""

    cert: Path
    key: Path


@dataclass
class TlsProxy:
    """A running proxy; see the module docstring."""

    directory: Path
    ca: trustme.CA
    ca_file: Path
    mtls_port: int
    api_key_port: int
    api_key: str

    @property
    def mtls_address(self) -> str:
        return f"127.0.0.1:{self.mtls_port}"

    @property
    def api_key_address(self) -> str:
        return f"127.0.0.1:{self.api_key_port}"

    def client_cert(self, name: str) -> ClientFiles:
        """A client certificate with common name `name`, signed by the proxy's CA."""
        leaf = self.ca.issue_cert(f"{name}.clients.test", common_name=name)
        files = ClientFiles(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        leaf.cert_chain_pems[0].write_to_path(str(files.cert))
        leaf.private_key_pem.write_to_path(str(files.key))
        files.key.chmod(0o600)
        return files

    def calls(self) -> list[tuple[str, str]]:
        """(client common name, gRPC method) of every call forwarded so far, in order."""
        found: list[tuple[str, str]] = []
        log = self.directory / "calls.log"
        if not log.exists():
            return found
        for line in log.read_text().splitlines():
            subject, path, _status = line.rsplit("|", 2)
            common_name = next(
                (p.removeprefix("CN=") for p in subject.split(",") if p.startswith("CN=")),
                "",
            )
            found.append((common_name, path.rsplit("/", 1)[-1]))
        return found

    def methods_of(self, common_name: str) -> set[str]:
        """The gRPC methods the client with `common_name` called."""
        return {method for cn, method in self.calls() if cn == common_name}

    def refused(self) -> list[str]:
        """Lines of the calls the proxy answered itself (no certificate, no key)."""
        log = self.directory / "refused.log"
        return log.read_text().splitlines() if log.exists() else []


@asynccontextmanager
async def tls_proxy(directory: Path, upstream: str) -> AsyncIterator[TlsProxy]:
    """Run nginx in front of the plain gRPC server at `upstream` until the block exits.

    Fails the test (naming the Debian package) if nginx is not installed.
    """
    proxy, proc = _start(directory, upstream)
    try:
        await _listening(proxy, proc, [proxy.mtls_port, proxy.api_key_port])
        yield proxy
    finally:
        await _stop(proc)


def _start(directory: Path, upstream: str) -> tuple[TlsProxy, subprocess.Popen[bytes]]:
    nginx = require("nginx", "nginx")
    ca, ca_file = _server_certificate(directory)
    proxy = TlsProxy(
        directory,
        ca,
        ca_file,
        mtls_port=free_port(),
        api_key_port=free_port(),
        api_key=f"pl-test-{secrets.token_hex(16)}",
    )
    conf = directory / "nginx.conf"
    conf.write_text(
        _CONF.format(
            d=directory,
            api_key=proxy.api_key,
            mtls_port=proxy.mtls_port,
            api_key_port=proxy.api_key_port,
            upstream=upstream,
        )
    )
    args = [nginx, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    return proxy, _spawn(args, directory / "nginx.stderr")


def _spawn(args: list[str], output: Path) -> subprocess.Popen[bytes]:
    with output.open("wb") as out:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


async def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        await asyncio.to_thread(proc.wait, 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)


async def _listening(proxy: TlsProxy, proc: subprocess.Popen[bytes], ports: list[int]) -> None:
    async def up() -> bool:
        if proc.poll() is not None:  # not an AssertionError: that would mean "not yet"
            logs = sorted(proxy.directory.glob("*.stderr")) + sorted(proxy.directory.glob("*.log"))
            raise RuntimeError(f"{proc.args!r} exited: " + "".join(p.read_text() for p in logs))
        for port in ports:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
        return True

    await assert_eventually(up, within=30, what="the proxy listening")


@asynccontextmanager
async def plain_tls_tunnel(directory: Path, upstream: str) -> AsyncIterator[TlsProxy]:
    """stunnel terminating TLS in front of `upstream`: TLS only, no ALPN (stunnel 5.68 has
    none), which Temporal's client refuses. `api_key_port` is unused (0).

    Fails the test (naming the Debian package) if stunnel4 is not installed.
    """
    proxy, proc = _start_stunnel(directory, upstream)
    try:
        await _listening(proxy, proc, [proxy.mtls_port])
        yield proxy
    finally:
        await _stop(proc)


def _start_stunnel(directory: Path, upstream: str) -> tuple[TlsProxy, subprocess.Popen[bytes]]:
    stunnel = require("stunnel4", "stunnel4")
    ca, ca_file = _server_certificate(directory)
    proxy = TlsProxy(directory, ca, ca_file, free_port(), 0, "")
    conf = directory / "stunnel.conf"
    conf.write_text(
        f"foreground = yes\npid =\n[temporal]\naccept = 127.0.0.1:{proxy.mtls_port}\n"
        f"connect = {upstream}\ncert = {directory / 'server.pem'}\n"
    )
    return proxy, _spawn([stunnel, str(conf)], directory / "stunnel.stderr")


def _server_certificate(directory: Path) -> tuple[trustme.CA, Path]:
    """A new CA (``ca.pem``) and a certificate it signed for localhost and 127.0.0.1, with
    its key (``server.pem``), in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(directory / "server.pem")
    )
    return ca, ca_file
