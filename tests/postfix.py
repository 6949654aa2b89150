"""A private Postfix on loopback for tests: its own configuration, queue, log and port.

Debian's postfix (``apt-get install postfix``) is started with ``postfix -c <dir> start``
as a second instance that touches nothing of the system's: it listens on 127.0.0.1 at a
free port, relays for loopback clients, discards every message it accepts (after logging
it), and logs to a file of its own. Its log is the ground truth a test reads: one
``message-id=`` line per queued message, and one ``disconnect from`` line per SMTP session
with the commands the client sent (``ehlo=1 mail=3/5 rcpt=3 data=3 rset=2 quit=1``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import free_port
from tests.sysdeps import require

POSTFIX = "/usr/sbin/postfix"
MASTER_CF = Path("/etc/postfix/master.cf")

_DISCONNECT = re.compile(r"smtpd\[\d+\]: disconnect from \S+ (?P<counts>.*)$")
_MESSAGE_ID = re.compile(r"cleanup\[\d+\]: \w+: message-id=(?P<id><[^>]*>)")


@dataclass(frozen=True)
class PostfixSession:
    """One SMTP session as Postfix logged it when it ended."""

    counts: dict[str, tuple[int, int]]
    """Command → (accepted, sent), e.g. ``{"mail": (3, 5), "quit": (1, 1)}``."""

    def sent(self, command: str) -> int:
        return self.counts.get(command, (0, 0))[1]

    def refused(self, command: str) -> int:
        ok, total = self.counts.get(command, (0, 0))
        return total - ok


class Postfix:
    """A running private Postfix; use as a context manager."""

    def __init__(self, **main_cf: str) -> None:
        require(POSTFIX, "postfix")
        if os.geteuid() != 0:
            pytest.fail("a private postfix instance must be started as root")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pl-postfix-"))
        self.root.chmod(0o755)  # postfix's own user must reach its data directory
        self.log = self.root / "maillog"
        self._main_cf = main_cf

    def __enter__(self) -> Postfix:
        etc, data = self.root / "etc", self.root / "data"
        for d in (etc, data, self.root / "spool"):
            d.mkdir()
        shutil.chown(data, "postfix")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.root / "spool"),
            "data_directory": str(data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "mx.postfix.test",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "default_transport": "discard",
            "relay_transport": "discard",
            "local_transport": "discard",
            "maillog_file": str(self.log),
            "maillog_file_prefixes": str(self.root),
            "master_service_disable": "pickup.unix, tlsmgr.unix",
            "smtputf8_enable": "no",
            **self._main_cf,
        }
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (etc / "master.cf").write_text(_private_master_cf(self.port))
        self._postfix("start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._postfix("stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def _postfix(self, command: str) -> None:
        # postfix(1) reports errors only to a terminal or syslog: `script` gives it one.
        result = subprocess.run(
            ["script", "-qec", f"{POSTFIX} -c {self.root / 'etc'} {command}", "/dev/null"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"postfix {command} failed: {result.stdout}{result.stderr}{log}")

    def _lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []

    def sessions(self) -> list[PostfixSession]:
        """The SMTP sessions that have ended, oldest first."""
        found = []
        for line in self._lines():
            match = _DISCONNECT.search(line)
            if match is None:
                continue
            counts: dict[str, tuple[int, int]] = {}
            for item in match["counts"].split():
                name, _, value = item.partition("=")
                ok, _, total = value.partition("/")
                counts[name] = (int(ok), int(total or ok))
            found.append(PostfixSession(counts))
        return found

    def connections(self) -> int:
        """SMTP sessions opened so far."""
        return sum(1 for line in self._lines() if re.search(r"smtpd\[\d+\]: connect from", line))

    def queued(self) -> Counter[str]:
        """Message-ID → how many times Postfix accepted a message carrying it."""
        return Counter(m["id"] for line in self._lines() if (m := _MESSAGE_ID.search(line)))

    def count(self, text: str) -> int:
        """Log lines containing `text`."""
        return sum(1 for line in self._lines() if text in line)


def _private_master_cf(port: int) -> str:
    """Debian's master.cf, its SMTP service on 127.0.0.1:`port`, nothing chrooted."""
    out = []
    for line in MASTER_CF.read_text().splitlines():
        fields = line.split()
        if not line or line[0] in "# \t" or len(fields) < 8:
            out.append(line)
            continue
        if fields[0] == "smtp" and fields[1] == "inet":
            fields[0] = f"127.0.0.1:{port}"
        fields[4] = "n"
        out.append("\t".join(fields))
    return "\n".join(out) + "\n"
