"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` + ``*.distcp``, read lazily.

Facts (checked against torch 2.13's ``torch/distributed/checkpoint/filesystem.py`` and
``metadata.py``):

- ``.metadata`` is a plain pickle of ``Metadata``. It is unpickled under the DCP metadata policy
  of io/unpickle.py: DCP's own metadata and planner dataclasses (megatron-core stores its
  ``SavePlan``s there) as data, ``torch.Size``, dtypes, the layout lookup
  ``torch.serialization._get_layout`` and paths; anything else is refused with one line naming the file.
- ``Metadata.state_dict_metadata[fqn]`` is a ``TensorStorageMetadata`` (global ``size``,
  ``properties.dtype``, ``chunks`` of ``offsets``/``sizes``) or a ``BytesStorageMetadata``
  (a pickled object, not a tensor).
- ``Metadata.storage_data[MetadataIndex(fqn, chunk.offsets)]`` is a ``_StorageInfo``
  (``relative_path``, ``offset``, ``length``, optional ``transform_descriptors``).
- Each tensor chunk is a complete ``torch.save`` archive in that byte range
  (``_write_item``: ``torch.save(data, stream)``); its ``data.pkl`` is read under the torch policy of
  io/unpickle.py, which locates the chunk's storage in the file. BYTE_IO items are the raw bytes.

A tensor is assembled from its chunks on demand: ``rows(lo, hi)`` (and ``box``) read only the
chunks that intersect the requested range.
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import torch

from ckdiff.errors import InputError
from ckdiff.io.inputs import inside_root, open_input
from ckdiff.tensor.lazy import Checkpoint, LazyTensor

METADATA = ".metadata"
SUFFIX = ".distcp"


def dcp_class(name: str) -> type:
    """The stand-in the DCP metadata policy reads torch's DCP dataclass ``name`` as (io/dcp_pickle.py)."""
    from ckdiff.io.unpickle import policy
    return next(s for c, s in policy("dcp").slims.items() if c.__name__ == name)


def read_metadata(path: Path):
    """The ``Metadata`` object of a DCP ``.metadata`` file, unpickled under the DCP metadata policy
    (io/unpickle.py): DCP's metadata and planner dataclasses as data, nothing else."""
    from ckdiff.io.inputs import read_input
    from ckdiff.io.unpickle import MAX_PICKLE_BYTES, load_pickle_bytes
    md = load_pickle_bytes(read_input(path, MAX_PICKLE_BYTES), path, "dcp", "DCP metadata")
    if not isinstance(md, dcp_class("Metadata")) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise InputError(path, f"not a DCP Metadata object (found {type(md).__name__})")
    if not isinstance(md.storage_data, dict):
        raise InputError(path, "DCP metadata has no storage_data: it was not written by FileSystemWriter")
    return md


# ---------------------------------------------------------------- byte ranges
class _Chunk:
    __slots__ = ("offsets", "sizes", "file", "offset", "length", "transforms", "raw")

    def __init__(self, offsets, sizes, file, offset, length, transforms):
        self.raw = None  # (data start, element strides) once located
        self.offsets, self.sizes = tuple(int(x) for x in offsets), tuple(int(x) for x in sizes)
        self.file, self.offset, self.length, self.transforms = file, int(offset), int(length), tuple(transforms or ())


def read_range(file: Path, offset: int, length: int, transforms=()) -> bytes:
    if transforms:
        raise InputError(file, f"DCP stream transform {list(transforms)} is not supported (only untransformed "
                               "torch.save chunks are read)")
    try:
        with open_input(file) as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as e:
        raise InputError(file, f"cannot read: {e.strerror or e}") from None
    if len(data) != length:
        raise InputError(file, f"short read: {len(data)} of {length} bytes at offset {offset}")
    return data


# Archive layouts already read through the torch policy: a checkpoint's chunks of one shape and dtype are
# archives laid out alike (the same data.pkl, the same records at the same places), so the element
# offset and strides found for the first hold for every archive of the same layout.
_LAYOUTS: dict = {}
_MAX_LAYOUTS = 1 << 12
_CD_ENTRY = struct.Struct("<4s6H3I5H2I")  # a zip central-directory entry (46 bytes)


