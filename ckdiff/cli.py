"""Console-script entry point (``ckdiff``); the commands live in ckdiff/commands/."""
from __future__ import annotations

import sys

from ckdiff.commands import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
