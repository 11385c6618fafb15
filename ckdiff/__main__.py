"""``python3 -m ckdiff``: the same as the ``ckdiff`` command."""
from ckdiff.cli import run

run()