def _archive_layout(c: "_Chunk", dtype):
    """A key naming everything the torch-policy read of the chunk's archive depends on, read from its zip
    directory without unpickling: the chunk's shape and dtype, data.pkl's bytes, every record's name,
    method, sizes and place (and the CRC of its byteorder record), the data records' local
    header lengths. None where the archive is not laid out as torch.save writes it (the directory right
    before its end records, no comment, no zip64 sizes): the full read then decides."""
    try:
        with open_input(c.file) as f:
            fd = f.fileno()
            tail = os.pread(fd, min(c.length, 8192), c.offset + c.length - min(c.length, 8192))
            if len(tail) < 22 or tail[-22:-18] != b"PK\x05\x06" or tail[-2:] != b"\x00\x00":
                return None
            n, size, at = struct.unpack("<HII", tail[-12:-2])
            gap = c.length - 22 - (at + size)  # torch writes zip64 end records (56 + 20 bytes) between them
            if gap not in (0, 76) or (gap and tail[-98:-94] != b"PK\x06\x06") or size + 22 + gap > len(tail):
                return None
            end = len(tail) - 22 - gap
            cd, pos, entries, pkl, data = tail[end - size:end], 0, [], None, []
            for _ in range(n):
                e = _CD_ENTRY.unpack_from(cd, pos)
                if e[0] != b"PK\x01\x02":
                    return None
                name = cd[pos + 46:pos + 46 + e[10]]
                crc, csize, usize, lho = e[7], e[8], e[9], e[16]
                if 0xFFFFFFFF in (csize, usize, lho) or lho + 30 > at:
                    return None
                is_data = b"/data/" in name
                # the byteorder record is the one other record the full read looks into (serialization_id
                # and the version records differ from save to save and are not read)
                entries.append((name, e[4], csize, usize, lho, crc if name.endswith(b"/byteorder") else None))
                if name.endswith(b"data.pkl"):
                    pkl = (lho, usize)
                elif is_data:
                    data.append(lho)
                pos += 46 + e[10] + e[11] + e[12]
            if pkl is None or pkl[1] > 1 << 20:
                return None
            heads = []
            for lho in [pkl[0], *data]:
                h = os.pread(fd, 30, c.offset + lho)
                if len(h) != 30 or h[:4] != b"PK\x03\x04":
                    return None
                heads.append(struct.unpack("<HH", h[26:30]))
            start = c.offset + pkl[0] + 30 + sum(heads[0])
            body = os.pread(fd, pkl[1], start)
            if len(body) != pkl[1]:
                return None
    except (OSError, struct.error):
        return None
    return (c.sizes, str(dtype), c.length, body, tuple(entries), tuple(heads))


def _locate(c: "_Chunk", name: str, dtype):
    """(absolute byte offset of the chunk's first element, element strides): the chunk's archive is
    read under the torch policy (io/unpickle.py), which maps its storage and checks its layout; an
    archive laid out like one read before (``_archive_layout``) reuses what that read found."""
    from ckdiff.io.unpickle import load_torch
    if c.transforms:
        raise InputError(c.file, f"DCP stream transform {list(c.transforms)} is not supported (only "
                                 "untransformed torch.save chunks are read)")
    key = _archive_layout(c, dtype)
    hit = _LAYOUTS.get(key) if key is not None else None
    if hit is not None:
        return c.offset + hit[0], hit[1]
    found = _locate_read(c, name, dtype, load_torch)
    if key is not None:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = (found[0] - c.offset, found[1])
    return found


def _locate_read(c: "_Chunk", name: str, dtype, load_torch):
    t = load_torch(c.file, (c.offset, c.length), f"chunk of {name!r} at offset {c.offset}")
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != c.sizes or t.dtype != dtype:
        got = f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise InputError(c.file, f"chunk of {name!r} at offset {c.offset} holds {got}, metadata says "
                                 f"{list(c.sizes)} {dtype}")
    from ckdiff.io.unpickle import file_offset
    return file_offset(t), tuple(t.stride())


def _read_chunk_box(c: "_Chunk", lo, hi, name: str, dtype) -> torch.Tensor:
    """``chunk[lo:hi]`` (local box): the span of bytes from its first to its last element."""
    if c.raw is None:
        c.raw = _locate(c, name, dtype)
    start, strides = c.raw
    first = sum(a * s for a, s in zip(lo, strides))
    n = sum((b - 1) * s for b, s in zip(hi, strides)) - first + 1 if all(b > a for a, b in zip(lo, hi)) else 0
    buf = bytearray(read_range(c.file, start + first * dtype.itemsize, n * dtype.itemsize))
    flat = torch.frombuffer(buf, dtype=dtype, count=n) if n else torch.empty(0, dtype=dtype)
    return torch.as_strided(flat, [b - a for a, b in zip(lo, hi)], strides) if n else \
        torch.empty([b - a for a, b in zip(lo, hi)], dtype=dtype)


