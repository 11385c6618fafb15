"""Benchmark: checkpoints of 10^6 tensors (a header-heavy file: every tensor two float32 values).

What a user sees on a model with a huge number of small tensors (per-expert scales, per-channel biases):
the per-tensor costs of reading a header, lining the sides up, comparing and reporting, with nothing to
stream. Cases: ``A A`` (identical), ``A B`` (one tensor differs), ``A B --json`` (every row in the
report), ``A B --html --junit`` (page-sized reports, rows bounded), ``inspect A``, and ``inspect`` of a
DCP checkpoint of 10^6 one-chunk tensors. Figures per row: wall, user + system CPU and peak RSS of that
process (``wait4``).

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


def write_dcp(root: Path, n: int) -> None:
    """A DCP directory of ``n`` one-chunk [2] float32 tensors. ``.metadata`` is pickled from DCP's own
    classes with one object per entry, as torch's FileSystemWriter writes them (its ``dcp.save`` needs
    about a millisecond an item: hours for 10^6); the data file holds ``n`` copies of one real
    ``torch.save`` archive, one per chunk, at the offsets the metadata names."""
    import io
    import pickle
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)
    root.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(torch.randn(2), buf)
    arc = buf.getvalue()
    with open(root / "__0_0.distcp", "wb") as f:
        for i in range(0, n, 1000):
            f.write(arc * min(1000, n - i))
    sdm, storage = {}, {}
    for i in range(n):
        fqn = f"model.t{i}.weight"
        sdm[fqn] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([2]),
                                         [ChunkStorageMetadata(torch.Size([0]), torch.Size([2]))])
        storage[MetadataIndex(fqn, torch.Size([0]), 0)] = _StorageInfo("__0_0.distcp", i * len(arc), len(arc))
    with open(root / ".metadata", "wb") as f:
        pickle.dump(Metadata(state_dict_metadata=sdm, storage_data=storage), f)


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
    p.add_argument("--make-dcp", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_dcp:
        write_dcp(Path(args.make_dcp), args.n)
        return
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    a, b = d / f"a-{args.n}.safetensors", d / f"b-{args.n}.safetensors"
    for path, flip in ((a, False), (b, True)):
        if not path.exists():
            write(path, args.n, flip)
    dcp = d / f"dcp-{args.n}"
    if not (dcp / ".metadata").exists():  # in a process of its own: a child's ru_maxrss starts at its parent's peak
        subprocess.run([sys.executable, __file__, "--make-dcp", str(dcp), "--n", str(args.n)], check=True)
    print(f"{args.n} tensors per file, {a.stat().st_size / 2**20:.0f} MiB each; DCP .metadata "
          f"{(dcp / '.metadata').stat().st_size / 2**20:.0f} MiB")
    print(f"{'case':<20}{'wall':>8}{'cpu':>8}{'peak RSS':>12}  rc")
    for name, argv in (("A A", [a, a, "-q"]), ("A B", [a, b, "-q"]),
                       ("A B --json", [a, b, "-q", "--json", d / "r.json"]),
                       ("A B --html --junit", [a, b, "-q", "--html", d / "r.html", "--junit", d / "r.xml"]),
                       ("inspect A", ["inspect", a]), ("inspect DCP", ["inspect", dcp])):
        wall, cpu, rss, rc = run(argv)
        print(f"{name:<20}{wall:>7.1f}s{cpu:>7.1f}s{rss:>9.0f} MiB  {rc}")
    if not args.keep:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
