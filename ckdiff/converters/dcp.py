"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` + ``*.distcp``, read lazily.

Facts (checked against torch 2.13's ``torch/distributed/checkpoint/filesystem.py`` and
``metadata.py``; see /work/shared/specs/formats-today.md section 1):

- ``.metadata`` is a plain pickle of ``Metadata``. It is unpickled here by a restricted
  unpickler that resolves only DCP's own metadata classes (plus ``torch.Size``, dtypes, the
  layout lookup ``torch.serialization._get_layout`` and ``pathlib`` paths); anything else is
  refused with one line naming the file.
- ``Metadata.state_dict_metadata[fqn]`` is a ``TensorStorageMetadata`` (global ``size``,
  ``properties.dtype``, ``chunks`` of ``offsets``/``sizes``) or a ``BytesStorageMetadata``
  (a pickled object, not a tensor).
- ``Metadata.storage_data[MetadataIndex(fqn, chunk.offsets)]`` is a ``_StorageInfo``
  (``relative_path``, ``offset``, ``length``, optional ``transform_descriptors``).
- Each tensor chunk is a complete ``torch.save`` archive in that byte range
  (``_write_item``: ``torch.save(data, stream)``); it is read with ``torch.load(weights_only=True)``
  of just those bytes. BYTE_IO items are the raw bytes.

A tensor is assembled from its chunks on demand: ``rows(lo, hi)`` (and ``box``) read only the
chunks that intersect the requested range.
"""
from __future__ import annotations

import io
import math
import pathlib
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import InputError
from .inputs import open_input
from .lazy import Checkpoint, LazyTensor

METADATA = ".metadata"
SUFFIX = ".distcp"


class _Stub:
    """Stands in for an allowlisted class that is not importable here (Megatron's empty
    ``MCoreMetadata``/``MCoreSavePlan`` markers); keeps whatever state it is given."""

    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)


def _allowed() -> dict:
    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md
    ok = {("torch.distributed.checkpoint.metadata", n): getattr(md, n) for n in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
        "StorageMeta", "TensorProperties", "_MEM_FORMAT_ENCODING") if hasattr(md, n)}
    ok[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = fs._StorageInfo
    # megatron-core's torch_dist writer keeps every rank's save plan on the Metadata (``all_local_plans``):
    # plain dataclasses and one enum of the planner module, rebuilt as data (their pickles name no callable)
    from torch.distributed.checkpoint import planner as pl
    for n in ("SavePlan", "WriteItem", "TensorWriteData", "WriteItemType"):
        ok[("torch.distributed.checkpoint.planner", n)] = getattr(pl, n)
    try:  # older writers pickled TensorProperties from the sharded-tensor package
        from torch.distributed._shard.sharded_tensor import metadata as old
        ok[("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties")] = old.TensorProperties
        ok[("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING")] = old.MEM_FORMAT_ENCODING
    except ImportError:
        pass
    ok[("torch", "Size")] = torch.Size
    ok[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a lookup by name only
    for n in dir(torch):
        if isinstance(getattr(torch, n, None), torch.dtype):
            ok[("torch", n)] = getattr(torch, n)
    for n in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        ok[("pathlib", n)] = getattr(pathlib, n)
    ok[("collections", "OrderedDict")] = OrderedDict
    for n in ("MCoreMetadata", "MCoreSavePlan"):
        ok[("megatron.core.dist_checkpointing.strategies.torch", n)] = _Stub
    return ok


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f)
        self._ok = _allowed()
        self._path = path

    def find_class(self, module, name):
        cls = self._ok.get((module, name))
        if cls is None:
            raise InputError(self._path, f"refused to unpickle: {module}.{name} is not a DCP metadata class "
                                         "(only torch.distributed.checkpoint's own metadata types are read)")
        return cls

    def persistent_load(self, pid):
        raise InputError(self._path, "refused to unpickle: persistent ids have no place in DCP metadata")


def read_metadata(path: Path):
    """The ``Metadata`` object of a DCP ``.metadata`` file, unpickled with the allowlist only."""
    from torch.distributed.checkpoint.metadata import Metadata
    try:
        with open_input(path) as f:
            md = _MetadataUnpickler(f, path).load()
    except InputError:
        raise
    except PermissionError as e:
        raise InputError(path, f"cannot read: {e.strerror}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise InputError(path, f"not a DCP metadata pickle ({e.__class__.__name__}: {str(e)[:120]})") from None
    if not isinstance(md, Metadata) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise InputError(path, f"not a DCP Metadata object (found {type(md).__name__})")
    if not isinstance(md.storage_data, dict):
        raise InputError(path, "DCP metadata has no storage_data: it was not written by FileSystemWriter")
    return md


# ---------------------------------------------------------------- byte ranges
class _Chunk:
    __slots__ = ("offsets", "sizes", "file", "offset", "length", "transforms", "raw")

    def __init__(self, offsets, sizes, file, offset, length, transforms):
        self.raw = None if not transforms else False  # (data start, strides) once located; False: use torch.load
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


class _Window(io.RawIOBase):
    """A read-only file view of ``[offset, offset + length)``: the torch.save archive of one chunk."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.base, self.n, self.pos = f, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.n + pos}[whence]
        return self.pos

    def readinto(self, b):
        k = max(0, min(len(b), self.n - self.pos))
        self.f.seek(self.base + self.pos)
        got = self.f.readinto(memoryview(b)[:k])
        self.pos += got
        return got


