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
from typing import Iterable

import torch

from ckdiff.io.inputs import no_gc, open_input
from ckdiff.io.safetensors_header import MappedFile
from ckdiff.tensor.lazy import LazyTensor

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
class SafetensorsFile(MappedFile):
    """Header of one .safetensors file plus a memory map of its data, tensors as torch views."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, DTYPES)

    def buffer(self):
        if self._mm is None:
            with open_input(self.path) as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""
                # ACCESS_COPY: writable pages for torch, backed by the file until written.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def tensors(self) -> dict[str, "SafetensorsTensor"]:
        """The file's lazy tensors, made once: the parsed entries are dropped after (a header of 10^6
        entries would otherwise be held twice)."""
        if self.entries is None:
            raise RuntimeError(f"{self.path}: tensors() already taken")
        with no_gc():
            out = {n: SafetensorsTensor(n, self, *e) for n, e in self.entries.items()}
        self.entries = None
        return out


class SafetensorsTensor(LazyTensor):
    __slots__ = ("file", "lo", "hi")  # with LazyTensor's slots: no per-tensor dict (10^6-entry headers)

    def __init__(self, name, file: SafetensorsFile, dtype, shape, lo, hi, origin=None):
        # the header parser has made ``shape`` a tuple of ints already: set the fields directly
        # (a header can hold a million entries)
        self.name, self.shape, self.dtype = name, shape, dtype
        self.origin = file.origin if origin is None else origin
        self.file, self.lo, self.hi = file, lo, hi

    def _view(self, byte_lo: int, byte_hi: int, shape) -> torch.Tensor:
        if byte_hi == byte_lo:
            return torch.empty(shape, dtype=self.dtype)
        start = self.file.data_start + byte_lo
        # the map is ACCESS_COPY, writable as torch wants (no per-view warning to silence): a write through
        # a view would change this process's copy of the page only, never the file
        raw = torch.frombuffer(self.file.buffer(), dtype=torch.uint8, count=byte_hi - byte_lo, offset=start)
        return raw.view(self.dtype).reshape(shape)

    def load(self) -> torch.Tensor:
        return self._view(self.lo, self.hi, self.shape)

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
    from ckdiff.io.torch_zip import TensorSource
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
