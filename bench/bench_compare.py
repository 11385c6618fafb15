"""Benchmark: `ckdiff A B` on two identical ~1.7 GB checkpoints (generated, never committed).

Prints the time of comparing against the time of reading both files' bytes from the
page cache, and the peak anonymous memory (RssAnon) of the compare.
Targets (issue 2): time ratio <= 2, peak RssAnon < 300 MiB.

    python bench/bench_compare.py [--dir bench/out] [--keep]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PeakRssAnon, big_hf_tensors, ensure_space, human, read_bytes_seconds  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default=str(Path(__file__).parent / "out"))
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    a = p.parse_args()
    from ckdiff.compare.diff import compare_checkpoints
    from ckdiff.converters.formats import open_checkpoint
    from ckdiff.converters.safetensors_io import write_safetensors
    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = big_hf_tensors()
    size = sum(t.nbytes for t in tensors.values())
    ensure_space(out, 2 * size)
    fa, fb = out / "a.safetensors", out / "b.safetensors"
    if not (fa.exists() and fa.stat().st_size > size):
        t = time.perf_counter()
        write_safetensors(fa, tensors.values())
        print(f"generated {fa} ({human(fa.stat().st_size)}) in {time.perf_counter() - t:.1f}s")
    if not (fb.exists() and fb.stat().st_size == fa.stat().st_size):
        shutil.copyfile(fa, fb)
    read_bytes_seconds([fa, fb])  # warm the page cache
    t_read = min(read_bytes_seconds([fa, fb]) for _ in range(3))
    times, peaks = [], []
    for _ in range(3):
        with PeakRssAnon() as m:
            t = time.perf_counter()
            res = compare_checkpoints(open_checkpoint(str(fa)), open_checkpoint(str(fb)))
            times.append(time.perf_counter() - t)
        peaks.append(m.peak_mib)
        assert res.equivalent and all(r.bit_exact for r in res.tensors)
    t_cmp = min(times)
    total = fa.stat().st_size + fb.stat().st_size
    print(f"pair: {human(total)} in {len(res.tensors)} tensors")
    print(f"read both files from page cache: {t_read:.3f}s ({total / t_read / 2**30:.2f} GiB/s)")
    print(f"ckdiff compare (identical):      {t_cmp:.3f}s ({total / t_cmp / 2**30:.2f} GiB/s)")
    print(f"time ratio compare/read: {t_cmp / t_read:.2f}  (target <= 2)")
    print(f"peak RssAnon during compare: {max(peaks):.1f} MiB  (target < 300 MiB; ratio {max(peaks) / 300:.2f})")
    if not a.keep:
        fa.unlink()
        fb.unlink()


if __name__ == "__main__":
    main()
