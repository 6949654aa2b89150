"""A missing system program fails the test that needs it, naming the Debian package."""

from __future__ import annotations

import sys

import pytest

from tests.sysdeps import require


def test_missing_program_fails_naming_its_package() -> None:
    with pytest.raises(pytest.fail.Exception) as failed:
        require("postlane-no-such-daemon", "postlane-no-such-package")
    assert "apt-get install postlane-no-such-package" in str(failed.value)


def test_missing_absolute_path_fails_too() -> None:
    with pytest.raises(pytest.fail.Exception, match="Debian's postfix package"):
        require("/nonexistent/sbin/postfix", "postfix")


def test_present_program_is_found_by_name_and_by_path() -> None:
    assert require(sys.executable, "python3") == sys.executable
    assert require("sh", "dash").endswith("/sh")
