"""A plain-text progress bar for bulk CLI actions, on stderr so stdout stays parseable."""

from __future__ import annotations

import sys
from typing import TextIO

WIDTH = 30


class Progress:
    """``enrolling [##########----------] 12/30 campaign:bob@x: enrolled``.

    On a terminal the bar redraws in place; otherwise (CI logs, pipes) each step is one
    line, so nothing is lost.
    """

    def __init__(self, total: int, *, label: str = "", stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.label = label
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()

    def advance(self, item: str = "") -> None:
        """One more item finished; `item` says which and how it went."""
        self.done += 1
        filled = WIDTH * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (WIDTH - filled)
        line = f"{self.label} [{bar}] {self.done}/{self.total} {item}".rstrip()
        if self._tty:
            self._stream.write("\r\x1b[2K" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def note(self, message: str) -> None:
        """A message that must stay visible (an error for one item)."""
        if self._tty:
            self._stream.write("\r\x1b[2K")
        self._stream.write(message + "\n")
        self._stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self._tty and self.done:
            self._stream.write("\n")
            self._stream.flush()
