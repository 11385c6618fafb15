"""What every command shares: the parser class, the common flags, the console, progress bars,
the command string of a run, and the one report-writing path.

Commands parse, print and choose exit codes; the library (tensor/, io/, models/, formats/, convert/,
compare/, runtime/, golden/, reports/) does neither.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ckdiff.errors import UsageError
from ckdiff.text import printable

REPORT_FLAGS = ("json", "html", "markdown", "junit")
SUMMARY_ENV = "GITHUB_STEP_SUMMARY"  # GitHub Actions' job summary file, appended to by each step


class HelpFormatter(argparse.HelpFormatter):
    """Help lines that always name the choices and the default."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=min(100, _columns()))

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction) and action.choices:
            # sub-commands are drawn indented one level deeper than argparse measures them
            longest = max(len(n) for n in action.choices)
            self._action_max_length = max(self._action_max_length, longest + self._current_indent + 4)

    def _get_help_string(self, action):
        h = action.help or ""
        if action.choices is not None and "%(choices)" not in h and not isinstance(action, argparse._SubParsersAction):
            h += "; one of: %(choices)s" if h else "one of: %(choices)s"
        d = action.default
        if d is not None and not isinstance(d, bool) and d is not argparse.SUPPRESS and d not in ([], "") \
                and "%(default)" not in h and action.nargs != 0:
            h += " [default: %(default)s]"
        return h


def _columns() -> int:
    try:
        return int(os.environ.get("COLUMNS", "")) or 100
    except ValueError:
        return 100


class Parser(argparse.ArgumentParser):
    """argparse with errors as UsageError (one line, exit 2) and help that lists choices."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        """Every long flag in either spelling: ``--true_vocab_size`` and ``--true-vocab-size`` name the same
        option whichever of them a converter declares (the original tools differ from one another)."""
        if args is not None:
            args = [self._spelled(a) for a in args]
        return super().parse_known_args(args, namespace)

    def _spelled(self, token):
        if not isinstance(token, str) or not token.startswith("--") or len(token) < 4:
            return token
        name, eq, value = token.partition("=")
        if name in self._option_string_actions:
            return token
        key = _flag_key(name)
        hits = sorted(o for o in self._option_string_actions if o.startswith("--") and _flag_key(o) == key)
        same = len({id(self._option_string_actions[o]) for o in hits}) == 1  # spellings of one option
        return (hits[0] + eq + value) if hits and same else token


def _flag_key(option: str) -> str:
    return "--" + option[2:].replace("_", "-")


def add_common(p: argparse.ArgumentParser, *, cache: bool = True, pickle: bool = True) -> None:
    """-q/--quiet, --debug, and (for commands that read checkpoints) --cache-dir and --trust-pickle."""
    g = p.add_argument_group("common options")
    g.add_argument("-q", "--quiet", action="store_true", help="print only the verdict or result line")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")
    if cache:
        g.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", metavar="DIR",
                       help="Hugging Face cache in which hub ids (org/name) are looked up; never downloads")
    if pickle:
        g.add_argument("--trust-pickle", action="store_true",
                       help="allow pickles that need more than tensors (RUNS CODE from the file; "
                            "only for files you trust)")


def format_names() -> list[str]:
    from ckdiff.formats import registry
    return [n for n, _ in registry.declared()]


class _FormatNames(Sequence):
    """The --format choices, listed only when argparse checks a given --format or names the choices: a
    comparison without --format never reads the format declarations (~0.12 s of parsing their sources)."""

    def __init__(self):
        self._names = None

    def _get(self) -> list:
        if self._names is None:
            self._names = format_names()
        return self._names

    def __getitem__(self, i):
        return self._get()[i]

    def __len__(self):
        return len(self._get())

    def __contains__(self, x):
        return x in self._get()


def formats_help() -> str:
    """One line per registered format: its name and what it is (the --format choices)."""
    import textwrap

    from ckdiff.formats import registry
    fs = registry.declared()
    width = max(len(n) for n, _ in fs)
    return "formats (--format; detected from the files otherwise):\n" + "\n".join(
        textwrap.fill(d, min(100, _columns()), initial_indent=f"  {n.ljust(width)}  ",
                      subsequent_indent=" " * (width + 4)) for n, d in fs)


def workers_arg(v: str) -> int:
    """--workers N: a whole number 1..1024."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"expected 1..1024, got {n}")
    return n


