"""``ckdiff check X``: lint one checkpoint (config vs tensors, coverage, NaN/Inf, tied head, mixed dtypes,
vocab padding). Exit 0 clean, 1 findings, 2 usage or input error."""
from __future__ import annotations

from ckdiff.commands import common

NAME = "check"
SUMMARY = "lint one checkpoint: config vs tensors, coverage, NaN/Inf, tied head, mixed dtypes, padding"


def parser(prog: str = "ckdiff check"):
    return common.one_side_parser(prog, "Lint one checkpoint: its config against its tensors, every tensor "
                                  "accounted for by its layout, NaN/Inf, the tied head, mixed dtypes, vocab padding. "
                                  "Exit 0 clean, 1 findings, 2 usage or input error.")


def run(argv, command: str = "") -> int:
    from rich.markup import escape

    from ckdiff.compare.lint import lint
    from ckdiff.reports.render import render_json
    from ckdiff.text import printable
    args = parser().parse_args(argv)
    ck = common.open_one_side(args)
    res = lint(ck, progress_factory=common.progress_factory(common.show_progress(args), "checking"))
    console = common.console(args)
    style = "bold green" if res.equivalent else "bold red"
    head = "CLEAN" if res.equivalent else f"FINDINGS: {len(res.findings)}"
    console.print(f"[{style}]{head}[/{style}]: {escape(printable(ck.path))} \\[{ck.format}], {res.tensors} tensors "
                  f"(checks: {', '.join(res.checks)})")
    if not args.quiet:
        for f in res.findings:
            console.print(escape(printable(f"{f.check}: {f.text}")))
        for n in res.notes:
            console.print(escape(printable(f"note: {n}")))
    if args.json:
        common.write_report(args.json, render_json("check", res.to_dict(), res.verdict(), command), (ck,), "json",
                            args.force)
    return 0 if res.equivalent else 1
