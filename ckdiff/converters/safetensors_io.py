"""safetensors: a validating lazy reader and a streaming writer.

The reader parses the header (8-byte little-endian length, JSON) itself so that
every defect gets a precise message, then memory-maps the file and hands out
zero-copy views. The writer computes the header from shapes and dtypes first and
then streams tensors one at a time, so a model never has to be in memory at once;
``safetensors.torch.load_file`` is the oracle for it in the tests.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Iterable

import torch

from ..errors import InputError
from .lazy import LazyTensor

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # same bound as the reference implementation


class SafetensorsFile:
    """Header of one .safetensors file plus a memory map of its data."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise InputError(path, "not a safetensors file: shorter than its 8-byte header length")
                (hlen,) = struct.unpack("<Q", head)
                if hlen > MAX_HEADER or 8 + hlen > size:
                    raise InputError(path, f"truncated or corrupt safetensors: header length {hlen} "
                                           f"exceeds the file size {size}")
                raw = f.read(hlen)
        except PermissionError as e:
            raise InputError(path, f"cannot read: {e.strerror}") from None
        except IsADirectoryError:
            raise InputError(path, "is a directory, expected a .safetensors file") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(path, f"invalid safetensors header JSON ({e.__class__.__name__}: {e})") from None
        if not isinstance(header, dict):
            raise InputError(path, "invalid safetensors header: not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + hlen
        data_len = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for name, info in header.items():
            try:
                dt_name, shape, (lo, hi) = info["dtype"], info["shape"], info["data_offsets"]
                shape = tuple(int(s) for s in shape)
                lo, hi = int(lo), int(hi)
            except (KeyError, TypeError, ValueError):
                raise InputError(path, f"invalid header entry for tensor {name!r}") from None
            if dt_name not in DTYPES:
                raise InputError(path, f"tensor {name!r} has unknown dtype {dt_name!r}")
            dtype = DTYPES[dt_name]
            if any(s < 0 for s in shape):
                raise InputError(path, f"tensor {name!r} has a negative dimension {list(shape)}")
            n = 1
            for s in shape:
                n *= s
            if not (0 <= lo <= hi <= data_len):
                raise InputError(path, f"tensor {name!r} offsets [{lo}, {hi}) lie outside the data "
                                       f"({data_len} bytes): file truncated or corrupt")
            if hi - lo != n * dtype.itemsize:
                raise InputError(path, f"tensor {name!r}: {hi - lo} bytes for shape {list(shape)} {dt_name}")
            self.entries[name] = (dtype, shape, lo, hi)
            spans.append((lo, hi, name))
        spans.sort()
        for (alo, ahi, a), (blo, bhi, b) in zip(spans, spans[1:]):
            if blo < ahi:
                raise InputError(path, f"tensors {a!r} and {b!r} overlap in the data section")
        self._mm = None

    def buffer(self):
        if self._mm is None:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""
                # ACCESS_COPY: writable pages for torch, backed by the file until written.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def read_into(self, offset: int, buf: memoryview) -> int:
        """Read data bytes at ``offset`` (relative to the data section) into ``buf``."""
        return os.preadv(self._fd(), [buf], self.data_start + offset)

    def _fd(self) -> int:
        if getattr(self, "_fh", None) is None:
            self._fh = open(self.path, "rb", buffering=0)
        return self._fh.fileno()

    def tensors(self) -> dict[str, "SafetensorsTensor"]:
        return {n: SafetensorsTensor(n, self, *e) for n, e in self.entries.items()}


class SafetensorsTensor(LazyTensor):
    def __init__(self, name, file: SafetensorsFile, dtype, shape, lo, hi):
        super().__init__(name, shape, dtype, str(file.path))
        self.file, self.lo, self.hi = file, lo, hi

    def _view(self, byte_lo: int, byte_hi: int, shape) -> torch.Tensor:
        if byte_hi == byte_lo:
            return torch.empty(shape, dtype=self.dtype)
        start = self.file.data_start + byte_lo
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = torch.frombuffer(self.file.buffer(), dtype=torch.uint8, count=byte_hi - byte_lo, offset=start)
        return raw.view(self.dtype).reshape(shape)

    def load(self) -> torch.Tensor:
        return self._view(self.lo, self.hi, self.shape)

    def byte_chunks(self, bufs, chunk: int):
        """Yield (offset, memoryview) over this tensor's raw bytes, read into reused buffers."""
        n = self.hi - self.lo
        for off in range(0, n, chunk):
            m = min(chunk, n - off)
            view = memoryview(bufs)[:m]
            got = self.file.read_into(self.lo + off, view)
            if got != m:
                raise InputError(self.file.path, f"tensor {self.name!r}: short read ({got} of {m} bytes)")
            yield off, view

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if not self.shape:
            return self.load().reshape(1)
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return self._view(self.lo + start * row, self.lo + stop * row, (stop - start,) + self.shape[1:])


def read_safetensors(path) -> dict[str, LazyTensor]:
    return SafetensorsFile(path).tensors()


def safetensors_header(tensors: Iterable[tuple[str, tuple, torch.dtype]], metadata: dict | None = None):
    """Header bytes (padded to 8) and the total data length for the given tensors, in order."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, shape, dtype in tensors:
        n = 1
        for s in shape:
            n *= int(s)
        nb = n * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + nb]}
        offset += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def write_safetensors(path, tensors: Iterable[LazyTensor], metadata: dict | None = None, progress=None) -> int:
    """Stream lazy tensors into one safetensors file; returns bytes written.

    The header is built from shapes and dtypes, then each tensor is read, a row
    chunk at a time, written and dropped in turn. Writing goes to ``path`` directly:
    callers put it inside a temporary directory that is renamed when complete.
    ``progress(n)`` is called with the bytes of each chunk written.
    """
    from .torch_zip import TensorSource
    tensors = list(tensors)
    head, total = safetensors_header([(t.name, t.shape, t.dtype) for t in tensors], metadata)
    with open(path, "wb") as f:
        f.write(head)
        for t in tensors:
            done = 0
            for data in TensorSource.rows_of(t).chunks():
                if data.dtype != t.dtype:
                    raise RuntimeError(f"{t.name}: produced {data.dtype}, announced {t.dtype}")
                data = data.contiguous()
                if data.numel():
                    f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
                    done += data.numel() * data.element_size()
                    if progress:
                        progress(data.numel() * data.element_size())
            if done != t.nbytes:
                raise RuntimeError(f"{t.name}: produced {done} bytes, announced {list(t.shape)} {t.dtype}")
        f.flush()
        os.fsync(f.fileno())
    return len(head) + total