def add_formats(p: argparse.ArgumentParser, sides: int = 2, names=None) -> None:
    """--format (both sides), --format-a and --format-b, choosing among ``names`` (default: every format);
    detection from the files is the default."""
    names = list(names) if names is not None else _FormatNames()
    g = p.add_argument_group("formats (detected from the files unless given)")
    g.add_argument("--format", choices=names, metavar="FORMAT",
                   help="read " + ("both inputs" if sides == 2 else "the input") + " as this format")
    if sides == 2:
        g.add_argument("--format-a", choices=names, metavar="FORMAT", help="read A as this format")
        g.add_argument("--format-b", choices=names, metavar="FORMAT", help="read B as this format")
        g.add_argument("--prefix", "--prefix-a", dest="prefix_a", metavar="P",
                       help="read only A's tensors named P... with P stripped (e.g. 'model.' for a trainer's "
                            "{'model': ..., 'optimizer': ...} DCP checkpoint; found by itself when it is the only "
                            "model sub-tree)")
        g.add_argument("--prefix-b", dest="prefix_b", metavar="P", help="the same for B")


def add_reports(p: argparse.ArgumentParser, flags=REPORT_FLAGS) -> None:
    """The report flags; a comparing command (``junit`` among ``flags``) also gets the CI flags
    --github-summary/--no-github-summary and the verification record's --hash."""
    g = p.add_argument_group("reports (PATH '-' writes to standard output)")
    text = {"json": "write the versioned JSON result (schema ckdiff.result/1) with its verification record",
            "html": "write a self-contained HTML report",
            "markdown": "write a Markdown summary (PR comment, job summary)",
            "junit": "write JUnit XML (one test case per tensor group and per check) for CI test reports"}
    for f in flags:
        g.add_argument(f"--{f}", metavar="PATH", help=text[f])
    if "junit" in flags:
        g.add_argument("--github-summary", nargs="?", const="", default=None, metavar="PATH",
                       help=f"append the Markdown report to PATH (default: ${SUMMARY_ENV}); done without the flag "
                            f"whenever ${SUMMARY_ENV} is set (GitHub Actions)")
        g.add_argument("--no-github-summary", action="store_true", help=f"do not append to ${SUMMARY_ENV}")
        g.add_argument("--hash", action="store_true",
                       help="record the SHA-256 of every input file's whole content in the JSON result (reads "
                            "every byte once more; sizes and header hashes are always recorded)")
    g.add_argument("--force", action="store_true",
                   help="write a report through a symbolic link (never onto an input's files)")


def one_side_parser(prog: str, description: str, add=None) -> Parser:
    """The parser of a command on one checkpoint: its path, what ``add(parser)`` adds, the format flags of one
    side, --json and the common flags."""
    p = Parser(prog=prog, description=description)
    p.add_argument("path", help="a model directory, a directory of tensor files, a tensor file or a hub id")
    if add is not None:
        add(p)
    add_formats(p, sides=1)
    add_reports(p, ("json",))
    add_common(p)
    return p


def open_one_side(args):
    """The checkpoint at ``args.path`` (read as --format, with --cache-dir and --trust-pickle), the report paths
    checked before it is opened and again against its files."""
    from ckdiff.formats.readers import open_checkpoint
    check_reports(args)
    ck = open_checkpoint(args.path, args.format, args.cache_dir, args.trust_pickle)
    check_reports(args, (ck,))
    return ck


def command_line(argv) -> str:
    """The command that reproduces this run, as a shell line."""
    return "ckdiff " + " ".join(shlex.quote(str(a)) for a in argv)


def to_stdout(args) -> bool:
    """Whether a report goes to standard output: '-', or a path naming the same file (/dev/stdout)."""
    return any(getattr(args, f, None) == "-" or _is_stdout(getattr(args, f, None)) for f in REPORT_FLAGS)


def _is_stdout(path) -> bool:
    if not path:
        return False
    try:
        a, b = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def console(args=None, stream=None):
    """A rich console on stdout (stderr when a report goes to stdout). Width: the terminal's, $COLUMNS,
    or 160 when the output is not a terminal."""
    from rich.console import Console
    if stream is None:
        stream = sys.stderr if args is not None and to_stdout(args) else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    return Console(file=stream, highlight=False, soft_wrap=False, width=width)


def progress_factory(enabled: bool, label: str = "comparing"):
    """A ``progress_factory(total) -> step(n)`` for the library, drawn on stderr; None when disabled."""
    if not enabled:
        return None

    def make(total: int):
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
        prog = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), transient=True, console=console(stream=sys.stderr))
        prog.start()
        task = prog.add_task(label, total=total)

        def step(n):
            prog.advance(task, n)
        step.stop = prog.stop
        return step
    return make


