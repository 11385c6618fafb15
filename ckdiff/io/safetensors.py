"""safetensors: a validating lazy reader and a streaming writer.

The reader parses the header (8-byte little-endian length, JSON) itself so that
every defect gets a precise message, then memory-maps the file and hands out
zero-copy views. The writer computes the header from shapes and dtypes first and
then streams tensors one at a time, so a model never has to be in memory at once;
``safetensors.torch.load_file`` is the oracle for it in the tests.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ckdiff.errors import InputError
from ckdiff.io.inputs import no_gc, open_input, os_problem
from ckdiff.tensor.lazy import LazyTensor

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the reference implementation's bound on the header length
# Every dtype name the format defines; the ones without an entry in DTYPES are refused as unsupported.
FORMAT_DTYPES = set(DTYPES) | {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"}
FIELDS = ("dtype", "shape", "data_offsets")
MAX_DEPTH = 127  # nesting the reference JSON reader accepts (objects and arrays, the header itself included)
U64 = 1 << 64
MAX_LAYOUT = 1 << 62  # torch's strides and sizes are int64: leave room for a concatenation
_INT_ONLY = {int}


class _Dups(dict):
    """A JSON object in which some keys appeared more than once (the last value kept)."""

    dups: set


def _pairs(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        d = _Dups(pairs)
        seen: set = set()
        d.dups = {k for k, _ in pairs if k in seen or seen.add(k)}
    return d


def _float(s):
    x = float(s)
    if x in (float("inf"), float("-inf")):
        raise ValueError(f"number {s[:20]} out of range")
    return x


def _int(s):
    return -0.0 if s == "-0" else int(s)  # the reference reader takes -0 as a float


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _depth_and_text_ok(value, depth: int, surrogates: bool) -> bool:
    """No nesting deeper than MAX_DEPTH below ``value`` (at ``depth``), and no lone surrogate in a string."""
    stack = [(value, depth)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            if d > MAX_DEPTH:
                return False
            if surrogates and any(_lone_surrogate(k) for k in v):
                return False
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            if d > MAX_DEPTH:
                return False
            stack.extend((x, d + 1) for x in v)
        elif surrogates and isinstance(v, str) and _lone_surrogate(v):
            return False
    return True


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(s: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in s)


def _repeats_possible(raw: bytes, header) -> bool:
    """Whether an object in ``header`` (parsed keeping the last of repeated keys) may have repeated
    a field that matters; False is a proof, reached without the slower parse that sees repeats.

    Without ``\\u`` escapes every key is spelled literally: if ``"dtype"``, ``"shape"`` and
    ``"data_offsets"`` each occur exactly once per object entry, and ``"__metadata__"`` at most
    once, nothing was repeated.
    """
    if b"\\u" in raw or raw.count(b'"__metadata__"') > 1 or not isinstance(header, dict):
        return True
    n = sum(1 for k, v in header.items() if type(v) is dict and k != "__metadata__")
    return not (raw.count(b'"dtype"') == raw.count(b'"shape"') == raw.count(b'"data_offsets"') == n)


def _u64(x) -> bool:
    return type(x) is int and 0 <= x < U64


def parse_header(path, raw: bytes, data_len: int):
    """Validate a safetensors header exactly as the format (and its reference reader) defines it.

    Returns (metadata, entries) with entries name -> (dtype, shape, lo, hi) in file order.
    Defects are one-line ``InputError``s naming the file and, where there is one, the tensor.
    """
    def bad(problem):
        return InputError(path, f"invalid safetensors header: {problem}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 (byte {e.start})") from None
    try:
        kw = dict(parse_float=_float, parse_constant=_no_constant, parse_int=_int if "-0" in text else None)
        header = json.loads(text, **kw)
        if _repeats_possible(raw, header):
            header = json.loads(text, object_pairs_hook=_pairs, **kw)
    except json.JSONDecodeError as e:
        raise bad(f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:
        raise bad(f"invalid JSON ({e})") from None
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise bad("not a JSON object")
    surrogates = bool(_SURROGATE_ESCAPE.search(raw))
    if surrogates and any(_lone_surrogate(k) for k in header):
        raise bad("a tensor name holds a lone UTF-16 surrogate")
    if isinstance(header, _Dups) and "__metadata__" in header.dups:
        raise bad("'__metadata__' appears twice")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(type(v) is str for v in metadata.values()):
        raise bad("'__metadata__' must map strings to strings")
    elif surrogates and not _depth_and_text_ok(metadata, 2, True):
        raise bad("'__metadata__' holds a lone UTF-16 surrogate")
    spans = []
    for name, info in header.items():
        if type(info) is list:  # the reference reader also takes the three fields as a list, in order
            if len(info) != 3:
                raise bad(f"entry for tensor {name!r} is a list of {len(info)} items, expected 3")
            dt_name, shape, offsets = info
        elif isinstance(info, dict):
            if isinstance(info, _Dups) and info.dups & set(FIELDS):
                raise bad(f"entry for tensor {name!r} repeats {sorted(info.dups & set(FIELDS))}")
            missing = [f for f in FIELDS if f not in info]
            if missing:
                raise bad(f"entry for tensor {name!r} lacks {missing[0]!r}")
            dt_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if len(info) > 3 and not _depth_and_text_ok(info, 2, surrogates):
                raise bad(f"entry for tensor {name!r} is nested too deeply or holds a lone UTF-16 surrogate")
        else:
            raise bad(f"entry for tensor {name!r} is a {type(info).__name__}, expected an object")
        if type(dt_name) is not str:
            raise bad(f"dtype of tensor {name!r} is a {type(dt_name).__name__}, expected a string")
        if dt_name not in FORMAT_DTYPES:
            raise InputError(path, f"tensor {name!r} has unknown dtype {dt_name!r}")
        if type(shape) is not list or shape and (set(map(type, shape)) != _INT_ONLY or min(shape) < 0
                                                 or max(shape) >= U64):
            raise bad(f"shape of tensor {name!r} must be a list of non-negative integers")
        if surrogates and not _depth_and_text_ok(shape, 3, True):
            raise bad(f"shape of tensor {name!r} is invalid")
        if type(offsets) is not list or len(offsets) != 2 or not (_u64(offsets[0]) and _u64(offsets[1])):
            raise bad(f"data_offsets of tensor {name!r} must be two non-negative integers")
        spans.append((offsets[0], offsets[1], name, dt_name, shape))
    # The reference reader's checks, in its order: tensors sorted by offsets must tile the data exactly.
    spans.sort()  # by offsets (names are unique, so no tie reaches the shapes)
    start = 0
    entries = {}
    for lo, hi, name, dt_name, shape in spans:
        if lo != start or hi < lo:
            if lo < start:
                raise InputError(path, f"tensor {name!r} overlaps the tensor before it in the data section")
            if hi < lo:
                raise InputError(path, f"tensor {name!r} has data_offsets [{lo}, {hi}) that end before they start")
            raise InputError(path, f"tensor {name!r} starts at byte {lo}, leaving a gap after byte {start} "
                                   "in the data section")
        start = hi
        if hi > data_len:
            raise InputError(path, f"tensor {name!r} offsets [{lo}, {hi}) lie outside the data ({data_len} bytes): "
                                   "file truncated or corrupt")
        n = math.prod(shape)
        # the reference multiplies left to right and refuses any product past 64 bits, even one a
        # later zero would bring back to 0
        if (math.prod(shape[:shape.index(0)]) if n == 0 and shape else n) >= U64:
            raise InputError(path, f"tensor {name!r}: shape {shape} overflows a 64-bit size")
        if dt_name not in DTYPES:
            raise InputError(path, f"tensor {name!r} has dtype {dt_name}, which ckdiff does not support")
        dtype = DTYPES[dt_name]
        if n * dtype.itemsize * 8 >= U64:
            raise InputError(path, f"tensor {name!r}: shape {shape} {dt_name} overflows a 64-bit byte count")
        if hi - lo != n * dtype.itemsize:
            raise InputError(path, f"tensor {name!r}: {hi - lo} bytes for shape {shape} {dt_name}")
        if n == 0 and shape and math.prod(d or 1 for d in shape) > MAX_LAYOUT:
            # the reference reads an empty tensor of any shape; torch cannot lay such a one out or
            # operate on it (its strides overflow), so ckdiff refuses it
            raise InputError(path, f"tensor {name!r}: empty, but shape {shape} exceeds what torch can index "
                                   "(its size, counting empty dimensions as 1, is past 2^62)")
        entries[name] = (dtype, tuple(shape), lo, hi)
    if start != data_len:
        if start > data_len:
            raise InputError(path, f"truncated or corrupt safetensors: tensors need {start} data bytes, the file "
                                   f"holds {data_len}; offsets lie outside the data")
        raise InputError(path, f"truncated or corrupt safetensors: tensors cover {start} of the "
                               f"{data_len} data bytes")
    return metadata, entries


class SafetensorsFile:
    """Header of one .safetensors file plus a memory map of its data."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.origin = str(self.path)  # one string shared by every tensor of the file (a header can hold 10^6)
        with open_input(self.path) as f:
            size = os.fstat(f.fileno()).st_size
            try:
                head = f.read(8)
                if len(head) < 8:
                    raise InputError(path, "not a safetensors file: shorter than its 8-byte header length")
                (hlen,) = struct.unpack("<Q", head)
                if hlen > MAX_HEADER or 8 + hlen > size:
                    raise InputError(path, f"truncated or corrupt safetensors: header length {hlen} "
                                           f"exceeds the file size {size}" if hlen <= MAX_HEADER else
                                     f"corrupt safetensors: header length {hlen} exceeds the format's "
                                     f"limit of {MAX_HEADER} bytes")
                raw = f.read(hlen)
            except OSError as e:
                raise InputError(path, os_problem(e)) from None
        self.data_start = 8 + hlen
        with no_gc():  # a header of a million entries allocates millions of objects, none of them cyclic
            self.metadata, self.entries = parse_header(path, raw, size - self.data_start)
        self._mm = None

    def buffer(self):
        if self._mm is None:
            with open_input(self.path) as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""
                # ACCESS_COPY: writable pages for torch, backed by the file until written.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def window(self, offset: int, n: int) -> np.ndarray:
        """Data bytes [offset, offset + n) as a uint8 array over a map of just their pages: the
        page cache's own pages, nothing copied (a private map: never written through), unmapped
        when the array is dropped. A file that has shrunk since its header was read is refused
        here rather than faulting on a page past its end."""
        start = self.data_start + offset
        fd = self._fd()
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            raise InputError(self.path, os_problem(e)) from None
        if start + n > size:
            raise InputError(self.path, f"file shrank to {size} bytes while being read (data up to byte "
                                        f"{start + n} expected)")
        if n == 0:
            return np.zeros(0, np.uint8)
        base = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(fd, start + n - base, access=mmap.ACCESS_COPY, offset=base)
        except (OSError, ValueError):  # a file system that cannot map: read the bytes instead
            buf = np.empty(n, np.uint8)
            try:
                got = os.preadv(fd, [memoryview(buf)], start)
            except OSError as e:
                raise InputError(self.path, os_problem(e)) from None
            if got != n:
                raise InputError(self.path, f"short read ({got} of {n} bytes at byte {start})")
            return buf
        return np.frombuffer(mm, np.uint8, count=n, offset=start - base)

    def will_need(self, offset: int, n: int) -> None:
        """Ask the kernel to start reading data bytes [offset, offset + n) into the page cache
        (asynchronously: a later window over them does not wait on the disk)."""
        if n > 0 and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._fd(), self.data_start + offset, n, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # a hint only

    def _fd(self) -> int:
        if getattr(self, "_fh", None) is None:
            self._fh = open_input(self.path)
        return self._fh.fileno()

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
        with warnings.catch_warnings():  # a read-only map: the data is never written through this view
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
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
