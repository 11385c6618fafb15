"""Write torch's zip checkpoint format (what ``torch.save`` writes) one tensor at a time.

``torch.save`` pickles a whole object and needs every tensor in memory. Here the
object holds ``TensorSource`` leaves (shape, dtype and a generator of row chunks);
each leaf's bytes go into the archive as ``<archive>/data/<key>`` while the object
is pickled, chunk by chunk, and ``data.pkl`` is written last. The pickle is the
one ``torch.save`` would write for the same object (the same persistent ids,
``_rebuild_tensor_v2`` calls and storage key order), so ``torch.load`` reads it
alike, with or without ``mmap=True``. The zip container is Python's ``zipfile``
(stored, CRC-32 checked, zip64 when needed) with every record's data aligned to
64 bytes, as torch's own writer aligns it; torch's writer cannot write a record
in pieces, so a tensor would have to be whole in memory.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from ckdiff.tensor.lazy import LazyTensor

# bytes per chunk written: large enough for full-speed writes, small enough that a chunk that must be
# assembled (columns of a TP shard, a row block across TP parts) costs little memory
WRITE_CHUNK = 8 << 20
ALIGN = 64  # torch's storage alignment (serialization._get_storage_alignment)
_PAD_ID = 0x4246  # extra-field id torch uses for its own alignment padding ("FB")


class TensorSource:
    """A tensor to write: its shape and dtype, and ``chunks()`` yielding its data in order (C order)."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, chunks: Callable[[], Iterable[torch.Tensor]],
                 name: str = ""):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.chunks = chunks
        self.name = name

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @classmethod
    def of_tensor(cls, t: torch.Tensor, name: str = "") -> "TensorSource":
        return cls(t.shape, t.dtype, lambda: [t], name)

    @classmethod
    def rows_of(cls, lt: LazyTensor, ranges: Optional[Sequence[tuple[int, int]]] = None,
                cols: Optional[tuple[int, int]] = None, chunk_bytes: int = WRITE_CHUNK) -> "TensorSource":
        """Rows ``ranges`` (concatenated along dim 0; default all) of ``lt``, optionally only columns
        [c0, c1) of a 2-d tensor, read ``chunk_bytes`` at a time."""
        if lt.numel and not lt.shape:
            return cls((), lt.dtype, lambda: [lt.load().reshape(1)], lt.name)
        ranges = list(ranges) if ranges is not None else [(0, lt.shape[0] if lt.shape else 0)]
        rows = sum(b - a for a, b in ranges)
        shape = (rows,) + tuple(lt.shape[1:])
        if cols is not None:
            shape = (rows, cols[1] - cols[0]) + tuple(lt.shape[2:])
        step = max(1, chunk_bytes // lt.row_read_bytes)  # a derived row may cost more than its own bytes

        def chunks():
            for a, b in ranges:
                for s in range(a, b, step):
                    x = lt.rows(s, min(b, s + step))
                    if tuple(x.shape) != (min(b, s + step) - s,) + tuple(lt.shape[1:]):
                        raise RuntimeError(f"{lt.name}: produced rows of shape {list(x.shape)}, "
                                           f"announced {list(lt.shape)}")
                    yield x if cols is None else x[:, cols[0]:cols[1]]
        return cls(shape, lt.dtype, chunks, lt.name)


def _storage_type(dtype: torch.dtype):
    return getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])


def _contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(1, s)
    return tuple(reversed(strides))


class _StorageRef:
    __slots__ = ("src",)

    def __init__(self, src: TensorSource):
        self.src = src


class _ArchiveWriter:
    """A zip archive in torch's layout: every record under one top-level directory, data 64-aligned."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.prefix = self.path.stem or "archive"
        self.fh = open(self.path, "wb")  # our own handle: a full disk surfaces as the OSError it is
        self.zf = zipfile.ZipFile(self.fh, "w", zipfile.ZIP_STORED, allowZip64=True)

    def _info(self, name: str, size: int) -> tuple[zipfile.ZipInfo, bool]:
        zi = zipfile.ZipInfo(f"{self.prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        zi.compress_type = zipfile.ZIP_STORED
        zi.file_size = size
        zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule for a known size
        fixed = 30 + len(zi.filename.encode("utf-8")) + (20 if zip64 else 0) + 4
        pad = -(self.zf.start_dir + fixed) % ALIGN
        zi.extra = struct.pack("<HH", _PAD_ID, pad) + b"Z" * pad
        return zi, zip64

    def record(self, name: str, data: bytes) -> None:
        zi, zip64 = self._info(name, len(data))
        with self.zf.open(zi, "w", force_zip64=zip64) as f:
            f.write(data)

    def stream(self, name: str, src: TensorSource, progress=None) -> None:
        zi, zip64 = self._info(name, src.nbytes)
        done = 0
        with self.zf.open(zi, "w", force_zip64=zip64) as f:
            for c in src.chunks():
                if c.dtype != src.dtype:
                    raise RuntimeError(f"{src.name}: produced {c.dtype}, announced {src.dtype}")
                c = c.contiguous()
                n = c.numel() * c.element_size()
                if n:
                    f.write(memoryview(c.reshape(-1).view(torch.uint8).numpy()))
                    done += n
                    if progress:
                        progress(n)
                del c
        if done != src.nbytes:
            raise RuntimeError(f"{src.name}: produced {done} bytes, announced {src.nbytes} "
                               f"({list(src.shape)} {src.dtype})")

    def close(self) -> None:
        try:
            self.zf.close()
            self.fh.flush()
            os.fsync(self.fh.fileno())
        finally:
            self.fh.close()


def write_torch_zip(path, obj, progress: Optional[Callable[[int], None]] = None) -> None:
    """Write ``obj`` (dicts, lists, plain values, ``TensorSource`` or small ``torch.Tensor`` leaves)
    as ``torch.save(obj, path)`` would, holding one chunk of one tensor at a time.

    ``progress(n)`` is called with the bytes of each chunk as it is written.
    """
    ar = _ArchiveWriter(Path(path))
    keys: dict[int, str] = {}

    class Pickler(pickle.Pickler):
        def reducer_override(self, o):
            if isinstance(o, torch.Tensor):
                o = TensorSource.of_tensor(o.detach())
            if isinstance(o, TensorSource):
                return (torch._utils._rebuild_tensor_v2,
                        (_StorageRef(o), 0, o.shape, _contiguous_strides(o.shape), False,
                         collections.OrderedDict()))
            return NotImplemented

        def persistent_id(self, o):
            if not isinstance(o, _StorageRef):
                return None
            key = str(len(keys))
            keys[id(o)] = key
            ar.stream(f"data/{key}", o.src, progress)
            return ("storage", _storage_type(o.src.dtype), key, "cpu", o.src.numel)

    try:
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(obj)
        ar.record("data.pkl", buf.getvalue())
        ar.record(".format_version", b"1")
        ar.record(".storage_alignment", str(ALIGN).encode())
        ar.record("byteorder", sys.byteorder.encode())
        ar.record("version", b"3\n")
    finally:
        ar.close()


def iter_leaves(obj) -> Iterator[TensorSource]:
    """The ``TensorSource`` leaves of nested dicts / lists, in pickling order."""
    if isinstance(obj, TensorSource):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_leaves(v)
