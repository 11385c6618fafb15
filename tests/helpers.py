"""Shared test helpers (imported by the test modules)."""
import contextlib
import io
from pathlib import Path

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.commands.convert import COMMANDS
from ckdiff.converters.formats import open_checkpoint


def convert(*argv):
    """Run a `ckdiff convert` subcommand in-process; returns its exit code."""
    argv = [str(a) for a in argv]
    with contextlib.redirect_stdout(io.StringIO()):
        return COMMANDS[argv[0]](argv[1:])


def diff(a, b, **kw):
    return compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options(**kw))


def assert_same(a, b):
    res = diff(a, b)
    bad = [(t.name, t.status, t.diagnosis) for t in res.tensors if t.status != "equal"]
    assert not bad, bad
    return res


def tree(p: Path):
    return sorted(str(x.relative_to(p)) for x in p.rglob("*"))
