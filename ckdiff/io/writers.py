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
from typing import Optional, Iterable, Sequence

from ckdiff.errors import CkdiffError, InputError, UsageError
from ckdiff.tensor.lazy import LazyTensor


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # renameat2(2) flags (Linux >= 3.15)
_AT_FDCWD = -100


def _renameat2(src, dst, flags: int) -> None:
    """renameat2(2) through libc; OSError(ENOSYS/EINVAL) where the libc or filesystem lacks it."""
    import ctypes
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 not available")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


def _unsupported(e: OSError) -> bool:
    return e.errno in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist, atomically; FileExistsError if it does.

    renameat2(RENAME_NOREPLACE) where available; otherwise a hard link for a file (link(2) never
    replaces) or, for a directory, mkdir(2) as the claim followed by a rename over that empty claim.
    """
    try:
        return _renameat2(src, dst, RENAME_NOREPLACE)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        if not _unsupported(e):
            raise
    if src.is_dir():
        os.mkdir(dst)  # FileExistsError if someone else has it
        try:
            os.rename(src, dst)  # replaces only our empty claim; ENOTEMPTY if it was written into
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            raise
    else:
        os.link(src, dst)
        os.unlink(src)


def exchange(src: Path, dst: Path) -> bool:
    """Swap ``src`` and ``dst`` atomically (both exist); False where the system cannot."""
    try:
        _renameat2(src, dst, RENAME_EXCHANGE)
        return True
    except OSError as e:
        if _unsupported(e):
            return False
        raise


def _appeared(target: Path) -> UsageError:
    return UsageError(f"output {target} appeared while this run was writing (another process?); "
                      "nothing was replaced; pass --overwrite to replace it")


def _place_dir(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``target``: never replacing anything unless ``overwrite``."""
    if os.path.islink(target):
        raise UsageError(f"output {target} is a symbolic link; refusing to replace it (give the real path)")
    if overwrite and target.is_dir():
        if exchange(tmp, target):  # one atomic step: readers see the old or the new output
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = target.parent / f".{target.name}.ckdiff-old-{os.getpid()}"
        os.rename(target, old)
        try:
            rename_noreplace(tmp, target)
        except FileExistsError:
            raise _appeared(target) from None
        shutil.rmtree(old, ignore_errors=True)
        return
    if target.is_dir():
        try:
            os.rmdir(target)  # an empty directory may be taken over; a non-empty one is refused
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _appeared(target) from None
            raise
    try:
        rename_noreplace(tmp, target)
    except FileExistsError:
        raise _appeared(target) from None


@contextlib.contextmanager
def atomic_dir(target, overwrite: bool = False, inputs: Sequence = ()):
    """Yield a temporary directory that becomes ``target`` on success.

    The final step never replaces an output that appeared meanwhile (rename without replace);
    with ``overwrite`` an existing output is swapped for the new one in one atomic step.
    """
    target = Path(target)
    for src in inputs:
        if src is not None and Path(src).exists() and _overlaps(target, Path(src)):
            raise UsageError(f"output {target} overlaps the input {src}; refusing to write there")
    if os.path.islink(target):
        raise UsageError(f"output {target} is a symbolic link; refusing to replace it (give the real path)")
    if target.exists():
        if not target.is_dir():
            raise UsageError(f"output {target} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise UsageError(f"output directory {target} is not empty; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.ckdiff-tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _place_dir(tmp, target, overwrite)
    finally:
        if tmp.exists():  # failed, interrupted or refused: leave nothing behind
            shutil.rmtree(tmp, ignore_errors=True)


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
    """Write one file through a temporary name beside it (reports).

    With ``overwrite`` the file replaces ``path`` atomically; without, the final rename fails if
    ``path`` exists by then. An unwritable directory or a full disk is a one-line error.
    """
    path = Path(path)
    tmp = None
    try:
        with disk_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            os.close(fd)
            write_fn(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    rename_noreplace(Path(tmp), path)
                except FileExistsError:
                    raise UsageError(f"{path} exists; refusing to replace it") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


class FileJobs:
    """Where a writer's output files are made: at once (one process), or spread over the ranks of a
    ``distributed.Shard`` by bytes, each rank writing its own files into the shared temporary output
    directory. Small marker files (index, config, tracker) are written by rank 0 only (``is_main``)."""

    def __init__(self, shard=None):
        self.shard = shard
        self.jobs: list = []

    @property
    def is_main(self) -> bool:
        return self.shard is None or self.shard.is_main

    def add(self, name: str, nbytes: int, fn) -> None:
        if self.shard is None:
            fn()
        else:
            self.jobs.append((name, nbytes, fn))

    def finish(self) -> None:
        """Run the jobs on their ranks; an error on any rank is raised on every rank."""
        if self.shard is not None:
            self.shard.map([(n, b, lambda fn=fn: bool(fn() or True)) for n, b, fn in self.jobs])
            self.jobs = []


@contextlib.contextmanager
def atomic_output(target, overwrite: bool = False, inputs: Sequence = (), shard=None):
    """``(temporary directory, FileJobs)`` for an output that appears at ``target`` by one rename, once
    every rank's files are written (a failure on any rank leaves no output). Without ``shard`` this is
    ``atomic_dir`` with files written at once."""
    if shard is None:
        with disk_errors(target), atomic_dir(target, overwrite, inputs) as tmp:
            yield tmp, FileJobs()
        return
    from ckdiff.distributed import ABORT_CLEANUP
    files = FileJobs(shard)
    if shard.is_main:
        with disk_errors(target), atomic_dir(target, overwrite, inputs) as tmp:
            ABORT_CLEANUP.add(str(tmp))
            try:
                shard.agree(str(tmp))
                yield tmp, files
                with disk_errors(target):
                    files.finish()
            finally:
                ABORT_CLEANUP.discard(str(tmp))
    else:
        tmp = Path(shard.agree(None))
        with disk_errors(target):
            yield tmp, files
            files.finish()


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


def write_safetensors(path, tensors, metadata=None, progress=None) -> int:
    """io/safetensors.py's streaming writer, imported on first use: it imports torch, which the reports
    written through ``atomic_file`` never need."""
    from ckdiff.io.safetensors import write_safetensors as write
    return write(path, tensors, metadata, progress)


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
             progress_factory=None, files: Optional[FileJobs] = None) -> list[str]:
    """HF safetensors (sharded with an index when asked) plus config.json.

    ``progress_factory(total_bytes)`` returns a callable told the bytes of each chunk written;
    ``files`` spreads the shard files over ranks (``FileJobs``)."""
    files = files or FileJobs()
    items = list(tensors.values())
    progress = _start(progress_factory, sum(t.nbytes for t in items))
    groups = shard_groups(items, num_shards)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)])
    for name, g in zip(names, groups):
        files.add(name, sum(t.nbytes for t in g), lambda name=name, g=g: _write_st(out_dir / name, g, progress))
    if files.is_main:
        if len(groups) > 1:
            write_json(out_dir / "model.safetensors.index.json",
                       {"metadata": {"total_size": sum(t.nbytes for t in items)},
                        "weight_map": {t.name: name for name, g in zip(names, groups) for t in g}})
        write_json(out_dir / "config.json", config)
    _stop(progress)
    return names


