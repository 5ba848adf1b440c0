"""`python -m tokenmill ...` is the `tokenmill` command."""

import sys

from .tools.cli import main

sys.exit(main())
