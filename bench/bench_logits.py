"""Benchmark: ``ckdiff logits`` (HF vs Megatron TP=2) at two model sizes (generated, never committed).

For each size (default about 1 and 4 GiB of bf16 Llama-shaped weights, GQA), an HF
checkpoint is generated and converted to Megatron-LLM at TP=2; then ``ckdiff logits``
of the pair runs in a fresh process and prints its wall time and peak anonymous
memory (RssAnon) next to its target: one layer's weights in the compute dtype (each
side's runtime holds one layer at a time, the two sides run layer by layer in step)
plus activations, over the interpreter's own RssAnon.

    python bench/bench_logits.py [--sizes 1,4] [--dtype float32] [--dir bench/out] [--keep]
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import human, measured, per_size_main, run_one, sized_model, write_model  # noqa: E402


def one(argv):
    """``ckdiff logits A B`` here (``argv``: A, B, dtype); print seconds, RssAnon after imports, peak, verdict."""
    a, b, dtype = argv[:3]
    from ckdiff.compare.logits import compare_logits
    from ckdiff.formats.readers import open_checkpoint
    dt, base, peak, res = measured(lambda: compare_logits(open_checkpoint(a), open_checkpoint(b), dtype=dtype))
    print(dt, base, peak, res.verdict())


def bench_size(gib: float, out: Path, args) -> None:
    dtype = args.dtype
    import torch

    from ckdiff.convert import api
    cfg, tensors, size = sized_model(gib, out, 2.2)
    src, meg = out / f"logits-hf-{gib:g}g", out / f"logits-meg-{gib:g}g"
    try:
        write_model(src, tensors, cfg, num_shards=4)
        api.hf_to_megatron("llama2", meg, model_path=src, tp=2, overwrite=True)
        layer = sum(t.numel for n, t in tensors.items() if ".layers.0." in n)
        item = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        dt, base, peak, verdict = run_one(__file__, "logits", src, meg, dtype)
        dt, base, peak = float(dt), float(base), float(peak)
        target = base + layer * item / 2**20
        print(f"\n== {human(size)} model: {cfg.layers} layers, hidden {cfg.hidden}; HF vs Megatron TP=2, "
              f"{dtype} compute, 4 x 48 tokens")
        print(f"ckdiff logits {dt:7.1f}s ({size * 2 / dt / 2**30:.2f} GiB/s of weights)  verdict {verdict}  "
              f"peak RssAnon {peak:6.0f} MiB (after imports {base:.0f}; one layer in {dtype} is "
              f"{human(layer * item)}, so about {target:.0f} MiB + activations)")
    finally:
        if not args.keep:
            for d in (src, meg):
                shutil.rmtree(d, ignore_errors=True)


def main():
    return per_size_main(__doc__, one, bench_size, "logits",
                         lambda p: p.add_argument("--dtype", default="float32", help="compute dtype"))


if __name__ == "__main__":
    main()