class DcpTensor(LazyTensor):
    """A DCP tensor at its global shape, assembled from the chunks that intersect a read."""

    def __init__(self, name, shape, dtype, chunks: list, origin: str):
        super().__init__(name, shape, dtype, origin)
        self.chunks = chunks

    def box(self, lo, hi) -> torch.Tensor:
        """The sub-tensor ``[lo[d]:hi[d]]`` on every dim, reading only the chunks it touches."""
        out = torch.empty([h - l for l, h in zip(lo, hi)], dtype=self.dtype)
        if out.numel() == 0:
            return out
        for c in self.chunks:
            a = [max(l, o) for l, o in zip(lo, c.offsets)]
            b = [min(h, o + s) for h, o, s in zip(hi, c.offsets, c.sizes)]
            if any(x >= y for x, y in zip(a, b)):
                continue
            src = _read_chunk_box(c, [x - o for x, o in zip(a, c.offsets)], [y - o for y, o in zip(b, c.offsets)],
                                  self.name, self.dtype)
            out[tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))] = src
        return out

    def load(self) -> torch.Tensor:
        if not self.shape:
            return self.box((), ()) if not self.chunks else _read_chunk_box(self.chunks[0], (), (), self.name, self.dtype).clone()
        return self.box((0,) * len(self.shape), self.shape)

    def rows(self, start, stop) -> torch.Tensor:
        if not self.shape:
            return self.load().reshape(1)
        return self.box((start,) + (0,) * (len(self.shape) - 1), (stop,) + self.shape[1:])


class SubTensor(LazyTensor):
    """``base[index]`` for a leading index tuple (one layer of a layer-stacked Megatron key)."""

    def __init__(self, name: str, base: DcpTensor, index: tuple):
        super().__init__(name, base.shape[len(index):], base.dtype, base.origin)
        self.base, self.index = base, tuple(index)

    def _box(self, lo, hi):
        i = self.index
        return self.base.box(i + tuple(lo), tuple(x + 1 for x in i) + tuple(hi)).reshape(
            [h - l for l, h in zip(lo, hi)])

    def load(self):
        return self._box((0,) * len(self.shape), self.shape)

    def rows(self, start, stop):
        if not self.shape:
            return self.load().reshape(1)
        return self._box((start,) + (0,) * (len(self.shape) - 1), (stop,) + self.shape[1:])


def _inside(root: Path, rel: str) -> Path:
    p = inside_root(root, rel)
    if not p.is_file():
        raise InputError(root / METADATA, f"names data file {rel!r}, which is missing or not a regular file")
    return p