def show_progress(args) -> bool:
    return sys.stderr.isatty() and not getattr(args, "quiet", False)


# ---------------------------------------------------------------- the one report-writing path
def _owned(inputs) -> tuple[set, list]:
    """(files of the inputs, directories of the inputs) as resolved paths."""
    files, dirs = set(), []
    for ck in inputs:
        if ck is None:
            continue
        paths = [ck] if isinstance(ck, (str, Path)) else [ck.path, *ck.meta.get("files", [])]
        for f in paths:
            p = Path(f).resolve()
            (dirs.append(p) if p.is_dir() else files.add(p))
    return files, dirs


def check_target(flag: str, target, inputs=(), force: bool = False) -> Optional[tuple]:
    """Where a report may go, decided before any work; raises UsageError when it may not.

    Returns None for ``-`` or a name of standard output's own file (/dev/stdout), ("stream", path) for a FIFO or character device (written
    to as it is, never replaced), ("file", path) for a regular file or a new name (temp file + rename).
    Refused: a path that is an input, a file of an input or an existing file inside an input directory
    (symbolic links resolved); a symbolic link, unless ``force`` and its target is no input's and is a
    regular file or a new name in an existing directory (then the target is written); a directory,
    socket or block device; a missing parent directory (never created)."""
    import stat as S
    if target in (None, "-"):
        return None
    p = Path(target)
    name = f"--{flag} {printable(str(target))}"
    try:
        t = p.resolve()
    except (OSError, RuntimeError) as e:  # a symbolic-link loop, a name too long
        raise UsageError(f"{name}: {_why(e, 'symbolic link loop')}") from None
    from ckdiff.io.inputs import is_input
    files, dirs = _owned(inputs)
    if t in files or t in dirs or (t.exists() and any(d in t.parents for d in dirs)) or is_input(t):
        raise UsageError(f"{name} is a file of an input checkpoint; refusing to overwrite it")
    if _is_stdout(p):
        return None  # /dev/stdout (or any name of the file standard output already is): written as '-'
    try:
        link = S.S_ISLNK(os.lstat(p).st_mode)
    except FileNotFoundError:
        link = False
    except OSError as e:
        raise UsageError(f"{name}: {_why(e)}") from None
    try:
        mode = os.stat(p).st_mode  # follows links (/dev/stdout -> /proc/self/fd/1 -> a pipe)
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise UsageError(f"{name}: {_why(e)}") from None
    if mode is not None and (S.S_ISFIFO(mode) or S.S_ISCHR(mode)):
        return ("stream", p)  # opened for writing as it is: nothing is replaced, links stay links
    if mode is not None and not S.S_ISREG(mode):
        kind = "a directory" if S.S_ISDIR(mode) else "a special file"
        raise UsageError(f"{name} is {kind}; a report is written to a regular file, a FIFO, a character "
                         "device or '-'")
    if link and not force:
        raise UsageError(f"{name} is a symbolic link; refusing to replace it (pass --force to write the "
                         "report to the link's target)")
    dest = t if link else p
    if not dest.parent.is_dir():
        raise UsageError(f"{name}: directory {printable(str(dest.parent))} does not exist (it is not created)")
    return ("file", dest)


def _why(e: OSError, loop: str = "") -> str:
    import errno
    if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP:
        return loop or "symbolic link loop"
    return (e.strerror or str(e)).lower()


def check_reports(args, inputs=()) -> None:
    """Before any work: every requested report path is writable by the rules above; one '-' at most."""
    dashes = [f for f in REPORT_FLAGS if getattr(args, f, None) == "-"]
    if len(dashes) > 1:
        raise UsageError(f"only one report can go to standard output ('-'); got {', '.join('--' + f for f in dashes)}")
    for f in REPORT_FLAGS:
        check_target(f, getattr(args, f, None), inputs, getattr(args, "force", False))
    summary = summary_target(args)
    if summary is not None:
        where = check_target("github-summary", summary, inputs, getattr(args, "force", False))
        if where is None:
            raise UsageError("--github-summary: the job summary is a file; use --markdown - for standard output")


def summary_target(args) -> Optional[str]:
    """The job summary file to append the Markdown report to: --github-summary's PATH, else
    $GITHUB_STEP_SUMMARY when it is set (unless --no-github-summary); None for none."""
    if not hasattr(args, "github_summary") or getattr(args, "no_github_summary", False):
        return None
    env = os.environ.get(SUMMARY_ENV) or None
    if args.github_summary is None:
        return env
    if args.github_summary == "":
        if env is None:
            raise UsageError(f"--github-summary: ${SUMMARY_ENV} is not set; pass --github-summary PATH")
        return env
    return args.github_summary


