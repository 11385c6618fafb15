"""Errors that the CLI turns into a one-line message and exit code 2."""
from ckdiff.text import printable


class CkdiffError(Exception):
    """Bad input or usage: reported as one line, exit code 2."""


class InputError(CkdiffError):
    """A checkpoint (or a file in it) cannot be read as what it claims to be."""

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{printable(self.path)}: {printable(problem)}")


class UsageError(CkdiffError):
    """The command line or an option value is wrong."""


def error_line(e: BaseException) -> str:
    """The one line shown for an error: control characters escaped, so it stays one line."""
    return printable(str(e))
