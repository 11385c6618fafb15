"""Console-script entry point (``ckdiff``, ``python -m ckdiff``); the commands live in ckdiff/commands/."""
from __future__ import annotations

import os
import sys

from ckdiff.commands import main

__all__ = ["main", "run"]


def run() -> None:
    """Run the command line and end the process at once.

    Python's own shutdown would walk every object torch and numba created (its final garbage collections
    and the modules' teardown) although nothing is left to do: reports and
    converted checkpoints are complete, fsynced and renamed into place before ``main`` returns, and the
    command has joined its threads and worker processes. So the console script flushes its standard streams
    and leaves with ``os._exit``. When a stream cannot be flushed (the reader of a pipe went away) or a
    torch.distributed process group is still up (its launcher may wait on the group's own teardown), the
    normal exit runs instead.

    Before anything imports torch, OpenMP's idle threads are told to sleep rather than spin (``OMP_WAIT_POLICY``
    PASSIVE, unless the caller set it): libgomp's default spins after every parallel region, and on a machine
    whose cores are all busy (a CI runner with parallel jobs) each of the diagnosis's many small torch
    operations then waits for spinning threads the scheduler took off their cores. libgomp reads the variable
    once, when torch loads it."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    code = main()
    leave(code)


def leave(code: int) -> None:
    """Exit with ``code``, skipping the interpreter's teardown when that is safe (see ``run``)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    run()