def append_summary(path, text: str, inputs=(), force: bool = False) -> None:
    """Append ``text`` to a job summary file (GitHub Actions collects what every step appended, so the
    file is appended to in place, never replaced); the same target rules as a report."""
    where = check_target("github-summary", path, inputs, force)
    if where is None:
        raise UsageError("--github-summary: the job summary is a file; use --markdown - for standard output")
    try:
        with open(where[1], "a", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
    except OSError as e:
        raise UsageError(f"--github-summary {printable(str(path))}: {_why(e)}") from None


def write_report(path, content, inputs=(), flag: str = "report", force: bool = False) -> None:
    """Write one report: ``-`` is standard output, a FIFO or character device is written as a stream,
    anything else appears only by atomic rename; never onto an input's files, never replacing a link."""
    import stat as S
    if isinstance(content, (str, bytes)):
        content = (content,)
    chunks = (c.encode() if isinstance(c, str) else c for c in content)  # text pieces, written as they come
    where = check_target(flag, path, inputs, force)
    if where is None:
        sys.stdout.flush()
        out = getattr(sys.stdout, "buffer", None)
        for data in chunks:
            if out is not None:
                out.write(data)
            else:
                sys.stdout.write(data.decode())
        if out is not None:
            out.flush()
        return
    kind, dest = where
    if kind == "stream":
        name = f"--{flag} {printable(str(path))}"
        try:
            fd = os.open(dest, os.O_WRONLY | getattr(os, "O_NOCTTY", 0))  # no O_CREAT, no O_TRUNC
        except OSError as e:
            raise UsageError(f"{name}: {_why(e)}") from None
        try:
            if not (S.S_ISFIFO(os.fstat(fd).st_mode) or S.S_ISCHR(os.fstat(fd).st_mode)):
                raise UsageError(f"{name} changed into a regular file while being opened; not written")
            with os.fdopen(fd, "wb", closefd=False) as f:
                for data in chunks:
                    f.write(data)
        except OSError as e:
            raise UsageError(f"{name}: {_why(e)}") from None
        finally:
            os.close(fd)
        return
    from ckdiff.io.writers import atomic_file

    def write(tmp):
        with open(tmp, "wb", buffering=1 << 20) as f:
            for data in chunks:
                f.write(data)
    atomic_file(dest, write)


def emit_reports(args, kind: str, res, inputs=(), command: str = "") -> None:
    """--json (with the verification record of ``inputs``) / --html / --markdown / --junit and the job
    summary, for any result object with to_dict()/verdict()/equivalent."""
    from ckdiff.reports import html as H
    from ckdiff.reports.junit import render_junit
    from ckdiff.reports.render import bounded_result, iter_json, render_json

    def record():
        from ckdiff.provenance import record
        rec = record(command, inputs, getattr(args, "hash", False))
        if hasattr(res, "tensor_dicts"):  # rows streamed: a result of 10^6 tensors is never one string
            return iter_json(kind, res.to_dict(tensors=False), res.tensor_dicts(), res.verdict(), command, rec)
        return render_json(kind, res.to_dict(), res.verdict(), command, rec)
    render = {"json": record,
              "html": lambda: H.render_html(kind, res, command),
              "markdown": lambda: H.render_markdown(kind, res, command),
              "junit": lambda: render_junit(kind, bounded_result(res), res.verdict(), command)}
    force = getattr(args, "force", False)
    for f in REPORT_FLAGS:
        target = getattr(args, f, None)
        if target:
            write_report(target, render[f](), inputs, f, force)
    summary = summary_target(args)
    if summary is not None:
        append_summary(summary, render["markdown"](), inputs, force)


def run_sharded(name: str, argv, workers: int, fn):
    """``fn(shard)`` on every rank: the launcher's ranks under torchrun/SLURM, ``workers`` local
    processes running ``ckdiff NAME argv`` (without --workers) otherwise, or one process (shard None)."""
    from ckdiff import distributed
    if distributed.launched():
        shard = distributed.init_from_env()
        try:
            return fn(shard)
        finally:
            distributed.shutdown()
    if workers > 1:
        rest = [x for i, x in enumerate(argv) if x != "--workers" and not x.startswith("--workers=")
                and (i == 0 or argv[i - 1] != "--workers")]
        with distributed.LocalWorkers(workers, [name, *rest],
                                      lambda msg: print(f"ckdiff: error: {printable(msg)}", file=sys.stderr)) as shard:
            return fn(shard)
    return fn(None)
