"""``python -m edge_inspect``: the same as ``edge-inspect``."""

import sys

from .cli import main

sys.exit(main())
