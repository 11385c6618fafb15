"""Shared pieces of the benchmarks: a streamed big model, its generation, fresh processes timed with their peak
RssAnon, and an RssAnon sampler."""
from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's ckdiff, installed or not
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


def rss_anon_kib(pid="self") -> int:
    """RssAnon of a process in KiB from /proc (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
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


def add_dir_keep(p, keep_help: str | None = "keep the generated checkpoints") -> None:
    """The ``--dir`` (where the checkpoints are generated) and ``--keep`` options every benchmark has."""
    p.add_argument("--dir", default=str(Path(__file__).parent / "out"))
    p.add_argument("--keep", action="store_true", help=keep_help)


def out_dir(path) -> Path:
    """``path`` made if missing."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def checkout_env() -> dict:
    """This process's environment with this checkout first on PYTHONPATH, for the fresh processes a benchmark
    times."""
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def warm_kernels(env) -> None:
    """numba compiles the kernels once and caches them on disk: done here, so no timed process pays for it."""
    import subprocess
    subprocess.run([sys.executable, "-c", "from ckdiff.compare.kernels import warm; warm()"], env=env, check=True)


def sized_model(gib: float, out: Path, copies: float):
    """(config, lazy tensors, bytes) of a ``sized_config(gib)`` model, after checking ``out`` has room for
    ``copies`` of it."""
    cfg = sized_config(gib)
    tensors = big_hf_tensors(cfg)
    size = sum(t.nbytes for t in tensors.values())
    ensure_space(out, copies * size)
    return cfg, tensors, size


def write_model(path: Path, tensors: dict, cfg, num_shards: int = 1) -> None:
    """An HF directory of ``tensors`` at ``path``, published whole (atomic_dir) or not at all."""
    from ckdiff.io.writers import atomic_dir, write_hf
    with atomic_dir(path, overwrite=True) as tmp:
        write_hf(tmp, tensors, cfg.to_hf(), num_shards=num_shards)


def discard(keep: bool, *paths) -> None:
    """The generated checkpoint directories removed, unless ``--keep`` asked to keep them."""
    if not keep:
        for path in paths:
            shutil.rmtree(path)


def verdict(stdout: str, stderr: str, width: int) -> str:
    """A run's verdict for a table row: its first line of output (of stderr when stdout is empty), cut to
    ``width``."""
    return (stdout.strip().splitlines() or [stderr.strip()])[0][:width]


def files_of(d) -> list:
    return sorted(p for p in Path(d).rglob("*") if p.is_file())


def median(values, key=None):
    """The middle item of ``values`` sorted by ``key`` (the upper one of an even count)."""
    values = sorted(values, key=key)
    return values[len(values) // 2]


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
    while p.poll() is None:
        peak = max(peak, rss_anon_kib(p.pid))
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


def timed_child(argv, env, what: str, tail: int = 800) -> tuple:
    """(seconds after start-up, wall, peak RssAnon MiB, returncode, stdout, stderr) of ``argv``, a fresh process
    that writes ``CKDIFF_BENCH_SECONDS <seconds>`` as its last such line on stderr (``what`` names it when it
    does not, with the last ``tail`` characters of its stderr)."""
    wall, peak, rc, out, err = child_peak_rss_anon(argv, env=env)
    lines = [x for x in err.splitlines() if x.startswith("CKDIFF_BENCH_SECONDS ")]
    if not lines:
        raise SystemExit(f"{what}: no timing ({err.strip()[-tail:]})")
    return float(lines[-1].split()[1]), wall, peak, rc, out, err


def measured(fn):
    """``fn()`` in this process: (its seconds, RssAnon MiB after the imports before it, peak RssAnon MiB, its
    result)."""
    with PeakRssAnon() as m:
        t = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t
    return dt, m.base / 1024, m.peak_mib, res


def run_one(script, what: str, *args) -> list:
    """``script --one ARGS`` in a fresh process (so its peak is its own); the words it printed."""
    import subprocess
    r = subprocess.run([sys.executable, str(script), "--one", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{what} failed:\n{r.stderr[-2000:]}")
    return r.stdout.split()


def per_size_main(doc: str, one, bench_size, steps: str, add=None):
    """The main of a benchmark that measures each step in a fresh process of its own script: ``SCRIPT --one ARGS``
    runs ``one(ARGS)``; else the options (--sizes, what ``add(parser)`` adds, --dir, --keep) are parsed and
    ``bench_size(gib, out dir, args)`` runs for each size."""
    import argparse
    if sys.argv[1:2] == ["--one"]:
        return one(sys.argv[2:])
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,4", help="model sizes in GiB, comma separated")
    if add is not None:
        add(p)
    add_dir_keep(p)
    args = p.parse_args()
    out = out_dir(args.dir)
    print(f"machine: {os.cpu_count()} CPUs; page cache warm; {steps} in a fresh process")
    for gib in (float(s) for s in args.sizes.split(",")):
        bench_size(gib, out, args)
