"""``ckdiff golden CONVERTER GOLDEN_SRC CANDIDATE_SRC``: the supported path is the golden, the new one is diffed."""
from __future__ import annotations

from ckdiff.commands.roundtrip import run_suite, suite_parser

NAME = "golden"
SUMMARY = "convert a golden source and a candidate source with one converter; diff the outputs"


def parser(prog: str = "ckdiff golden"):
    def add(p):
        p.add_argument("golden_src", help="source whose conversion is the golden")
        p.add_argument("candidate_src", help="source whose conversion is checked against the golden")
    return suite_parser(prog, "The JetStream guide's workflow: convert GOLDEN_SRC (a supported path, e.g. Meta "
                        "weights) and CANDIDATE_SRC (the new path, e.g. HF weights) with CONVERTER and diff the two "
                        "outputs. Exit 0 equivalent, 1 differ, 2 error.", add)


def run(argv, command: str = "") -> int:
    from ckdiff.golden.suite import golden_diff
    from ckdiff.reports.terminal import print_compare
    a = parser().parse_args(argv)

    def show(res, console):
        print_compare(res, console)
        console.print(f"converter: {res.options['converter']} {res.options['converter_options']}", markup=False)
    return run_suite(a, "golden", (a.golden_src, a.candidate_src), command, "ckdiff-golden-",
                     lambda work, opts, prog: golden_diff(a.converter, a.golden_src, a.candidate_src, work, a.tp,
                                                          a.pp, options=opts, progress=prog),
                     lambda res: ("EQUIVALENT" if res.equivalent else "DIFFER") + ": " + res.counts_text(), show)
