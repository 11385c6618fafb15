"""Benchmark: `ckdiff A B --workers N` for N = 1 and 2 on one machine (the torch.distributed path).

Generates a bf16 Llama-shaped pair (about 4 GiB per side by default) where every element differs
slightly (the compute-heavy case) and a byte-identical pair, and prints for each the wall time
with 1 and 2 processes, the speed-up, and the peak RssAnon of each rank (sampled from /proc for
the command and its worker processes). Per-rank throughput is what the README's estimate for a
405B comparison on many nodes is computed from.

    python bench/bench_sharded.py [--size 4] [--dir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_compare import MAIN, make_b  # noqa: E402
from common import (add_dir_keep, cat_seconds, checkout_env, discard, human, out_dir, rss_anon_kib,  # noqa: E402
                    sized_model, write_model)


def children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def run(argv, env):
    """(wall, {pid: peak RssAnon MiB}, returncode, stdout)."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", MAIN, *map(str, argv)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    peaks: dict = {}
    while p.poll() is None:
        for pid in [p.pid] + children(p.pid):
            peaks[pid] = max(peaks.get(pid, 0), rss_anon_kib(pid))
        time.sleep(0.005)
    out, err = p.communicate()
    if p.returncode not in (0, 1):
        raise SystemExit(f"ckdiff failed: {err.decode()[-500:]}")
    return time.perf_counter() - t, {k: v / 1024 for k, v in peaks.items()}, p.returncode, out.decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dir_keep(ap, None)
    ap.add_argument("--size", type=float, default=4.0, help="GiB per side")
    args = ap.parse_args()
    out = out_dir(args.dir)
    env = checkout_env()
    cfg, tensors, size = sized_model(args.size, out, 3)
    a = out / f"sharded-a-{args.size:g}"
    if not (a / "config.json").exists():
        write_model(a, tensors, cfg)
    print(f"model {human(size)} per side, {len(tensors)} tensors; {os.cpu_count()} cores")
    for case in ("all", "copy"):
        b = out / f"sharded-b-{case}"
        make_b(case, a, b, tensors, cfg, env)
        floor = cat_seconds([a / "model.safetensors", b / "model.safetensors"])
        walls = {}
        for n in (1, 2):
            wall, peaks, rc, stdout = run([a, b, "-q", "--no-diagnose", "--workers", n], env)
            walls[n] = wall
            per_rank = ", ".join(f"{v:.0f}" for v in peaks.values())
            print(f"{case:5s} workers={n}: {wall:6.2f}s  ({2 * size / wall / 2**30:.2f} GiB/s of both sides; "
                  f"cat {floor:.2f}s)  peak RssAnon per rank [MiB]: {per_rank}  -> {stdout.strip()[:50]}")
        print(f"{case:5s} speed-up with 2 processes: {walls[1] / walls[2]:.2f}x")
        discard(args.keep, b)
    discard(args.keep, a)


if __name__ == "__main__":
    main()