def read_dcp_entries(root: Path):
    """(tensors: name -> DcpTensor, byte items: name -> (file, offset, length), metadata)."""
    mpath = root / METADATA
    md = read_metadata(mpath)
    BytesStorageMetadata, TensorStorageMetadata = dcp_class("BytesStorageMetadata"), dcp_class("TensorStorageMetadata")
    by_fqn: dict = {}
    for idx, info in md.storage_data.items():
        fqn = getattr(idx, "fqn", None)
        if not isinstance(fqn, str) or not isinstance(getattr(info, "relative_path", None), str):
            raise InputError(mpath, "storage_data entry without a name or file")
        by_fqn.setdefault(fqn, []).append((idx, info))
    files: dict = {}  # relative path -> (path, size)
    tensors: dict[str, LazyTensor] = {}
    items: dict = {}
    for fqn, smd in md.state_dict_metadata.items():
        entries = by_fqn.get(fqn, [])
        if isinstance(smd, BytesStorageMetadata):
            if len(entries) != 1:
                raise InputError(mpath, f"byte item {fqn!r} has {len(entries)} storage entries, expected 1")
            info = entries[0][1]
            items[fqn] = (_inside(root, info.relative_path), int(info.offset), int(info.length),
                          tuple(getattr(info, "transform_descriptors", None) or ()))
            continue
        if not isinstance(smd, TensorStorageMetadata):
            raise InputError(mpath, f"entry {fqn!r} is {type(smd).__name__}, not tensor or bytes metadata")
        shape = tuple(int(s) for s in smd.size)
        dtype = smd.properties.dtype
        if not isinstance(dtype, torch.dtype):
            raise InputError(mpath, f"tensor {fqn!r} has no torch dtype")
        where = {tuple(int(x) for x in (i.offset or ())): info for i, info in entries}
        chunks, vol = [], 0
        for c in smd.chunks:
            off = tuple(int(x) for x in c.offsets)
            info = where.get(off)
            if info is None:
                raise InputError(mpath, f"tensor {fqn!r}: chunk at {list(off)} has no storage entry")
            if len(off) != len(shape) or len(c.sizes) != len(shape) or any(
                    o < 0 or s < 0 or o + s > n for o, s, n in zip(off, c.sizes, shape)):
                raise InputError(mpath, f"tensor {fqn!r}: chunk {list(off)}+{list(c.sizes)} lies outside {list(shape)}")
            if info.relative_path not in files:  # each data file resolved and measured once
                p = _inside(root, info.relative_path)
                files[info.relative_path] = (p, p.stat().st_size)
            f, fsize = files[info.relative_path]
            if int(info.offset) < 0 or int(info.length) < 0 or int(info.offset) + int(info.length) > fsize:
                raise InputError(f, f"chunk of {fqn!r} runs past the end of the file")
            need = math.prod(int(s) for s in c.sizes) * dtype.itemsize
            if int(info.length) < need:  # the archive holds the chunk's bytes: a 1 KB chunk never claims 1 TiB
                raise InputError(f, f"chunk of {fqn!r} at {list(off)} claims {list(c.sizes)} {dtype} ({need} bytes) "
                                    f"in an archive of {int(info.length)} bytes")
            chunks.append(_Chunk(off, c.sizes, f, info.offset, info.length,
                                 getattr(info, "transform_descriptors", None)))
            vol += math.prod(int(s) for s in c.sizes)
        if vol != math.prod(shape):
            raise InputError(mpath, f"tensor {fqn!r}: its chunks hold {vol} elements, its global shape "
                                    f"{list(shape)} has {math.prod(shape)} (overlapping or missing chunks)")
        problem = tiling_problem(shape, [(c.offsets, c.sizes) for c in chunks])
        if problem:
            raise InputError(mpath, f"tensor {fqn!r}: {problem}")
        tensors[fqn] = DcpTensor(fqn, shape, dtype, chunks, str(root))
    return tensors, items, md


PAIRWISE_MAX = 4096  # chunks of one tensor checked pair by pair; more must form a grid


def tiling_problem(shape, boxes) -> str | None:
    """Why chunks ``boxes`` ((offsets, sizes), each inside ``shape``, volumes adding up to the tensor's)
    do not tile the tensor exactly, or None. With the volumes equal, no overlap means no gap: up to
    ``PAIRWISE_MAX`` chunks are checked pair by pair; more must form a product grid (each dimension cut
    into intervals that tile it, every combination present once), as every DCP writer cuts them."""
    import numpy as np
    n = len(boxes)
    if n <= 1 or not shape:
        return None if n == 1 or not shape else "has no chunks"
    if any(0 in sz for _, sz in boxes):
        return "has an empty chunk"
    lo = np.array([o for o, _ in boxes], dtype=np.int64)
    hi = lo + np.array([sz for _, sz in boxes], dtype=np.int64)
    if n <= PAIRWISE_MAX:
        overlap = np.ones((n, n), dtype=bool)
        for d in range(len(shape)):
            overlap &= (lo[:, d][:, None] < hi[:, d][None, :]) & (lo[:, d][None, :] < hi[:, d][:, None])
        np.fill_diagonal(overlap, False)
        if overlap.any():
            i, j = (int(x) for x in np.argwhere(overlap)[0])
            return (f"chunks at {lo[i].tolist()} and {lo[j].tolist()} overlap (the chunks must tile the tensor: "
                    "some elements are covered twice, others by none)")
        return None
    count = 1
    for d, extent in enumerate(shape):
        cuts = sorted(set(zip(lo[:, d].tolist(), hi[:, d].tolist())))
        at = 0
        for a, b in cuts:
            if a != at:
                return f"chunks along dimension {d} do not tile it ({n} chunks: too many to check pair by pair " \
                       "unless they form a grid)"
            at = b
        if at != extent:
            return f"chunks along dimension {d} end at {at}, not {extent}"
        count *= len(cuts)
    if count != n or len({tuple(r) for r in lo.tolist()}) != n:
        return f"{n} chunks do not form a grid (too many to check pair by pair)"
    return None


