"""Benchmark: `ckdiff A B` on generated bf16 Llama-shaped checkpoints, the cases users have.

For each size (about 1 GiB and 4 GiB per side by default) it writes an HF directory A and, one
case at a time, a B that is
  copy     a byte-identical copy
  one      a copy with one element changed
  all      every element changed slightly (x * (1 + 1e-2 * noise), a fine-tune or a numerics change)
  cast     every tensor cast bf16 -> fp16
  perm     every q_proj's rows in another order (a rotary permutation applied to q and not k)
  int8     A converted to JetStream int8 per-channel (float vs quantized, across layouts)
  megatron A converted to Megatron-LLM TP=2 (across layouts)
and runs the command line `ckdiff A B -q` in a fresh process. Figures per row: wall time, the
time from after the process's fixed start-up (interpreter, torch, numba's cached kernels loaded) to
its end, the figure = that time / time to `cat` both sides' files (page cache warm, `cat` run right
before), the target, and the peak RssAnon of the process sampled from /proc. A row is the run with
the median figure of ``--repeat`` runs, followed by the lowest and highest figure.

    python bench/bench_compare.py [--sizes 1,4] [--cases copy,one,all,cast,int8,megatron] [--dir DIR] [--keep]
                                  [--reuse] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (add_dir_keep, cat_seconds, checkout_env, child_peak_rss_anon, discard, files_of,  # noqa: E402
                    human, out_dir, sized_model, timed_child, verdict, warm_kernels, write_model)
from ckdiff.tensor.lazy import LazyTensor  # noqa: E402

TARGET = {"copy": 1.5, "one": 2.0, "all": 3.0, "cast": 3.0, "perm": 3.0, "int8": 4.0, "megatron": 3.0}
MAIN = "from ckdiff.cli import run; run()"  # what the ckdiff console script runs
# the same command, timed from after its fixed start-up (imports, numba's cached kernels loaded) to its end
TIMED = ("import sys, time; from ckdiff.cli import main; from ckdiff.compare.kernels import warm; warm(); "
         "t = time.perf_counter(); rc = main(sys.argv[1:]); "
         "sys.stderr.write(f'\\nCKDIFF_BENCH_SECONDS {time.perf_counter() - t}\\n'); sys.exit(rc)")


class Changed(LazyTensor):
    """``base`` with every element perturbed (``noise``) or cast to ``dtype``."""

    def __init__(self, base, dtype=None, noise=0.0, permute=False):
        super().__init__(base.name, base.shape, dtype or base.dtype, "<bench>")
        self.base, self.noise, self.permute = base, noise, permute

    def load(self):
        t = self.base.load()
        if self.permute:  # the rows in another order (a rotary permutation applied twice, q against k)
            g = torch.Generator().manual_seed(hash(self.name) % 2**31)
            t = t[torch.randperm(t.shape[0], generator=g)]
        if self.noise:
            g = torch.Generator().manual_seed(hash(self.name) % 2**31)
            t = (t.float() * (1 + self.noise * torch.randn(t.shape, generator=g))).to(t.dtype)
        return t.to(self.dtype)


def ckdiff(argv, env) -> tuple:
    return child_peak_rss_anon([sys.executable, "-c", MAIN, *map(str, argv)], env=env)


def ckdiff_timed(argv, env) -> tuple:
    """(seconds after start-up, wall, peak RssAnon MiB, returncode, stdout, stderr) of one fresh process."""
    return timed_child([sys.executable, "-c", TIMED, *map(str, argv)], env, f"ckdiff {argv}", 500)


def write_a(a: Path, tensors: dict, cfg, size: int) -> None:
    """A at ``a``, unless a --keep run left it there; says how long it took."""
    if not (a / "config.json").exists():
        t = time.perf_counter()
        write_model(a, tensors, cfg)
        print(f"generated {a} ({human(size)}, {len(tensors)} tensors) in {time.perf_counter() - t:.0f}s", flush=True)


def make_b(case: str, a: Path, b: Path, tensors: dict, cfg, env, reuse: bool = False) -> None:
    """B of ``case`` made from A at ``b`` (a leftover there removed first); with ``reuse`` one already there is
    kept as it is."""
    if b.exists():
        if reuse:
            return
        shutil.rmtree(b)
    if case in ("copy", "one"):
        shutil.copytree(a, b)
        if case == "one":  # flip a low mantissa bit of one bf16 element in the middle of a big tensor
            from ckdiff.io.safetensors import SafetensorsFile
            path = max(b.glob("*.safetensors"), key=lambda p: p.stat().st_size)  # one file or the largest shard
            f = SafetensorsFile(path)
            name = max(f.entries, key=lambda k: f.entries[k][3] - f.entries[k][2])
            _, shape, lo, hi = f.entries[name]
            off = f.data_start + lo + ((hi - lo) // 4) * 2
            with open(path, "r+b") as fh:
                fh.seek(off)
                x = fh.read(1)
                fh.seek(off)
                fh.write(bytes([x[0] ^ 1]))
        return
    if case in ("all", "cast", "perm"):
        changed = {k: Changed(t, noise=1e-2) if case == "all" else
                   Changed(t, permute=k.endswith("q_proj.weight")) if case == "perm" else Changed(t, dtype=torch.float16)
                   for k, t in tensors.items()}
        write_model(b, changed, cfg)
        return
    if case == "int8":
        argv = ["convert", "to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", a,
                "--output_checkpoint_dir", b, "--from_hf", "--quantize_weights", "--quantize_type",
                "int8_per_channel"]
    else:
        argv = ["convert", "hf-to-megatron", "llama2", "--model-path", a, "--out", b, "--tp", "2"]
    dt, peak, rc, out, err = ckdiff(argv, env)
    if rc:
        raise SystemExit(f"{case}: conversion failed: {err.strip()[-500:]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dir_keep(p)
    p.add_argument("--sizes", default="1,4", help="GiB per side, comma separated")
    p.add_argument("--cases", default=",".join(TARGET), help="comma separated, of " + ",".join(TARGET))
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per case; the row shows the median wall (with the cat before it) and the highest peak")
    p.add_argument("--reuse", action="store_true",
                   help="use the B checkpoints a previous --keep run left in --dir instead of making them again "
                        "(a run that was interrupted may have left one half made: delete it)")
    args = p.parse_args()
    out = out_dir(args.dir)
    env = checkout_env()
    t = time.perf_counter()
    warm_kernels(env)
    print(f"kernels compiled or loaded from numba's cache: {time.perf_counter() - t:.1f}s (once per install)")
    # Each run is a fresh process timed from after its fixed start-up (interpreter, torch, numba's
    # cached kernels: 1.8-3 s here) to its end: opening, mapping, comparing, diagnosing, reporting.
    # (Subtracting the wall of the same command on two tiny files measured the start-up in another
    # machine state: reading gigabytes evicts torch's own files from the page cache, and that start-up
    # ranged 1.8-3.6 s, a swing of several units of the figure at 1 GiB.)
    print(f"machine: {os.cpu_count()} cores; each row: the median of {args.repeat} runs of cat, then the command")
    print(f"{'size':>8} {'case':9} {'wall':>7} {'timed':>7} {'cat':>6} {'figure':>7} {'target':>6} "
          f"{'peak RssAnon':>13}  verdict")
    for gib in [float(s) for s in args.sizes.split(",")]:
        cfg, tensors, size = sized_model(gib, out, 3)
        a = out / f"a-{gib:g}"
        write_a(a, tensors, cfg, size)
        for case in args.cases.split(","):
            b = out / f"b-{gib:g}-{case}"
            make_b(case, a, b, tensors, cfg, env, args.reuse)
            runs = []
            for _ in range(args.repeat):
                floor = cat_seconds(files_of(a) + files_of(b))  # the page cache warm for the run
                secs, wall, peak, rc, stdout, err = ckdiff_timed([a, b, "-q"], env)
                runs.append((secs / floor, secs, wall, floor, peak, rc, stdout, err))
            runs.sort(key=lambda r: r[0])
            fig, secs, wall, floor, peak, rc, stdout, err = runs[len(runs) // 2]  # the median figure
            peak = max(r[4] for r in runs)
            said = verdict(stdout, err, 60)
            print(f"{human(size):>8} {case:9} {wall:6.1f}s {secs:6.2f}s {floor:5.2f}s {fig:6.2f}x "
                  f"{TARGET[case]:5.1f}x {peak:9.0f} MiB  rc={rc} {said}  (figures {runs[0][0]:.2f}-"
                  f"{runs[-1][0]:.2f}x)", flush=True)
            discard(args.keep, b)
        discard(args.keep, a)


if __name__ == "__main__":
    main()
