"""Benchmark: `ckdiff A B` on two identical ~1.7 GB checkpoints (generated, never committed).

Prints the time of comparing against the time of reading both files' bytes from the
page cache, and the peak anonymous memory (RssAnon) of the compare.
Targets (issue 2): time ratio <= 2, peak RssAnon < 300 MiB.

    python bench/bench_compare.py [--dir bench/out] [--keep]
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PeakRssAnon, human, prepare, read_bytes_seconds, rss_anon_kib  # noqa: E402


def one(fa, fb):
    """Best of three compares of the pair: seconds, RssAnon after imports, peak RssAnon, tensors."""
    from ckdiff.compare.diff import compare_checkpoints
    from ckdiff.converters.formats import open_checkpoint
    base = rss_anon_kib() / 1024
    times, peak = [], 0.0
    for _ in range(3):
        with PeakRssAnon() as m:
            t = time.perf_counter()
            res = compare_checkpoints(open_checkpoint(fa), open_checkpoint(fb))
            times.append(time.perf_counter() - t)
        peak = max(peak, m.peak_mib)
        assert res.equivalent and all(r.bit_exact for r in res.tensors)
    print(min(times), base, peak, len(res.tensors))


def main():
    if sys.argv[1:2] == ["--one"]:
        return one(*sys.argv[2:4])
    from ckdiff.converters.safetensors_io import write_safetensors
    a, out, tensors, size = prepare(2, __doc__)
    fa, fb = out / "a.safetensors", out / "b.safetensors"
    if not (fa.exists() and fa.stat().st_size > size):
        t = time.perf_counter()
        write_safetensors(fa, tensors.values())
        print(f"generated {fa} ({human(fa.stat().st_size)}) in {time.perf_counter() - t:.1f}s")
    if not (fb.exists() and fb.stat().st_size == fa.stat().st_size):
        shutil.copyfile(fa, fb)
    read_bytes_seconds([fa, fb])  # warm the page cache
    t_read = min(read_bytes_seconds([fa, fb]) for _ in range(3))
    # the compare runs in a fresh process, so its peak memory is its own
    r = subprocess.run([sys.executable, __file__, "--one", str(fa), str(fb)], capture_output=True, text=True,
                       check=True)
    t_cmp, base, peak, n = r.stdout.split()
    t_cmp, peaks = float(t_cmp), [float(peak)]
    total = fa.stat().st_size + fb.stat().st_size
    print(f"pair: {human(total)} in {n} tensors; RssAnon after imports {float(base):.0f} MiB")
    print(f"read both files from page cache: {t_read:.3f}s ({total / t_read / 2**30:.2f} GiB/s)")
    print(f"ckdiff compare (identical):      {t_cmp:.3f}s ({total / t_cmp / 2**30:.2f} GiB/s)")
    print(f"time ratio compare/read: {t_cmp / t_read:.2f}  (target <= 2)")
    print(f"peak RssAnon during compare: {max(peaks):.1f} MiB  (target < 300 MiB; ratio {max(peaks) / 300:.2f})")
    if not a.keep:
        fa.unlink()
        fb.unlink()


if __name__ == "__main__":
    main()
