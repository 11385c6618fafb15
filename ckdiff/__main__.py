"""``python -m ckdiff`` (and ``torchrun -m ckdiff``): the same as the ``ckdiff`` command."""
import sys

from .cli import main

sys.exit(main())
