"""The identical pair of plain safetensors files, decided without torch.

``ckdiff a.safetensors b.safetensors`` on two files whose headers declare the same floating-point tensors
(names, dtypes, shapes) and whose tensors' bytes are equal has one answer: every tensor ``equal``. The
full comparison reaches it by memcmp too (compare/bytes_equal.py), after importing torch (~1 s of a
tiny pair's 1.1 s). Here the headers are parsed and validated by the same parser as the reader's
(io/safetensors_header.py), the bytes compared by the same memcmp, and the same ``CompareResult`` built
that the full comparison builds for such a pair (tests/test_quick_identical.py holds the two equal,
row for row, on the families' tiny models).

Anything else is declined (``None``) and the full comparison runs: a header the reader would refuse or
describe differently, a dtype that is not floating point (the integer and FP8 codes of the quantized
encodings, read as views there), file metadata other than ``{"format": "pt"}``, one differing byte.
"""
from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Optional

import numpy as np

from ckdiff.compare.result import CompareResult, TensorResult
from ckdiff.compare.status import Status
from ckdiff.errors import InputError
from ckdiff.io.inputs import open_input


class Float:
    """A floating-point dtype as the torch-free comparisons know it: its name (``str``, as
    tensor/dtype_names.py reads a dtype), size and kind. One object per dtype, so ``==`` is identity."""
    __slots__ = ("name", "itemsize")
    is_floating_point = True

    def __init__(self, name: str, itemsize: int):
        self.name, self.itemsize = name, itemsize

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__


# the floating dtypes a plain checkpoint stores; every other dtype name is declined by the parser
FLOATS = {"F64": Float("float64", 8), "F32": Float("float32", 4), "F16": Float("float16", 2),
          "BF16": Float("bfloat16", 2)}
PLAIN_METADATA = ({}, {"format": "pt"})


def _header(path: Path):
    from ckdiff.io.safetensors_header import MappedFile
    f = MappedFile(path, FLOATS)
    return f.metadata, f.entries, f.data_start


def _mapped(path: Path):
    with open_input(path) as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def identical_safetensors(a: str, b: str) -> Optional[CompareResult]:
    """The comparison of two plain, identical safetensors files, or None (the full comparison decides)."""
    pa, pb = Path(a), Path(b)
    if pa.suffix != ".safetensors" or pb.suffix != ".safetensors" or not pa.is_file() or not pb.is_file():
        return None
    try:
        ma, ea, sa = _header(pa)
        mb, eb, sb = _header(pb)
    except InputError:
        return None
    if ma not in PLAIN_METADATA or mb not in PLAIN_METADATA or list(ea) != list(eb):
        return None
    if any(x[0] is not y[0] or x[1] != y[1] for x, y in zip(ea.values(), eb.values())):
        return None
    if not _bytes_equal(pa, pb, ea, eb, sa, sb):
        return None
    rows = []
    for n, (dt, shape, _, _) in ea.items():  # the fields compare/tensor.py sets on a bit-exact pair
        numel = math.prod(shape)
        rows.append(TensorResult(n, Status.EQUAL, shape_a=shape, shape_b=shape, dtype_a=dt.name, dtype_b=dt.name,
                                 bit_exact=True, numel=numel, cosine=1.0 if numel else None, atol=0.0, rtol=0.0,
                                 tol_source="exact"))
    side = {"read": len(rows), "consumed_by_rules": 0, "targets": len(rows), "in_results": len(rows),
            "ignored": 0, "dropped": {}, "unaccounted": []}
    return CompareResult(str(pa), str(pb), "file", "file", rows, config_diff=[], config_findings=[], warnings=[],
                         strict=False, options={"atol": None, "rtol": None, "only": [], "ignore": [], "patterns": []},
                         notes=[], mapping=[], coverage={"A": dict(side), "B": dict(side)})


def _bytes_equal(pa, pb, ea, eb, sa, sb) -> bool:
    """Every tensor's bytes equal (one memcmp over the data when both files lay the tensors out alike)."""
    from ckdiff.compare.bytes_equal import bytes_equal
    try:
        fa, fb = _mapped(pa), _mapped(pb)
    except (InputError, OSError, ValueError):  # ValueError: mmap of an empty file
        return False
    try:
        ua, ub = np.frombuffer(fa, dtype=np.uint8), np.frombuffer(fb, dtype=np.uint8)
        try:
            if all(x[2:] == y[2:] for x, y in zip(ea.values(), eb.values())):
                end = max((x[3] for x in ea.values()), default=0)
                return bytes_equal(ua[sa:sa + end], ub[sb:sb + end])
            return all(bytes_equal(ua[sa + x[2]:sa + x[3]], ub[sb + y[2]:sb + y[3]])
                       for x, y in zip(ea.values(), eb.values()))
        finally:
            del ua, ub  # the maps close only once no array points into them
    finally:
        fa.close()
        fb.close()
