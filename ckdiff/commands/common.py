"""What every command shares: the parser class, the common flags, the console, progress bars,
the command string of a run, and the one report-writing path.

Commands parse, print and choose exit codes; the library (compare/, converters/, golden/, reports/)
does neither.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..errors import UsageError

REPORT_FLAGS = ("json", "html", "markdown")


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
    from ..converters import megatron  # noqa: F401  (registers the Megatron reader)
    from ..converters.formats import READERS
    return list(READERS)


def add_formats(p: argparse.ArgumentParser, sides: int = 2) -> None:
    """--format (both sides), --format-a and --format-b; detection from the files is the default."""
    names = format_names()
    g = p.add_argument_group("formats (detected from the files unless given)")
    g.add_argument("--format", choices=names, metavar="FORMAT",
                   help="read " + ("both inputs" if sides == 2 else "the input") + " as this format")
    if sides == 2:
        g.add_argument("--format-a", choices=names, metavar="FORMAT", help="read A as this format")
        g.add_argument("--format-b", choices=names, metavar="FORMAT", help="read B as this format")


def add_reports(p: argparse.ArgumentParser, flags=REPORT_FLAGS) -> None:
    g = p.add_argument_group("reports (PATH '-' writes to standard output)")
    text = {"json": "write the versioned JSON result (schema ckdiff.result/1)",
            "html": "write a self-contained HTML report",
            "markdown": "write a Markdown summary (PR comment, job summary)"}
    for f in flags:
        g.add_argument(f"--{f}", metavar="PATH", help=text[f])


def command_line(argv) -> str:
    """The command that reproduces this run, as a shell line."""
    return "ckdiff " + " ".join(shlex.quote(str(a)) for a in argv)


def to_stdout(args) -> bool:
    return any(getattr(args, f, None) == "-" for f in REPORT_FLAGS)


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


def progress_kw(fn, factory) -> dict:
    """``{"progress_factory": factory}`` for a library call that takes one; {} without a factory."""
    import inspect
    if factory is None or "progress_factory" not in inspect.signature(fn).parameters:
        return {}
    return {"progress_factory": factory}


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


def check_target(flag: str, target, inputs=()) -> None:
    """Refuse a report path that is an input, a file of an input, or an existing file inside an input
    directory (reports never overwrite a checkpoint's files, config.json included)."""
    if target in (None, "-"):
        return
    t = Path(target).resolve()
    files, dirs = _owned(inputs)
    if t in files or t in dirs or (t.exists() and any(d in t.parents for d in dirs)):
        raise UsageError(f"--{flag} {target} is a file of an input checkpoint; refusing to overwrite it")


def check_reports(args, inputs=()) -> None:
    """Before any work: every requested report path is writable by the rules above; one '-' at most."""
    dashes = [f for f in REPORT_FLAGS if getattr(args, f, None) == "-"]
    if len(dashes) > 1:
        raise UsageError(f"only one report can go to standard output ('-'); got {', '.join('--' + f for f in dashes)}")
    for f in REPORT_FLAGS:
        check_target(f, getattr(args, f, None), inputs)


def write_report(path, content, inputs=(), flag: str = "report") -> None:
    """Write one report: ``-`` is standard output, anything else appears only by atomic rename and
    never onto an input's files."""
    data = content.encode() if isinstance(content, str) else content
    if str(path) == "-":
        sys.stdout.flush()
        out = getattr(sys.stdout, "buffer", None)
        if out is not None:
            out.write(data)
            out.flush()
        else:
            sys.stdout.write(data.decode())
        return
    check_target(flag, path, inputs)
    from ..converters.writers import atomic_file

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_file(path, write)


def emit_reports(args, kind: str, res, inputs=(), command: str = "") -> None:
    """--json / --html / --markdown for any result object with to_dict()/verdict()/equivalent."""
    from ..reports import html as H
    from ..reports.render import render_json
    render = {"json": lambda: render_json(kind, res.to_dict(), res.verdict(), command),
              "html": lambda: H.render_html(kind, res, command),
              "markdown": lambda: H.render_markdown(kind, res, command)}
    for f in REPORT_FLAGS:
        target = getattr(args, f, None)
        if target:
            write_report(target, render[f](), inputs, f)
