"""``ckdiff roundtrip CONVERTER SRC``: convert and back on your own checkpoint; diff and logits."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from . import common

NAME = "roundtrip"
SUMMARY = "convert your checkpoint with a converter and back; diff, config drift and logits"


@contextlib.contextmanager
def workdir(keep: Optional[str], prefix: str):
    """``keep`` if given (left in place), else a temporary directory removed afterwards."""
    if keep:
        yield Path(keep)
        return
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def converter_names() -> list:
    from ..golden.suite import REGISTRY
    return sorted(REGISTRY)


def add_suite_args(p) -> None:
    p.add_argument("--work", metavar="DIR",
                   help="keep intermediate checkpoints here (default: a temporary directory, removed afterwards)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size for Megatron targets")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size for Megatron targets")
    common.add_reports(p)
    common.add_common(p, cache=False, pickle=False)


def parser(prog: str = "ckdiff roundtrip"):
    p = common.Parser(prog=prog, description="Convert SRC with CONVERTER, convert the result back with its "
                      "registered inverse, diff the two (bit-exact, config drift included) and compare logits of "
                      "SRC and the converted checkpoint. Exit 0 pass, 1 fail, 2 error.")
    p.add_argument("converter", choices=converter_names(), help="a registered converter")
    p.add_argument("src", help="your checkpoint, in the converter's source layout")
    p.add_argument("--no-logits", action="store_true", help="skip the logit comparison")
    add_suite_args(p)
    return p


def run(argv, command: str = "") -> int:
    from ..golden.suite import roundtrip
    from ..reports.terminal import print_suite
    a = parser().parse_args(argv)
    common.check_reports(a, (a.src,))
    with workdir(a.work, "ckdiff-rt-") as work:
        res = roundtrip(a.converter, a.src, work, a.tp, a.pp, logits=not a.no_logits)
    for c in res.checks:
        c.command = command
    console = common.console(a)
    if a.quiet:
        console.print(f"{'PASS' if res.equivalent else 'FAIL'}: {sum(c.ok for c in res.checks)}/{len(res.checks)} "
                      "checks passed")
    else:
        print_suite(res, console)
    common.emit_reports(a, "roundtrip", res, (a.src,), command)
    return 0 if res.equivalent else 1
