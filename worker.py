"""Run Postlane's workers: ``python worker.py [--lanes a,b] [--no-workflows] [--no-inbound]``.

Reads ``postlane.toml`` (or ``$POSTLANE_CONFIG``) and the ``TEMPORAL_*`` variables, applies
each lane's rate to its task queue on the server, starts a watcher for each configured
inbox and polls it, and serves until SIGTERM/SIGINT, when in-flight sends finish (or are
handed back) before it exits.
"""

from __future__ import annotations

import sys

from postlane.cli.app import main

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
