"""The safetensors header: read (8-byte little-endian length, then JSON) and validated exactly as the
format and its reference reader define it, each defect a one-line ``InputError`` naming the file. No
torch: the dtype table is the caller's (name -> an object with ``itemsize``), so a command that only
needs headers and bytes (the identical-pair check, compare/quick.py) starts without importing torch."""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np

from ckdiff.errors import InputError
from ckdiff.io.inputs import no_gc, open_input, os_problem

# Every dtype name the format defines, and the bytes per element of those with a whole number of bytes
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}

MAX_HEADER = 100_000_000  # the reference implementation's bound on the header length
# Every dtype name the format defines; the ones without an entry in the caller's table are refused as unsupported.
FORMAT_DTYPES = set(ITEMSIZE) | {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"}
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


def parse_header(path, raw: bytes, data_len: int, dtypes: dict):
    """Validate a safetensors header exactly as the format (and its reference reader) defines it.

    Returns (metadata, entries) with entries name -> (dtype, shape, lo, hi) in file order, ``dtype``
    the value of ``dtypes`` (format name -> an object with ``itemsize``) for the entry's dtype name.
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
        if dt_name not in dtypes:
            raise InputError(path, f"tensor {name!r} has dtype {dt_name}, which ckdiff does not support")
        dtype = dtypes[dt_name]
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




def read_header(path) -> tuple[bytes, int, int]:
    """(header bytes, data start, file size) of the safetensors file at ``path``, the length checked."""
    with open_input(path) as f:
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
    return raw, 8 + hlen, size


class MappedFile:
    """Header of one .safetensors file (its dtype codes read through ``dtypes``) and windows over its data.
    Torch-free: io/safetensors.py's reader and the torch-free comparison (compare/lane.py) share it."""

    def __init__(self, path: str | os.PathLike, dtypes: dict):
        self.path = Path(path)
        self.origin = str(self.path)  # one string shared by every tensor of the file (a header can hold 10^6)
        raw, self.data_start, size = read_header(self.path)
        with no_gc():  # a header of a million entries allocates millions of objects, none of them cyclic
            self.metadata, self.entries = parse_header(path, raw, size - self.data_start, dtypes)
        self._mm = None  # a writable map of the whole file (io/safetensors.py's torch views)
        self._ro: np.ndarray | None = None  # a read-only map of the whole file (``view``)

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

    def view(self, offset: int, n: int) -> np.ndarray:
        """Data bytes [offset, offset + n) as a read-only uint8 array over one map of the whole file, made on
        first use: for many small reads (a diagnosis's single rows), where a map per read would cost a
        system call each. Streaming goes through ``window``, whose maps are dropped as it moves on."""
        if n == 0:
            return np.zeros(0, np.uint8)
        if self._ro is None:
            fd = self._fd()
            try:
                size = os.fstat(fd).st_size
                self._ro = np.frombuffer(mmap.mmap(fd, 0, access=mmap.ACCESS_READ), np.uint8) if size else \
                    np.zeros(0, np.uint8)
            except (OSError, ValueError) as e:
                raise InputError(self.path, os_problem(e) if isinstance(e, OSError) else str(e)) from None
        start = self.data_start + offset
        if start + n > self._ro.size:
            raise InputError(self.path, f"file shrank to {self._ro.size} bytes while being read (data up to byte "
                                        f"{start + n} expected)")
        return self._ro[start:start + n]

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
