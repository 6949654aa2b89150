"""The progress bar of bulk CLI actions, on stderr so stdout stays parseable."""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


class ProgressBar:
    """A progress bar for bulk actions, with one line per item's result.

    On a terminal it is rich's live bar on the last line, with the items' results
    scrolling above it. Elsewhere (a pipe, a log file) every item prints one plain line
    that carries a text bar, so a log shows how far a run got.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 24):
        self.total = total
        self.label = label
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._width = width
        self.console: Console | None = None
        """The terminal's console (None off a terminal); it records what it showed."""
        self._live: Progress | None = None
        if self._stream.isatty():
            self.console = Console(file=self._stream, force_terminal=True, record=True)
            self._live = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=width),
                MofNCompleteColumn(),
                console=self.console,
            )
            self._task = self._live.add_task(label, total=total)
            self._live.start()

    def bar(self) -> str:
        """The plain bar as it stands, e.g. ``dlq retry [######------------------] 1/4``."""
        filled = self._width * self.done // self.total if self.total else self._width
        return (
            f"{self.label} [{'#' * filled}{'-' * (self._width - filled)}] {self.done}/{self.total}"
        )

    def step(self, item: str, result: str) -> None:
        """One more item is done, with this result."""
        self.done += 1
        if self._live is not None:
            self._live.console.print(f"{item}: {result}", markup=False, highlight=False)
            self._live.update(self._task, completed=self.done, refresh=True)
            return
        self._stream.write(f"{self.bar()}  {item}: {result}\n")
        self._stream.flush()

    def advance(self, done: int, note: str, *, total: int | None = None) -> None:
        """Jump to `done` (of `total`, when the count is only known later): a server-side
        job's own progress. Prints a line only when the count moved."""
        if total is not None and total != self.total:
            self.total = total
            if self._live is not None:
                self._live.update(self._task, total=total)
        if done == self.done and total is None:
            return
        self.done = done
        if self._live is not None:
            self._live.update(self._task, completed=done, description=note, refresh=True)
            return
        self._stream.write(f"{self.bar()}  {note}\n")
        self._stream.flush()

    def close(self) -> None:
        """Leave the finished bar on screen (a terminal) or say there was nothing to do."""
        if self._live is not None:
            self._live.stop()
        elif self.total == 0:
            self._stream.write(f"{self.bar()}  nothing to do\n")
            self._stream.flush()