class _Rebuild:
    def __init__(self, storage, offset, size, stride, *_):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads a chunk archive's ``data.pkl`` for its layout only: which storage, offset, size, stride."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name.endswith("Storage") and isinstance(getattr(torch, name, None), type):
            return name
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        return pid


def _raw_layout(c: "_Chunk", dtype):
    """(absolute byte offset of the chunk's first element, element strides) when the chunk's archive
    stores it as one uncompressed little-endian contiguous storage of ``dtype``; None otherwise (then the
    whole chunk is read with torch.load)."""
    import struct
    import zipfile
    try:
        with open_input(c.file) as f:
            z = zipfile.ZipFile(io.BufferedReader(_Window(f, c.offset, c.length)))
            names = z.namelist()
            pkl = next(n for n in names if n.endswith("/data.pkl"))
            prefix = pkl[: -len("data.pkl")]
            order = z.read(prefix + "byteorder") if prefix + "byteorder" in names else b"little"
            rec = _ArchiveUnpickler(io.BytesIO(z.read(pkl))).load()
            if order != b"little" or not isinstance(rec, _Rebuild) or not isinstance(rec.storage, tuple):
                return None
            _, stype, key, _loc, _numel = rec.storage
            with warnings.catch_warnings():  # the legacy typed-storage class only names the dtype here
                warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
                sdt = getattr(torch, stype).dtype
            if sdt != dtype or rec.size != c.sizes:
                return None
            want, acc = [], 1
            for n in reversed(rec.size):
                want.append(acc)
                acc *= n
            if tuple(reversed(want)) != rec.stride and math.prod(rec.size) > 1:
                return None
            info = z.getinfo(f"{prefix}data/{key}")
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(c.offset + info.header_offset)
            head = f.read(30)
            if len(head) != 30 or head[:4] != b"PK\x03\x04":
                return None
            nlen, xlen = struct.unpack("<HH", head[26:30])
            start = c.offset + info.header_offset + 30 + nlen + xlen + rec.offset * dtype.itemsize
            if start + math.prod(rec.size) * dtype.itemsize > c.offset + c.length:
                return None
            return start, tuple(reversed(want))
    except (OSError, ValueError, KeyError, StopIteration, pickle.UnpicklingError, EOFError, AttributeError,
            TypeError, IndexError, zipfile.BadZipFile, struct.error):
        return None


