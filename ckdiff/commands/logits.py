"""``ckdiff logits A B``: the same random token ids through both checkpoints, each in its own layout."""
from __future__ import annotations

from ckdiff.errors import UsageError
from ckdiff.commands import common

NAME = "logits"
SUMMARY = "run the same random tokens through both checkpoints in their own layouts; compare the logits"
DTYPES = ("float64", "float32", "bfloat16", "float16")


def parser(prog: str = "ckdiff logits"):
    p = common.Parser(prog=prog, description="Compare two model checkpoints by forward passes, each in its own "
                      "layout's reference runtime (needs a model config: config.json, params.json or Megatron "
                      "args). Exit 0 equivalent, 1 differ, 2 error.")
    from ckdiff.formats import registry
    runnable = [f.name for f in registry.formats() if f.runtime is not registry.Runtime.NONE]
    p.add_argument("a", help=f"model checkpoint A, of a format with a model config ({', '.join(runnable)}), or a "
                             "hub id")
    p.add_argument("b", help="model checkpoint B (any of the same formats)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--length", type=int, default=48, help="positions per sequence (>= 2; >= 32 recommended)")
    p.add_argument("--batch", type=int, default=4, help="number of sequences")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute dtype of both forward passes (sets the KL threshold)")
    p.add_argument("--topk", type=int, default=5, help="k of the mutual top-k containment check")
    p.add_argument("--skip-first-token", action="store_true",
                   help="leave position 0 out of the metrics (models with an attention sink)")
    p.add_argument("--profile", default="standard", choices=("strict", "standard", "relaxed"),
                   help="how far above the measured noise floor each signal may go (docs/logits.md)")
    p.add_argument("--threshold", type=float, help="override the limit on the max per-token KL (absolute)")
    p.add_argument("--no-tensor-diff", action="store_true",
                   help="skip the tensor diff run before the forward passes (it names weight differences the "
                        "logits may not show)")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="where the forward passes run: cpu (default) or cuda[:N]")
    common.add_formats(p, names=runnable)  # the formats ckdiff logits can run
    common.add_reports(p)
    common.add_common(p)
    return p


def run(argv, command: str = "") -> int:
    from ckdiff.compare.logits import compare_logits
    from ckdiff.reports.terminal import print_logits
    from ckdiff.commands.compare import open_pair
    args = parser().parse_args(argv)
    common.check_reports(args)
    device = None
    if args.device != "cpu":
        from ckdiff.compare.kernels_torch import check_device
        device = str(check_device(args.device))
    a, b = open_pair(args)
    common.check_reports(args, (a, b))
    from ckdiff.formats import registry
    for side, ck in (("A", a), ("B", b)):
        f = registry.lookup(ck.format)
        if f is not None and f.runtime is registry.Runtime.NONE:
            raise UsageError(f"{ck.path}: {side} is a plain set of tensors ({ck.format}); ckdiff logits runs the "
                             "model, which needs its config: pass a model directory (HF config.json, Meta/JetStream "
                             "params.json or a Megatron-LLM checkpoint)")
    diff = None if args.no_tensor_diff else _tensor_diff(a, b, device)
    pf = common.progress_factory(common.show_progress(args), "running")
    res = compare_logits(a, b, args.batch, args.length, args.seed, args.dtype, args.topk,
                         args.skip_first_token, args.threshold, progress_factory=pf, profile=args.profile,
                         device=device)
    _cross_check(diff, res)
    console = common.console(args)
    if args.quiet:
        console.print(f"{res.verdict().upper()}: {res.summary().removeprefix('inconclusive: ')}")
    else:
        print_logits(res, console)
    common.emit_reports(args, "logits", res, (a, b), command)
    return 0 if res.equivalent else 1


def _tensor_diff(a, b, device=None):
    """The tensor diff of the pair (the cheap structural check), or the one-line reason it cannot run."""
    from ckdiff.compare.diff import Options, compare_checkpoints
    from ckdiff.errors import CkdiffError
    try:
        return compare_checkpoints(a, b, Options(device=device))
    except CkdiffError as e:
        return str(e).splitlines()[0] if str(e) else e.__class__.__name__


def _cross_check(diff, res) -> None:
    from ckdiff.compare.logits import cross_check_notes
    if isinstance(diff, str):
        res.notes.append(f"tensor diff not run: {diff}")
        return
    if diff is None:
        return
    res.tensor_diff = diff.verdict() if hasattr(diff, "verdict") else ("equivalent" if diff.equivalent else "differ")
    cross_check_notes(diff, res)
