"""System programs the tests need: a missing one fails the test, naming its Debian package.

``make test`` installs them (its ``.venv/.system`` step). A test that needs one calls
`require` rather than skipping: a skipped IMAP or SMTP test looks like a green suite that
tested nothing.

::

    dovecot = require("dovecot", "dovecot-imapd")
    postfix = require("/usr/sbin/postfix", "postfix")
"""

from __future__ import annotations

import os
import shutil

import pytest

SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
"""Where Debian puts daemons, often missing from a non-root user's PATH."""


def require(binary: str, package: str) -> str:
    """The path of `binary`, or a test failure that names the Debian `package` to install.

    Args:
        binary: a program name, looked up on PATH and then in the sbin directories, or an
            absolute path.
        package: the Debian package that ships it.
    """
    if os.path.isabs(binary):
        found = binary if os.access(binary, os.X_OK) else None
    else:
        found = shutil.which(binary) or shutil.which(binary, path=SBIN_PATH)
    if found is None:
        pytest.fail(
            f"{binary} is not installed: this test needs Debian's {package} package"
            f" (`make test` installs it; by hand: apt-get install {package}).",
            pytrace=False,
        )
    return found
