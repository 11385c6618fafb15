"""Errors that the CLI turns into a one-line message and exit code 2."""


class CkdiffError(Exception):
    """Bad input or usage: reported as one line, exit code 2."""


class InputError(CkdiffError):
    """A checkpoint (or a file in it) cannot be read as what it claims to be."""

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UsageError(CkdiffError):
    """The command line or an option value is wrong."""
