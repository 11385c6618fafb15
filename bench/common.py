"""Shared pieces of the benchmarks: a streamed big model and an RssAnon sampler."""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ckdiff, installed or not
from ckdiff.models.config import ModelConfig  # noqa: E402
from ckdiff.tensor.lazy import LazyTensor  # noqa: E402

# ~1.7 GB in bfloat16: Llama-shaped, GQA (H=16, K=4), 16 layers
BIG = ModelConfig("llama", hidden=2048, layers=16, heads=16, kv_heads=4, head_dim=128, ffn=5632, vocab=32000,
                  dtype="bfloat16", max_pos=2048)


class RandomTensor(LazyTensor):
    """Random data made on load (seeded by name), so a model is never held whole."""

    def __init__(self, name, shape, dtype, seed):
        super().__init__(name, shape, dtype, "<bench>")
        self.seed = seed

    def load(self):
        g = torch.Generator().manual_seed(self.seed)
        return (torch.randn(self.shape, generator=g) * 0.02).to(self.dtype)


def big_hf_tensors(cfg=BIG):
    from ckdiff.golden.models import hf_state
    tiny = ModelConfig(**{**cfg.to_dict(), "hidden": 8, "heads": 2, "kv_heads": 1, "head_dim": 4, "ffn": 8,
                          "vocab": 8, "layers": cfg.layers})
    names = list(hf_state(tiny))
    D, F, V, q, kv = cfg.hidden, cfg.ffn, cfg.vocab, cfg.q_rows, cfg.kv_rows
    shapes = {"embed_tokens": (V, D), "q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q),
              "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F), "lm_head": (V, D)}
    out = {}
    for i, n in enumerate(names):
        shape = next((s for k, s in shapes.items() if k in n), (D,))
        out[n] = RandomTensor(n, shape, torch.bfloat16, i)
    return out


def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


class PeakRssAnon:
    """Samples RssAnon every few ms in a thread; ``peak`` in MiB above the starting level too."""

    def __enter__(self):
        self.base = rss_anon_kib()
        self.peak_kib = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak_kib = max(self.peak_kib, rss_anon_kib())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak_kib = max(self.peak_kib, rss_anon_kib())

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024

    @property
    def growth_mib(self) -> float:
        return (self.peak_kib - self.base) / 1024


def read_bytes_seconds(paths, block=32 << 20) -> float:
    buf = bytearray(block)
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t


def human(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def prepare(copies: int, description: str = ""):
    """Parse --dir/--keep, create the directory and check room for ``copies`` of the big model.
    Returns (args, out dir, lazy tensors, model bytes)."""
    import argparse
    from pathlib import Path
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dir", default=str(Path(__file__).parent / "out"))
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = p.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = big_hf_tensors()
    size = sum(t.nbytes for t in tensors.values())
    ensure_space(out, copies * size)
    return args, out, tensors, size


def ensure_space(path, need: int):
    st = os.statvfs(path)
    if st.f_bavail * st.f_frsize < need * 1.2:
        raise SystemExit(f"not enough free space in {path} for {human(need)}")


def sized_config(gib: float) -> ModelConfig:
    """A Llama-shaped bf16 config (GQA) of about ``gib`` GiB: 2048 wide (16/4 heads) below 2 GiB,
    else 7B-shaped layers (4096 wide, 32/8 heads, FFN 11008); the layer count sets the size."""
    if gib < 2:
        D, H, K, F = 2048, 16, 4, 5632
    else:
        D, H, K, F = 4096, 32, 8, 11008
    V, hd = 32000, 128
    per_layer = D * (H * hd * 2 + K * hd * 2) + 3 * D * F + 2 * D
    layers = max(1, round((gib * 2**30 / 2 - 2 * V * D - D) / per_layer))
    return ModelConfig("llama", hidden=D, layers=layers, heads=H, kv_heads=K, head_dim=hd, ffn=F, vocab=V,
                       dtype="bfloat16", max_pos=2048)


def child_peak_rss_anon(argv, env=None, poll=0.005):
    """Run ``argv``; (wall seconds, peak RssAnon MiB sampled from /proc, returncode, stdout, stderr)."""
    import subprocess
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = 0
    status = f"/proc/{p.pid}/status"
    while p.poll() is None:
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]))
                        break
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(poll)
    out, err = p.communicate()
    return time.perf_counter() - t, peak / 1024, p.returncode, out.decode(), err.decode()


def cat_seconds(paths) -> float:
    """Best of three `cat FILES > /dev/null` (page cache warm after the first)."""
    import subprocess
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
        best = min(best, time.perf_counter() - t)
    return best
