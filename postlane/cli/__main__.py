"""``python -m postlane.cli``: the same as the ``postlane`` command."""

import sys

from postlane.cli.app import main

sys.exit(main())