def write_meta_like(out_dir: Path, tensors: dict[str, LazyTensor], params: dict, safetensors: bool = True,
                    progress_factory=None, files: Optional[FileJobs] = None):
    """JetStream output: model.safetensors, or consolidated.00.pth + checklist.chk; params.json last.

    Both are streamed one tensor (one row chunk) at a time (one file: one rank writes it)."""
    files = files or FileJobs()
    progress = _start(progress_factory, sum(t.nbytes for t in tensors.values()))
    total = sum(t.nbytes for t in tensors.values())

    def pth():  # the torch.save format JetStream asks for, written tensor by tensor
        from ckdiff.io.torch_zip import TensorSource, write_torch_zip
        write_torch_zip(out_dir / "consolidated.00.pth",
                        {k: TensorSource.rows_of(t) for k, t in tensors.items()}, progress)
        digest = hashlib.md5()
        with open(out_dir / "consolidated.00.pth", "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        (out_dir / "checklist.chk").write_text(digest.hexdigest() + "\n")
    if safetensors:
        files.add("model.safetensors", total, lambda: _write_st(out_dir / "model.safetensors", tensors.values(),
                                                                progress))
    else:
        files.add("consolidated.00.pth", total, pth)
    if files.is_main:
        write_json(out_dir / "params.json", params)
    _stop(progress)


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
    import torch

    from ckdiff.formats.readers import META_SHARDS, meta_variant
    from ckdiff.io.torch_zip import TensorSource, write_torch_zip
    from ckdiff.tensor.lazy import DerivedGroup
    from ckdiff.tensor.ops import Shard, ShardSplit
    files = []
    progress = _start(progress_factory, sum(t.nbytes for t in tensors.values()))
    pieces: dict = {}  # key -> its n_shards lazy pieces (or None: the whole tensor in every shard)
    for k, t in tensors.items():
        how = META_SHARDS.cut(k, meta_variant(llama_version))
        if how in (None, Shard.REPLICATED) or n_shards == 1:
            pieces[k] = None
            continue
        if t.shape[how.axis] % n_shards:
            raise UsageError(f"{k}: {t.shape[how.axis]} on axis {how.axis} does not split into {n_shards} shards")
        pieces[k] = DerivedGroup([t], ShardSplit(how, n_shards)).tensors([k] * n_shards)
    for s in range(n_shards):
        shard: dict = {k: TensorSource.rows_of(t if pieces[k] is None else pieces[k][s])
                       for k, t in tensors.items()}
        if rope_freqs:
            hd = params.get("head_dim") or params["dim"] // params["n_heads"]
            shard["rope.freqs"] = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2).float() / hd))
        name = f"consolidated.{s:02d}.pth"
        write_torch_zip(out_dir / name, shard, progress)
        files.append(name)
    _stop(progress)
    write_json(out_dir / "params.json", params)
    return files
