"""Benchmark: checkpoints of 10^6 tensors (a header-heavy file: every tensor two float32 values).

What a user sees on a model with a huge number of small tensors (per-expert scales, per-channel biases):
the per-tensor costs of reading a header, lining the sides up, comparing and reporting, with nothing to
stream. Cases: ``A A`` (identical), ``A B`` (one tensor differs), ``A B --json`` (every row in the
report), ``inspect A``. Figures per row: wall, user + system CPU and peak RSS of that process (``wait4``).

    python bench/bench_million.py [--n 1000000] [--dir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write(path: Path, n: int, flip: bool) -> None:
    """A safetensors file of ``n`` float32 tensors of 2 elements, written directly (header first)."""
    hdr = {f"model.t{i}.weight": {"dtype": "F32", "shape": [2], "data_offsets": [8 * i, 8 * i + 8]}
           for i in range(n)}
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = np.random.default_rng(0).standard_normal(2 * n).astype(np.float32)
    if flip:
        data[2 * (n // 2)] += 1
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.write(data.tobytes())


def run(argv) -> tuple[float, float, float, int]:
    """(wall s, cpu s, peak RSS MiB, exit code) of ``ckdiff argv`` in a fresh process (its own rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ckdiff", *map(str, argv)], stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, proc.returncode


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dir", default=str(Path(__file__).parent / "out" / "million"))
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    a, b = d / f"a-{args.n}.safetensors", d / f"b-{args.n}.safetensors"
    for path, flip in ((a, False), (b, True)):
        if not path.exists():
            write(path, args.n, flip)
    print(f"{args.n} tensors per file, {a.stat().st_size / 2**20:.0f} MiB each")
    print(f"{'case':<16}{'wall':>8}{'cpu':>8}{'peak RSS':>12}  rc")
    for name, argv in (("A A", [a, a, "-q"]), ("A B", [a, b, "-q"]),
                       ("A B --json", [a, b, "-q", "--json", d / "r.json"]), ("inspect A", ["inspect", a])):
        wall, cpu, rss, rc = run(argv)
        print(f"{name:<16}{wall:>7.1f}s{cpu:>7.1f}s{rss:>9.0f} MiB  {rc}")
    if not args.keep:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
