"""Command line: ``ckdiff A B`` and the subcommands.

Exit codes follow diff: 0 equivalent, 1 different, 2 usage or input error
(one line on stderr, a traceback only with --debug).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from .errors import CkdiffError, UsageError, error_line

PLAIN_ROWS = 2000  # inspect tables longer than this print as plain text
SUBCOMMANDS = ("inspect", "convert", "logits", "demo", "roundtrip", "golden", "compare")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _console(stream=None):
    from rich.console import Console
    return Console(file=stream or sys.stdout, highlight=False, soft_wrap=False,
                   width=None if (stream or sys.stdout).isatty() else 160)


def _progress_factory(enabled: bool):
    if not enabled:
        return None

    def make(total: int):
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
        prog = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), transient=True, console=_console(sys.stderr))
        prog.start()
        task = prog.add_task("comparing", total=total)

        def step(n):
            prog.advance(task, n)
        step.stop = prog.stop
        return step
    return make


def add_common(p: argparse.ArgumentParser):
    p.add_argument("--cache-dir", help="Hugging Face cache for hub repo ids (local only, never downloads)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow pickles that need more than tensors (RUNS CODE from the file; only for files you trust)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def add_report_args(p):
    p.add_argument("--json", metavar="PATH", help="write the versioned JSON result")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    p.add_argument("--markdown", metavar="PATH", help="write a Markdown summary (PR comment, job summary)")


def compare_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ckdiff", description="Compare two checkpoints of any supported format.",
                epilog="subcommands: " + ", ".join(SUBCOMMANDS) + " (ckdiff SUBCOMMAND -h)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--format", help="format of both sides (overrides detection)")
    p.add_argument("--format-a", help="format of A")
    p.add_argument("--format-b", help="format of B")
    p.add_argument("--only", action="append", default=[], metavar="GLOB", help="compare only matching tensors")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB", help="skip matching tensors")
    p.add_argument("--atol", type=float, help="absolute tolerance for every tensor (default: dtype-aware)")
    p.add_argument("--rtol", type=float, help="relative tolerance for every tensor (default: dtype-aware)")
    p.add_argument("--tol", action="append", default=[], metavar="GLOB=ATOL[,RTOL][:REASON]",
                   help="tolerance for tensors matching GLOB, with an optional reason shown in reports")
    p.add_argument("--strict-dtype", action="store_true", help="a dtype cast is a mismatch even within rounding")
    p.add_argument("--no-diagnose", action="store_true", help="skip the likely-cause analysis")
    p.add_argument("--no-map", action="store_true",
                   help="compare names as they are, even when the layouts differ (default: map one side)")
    p.add_argument("--limit", type=int, default=40, help="rows in the terminal table")
    p.add_argument("--quiet", "-q", action="store_true", help="print the verdict line only")
    add_report_args(p)
    add_common(p)
    return p


def parse_tol(specs) -> list:
    out = []
    for s in specs:
        try:
            pat, rest = s.split("=", 1)
            reason = ""
            if ":" in rest:
                rest, reason = rest.split(":", 1)
            parts = rest.split(",")
            atol = float(parts[0])
            rtol = float(parts[1]) if len(parts) > 1 else 0.0
        except ValueError:
            raise UsageError(f"--tol {s!r}: expected GLOB=ATOL[,RTOL][:REASON]") from None
        out.append((pat, atol, rtol, reason))
    return out


def cmd_compare(argv) -> int:
    from .compare.diff import Options, compare_checkpoints
    from .converters.formats import open_checkpoint
    args = compare_parser().parse_args(argv)
    fa = args.format_a or args.format
    fb = args.format_b or args.format
    a = open_checkpoint(args.a, fa, args.cache_dir, args.trust_pickle)
    b = open_checkpoint(args.b, fb, args.cache_dir, args.trust_pickle)
    check_report_paths(args, a, b)
    opts = Options(atol=args.atol, rtol=args.rtol, patterns=parse_tol(args.tol), only=args.only,
                   ignore=args.ignore, diagnose=not args.no_diagnose, strict_dtype=args.strict_dtype)
    res = compare_checkpoints(a, b, opts, progress_factory=_progress_factory(sys.stderr.isatty() and not args.quiet),
                              map_layouts=not args.no_map)
    console = _console()
    if args.quiet:
        console.print(("EQUIVALENT" if res.equivalent else "DIFFER") + f": {res.counts()}")
    else:
        from .reports.render import print_compare
        print_compare(res, console, args.limit)
    emit_reports(args, "compare", res)
    return 0 if res.equivalent else 1


def check_report_paths(args, *checkpoints) -> None:
    """Refuse a report path that is one of the inputs' files (reports never overwrite an input)."""
    from pathlib import Path
    owned = set()
    for ck in checkpoints:
        owned.add(Path(ck.path).resolve())
        owned.update(Path(f).resolve() for f in ck.meta.get("files", []))
    for flag in ("json", "html", "markdown"):
        target = getattr(args, flag, None)
        if target and Path(target).resolve() in owned:
            raise UsageError(f"--{flag} {target} is a file of an input checkpoint; refusing to overwrite it")


