"""A real IMAP server for tests: Debian's dovecot, started on loopback in a temporary dir.

The generated ``dovecot.conf`` listens on 127.0.0.1 on free unprivileged ports, keeps its
maildirs, sockets and logs in the temporary directory, and authenticates one user from a
passwd-file with a plaintext password. With ``tls=True`` it also offers STARTTLS on the
plain port and implicit TLS on a second one, with a certificate from a throwaway CA
(trustme) whose PEM the client can trust.

``make test`` installs dovecot (``dovecot-imapd``). Where it is missing, the tests that
need it fail, naming the package (`tests.sysdeps.require`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from types import TracebackType

import aioimaplib

from tests.procs import free_port
from tests.sysdeps import require

USER = "agent@acme.test"
PASSWORD = "imap-secret-for-tests"
DH_FILE = Path("/usr/share/dovecot/dh.pem")


def dovecot_binary() -> str:
    """The dovecot executable, or a test failure naming the package that ships it."""
    return require("dovecot", "dovecot-imapd")


class Dovecot:
    """One dovecot instance with one mailbox user; a context manager that stops it."""

    def __init__(self, *, tls: bool = False) -> None:
        self.binary = dovecot_binary()
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls_port = free_port() if tls else 0
        self.tls = tls
        self.user = USER
        self.password = PASSWORD
        self.ca_file: Path | None = None
        # Not under pytest's tmp_path: as root, the mail processes run as `nobody`, who
        # must be able to reach the maildir (pytest's tmp dirs are private to root).
        self.dir = Path(tempfile.mkdtemp(prefix="postlane-dovecot-"))
        self.dir.chmod(0o755)
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Dovecot:
        """Write the configuration, run ``dovecot -F -c conf`` and wait until it listens."""
        conf = self._write_config()
        out = (self.dir / "dovecot.out").open("wb")
        try:
            self._proc = subprocess.Popen(
                [self.binary, "-F", "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        deadline = time.monotonic() + 20
        ports = [p for p in (self.port, self.tls_port) if p]
        while not all(self._listening(p) for p in ports):
            if self._proc.poll() is not None:
                raise RuntimeError(f"dovecot exited (rc={self._proc.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dovecot did not listen on {ports}:\n{self.log}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop dovecot (the whole process group it leads) and remove its directory."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def log(self) -> str:
        parts = [self.dir / "dovecot.out", self.dir / "dovecot.log"]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())

    def _listening(self, port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex((self.host, port)) == 0

    def _write_config(self) -> Path:
        root = os.geteuid() == 0
        me = pwd.getpwuid(os.geteuid())
        mail = pwd.getpwnam("nobody") if root else me
        home = self.dir / "mail" / "agent"
        home.mkdir(parents=True)
        if root:
            os.chown(home, mail.pw_uid, mail.pw_gid)
        (self.dir / "users").write_text(
            f"{self.user}:{{PLAIN}}{self.password}:{mail.pw_uid}:{mail.pw_gid}::{home}\n"
        )
        internal = "dovecot" if root else me.pw_name
        login = "dovenull" if root else me.pw_name
        lines = [
            f"base_dir = {self.dir}/run",
            f"state_dir = {self.dir}/state",
            f"instance_name = postlane-test-{self.port}",
            "protocols = imap",
            "listen = 127.0.0.1",
            f"log_path = {self.dir}/dovecot.log",
            "mail_location = maildir:~/Maildir",
            "first_valid_uid = 1",
            f"default_internal_user = {internal}",
            f"default_login_user = {login}",
            "auth_mechanisms = plain login",
            # Loopback only: plaintext logins are fine without TLS.
            "disable_plaintext_auth = no",
            # A refused login answers at once (the penalty for repeated failures from one
            # IP still applies: a test of wrong passwords gets a server of its own).
            "auth_failure_delay = 0",
            "passdb {",
            "  driver = passwd-file",
            f"  args = scheme=PLAIN username_format=%u {self.dir}/users",
            "}",
            "userdb {",
            "  driver = passwd-file",
            f"  args = username_format=%u {self.dir}/users",
            "}",
            "service imap-login {",
            "  inet_listener imap {",
            f"    address = {self.host}",
            f"    port = {self.port}",
            "  }",
            "  inet_listener imaps {",
            f"    address = {self.host}",
            f"    port = {self.tls_port}",
            "    ssl = yes",
            "  }",
        ]
        if not root:
            lines.append("  chroot =")
        lines.append("}")
        if not root:
            lines += ["service anvil {", "  chroot =", "}"]
        if self.tls:
            lines += self._tls_config()
        else:
            lines.append("ssl = no")
        conf = self.dir / "dovecot.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _tls_config(self) -> list[str]:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
        self.ca_file = self.dir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        lines = [
            "ssl = yes",
            f"ssl_cert = <{self.dir}/cert.pem",
            f"ssl_key = <{self.dir}/key.pem",
        ]
        if DH_FILE.exists():
            lines.append(f"ssl_dh = <{DH_FILE}")
        return lines

    # -- mail --------------------------------------------------------------------------------

    async def append(
        self, raw: bytes, folder: str = "INBOX", *, arrived: datetime | None = None
    ) -> None:
        """Deliver `raw` into `folder` over IMAP (APPEND), as an MTA's delivery would.

        `arrived` sets the message's INTERNALDATE (default: now).
        """
        client = aioimaplib.IMAP4(host=self.host, port=self.port, timeout=10)
        await client.wait_hello_from_server()
        response = await client.login(self.user, self.password)
        assert response.result == "OK", response
        try:
            if folder != "INBOX":
                await client.create(folder)
            response = await client.append(raw, mailbox=folder, date=arrived)
            assert response.result == "OK", response
        finally:
            await client.logout()

    def change_uidvalidity(self, value: int, folder: str = "INBOX") -> None:
        """Give `folder` a new UIDVALIDITY (as a restored or rebuilt mailbox would get):
        every UID a client remembers for it is void."""
        doveadm = shutil.which("doveadm", path=f"{Path(self.binary).parent}:/usr/bin")
        assert doveadm, "doveadm ships with dovecot-core"
        conf = str(self.dir / "dovecot.conf")
        subprocess.run(
            [doveadm, "-c", conf, "mailbox", "update", "-u", self.user]
            + ["--uid-validity", str(value), folder],
            check=True,
            capture_output=True,
        )

    def client_ssl_context(self) -> ssl.SSLContext:
        """A context that trusts this server's throwaway CA."""
        assert self.ca_file is not None, "start with tls=True"
        return ssl.create_default_context(cafile=str(self.ca_file))