def _read_chunk_box(c: "_Chunk", lo, hi, name: str, dtype) -> torch.Tensor:
    """``chunk[lo:hi]`` (local box): the span of bytes from its first to its last element when the
    chunk's storage can be located, else the whole chunk through torch.load."""
    if c.raw is None:
        c.raw = _raw_layout(c, dtype) or False
    if not c.raw:
        t = _load_chunk(c, name, dtype)
        return t[tuple(slice(a, b) for a, b in zip(lo, hi))]
    start, strides = c.raw
    first = sum(a * s for a, s in zip(lo, strides))
    n = sum((b - 1) * s for b, s in zip(hi, strides)) - first + 1
    buf = bytearray(read_range(c.file, start + first * dtype.itemsize, n * dtype.itemsize))
    flat = torch.frombuffer(buf, dtype=dtype, count=n) if n else torch.empty(0, dtype=dtype)
    return torch.as_strided(flat, [b - a for a, b in zip(lo, hi)], strides)


_CACHE: OrderedDict = OrderedDict()  # (file, offset) -> tensor; the last two chunks read
_CACHE_N = 2


def _load_chunk(c: _Chunk, name: str, dtype) -> torch.Tensor:
    key = (str(c.file), c.offset)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    data = read_range(c.file, c.offset, c.length, c.transforms)
    try:
        t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of a corrupt archive is an input error
        raise InputError(c.file, f"chunk of {name!r} at offset {c.offset} is not a torch.save tensor "
                                 f"({str(e).strip().splitlines()[0][:120] if str(e).strip() else e.__class__.__name__})") from None
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != c.sizes or t.dtype != dtype:
        got = f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise InputError(c.file, f"chunk of {name!r} at offset {c.offset} holds {got}, metadata says "
                                 f"{list(c.sizes)} {dtype}")
    _CACHE[key] = t
    while len(_CACHE) > _CACHE_N:
        _CACHE.popitem(last=False)
    return t


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
            return self.box((), ()) if not self.chunks else _load_chunk(self.chunks[0], self.name, self.dtype).clone()
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
    from .formats import _inside as inside
    p = inside(root, rel)
    if not p.is_file():
        raise InputError(root / METADATA, f"names data file {rel!r}, which is missing or not a regular file")
    return p


def read_dcp_entries(root: Path):
    """(tensors: name -> DcpTensor, byte items: name -> (file, offset, length), metadata)."""
    mpath = root / METADATA
    md = read_metadata(mpath)
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
    by_fqn: dict = {}
    for idx, info in md.storage_data.items():
        fqn = getattr(idx, "fqn", None)
        if not isinstance(fqn, str) or not isinstance(getattr(info, "relative_path", None), str):
            raise InputError(mpath, "storage_data entry without a name or file")
        by_fqn.setdefault(fqn, []).append((idx, info))
    sizes: dict = {}
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
            f = _inside(root, info.relative_path)
            if int(info.offset) < 0 or int(info.length) < 0 or int(info.offset) + int(info.length) > f.stat().st_size:
                raise InputError(f, f"chunk of {fqn!r} runs past the end of the file")
            chunks.append(_Chunk(off, c.sizes, f, info.offset, info.length,
                                 getattr(info, "transform_descriptors", None)))
            vol += math.prod(int(s) for s in c.sizes)
            sizes[str(f)] = 1
        if vol != math.prod(shape):
            raise InputError(mpath, f"tensor {fqn!r}: its chunks hold {vol} elements, its global shape "
                                    f"{list(shape)} has {math.prod(shape)} (overlapping or missing chunks)")
        tensors[fqn] = DcpTensor(fqn, shape, dtype, chunks, str(root))
    return tensors, items, md


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


# ---------------------------------------------------------------- declaration (converters/registry.py)
def _declare() -> None:
    from .registry import Format, register
    register(Format("dcp", "torch.distributed.checkpoint directory: .metadata + *.distcp (read without a process "
                           "group)", is_dcp_dir, read_dcp, priority=20))


_declare()


__all__ = ["read_dcp", "model_subtree", "select_prefix", "read_dcp_entries", "read_metadata", "DcpTensor", "SubTensor", "is_dcp_dir"]
