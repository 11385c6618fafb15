"""Benchmark: streaming conversions of a ~1.7 GB bfloat16 Llama-shaped checkpoint.

Measures wall time and peak anonymous memory (RssAnon) of HF -> JetStream (one
safetensors file, streamed tensor by tensor) and HF -> Megatron at TP=2, PP=2
(each rank file is a torch pickle, so one rank's tensors are held at a time).
Each conversion runs in a fresh process so its peak is its own.

    python bench/bench_convert.py [--dir bench/out] [--keep]
"""
from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import BIG, PeakRssAnon, human, prepare  # noqa: E402


def one(argv):
    from ckdiff.commands.convert import COMMANDS
    with PeakRssAnon() as m, contextlib.redirect_stdout(io.StringIO()):
        t = time.perf_counter()
        COMMANDS[argv[0]](argv[1:])
        dt = time.perf_counter() - t
    print(dt, m.base / 1024, m.peak_mib)


def main():
    if sys.argv[1:2] == ["--one"]:
        return one(sys.argv[2:])
    from ckdiff.converters.writers import atomic_dir, write_hf
    a, out, tensors, size = prepare(3, __doc__)
    src = out / "hf-big"
    if not (src / "config.json").exists():
        with atomic_dir(src, overwrite=True) as tmp:
            write_hf(tmp, tensors, BIG.to_hf(), num_shards=4)
    print(f"source: {src} ({human(size)}, {len(tensors)} tensors, 4 shards)")
    runs = {
        "hf -> jetstream (safetensors)": ["to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir",
                                          str(src), "--output_checkpoint_dir", str(out / "js"), "--overwrite"],
        "hf -> megatron TP=2 PP=2": ["hf-to-megatron", "llama2", "--model-path", str(src), "--out",
                                     str(out / "meg"), "--tp", "2", "--pp", "2", "--overwrite"],
        "megatron TP=2 PP=2 -> hf": ["megatron-to-hf", "--input_dir", str(out / "meg"), "--output_dir",
                                     str(out / "hf-back"), "--overwrite", "--num_output_shards", "4"],
    }
    for name, argv in runs.items():
        r = subprocess.run([sys.executable, __file__, "--one", *argv], capture_output=True, text=True, check=True)
        dt, base, peak = map(float, r.stdout.split())
        print(f"{name:32s} {dt:6.1f}s  {size / dt / 2**30:.2f} GiB/s  peak RssAnon {peak:7.1f} MiB "
              f"(after imports {base:.0f} MiB; model {human(size)})")
    if not a.keep:
        for d in ("js", "meg", "hf-back", "hf-big"):
            shutil.rmtree(out / d, ignore_errors=True)


if __name__ == "__main__":
    main()
