"""Benchmark: the comparison kernels alone, in process, in million element pairs per second.

One 8 MiB chunk per side (4 Mi bf16 elements, the size compare reads at a time) for each case:
  all    bf16 vs bf16, every element changed (x * (1 + 1e-2 noise))
  cast   bf16 vs the same values cast to fp16
  f32    fp32 vs bf16 (every element changed)
  int8   bf16 rows vs int8 per-channel codes and scales (float vs JetStream int8)
  equal  byte equality of two identical chunks (GB/s of both sides)
Figures: the best of ``--repeat`` runs, as wall time on every core and per CPU second (process
time, which a busy machine disturbs less). ``--against OLD/kernels.py`` times another copy of
compare/kernels.py on the same buffers, alternating with this one (an A/B on a shared machine).

    python bench/bench_kernels.py [--repeat 7] [--against PATH]
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_copy(path: str):
    """Import a copy of a kernels.py under its own module name (numba caches next to the copy)."""
    d = Path(tempfile.gettempdir()) / "ckdiff-bench-kernels"
    d.mkdir(exist_ok=True)
    shutil.copy(path, d / "kernels_other.py")
    sys.path.insert(0, str(d))
    return importlib.import_module("kernels_other")


def cases(n: int):
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    b = (a.float() * (1 + 1e-2 * torch.randn(n, generator=g))).to(torch.bfloat16)
    C = 4096
    w = a.reshape(-1, C)
    scale = w.float().abs().amax(1) / 127
    q = torch.round(w.float() / scale[:, None]).to(torch.int8)
    return {"all": (a, b, 0.0, 0.0), "cast": (a, a.to(torch.float16), 1e-5, 1e-3),
            "f32": (a.float(), b, 1e-5, 1.6e-2), "int8": (w, q, scale), "equal": (a, a.clone())}


def run(k, case, args):
    if case == "int8":
        w, q, scale = args
        if hasattr(k, "ScaledStats"):
            k.ScaledStats().add(k.Side(w), k.Side(q, 1, scale.reshape(-1, 1), (1, w.shape[1])), 0.0, 1.5, 0)
        else:  # a kernels.py from before the one block-scaled kernel (--against)
            k.QuantStats().add(w, q, scale, 1, 0, w.shape[1], 0)
    elif case == "equal":
        assert k.bytes_equal(*args)
    else:
        x, y, atol, rtol = args
        k.Stats().add(k.as_kernel_input(x), k.as_kernel_input(y), 0, atol, rtol)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--against", help="another compare/kernels.py to time on the same buffers")
    args = p.parse_args()
    from ckdiff.compare import kernels
    mods = [("this", kernels)] + ([("other", load_copy(args.against))] if args.against else [])
    for _, k in mods:
        k.warm()
    n = 4 << 20
    data = cases(n)
    best: dict = {}
    for _ in range(args.repeat):
        for case, a in data.items():
            for name, k in mods:
                t, c = time.perf_counter(), time.process_time()
                run(k, case, a)
                w, cp = time.perf_counter() - t, time.process_time() - c
                old = best.get((case, name), (9e9, 9e9))
                best[(case, name)] = (min(old[0], w), min(old[1], cp))
    print(f"{torch.get_num_threads()} cores; 4 Mi element pairs per call, best of {args.repeat}")
    for (case, name), (w, cp) in best.items():
        if case == "equal":
            nb = 2 * n * 2 / 1e9
            print(f"{case:6} {name:6} {nb / w:8.1f} GB/s wall {nb / max(cp, 1e-9):8.1f} GB/s per CPU second")
        else:
            print(f"{case:6} {name:6} {n / w / 1e6:8.0f} M/s wall {n / max(cp, 1e-9) / 1e6:8.0f} M/s per CPU second")


if __name__ == "__main__":
    main()
