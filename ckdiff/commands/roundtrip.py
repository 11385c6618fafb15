"""``ckdiff roundtrip CONVERTER SRC``: convert and back on your own checkpoint; diff and logits."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ckdiff.errors import UsageError
from ckdiff.commands import common

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
    from ckdiff.golden.suite import REGISTRY
    return sorted(REGISTRY)


def add_suite_args(p) -> None:
    p.add_argument("--work", metavar="DIR",
                   help="keep intermediate checkpoints here (default: a temporary directory, removed afterwards)")
    g = p.add_argument_group("converter options (the converter's own flags; either spelling)")
    g.add_argument("--tp", "--target_tensor_parallel_size", "--target-tensor-parallel-size", type=int, default=1,
                   help="tensor-parallel size for Megatron targets")
    g.add_argument("--pp", "--target_pipeline_parallel_size", "--target-pipeline-parallel-size", type=int, default=1,
                   help="pipeline-parallel size for Megatron targets")
    g.add_argument("--true-vocab-size", "--true_vocab_size", dest="true_vocab_size", type=int, metavar="N",
                   help="real vocabulary rows, the rest padding (hf-to-megatron, megatron-to-hf)")
    g.add_argument("--make-vocab-size-divisible-by", "--make_vocab_size_divisible_by", dest="pad", type=int,
                   metavar="N", help="pad the vocab to a multiple of N x TP (hf-to-megatron)")
    g.add_argument("--model-name", "--model_name", dest="model_name", metavar="NAME",
                   help="model family for to-jetstream (default: from the config)")
    g.add_argument("--quantize-weights", "--quantize_weights", dest="quantize_weights", action="store_true",
                   help="quantize with --quantize-type (to-jetstream)")
    g.add_argument("--quantize-type", "--quantize_type", dest="quantize_type", metavar="TYPE",
                   help="quantization scheme for to-jetstream (implies --quantize-weights): "
                        "int8_per_channel, int4_per_channel, int8_blockwise, int4_blockwise")
    common.add_reports(p)
    common.add_common(p, cache=False, pickle=False)


# the converters each converter option applies to (the options column shows the ones given)
APPLIES = {"true_vocab_size": ("hf-to-megatron", "megatron-to-hf"), "pad": ("hf-to-megatron",),
           "model_name": ("to-jetstream",), "quantize": ("to-jetstream",)}


def converter_options(a) -> dict:
    """The converter options given, as the suite's options dict; one that the converter does not take is
    a usage error (it would be silently ignored otherwise)."""
    from ckdiff.formats.jetstream_quant import QUANT_TYPES
    o = {"true_vocab_size": a.true_vocab_size, "pad": a.pad, "model_name": a.model_name,
         "quantize": a.quantize_type or ("int8_per_channel" if a.quantize_weights else None)}
    if a.quantize_type is not None and a.quantize_type not in QUANT_TYPES:
        raise UsageError(f"--quantize-type {a.quantize_type!r}: one of {', '.join(QUANT_TYPES)}")
    for k, v in o.items():
        if v is not None and a.converter not in APPLIES[k]:
            flag = {"pad": "make-vocab-size-divisible-by", "quantize": "quantize-type"}.get(k, k.replace("_", "-"))
            raise UsageError(f"--{flag} applies to {', '.join(APPLIES[k])}, not {a.converter}")
    for k in ("tp", "pp", "true_vocab_size", "pad"):
        v = o.get(k, getattr(a, k, None))
        if v is not None and v < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be at least 1, got {v}")
    return {k: v for k, v in o.items() if v is not None}


def progress(a):
    """label -> progress_factory (None when progress is not shown)."""
    return lambda label: common.progress_factory(common.show_progress(a), label)


def suite_parser(prog: str, description: str, add) -> common.Parser:
    """The parser of a converter suite command: the converter, what ``add(parser)`` adds, the suite's flags."""
    p = common.Parser(prog=prog, description=description)
    p.add_argument("converter", choices=converter_names(), help="a registered converter")
    add(p)
    add_suite_args(p)
    return p


def parser(prog: str = "ckdiff roundtrip"):
    def add(p):
        p.add_argument("src", help="your checkpoint, in the converter's source layout")
        p.add_argument("--no-logits", action="store_true", help="skip the logit comparison")
    return suite_parser(prog, "Convert SRC with CONVERTER, convert the result back with its registered inverse, "
                        "diff the two (bit-exact, config drift included) and compare logits of SRC and the "
                        "converted checkpoint. Exit 0 pass, 1 fail, 2 error.", add)


def run_suite(a, kind: str, inputs, command: str, prefix: str, suite, quiet_line, show) -> int:
    """``suite(work, converter options, progress)`` in the work directory (--work, else a temporary one named
    ``prefix``...), after the report paths are checked against ``inputs``; then ``quiet_line(result)`` under -q,
    else ``show(result, console)``, and the reports. Exit 0 equivalent, 1 not."""
    opts = converter_options(a)
    common.check_reports(a, inputs)
    with workdir(a.work, prefix) as work:
        res = suite(work, opts, progress(a))
    console = common.console(a)
    if a.quiet:
        console.print(quiet_line(res))
    else:
        show(res, console)
    common.emit_reports(a, kind, res, inputs, command)
    return 0 if res.equivalent else 1


def run(argv, command: str = "") -> int:
    from ckdiff.golden.suite import roundtrip
    from ckdiff.reports.terminal import print_suite
    a = parser().parse_args(argv)

    def suite(work, opts, prog):
        res = roundtrip(a.converter, a.src, work, a.tp, a.pp, logits=not a.no_logits, options=opts, progress=prog)
        for c in res.checks:
            c.command = command
        return res
    return run_suite(a, "roundtrip", (a.src,), command, "ckdiff-rt-", suite,
                     lambda res: f"{'PASS' if res.equivalent else 'FAIL'}: {res.tally()}", print_suite)
