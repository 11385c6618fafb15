"""Atomic output directories and the HF / Meta / JetStream writers.

Everything is written into a temporary directory beside the target; marker
files (index, params, tracker) are written last, and the directory is renamed
into place only when complete. A refused or failed write leaves the target as
it was; an input is never a write target.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..errors import CkdiffError, InputError, UsageError
from .lazy import LazyTensor
from .safetensors_io import write_safetensors
from .torch_zip import TensorSource, write_torch_zip


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


@contextlib.contextmanager
def atomic_dir(target, overwrite: bool = False, inputs: Sequence = ()):
    """Yield a temporary directory that becomes ``target`` on success."""
    target = Path(target)
    for src in inputs:
        if src is not None and Path(src).exists() and _overlaps(target, Path(src)):
            raise UsageError(f"output {target} overlaps the input {src}; refusing to write there")
    if target.exists():
        if not target.is_dir():
            raise UsageError(f"output {target} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise UsageError(f"output directory {target} is not empty; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.ckdiff-tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.ckdiff-old-{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def disk_errors(where):
    """Turn a full disk or an unwritable target into a one-line error."""
    try:
        yield
    except OSError as e:
        if isinstance(e, CkdiffError):
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InputError(where, "no space left on device; nothing was written") from None
        raise InputError(where, f"write failed: {e.strerror or e}") from None


def atomic_file(path, write_fn, overwrite: bool = True):
    """Write one file through a temporary name beside it (reports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with disk_errors(path):
            write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def shard_groups(tensors: Sequence[LazyTensor], n_shards: int) -> list[list[LazyTensor]]:
    """Split tensors in order into exactly ``n_shards`` non-empty groups of about equal bytes."""
    n = max(1, min(n_shards, len(tensors)))
    cum = [0]
    for t in tensors:
        cum.append(cum[-1] + t.nbytes)
    groups, start = [], 0
    for g in range(n):
        left = n - g
        if left == 1:
            groups.append(list(tensors[start:]))
            break
        target = cum[-1] * (g + 1) / n
        end = start + 1
        while end < len(tensors) - (left - 1) and cum[end] < target:
            end += 1
        groups.append(list(tensors[start:end]))
        start = end
    return groups


def _write_st(path: Path, tensors, progress=None):
    if progress is None:
        return write_safetensors(path, tensors, {"format": "pt"})
    return write_safetensors(path, tensors, {"format": "pt"}, progress=progress)


def _start(progress_factory, total: int):
    return progress_factory(total) if progress_factory is not None else None


def _stop(progress) -> None:
    if progress is not None and hasattr(progress, "stop"):
        progress.stop()


def write_hf(out_dir: Path, tensors: dict[str, LazyTensor], config: dict, num_shards: int = 1,
             progress_factory=None) -> list[str]:
    """HF safetensors (sharded with an index when asked) plus config.json.

    ``progress_factory(total_bytes)`` returns a callable told the bytes of each chunk written."""
    items = list(tensors.values())
    progress = _start(progress_factory, sum(t.nbytes for t in items))
    groups = shard_groups(items, num_shards)
    files = []
    if len(groups) == 1:
        _write_st(out_dir / "model.safetensors", groups[0], progress)
        files.append("model.safetensors")
    else:
        weight_map = {}
        for i, g in enumerate(groups, 1):
            name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            _write_st(out_dir / name, g, progress)
            files.append(name)
            weight_map.update({t.name: name for t in g})
        write_json(out_dir / "model.safetensors.index.json",
                   {"metadata": {"total_size": sum(t.nbytes for t in items)}, "weight_map": weight_map})
    _stop(progress)
    write_json(out_dir / "config.json", config)
    return files


def write_meta_like(out_dir: Path, tensors: dict[str, LazyTensor], params: dict, safetensors: bool = True,
                    progress_factory=None):
    """JetStream output: model.safetensors, or consolidated.00.pth + checklist.chk; params.json last.

    Both are streamed one tensor (one row chunk) at a time."""
    progress = _start(progress_factory, sum(t.nbytes for t in tensors.values()))
    if safetensors:
        _write_st(out_dir / "model.safetensors", tensors.values(), progress)
    else:
        # the torch.save format JetStream asks for, written tensor by tensor
        write_torch_zip(out_dir / "consolidated.00.pth",
                        {k: TensorSource.rows_of(t) for k, t in tensors.items()}, progress)
        digest = hashlib.md5()
        with open(out_dir / "consolidated.00.pth", "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        (out_dir / "checklist.chk").write_text(digest.hexdigest() + "\n")
    _stop(progress)
    write_json(out_dir / "params.json", params)


def copy_if_exists(src_dir: Path | None, names: Iterable[str], out_dir: Path) -> list[str]:
    copied = []
    if src_dir is None:
        return copied
    for n in names:
        p = Path(src_dir) / n
        if p.is_file():
            shutil.copyfile(p, out_dir / n)
            copied.append(n)
    return copied


def write_meta_shards(out_dir: Path, tensors: dict[str, LazyTensor], params: dict, n_shards: int = 1,
                      llama_version: int = 2, rope_freqs: bool = False, progress_factory=None) -> list[str]:
    """Meta consolidated.NN.pth shards (split per the merge table) + params.json last.

    Each shard is streamed in torch's format, one row chunk of one tensor at a time.
    ``llama_version`` picks the embedding split axis (hidden for 1/2, vocab for 3).
    """
    from .formats import meta_axis
    files = []
    progress = _start(progress_factory, sum(t.nbytes for t in tensors.values()))
    for s in range(n_shards):
        shard: dict = {}
        for k, t in tensors.items():
            if k == "tok_embeddings.weight":
                axis = 1 if llama_version < 3 else 0
            else:
                axis = meta_axis(k, t.shape, params, n_shards)
            if axis in (0, 1) and n_shards > 1:
                if t.shape[axis] % n_shards:
                    raise UsageError(f"{k}: {t.shape[axis]} on axis {axis} does not split into {n_shards} shards")
                n = t.shape[axis] // n_shards
                shard[k] = (TensorSource.rows_of(t, [(s * n, (s + 1) * n)]) if axis == 0
                            else TensorSource.rows_of(t, cols=(s * n, (s + 1) * n)))
            else:
                shard[k] = TensorSource.rows_of(t)
        if rope_freqs:
            hd = params["dim"] // params["n_heads"]
            shard["rope.freqs"] = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2).float() / hd))
        name = f"consolidated.{s:02d}.pth"
        write_torch_zip(out_dir / name, shard, progress)
        files.append(name)
    _stop(progress)
    write_json(out_dir / "params.json", params)
    return files
