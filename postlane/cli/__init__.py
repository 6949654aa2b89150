"""The ``postlane`` command line: email commands, ``postlane sequence ...``, progress bars."""

from postlane.cli.app import main

__all__ = ["main"]
