"""`python -m trainer` runs the `edge-train` command line."""

import sys

from .cli import main

sys.exit(main())
