"""Benchmark: the streaming converters at two model sizes (generated, never committed).

For each size (default about 1 and 4 GiB of bf16 Llama-shaped weights, GQA), an HF
checkpoint is generated in 4 safetensors shards, then each conversion runs in a fresh
process (so its peak is its own) and prints its wall time, the ratio to the read+write
floor (time to read the input files from the page cache plus time to write as many
bytes), the ratio to the durable floor (the same, with the written bytes fsynced, as ckdiff
fsyncs its outputs before the rename that publishes them), and its peak anonymous memory
(RssAnon). Targets: ratio <= 3, peak RssAnon < 300 MiB at every size.

    python bench/bench_convert.py [--sizes 1,4] [--dir bench/out] [--keep]
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (files_of, human, measured, per_size_main, read_bytes_seconds, run_one, sized_model,  # noqa: E402
                    write_model)


def one(argv):
    """Run one ``ckdiff convert`` subcommand here; print seconds, RssAnon after imports, peak."""
    from ckdiff.commands.convert import COMMANDS
    with contextlib.redirect_stdout(io.StringIO()):
        dt, base, peak, _ = measured(lambda: COMMANDS[argv[0]](argv[1:]))
    print(dt, base, peak)


def write_seconds(path: Path, nbytes: int, block=32 << 20, sync: bool = False) -> float:
    """Time to write ``nbytes`` to a new file (fsynced when ``sync``, as a durable output is), then
    delete it."""
    buf = os.urandom(1 << 20) * (block >> 20)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(memoryview(buf)[:min(block, left)])
        if sync:
            os.fsync(f.fileno())
    dt = time.perf_counter() - t
    path.unlink()
    return dt


def floor_seconds(src: Path, out_bytes: int, scratch: Path) -> tuple[float, float]:
    """(read + write, read + write + fsync) of the input's and the output's bytes."""
    files = files_of(src)
    read_bytes_seconds(files)  # warm
    read = min(read_bytes_seconds(files) for _ in range(2))
    def timed(sync):  # best of two, each after a sync: dirty pages of earlier writes (the conversion's
        out = []       # output, the previous measurement) must not be charged to this one
        for _ in range(2):
            os.sync()
            out.append(write_seconds(scratch, out_bytes, sync=sync))
        return min(out)
    return read + timed(False), read + timed(True)


def bench_size(gib: float, out: Path, args) -> None:
    cfg, tensors, size = sized_model(gib, out, 5)
    src = out / f"hf-{gib:g}g"
    t = time.perf_counter()
    write_model(src, tensors, cfg, num_shards=4)
    print(f"\n== {human(size)} model: {cfg.layers} layers, hidden {cfg.hidden}, {len(tensors)} tensors, "
          f"4 shards (generated in {time.perf_counter() - t:.0f}s)")
    meg, js, back = out / f"meg-{gib:g}g", out / f"js-{gib:g}g", out / f"hf-back-{gib:g}g"
    runs = [
        ("hf -> megatron TP=2", src, meg,
         ["hf-to-megatron", "llama2", "--model-path", src, "--out", meg, "--tp", "2", "--overwrite"]),
        ("hf -> jetstream int8", src, js,
         ["to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", src, "--output_checkpoint_dir", js,
          "--quantize_weights", "--quantize_type", "int8_per_channel", "--overwrite"]),
        ("megatron TP=2 -> hf", meg, back,
         ["megatron-to-hf", "--input_dir", meg, "--output_dir", back, "--overwrite", "--num_output_shards", "4"]),
    ]
    try:
        for name, inp, outp, argv in runs:
            dt, base, peak = map(float, run_one(__file__, argv[0], *argv))
            written = sum(p.stat().st_size for p in files_of(outp))
            floor, durable = floor_seconds(inp, written, out / ".floor")
            print(f"{name:22s} {dt:7.1f}s  floor {floor:6.1f}s  ratio {dt / floor:5.2f} (target <= 3)  "
                  f"durable floor {durable:6.1f}s  ratio {dt / durable:5.2f}  "
                  f"peak RssAnon {peak:6.0f} MiB (target < 300; after imports {base:.0f})  "
                  f"in {human(sum(p.stat().st_size for p in files_of(inp)))} out {human(written)}")
    finally:
        if not args.keep:
            for d in (src, meg, js, back):
                shutil.rmtree(d, ignore_errors=True)


def main():
    return per_size_main(__doc__, one, bench_size, "each conversion")


if __name__ == "__main__":
    main()
