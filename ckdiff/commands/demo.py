"""``ckdiff demo``: every converter on the built-in tiny models, verified, with reports."""
from __future__ import annotations

from pathlib import Path

from ckdiff.commands import common

NAME = "demo"
SUMMARY = "build tiny models, convert along every path, verify each conversion, write reports"


def parser(prog: str = "ckdiff demo"):
    p = common.Parser(prog=prog, description="Build the tiny golden models, convert them along every path, "
                      "verify each conversion (round trip, golden diff, logits) and write reports "
                      "(demo.html, demo.md, demo.json, demo-junit.xml, and broken-compare.html: what a caught bug looks like). "
                      "Exit 0 all checks pass, 1 a check failed.")
    p.add_argument("--out", default="ckdiff-demo", metavar="DIR", help="directory for checkpoints and reports")
    p.add_argument("--quick", action="store_true", help="one model per converter")
    common.add_common(p, cache=False, pickle=False)
    return p


def run(argv, command: str = "") -> int:
    from ckdiff.golden.suite import SuiteResult, check_converter, demo_broken, demo_plan, demo_tag
    from ckdiff.reports import html as H
    from ckdiff.reports.junit import render_junit
    from ckdiff.reports.render import render_json
    from ckdiff.reports.terminal import print_suite
    from ckdiff.text import printable
    a = parser().parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    console = common.console(a)
    checks = []
    for name, model, opts in demo_plan(a.quick):
        tag = demo_tag(name, model, opts)
        if not a.quiet:
            console.print(f"checking {tag} ...")
        checks += check_converter(name, model, out / "work" / tag, options=opts)
    res = SuiteResult(checks)
    if a.quiet:
        console.print(f"{'PASS' if res.equivalent else 'FAIL'}: {res.tally()}")
    else:
        print_suite(res, console)
    common.write_report(out / "demo.json", render_json("demo", res.to_dict(), res.verdict(), command), flag="json")
    common.write_report(out / "demo.html", H.render_html("demo", res, command), flag="html")
    common.write_report(out / "demo.md", H.render_markdown("demo", res, command), flag="markdown")
    common.write_report(out / "demo-junit.xml", render_junit("demo", res.to_dict(), res.verdict(), command),
                        flag="junit")
    # a deliberately broken conversion, to show what a caught bug looks like
    work = out / "work" / "broken"
    broken = demo_broken(work)
    again = common.command_line([broken.a, broken.b])
    common.write_report(out / "broken-compare.html", H.render_html("compare", broken, again), flag="html")
    common.write_report(out / "broken-compare.md", H.render_markdown("compare", broken, again), flag="markdown")
    console.print(printable(f"reports: {out / 'demo.html'}, {out / 'demo.md'}, {out / 'demo.json'}; "
                            f"a caught bug: {out / 'broken-compare.html'}"), markup=False)
    return 0 if res.equivalent else 1
