"""Benchmark: `ckdiff A B --device cuda` and `ckdiff logits --device cuda` against the CPU path, on the
same pairs, with the two results held equal.

Prepared to run as one short script on a machine with a GPU (a session lent one has ~15 minutes of device
time). On a CPU-only machine ``--device cpu`` checks the script itself (both rows then run the numba
kernels; tests/test_device_kernels.py holds the torch path equal to them on the host).

For each size (GiB per side of a generated bf16 Llama-shaped HF directory, as in bench_compare.py) and case
(``one``, ``all``, ``cast``, ``perm``: see bench_compare.py) it
  1. times reading both sides once (``cat``, page cache warm): the read floor;
  2. runs ``ckdiff A B --json`` in fresh processes on the CPU kernels (numba) and on ``--device``, the
     median of ``--repeat`` runs, timed from after the fixed start-up (interpreter, torch, numba's cached
     kernels; for CUDA also the context, made before the clock starts) to the end;
  3. holds the two JSON reports equal: every tensor's status, over-tolerance count, max |d| and its index,
     NaN/Inf counts exactly; mean |d|, cosine and norms within 1e-9 relative (torch reduces sums in its own
     order). A disagreement is printed and makes the exit status 1.
With ``--logits`` it also runs ``ckdiff logits A B-all`` on both devices at the smallest size (the forward
passes of both sides; ``--no-tensor-diff``) and prints both walls, verdicts and the largest per-token KL.

    python bench/bench_device.py [--device cuda] [--sizes 1,4] [--cases one,all,cast,perm] [--repeat 2]
                                 [--logits] [--dir DIR] [--keep]

A 15-minute device window fits ``--sizes 1,4 --repeat 2 --logits`` (about 6 minutes of generation at 4 GiB on
16 cores, then ~20 fresh processes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_compare import make_b, write_a  # noqa: E402
from common import (add_dir_keep, cat_seconds, checkout_env, files_of, human, median, out_dir,  # noqa: E402
                    sized_model, timed_child, verdict)

# the ckdiff command timed from after its fixed start-up: numba's kernels loaded and, on a GPU, the CUDA
# context made, so that the figure is the reading and the compute
TIMED = ("import sys, time; from ckdiff.cli import main; from ckdiff.compare.kernels import warm; warm(); "
         "dev = sys.argv[1]; sys.argv = sys.argv[1:]\n"
         "if dev.startswith('cuda'):\n"
         "    import torch; torch.empty(1, device=dev); torch.cuda.synchronize()\n"
         "t = time.perf_counter(); rc = main(sys.argv[1:]); "
         "sys.stderr.write(f'\\nCKDIFF_BENCH_SECONDS {time.perf_counter() - t}\\n'); sys.exit(rc)")
EXACT = ("status", "n_over_tol", "max_abs", "max_abs_index", "nan_a", "nan_b", "inf_a", "inf_b", "bit_exact")
CLOSE = ("mean_abs", "cosine", "norm_a", "norm_b", "max_rel")


def timed(argv, device: str, env) -> tuple:
    """(seconds after start-up, wall, peak RssAnon MiB, returncode, stdout, stderr) of one fresh process."""
    return timed_child([sys.executable, "-c", TIMED, device, *map(str, argv)], env, f"ckdiff {argv} ({device})")


def rows_of(report: Path) -> dict:
    data = json.loads(report.read_text())
    return {t["name"]: t for t in data["result"]["tensors"]}


def disagreements(cpu: dict, dev: dict) -> list:
    """The fields where the device's report differs from the CPU kernels' (see the module docstring)."""
    out = []
    for name in sorted(set(cpu) | set(dev)):
        if name not in cpu or name not in dev:
            out.append(f"{name}: only in the {'device' if name in dev else 'CPU'} report")
            continue
        a, b = cpu[name], dev[name]
        for k in EXACT:
            if a.get(k) != b.get(k):
                out.append(f"{name}.{k}: cpu {a.get(k)!r} device {b.get(k)!r}")
        for k in CLOSE:
            x, y = a.get(k), b.get(k)
            if (x is None) != (y is None) or (x is not None and not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-300)):
                out.append(f"{name}.{k}: cpu {x!r} device {y!r}")
    return out


def median_run(argv, device, env, repeat, floor_paths):
    runs = []
    for _ in range(repeat):
        floor = cat_seconds(floor_paths) if floor_paths else 0.0
        runs.append((*timed(argv, device, env), floor))
    secs, wall, peak, rc, out, err, floor = median(runs, key=lambda r: r[0])
    return secs, wall, max(r[2] for r in runs), rc, out, err, floor


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="the torch device to measure against the CPU kernels")
    add_dir_keep(p)
    p.add_argument("--sizes", default="1,4", help="GiB per side, comma separated")
    p.add_argument("--cases", default="one,all,cast,perm", help="comma separated, of one,all,cast,perm")
    p.add_argument("--repeat", type=int, default=2, help="runs per row (the median is shown)")
    p.add_argument("--logits", action="store_true", help="also ckdiff logits on both devices at the smallest size")
    args = p.parse_args()
    out = out_dir(args.dir)
    env = checkout_env()
    import torch
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
        print(f"device: {torch.cuda.get_device_name(torch.device(args.device))}")
    print(f"machine: {os.cpu_count()} cores; each row: the median of {args.repeat} fresh processes, page cache warm")
    print(f"{'size':>8} {'case':5} {'where':6} {'timed':>7} {'wall':>7} {'cat':>6} {'x floor':>7} {'peak RssAnon':>13}"
          "  verdict")
    bad = 0
    sizes = [float(s) for s in args.sizes.split(",")]
    for gib in sizes:
        cfg, tensors, size = sized_model(gib, out, 3)
        a = out / f"a-{gib:g}"
        write_a(a, tensors, cfg, size)
        for case in args.cases.split(","):
            b = out / f"b-{gib:g}-{case}"
            make_b(case, a, b, tensors, cfg, env, reuse=True)
            reports = {}
            with tempfile.TemporaryDirectory() as td:
                for where, dev in (("cpu", "cpu"), ("device", args.device)):
                    rep = Path(td) / f"{where}.json"
                    argv = [a, b, "-q", "--json", rep, "--device", dev]
                    secs, wall, peak, rc, stdout, err, floor = median_run(argv, dev, env, args.repeat,
                                                                          files_of(a) + files_of(b))
                    said = verdict(stdout, err, 60)
                    print(f"{human(size):>8} {case:5} {where:6} {secs:6.2f}s {wall:6.1f}s {floor:5.2f}s "
                          f"{secs / floor:6.2f}x {peak:9.0f} MiB  rc={rc} {said}", flush=True)
                    if rc not in (0, 1) or not rep.exists():
                        print(f"  no report: {err.strip()[-800:]}")
                        bad += 1
                        break
                    reports[where] = rows_of(rep)
                if len(reports) == 2:
                    diff = disagreements(reports["cpu"], reports["device"])
                    print(f"  results: {'equal' if not diff else f'{len(diff)} disagreement(s)'}")
                    for line in diff[:20]:
                        print(f"    {line}")
                    bad += bool(diff)
        if args.logits and gib == min(sizes):
            b = out / f"b-{gib:g}-all"
            make_b("all", a, b, tensors, cfg, env, reuse=True)
            for where, dev in (("cpu", "cpu"), ("device", args.device)):
                argv = ["logits", a, b, "-q", "--no-tensor-diff", "--device", dev]
                secs, wall, peak, rc, stdout, err, _ = median_run(argv, dev, env, 1, None)
                said = verdict(stdout, err, 100)
                print(f"{human(size):>8} logits {where:6} {secs:6.2f}s {wall:6.1f}s {peak:9.0f} MiB  rc={rc} {said}",
                      flush=True)
        if not args.keep:  # only what this size made: --dir may hold other benches' checkpoints
            for d in [a, *out.glob(f"b-{gib:g}-*")]:
                shutil.rmtree(d, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
