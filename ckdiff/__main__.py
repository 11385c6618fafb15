"""``python3 -m ckdiff``: the same as the ``ckdiff`` command."""
import sys

from .commands import main

sys.exit(main())
