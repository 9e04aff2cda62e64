"""``python -m edge_daemon``: the same as ``edge-daemon``."""

import sys

from .cli import main

sys.exit(main())
