"""``ckdiff A B`` (also ``ckdiff compare A B``): compare two checkpoints tensor by tensor."""
from __future__ import annotations

from ckdiff.errors import UsageError
from ckdiff.commands import common

NAME = "compare"
SUMMARY = "compare two checkpoints of any supported format, tensor by tensor (the default command)"


def parser(prog: str = "ckdiff compare"):
    p = common.Parser(prog=prog, description="Compare two checkpoints of any supported format, tensor by tensor. "
                      "Exit 0 equivalent, 1 differ, 2 usage or input error.")
    p.add_argument("a", help="checkpoint A: a model directory, a directory of tensor files, a single "
                             ".safetensors/.bin/.pt/.pth file, or a hub id (org/name) in the local cache")
    p.add_argument("b", help="checkpoint B (same kinds as A; the layouts may differ)")
    p.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="compare only tensors whose name matches GLOB (repeatable)")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="skip tensors whose name matches GLOB (repeatable)")
    p.add_argument("--atol", type=float, help="absolute tolerance for every tensor (default: dtype-aware)")
    p.add_argument("--rtol", type=float, help="relative tolerance for every tensor (default: dtype-aware)")
    p.add_argument("--tol", action="append", default=[], metavar="GLOB=ATOL[,RTOL][:REASON]",
                   help="tolerance for tensors matching GLOB, with an optional reason shown in reports (repeatable)")
    p.add_argument("--strict-dtype", action="store_true", help="a dtype cast is a mismatch even within rounding")
    p.add_argument("--strict", action="store_true",
                   help="warnings (findings that hold on both checkpoints alike, such as an untied config "
                        "without an output head) fail the comparison too")
    p.add_argument("--no-diagnose", action="store_true", help="skip the likely-cause analysis")
    p.add_argument("--no-map", action="store_true",
                   help="compare names as they are, even when the layouts differ (default: map one side)")
    p.add_argument("--limit", type=int, default=40, metavar="N", help="mismatching rows shown in the terminal")
    p.add_argument("--workers", type=common.workers_arg, default=1, metavar="N",
                   help="spread the tensors over N local processes (torch.distributed, gloo on 127.0.0.1; "
                        "default 1). Under torchrun the launcher's ranks are used instead")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="where the metrics of differing tensors are computed: cpu (default, the numba kernels) or "
                        "cuda[:N] (torch on the GPU, pinned buffers, reads overlapping compute)")
    common.add_formats(p)
    common.add_reports(p)
    common.add_common(p)
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


def open_pair(args):
    """Both checkpoints, read with --format/--format-a/--format-b."""
    from ckdiff.formats.readers import open_checkpoint
    a = open_checkpoint(args.a, args.format_a or args.format, args.cache_dir, args.trust_pickle,
                        prefix=getattr(args, "prefix_a", None))
    b = open_checkpoint(args.b, args.format_b or args.format, args.cache_dir, args.trust_pickle,
                        prefix=getattr(args, "prefix_b", None))
    return a, b


def run(argv, command: str = "") -> int:
    args = parser().parse_args(argv)
    return common.run_sharded("compare", argv, args.workers, lambda shard: _run(args, command, shard))


def _plain(args) -> bool:
    """Nothing asked for changes the answer or needs the full comparison's machinery: no format, prefix,
    tolerance or selection option, one process on the CPU."""
    return not (args.format or args.format_a or args.format_b or getattr(args, "prefix_a", None)
                or getattr(args, "prefix_b", None) or args.only or args.ignore or args.tol or args.atol is not None
                or args.rtol is not None or args.strict_dtype or args.strict or args.workers != 1
                or args.device != "cpu")


def _reports(args) -> bool:
    return any(getattr(args, f, None) for f in common.REPORT_FLAGS) or common.summary_target(args) is not None


def _quick(args, command: str = "") -> int | None:
    """Without torch, where the options allow (``_plain``): the identical pair of plain safetensors files
    without reports, decided before numba too (compare/quick.py), then any pair of plain float safetensors
    checkpoints (compare/lane.py), reports included. None: the full comparison runs."""
    if not _plain(args):
        return None
    if not _reports(args):
        from ckdiff.compare.quick import identical_safetensors
        res = identical_safetensors(args.a, args.b)
        if res is not None:
            _print(args, res)
            return 0
    common.check_reports(args)
    from ckdiff.compare.lane import compare_plain_pair, open_plain_pair
    pair = open_plain_pair(args.a, args.b)
    if pair is None:
        return None
    common.check_reports(args, pair)
    res = compare_plain_pair(*pair, diagnose=not args.no_diagnose,
                             progress_factory=common.progress_factory(common.show_progress(args)))
    if res is None:
        return None
    _print(args, res)
    common.emit_reports(args, "compare", res, pair, command)
    return 0 if res.equivalent else 1


def _print(args, res) -> None:
    from ckdiff.reports.terminal import print_compare
    console = common.console(args)
    if args.quiet:
        console.print(("EQUIVALENT" if res.equivalent else "DIFFER") + ": "
                      + res.counts_text() + (f", {len(res.warnings)} warning(s)" if res.warnings else ""))
    else:
        print_compare(res, console, args.limit)


def _run(args, command: str, shard) -> int:
    """One comparison; with ``shard`` every rank runs this and rank 0 prints and writes the reports."""
    if shard is None:
        code = _quick(args, command)
        if code is not None:
            return code
    from ckdiff.compare.diff import Options, compare_checkpoints
    main_rank = shard is None or shard.is_main
    if main_rank:
        common.check_reports(args)
    tol = parse_tol(args.tol)
    device = None
    if args.device != "cpu":  # cpu: the numba kernels; anything else must name a device that runs here
        from ckdiff.compare.kernels_torch import check_device
        device = str(check_device(args.device))
    a, b = open_pair(args)
    if main_rank:
        common.check_reports(args, (a, b))
    opts = Options(atol=args.atol, rtol=args.rtol, patterns=tol, only=args.only, ignore=args.ignore,
                   diagnose=not args.no_diagnose, strict_dtype=args.strict_dtype,
                   strict=args.strict, device=device)
    res = compare_checkpoints(a, b, opts, progress_factory=common.progress_factory(
        common.show_progress(args) and main_rank), map_layouts=not args.no_map, shard=shard)
    if not main_rank:
        return shard.agree(None)
    _print(args, res)
    common.emit_reports(args, "compare", res, (a, b), command)
    code = 0 if res.equivalent else 1
    return shard.agree(code) if shard is not None else code
