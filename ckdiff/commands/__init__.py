"""The command layer: every ``ckdiff`` command parses its flags, prints, writes reports and picks its
exit code here, one module per command; the library modules below it never do.

Exit codes follow diff: 0 equivalent, 1 different, 2 usage or input error (one line on stderr,
a traceback only with --debug).
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Mapping

from ckdiff.errors import CkdiffError, error_line

# the commands in the order the overview lists them; each is the module ckdiff/commands/NAME.py
NAMES = ("compare", "inspect", "check", "logits", "convert", "roundtrip", "golden", "demo", "replay", "help")


class _Commands(Mapping):
    """name -> command module, each imported on first use: ``ckdiff A B`` loads the compare command alone,
    and the command modules import the library (torch, numba) only inside their functions."""

    def __getitem__(self, name):
        if name not in NAMES:
            raise KeyError(name)
        return importlib.import_module(f".{name}", __package__)

    def __iter__(self):
        return iter(NAMES)

    def __len__(self):
        return len(NAMES)


COMMANDS = _Commands()


def _dispatch(argv: list) -> int:
    from ckdiff.commands.common import command_line
    if not argv:
        print(COMMANDS["help"].overview(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(COMMANDS["help"].overview())
        return 0
    if argv[0] == "--version":
        from ckdiff import __version__
        print(f"ckdiff {__version__}")
        return 0
    from ckdiff.io.inputs import reset_inputs
    reset_inputs()  # the inputs this command reads are the ones its reports must never overwrite
    if argv[0] in COMMANDS:
        return COMMANDS[argv[0]].run(argv[1:], command_line(argv))
    return COMMANDS["compare"].run(argv, command_line(argv))


def main(argv=None) -> int:
    import warnings
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    debug = "--debug" in argv or os.environ.get("CKDIFF_DEBUG") == "1"
    with warnings.catch_warnings():  # restored on return: a caller's own filters are left as they were
        if not debug:
            warnings.simplefilter("ignore")  # library warnings would break the one-line error contract
        return _main(argv, debug)


def _main(argv: list, debug: bool) -> int:
    try:
        return _dispatch(argv)
    except SystemExit as e:  # argparse's --help
        return e.code if isinstance(e.code, int) else 0
    except CkdiffError as e:
        if debug:
            traceback.print_exc()
        print(f"ckdiff: error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ckdiff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read the output went away (``| head``): stop quietly, as a pipe would
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except Exception as e:  # never a traceback for the user; --debug shows it
        if debug:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"ckdiff: error: internal error {e.__class__.__name__}: {error_line(msg[:300])} (rerun with --debug)",
              file=sys.stderr)
        return 2