def emit_reports(args, kind: str, res) -> None:
    """Write --json / --html / --markdown for any result object with to_dict()/verdict()."""
    from .reports.render import write_json_report
    if getattr(args, "json", None):
        write_json_report(args.json, kind, res.to_dict(), res.verdict())
    if getattr(args, "html", None) or getattr(args, "markdown", None):
        from .reports import html as html_report
        if args.html:
            html_report.write_html(args.html, kind, res)
        if args.markdown:
            html_report.write_markdown(args.markdown, kind, res)


def cmd_inspect(argv) -> int:
    from rich.markup import escape
    from rich.table import Table

    from .converters.formats import dtype_name, open_checkpoint
    from .reports.render import collapse_layers
    from .text import printable
    p = _Parser(prog="ckdiff inspect", description="List tensors with repeated layers collapsed.")
    p.add_argument("path")
    p.add_argument("--format")
    p.add_argument("--full", action="store_true", help="one row per tensor, no collapsing")
    p.add_argument("--json", metavar="PATH")
    add_common(p)
    args = p.parse_args(argv)
    ck = open_checkpoint(args.path, args.format, args.cache_dir, args.trust_pickle)
    rows = [(n, t.shape, dtype_name(t.dtype)) for n, t in ck.tensors.items()]
    shown = [(n, list(s), d, 1) for n, s, d in rows] if args.full else collapse_layers(rows)
    console = _console()
    console.print(f"{escape(printable(ck.path))} \\[{ck.format}]: {len(ck)} tensors, {ck.num_params:,} parameters, "
                  f"{ck.num_bytes:,} bytes", highlight=False)
    for k in ("tp", "pp", "iteration"):
        if k in ck.meta:
            console.print(f"{k}: {ck.meta[k]}")
    if len(shown) > PLAIN_ROWS:  # a rich table costs about a millisecond a row
        from .text import plain_table
        sys.stdout.writelines(line + "\n" for line in plain_table(
            ("tensor", "shape", "dtype", "count"), [(printable(n), str(s), d, str(c)) for n, s, d, c in shown]))
        shown = []
    table = Table(show_header=True)
    for c in ("tensor", "shape", "dtype", "count"):
        table.add_column(c, overflow="fold")
    for n, s, d, c in shown:
        table.add_row(escape(printable(n)), str(s), d, str(c))
    if shown:
        console.print(table)
    if args.json:
        from .reports.render import write_json_report
        write_json_report(args.json, "inspect", {
            "path": ck.path, "format": ck.format, "num_params": ck.num_params, "num_bytes": ck.num_bytes,
            "tensors": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in rows]}, "ok")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CKDIFF_DEBUG") == "1"
    if not debug:
        import warnings
        warnings.simplefilter("ignore")  # library warnings would break the one-line error contract
    try:
        if not argv or argv[0] in ("-h", "--help"):
            compare_parser().print_help()
            return 0 if argv else 2
        if argv[0] == "--version":
            from . import __version__
            print(f"ckdiff {__version__}")
            return 0
        cmd = argv[0]
        if cmd == "compare":
            return cmd_compare(argv[1:])
        if cmd == "inspect":
            return cmd_inspect(argv[1:])
        if cmd == "convert":
            from .converters.cli import cmd_convert
            return cmd_convert(argv[1:])
        if cmd == "logits":
            from .compare.logits import cmd_logits
            return cmd_logits(argv[1:])
        if cmd in ("demo", "roundtrip", "golden"):
            from .golden import suite
            return getattr(suite, f"cmd_{cmd}")(argv[1:])
        return cmd_compare(argv)
    except CkdiffError as e:
        if debug:
            traceback.print_exc()
        print(f"ckdiff: error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ckdiff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for the user; --debug shows it
        if debug:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"ckdiff: error: internal error {e.__class__.__name__}: {error_line(msg[:300])} (rerun with --debug)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
