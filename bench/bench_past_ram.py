"""Benchmark: `ckdiff A B` on a pair larger than the machine's memory, page cache cold.

The case users have at 70B and up: the two checkpoints together do not fit in the page cache, so
every byte comes from the disk. The pair is ``--ratio`` times the machine's memory (default 1.5,
both sides together). Before each timed run every file of both sides is evicted from the page cache
(``posix_fadvise(DONTNEED)`` after an fsync, which needs no privileges), and the floor is reading
both sides once, file by file, with large sequential reads (32 MiB), after the same eviction.

Cases: ``copy`` (byte-identical), ``one`` (one element changed), ``all`` (every element changed).
Figures per row: wall, time after start-up, floor, figure = time / floor, read rate, peak RssAnon.

    python bench/bench_past_ram.py [--ratio 1.5] [--cases copy,one,all] [--dir DIR] [--keep] [--reuse]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_compare import ckdiff_timed, make_b  # noqa: E402
from common import (add_dir_keep, checkout_env, discard, files_of, human, out_dir, read_bytes_seconds,  # noqa: E402
                    sized_model, verdict, warm_kernels, write_model)


def mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no MemTotal in /proc/meminfo")


def evict(paths) -> None:
    """Drop the files' pages from the page cache (written back first, so DONTNEED can drop them)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(paths) -> float:
    """Share of the files' pages resident in the page cache (mincore of a read-only map), to show
    that the eviction worked."""
    import ctypes
    import mmap
    import numpy as np
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    total = resident = 0
    for p in paths:
        size = os.path.getsize(p)
        if not size:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = np.zeros(n, np.uint8)
            rc = libc.mincore(addr, size, vec.ctypes.data)
            libc.munmap(addr, size)
        finally:
            os.close(fd)
        if rc != 0:
            return float("nan")
        resident += int((vec & 1).sum())
        total += n
    return resident / total if total else 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dir_keep(p, None)
    p.add_argument("--ratio", type=float, default=1.5, help="pair size as a multiple of the machine's memory")
    p.add_argument("--cases", default="copy,one,all")
    p.add_argument("--reuse", action="store_true", help="use the checkpoints a --keep run left")
    args = p.parse_args()
    out = out_dir(args.dir)
    env = checkout_env()
    warm_kernels(env)
    mem = mem_total_bytes()
    cfg, tensors, size = sized_model(args.ratio * mem / 2 / 2**30, out, 2)
    print(f"machine: {os.cpu_count()} cores, {human(mem)} memory; pair {human(2 * size)} "
          f"({2 * size / mem:.2f}x memory), page cache evicted before every run")
    a = out / "past-ram-a"
    if not (args.reuse and (a / "config.json").exists()):
        t = time.perf_counter()
        write_model(a, tensors, cfg, num_shards=4)
        print(f"generated A: {human(size)} in {time.perf_counter() - t:.0f}s", flush=True)
    print(f"{'case':6} {'wall':>7} {'timed':>7} {'floor':>7} {'figure':>7} {'read rate':>10} "
          f"{'peak RssAnon':>13}  verdict")
    for case in args.cases.split(","):
        b = out / f"past-ram-b-{case}"
        make_b(case, a, b, tensors, cfg, env, args.reuse)
        files = files_of(a) + files_of(b)
        evict(files)
        floor = read_bytes_seconds(files)
        evict(files)
        left = cached_fraction(files)
        secs, wall, peak, rc, stdout, err = ckdiff_timed([a, b, "-q"], env)
        said = verdict(stdout, err, 50)
        print(f"{case:6} {wall:6.1f}s {secs:6.1f}s {floor:6.1f}s {secs / floor:6.2f}x "
              f"{2 * size / secs / 2**20:7.0f} MiB/s {peak:9.0f} MiB  rc={rc} {said} "
              f"(cached before the run: {left:.1%}; floor rate {2 * size / floor / 2**20:.0f} MiB/s)", flush=True)
        discard(args.keep, b)
    discard(args.keep, a)


if __name__ == "__main__":
    main()