def load_byte_item(item, what: str) -> bytes:
    f, off, n, tr = item
    return read_range(f, off, n, tr)


def is_dcp_dir(p: Path) -> bool:
    return p.is_dir() and (p / METADATA).is_file() and any(
        f.suffix == SUFFIX for f in p.iterdir() if not f.name.startswith("."))


# A trainer saves ``{"model": model_sd, "optimizer": optim_sd, "step": n, ...}`` and DCP flattens the nested
# dicts into dotted names. The model is the one top-level sub-tree named here; the others are trainer state.
MODEL_TREES = ("model", "module", "model_state_dict")
TRAINER_STATE = ("optimizer", "optim", "optimizer_state_dict", "step", "epoch", "lr_scheduler", "scheduler",
                 "dataloader", "data_loader", "train_state", "rng_state", "rng", "grad_scaler", "extra_state")


def model_subtree(names) -> str | None:
    """The prefix (``"model."``) of the single model sub-tree of a trainer checkpoint: the top-level
    components of ``names`` are one of MODEL_TREES plus trainer state only; None otherwise."""
    tops = {n.split(".", 1)[0] for n in names}
    models = tops & set(MODEL_TREES)
    if len(models) != 1 or len(tops) < 2 or not tops - models <= set(TRAINER_STATE):
        return None
    return next(iter(models)) + "."


def select_prefix(ck: Checkpoint, prefix: str, why: str) -> Checkpoint:
    """Only the tensors named ``prefix...``, with the prefix stripped; the others skipped, summarised by
    top-level component in one note."""
    keep = {k[len(prefix):]: t for k, t in ck.tensors.items() if k.startswith(prefix)}
    if not keep:
        raise InputError(ck.path, f"no tensor is named {prefix!r}... ({why}); top-level names: "
                                  f"{', '.join(sorted({k.split('.', 1)[0] for k in ck.tensors}))[:200]}")
    for k, t in keep.items():
        t.name = k
    skipped = dict(ck.meta.get("skipped", {}))
    counts: dict = {}
    for k in [*ck.tensors, *skipped]:
        if not k.startswith(prefix):
            top = k.split(".", 1)[0].split("/", 1)[0]
            counts[top] = counts.get(top, 0) + 1
            skipped.setdefault(k, f"outside the model sub-tree {prefix!r}")
    skipped = {k: v for k, v in skipped.items() if not k.startswith(prefix)}
    what = ", ".join(f"{top} ({n} {'entry' if n == 1 else 'entries'})" for top, n in sorted(counts.items()))
    notes = list(ck.meta.get("notes", [])) + [f"read the sub-tree {prefix!r} ({len(keep)} tensors, {why}); "
                                              f"skipped: {what or 'nothing'}"]
    return Checkpoint(ck.path, ck.format, keep, ck.config,
                      {**ck.meta, "skipped": skipped, "notes": notes, "prefix": prefix})


def read_dcp(p: Path, prefix: str | None = None, **_) -> Checkpoint:
    """A DCP directory's tensors. ``prefix`` reads one sub-tree (``"model."``); without it, a trainer
    checkpoint with a single model sub-tree next to optimizer/step state is read as that sub-tree."""
    tensors, items, _md = read_dcp_entries(p)
    files = sorted({str(c.file) for t in tensors.values() for c in t.chunks})
    ck = Checkpoint(str(p), "dcp", tensors,
                    meta={"files": files, "skipped": {k: "non-tensor (BYTE_IO) item" for k in items}})
    if prefix:
        return select_prefix(ck, prefix, "--prefix")
    auto = model_subtree([*tensors, *items])
    return select_prefix(ck, auto, "the only model sub-tree of a trainer checkpoint") if auto else ck


# ---------------------------------------------------------------- declaration (formats/registry.py)
def _declare() -> None:
    from ckdiff.formats.registry import Format, register
    register(Format("dcp", "torch.distributed.checkpoint directory: .metadata + *.distcp (read without a process "
                           "group)", is_dcp_dir, read_dcp, priority=20))


_declare()


__all__ = ["read_dcp", "model_subtree", "select_prefix", "read_dcp_entries", "read_metadata", "DcpTensor", "SubTensor", "is_dcp_dir"]
