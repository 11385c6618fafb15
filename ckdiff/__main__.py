"""``python3 -m ckdiff``: the same as the ``ckdiff`` command."""
import sys

from ckdiff.commands import main

sys.exit(main())
