"""A plain-text progress bar for bulk CLI actions, on stderr so stdout stays parseable."""

from __future__ import annotations

import sys
from typing import TextIO


class ProgressBar:
    """A plain-text progress bar for bulk actions, with one line per item's result.

    On a terminal the bar stays on the last line, redrawn with a carriage return, and the
    items' results scroll above it; elsewhere (a pipe, a log file) every item prints one
    line that carries the bar, so a log shows how far a run got.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 24):
        self.total = total
        self.label = label
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._width = width
        self._tty = self._stream.isatty()
        self._drawn = 0
        if self._tty:
            self._draw()

    def bar(self) -> str:
        """The bar as it stands, e.g. ``dlq retry [######------------------] 1/4``."""
        filled = self._width * self.done // self.total if self.total else self._width
        return (
            f"{self.label} [{'#' * filled}{'-' * (self._width - filled)}] {self.done}/{self.total}"
        )

    def step(self, item: str, result: str) -> None:
        """One more item is done, with this result."""
        self.done += 1
        if self._tty:
            self._stream.write("\r" + f"{item}: {result}".ljust(self._drawn) + "\n")
            self._draw()
        else:
            self._stream.write(f"{self.bar()}  {item}: {result}\n")
        self._stream.flush()

    def close(self) -> None:
        """End the bar's line (a terminal's cursor was left after it)."""
        if self._tty:
            self._stream.write("\n")
        elif self.total == 0:
            self._stream.write(f"{self.bar()}  nothing to do\n")
        self._stream.flush()

    def _draw(self) -> None:
        line = self.bar()
        self._stream.write("\r" + line.ljust(self._drawn))
        self._drawn = len(line)
        self._stream.flush()
