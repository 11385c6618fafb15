"""One protocol for a block-scaled tensor: stored codes times a scale per block, seen as its logical tensor.

Every quantized encoding ckdiff reads is a :class:`BlockScaled` lazy tensor, made when the checkpoint is read
(``formats.open_checkpoint`` applies the registered encodings, ``formats/registry.py``). It carries the
LOGICAL name and shape (``model.layers.0.mlp.down_proj.weight`` ``[out, in]``, never the stored
``[nb, 128, out]`` codes or a ``*_scale_inv`` sibling), so alignment tables, coverage, diagnosis and the
runtimes only ever see logical tensors; the stored tensors it folds are listed in ``stored`` (coverage
accounts for them).

What a view exposes, for rows ``[start, stop)`` along dim 0 (rows of a 3-D tensor are flattened to 2-D
``[R, C]`` by ``scaled``):

- ``scaled(start, stop) -> Scaled``: the raw codes ``[R, C]`` in logical order and the scale grid with its
  block shape ``(br, bc)``; element ``(i, j)`` is ``value = code * grid[i // br, j // bc]`` in float32
  arithmetic (what runtimes do). ``Scaled.dense`` marks an encoding that is not codes-times-scale
  (GGUF K-quants with minimums): ``codes`` are then the dequantized values and ``grid`` the units.
  ``Scaled.steps`` (optional, 256 float64 per byte of 1-byte codes) is the spacing of the code format at
  each code where it is not the codes' dtype's own: FP4 (e2m1) values held exactly as float8_e4m3fn codes
  are spaced like FP4, not like FP8 (compressed-tensors NVFP4, ``formats/compressed_tensors.py``).
- ``rows(start, stop)`` / ``dequantized()``: the dequantized float32 values (runtimes, diagnosis).
- ``units(start, stop)``: each element's unit, the scale step of its block (``|scale|``, times the spacing
  of the code's float format at that code for float codes such as FP8).
- ``bound``: a correct encoding keeps ``|x - value| <= bound * unit`` against the float it encodes. Two
  encoded sides are within ``bound_a * unit_a + bound_b * unit_b`` (one step per side).
- ``raw(start, stop)``: the stored bytes of those rows (codes and scales), for an exact comparison of two
  files in the same ``encoding``.
- ``problems(s: Scaled)``: what is wrong with stored codes/scales on their own (codes outside the
  encoding's range, non-finite or non-positive scales), as text; empty when nothing.
- ``reference(x) -> Scaled | None``: a correct encoding of float rows ``x`` in this encoding (the
  diagnosis compares stored codes and scales with it); None when ckdiff has no quantizer for it.

The comparator (``compare/quantized.py``) and its numba kernel (``compare/kernels.py``
``ScaledStats``) read ``scaled`` only: one comparator for every encoding and every pair of sides.

How to add an encoding (one file)
---------------------------------
1. Subclass :class:`BlockScaled`; in ``__init__`` call ``super().__init__(name, logical_shape, origin,
   encoding="short name", bound=..., stored=(names of the stored tensors))`` and check that the stored
   shapes fit (raise ``errors.InputError`` naming the file otherwise).
2. Implement ``scaled(start, stop)`` (codes in logical order, scale grid, block shape), and ``raw``
   (usually the codes' and scales' bytes). Override ``problems`` and ``reference`` where the encoding
   defines a code range or a quantizer.
3. Write a ``view(ck) -> Checkpoint`` that replaces each stored group (codes + scales) by one view under the
   logical name (``fold`` below does the bookkeeping), and register it:
   ``registry.register_encoding(Encoding("name", "description", view))`` in the module, listed in
   ``registry.BUILTIN``.
Examples: ``formats/fp8.py`` (float8 codes, 128x128 block scales), ``formats/jetstream_quant.py`` (JetStream
int8/int4 per channel, per column and blockwise), ``formats/gguf.py`` (GGUF Q8_0, Q4_0, K-quants).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ckdiff.tensor.lazy import Checkpoint, LazyTensor

FLOAT8 = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}  # mantissa bits, min normal exponent


def float_step(codes: torch.Tensor) -> torch.Tensor:
    """The spacing of a float format at each code (its unit in the last place); 1 for integer codes."""
    if codes.dtype not in FLOAT8:
        return torch.ones(codes.shape, dtype=torch.float32)
    mant, emin = FLOAT8[codes.dtype]
    x = codes.float().abs()
    _, e = torch.frexp(x)  # x = m * 2**e, m in [0.5, 1); frexp(0) gives e = 0: zero is spaced like subnormals
    e = torch.where(x == 0, emin, torch.clamp(e - 1, min=emin))
    return torch.ldexp(torch.ones_like(x), e - mant)


_STEPS: dict = {}


def step_table(dtype: torch.dtype) -> Optional[np.ndarray]:
    """The float step of every byte of a 1-byte float code (float64, indexed by the byte); None for integers."""
    if dtype not in FLOAT8:
        return None
    if dtype not in _STEPS:
        codes = torch.from_numpy(np.arange(256, dtype=np.uint8)).view(dtype)
        _STEPS[dtype] = float_step(codes).double().numpy().copy()
    return _STEPS[dtype]


@dataclass
class Scaled:
    """Rows of a block-scaled tensor as stored: ``value[i, j] = codes[i, j] * grid[i // br, j // bc]``
    (float32 arithmetic). ``dense``: ``codes`` already hold the values and ``grid`` the units (an encoding
    that is not codes times a scale)."""
    codes: torch.Tensor  # [R, C]: int8, uint8 (unsigned codes), float8, or float32 when dense
    grid: torch.Tensor   # [ceil(R / br), ceil(C / bc)] float32
    block: tuple         # (br, bc)
    dense: bool = False
    steps: Optional[np.ndarray] = None  # the code format's spacing per byte of 1-byte codes (default: the dtype's)

    def per_element(self) -> torch.Tensor:
        """The grid broadcast to every element ``[R, C]``."""
        R, C = self.codes.shape
        br, bc = self.block
        g = self.grid.float()
        if br > 1:
            g = g.repeat_interleave(br, 0)
        if bc > 1:
            g = g.repeat_interleave(bc, 1)
        return g[:R, :C]

    def values(self) -> torch.Tensor:
        if self.dense:
            return self.codes.float()
        return self.codes.float() * self.per_element()

    def units(self) -> torch.Tensor:
        if self.dense:
            return self.grid.float().abs()
        return self.code_steps() * self.per_element().abs()

    def code_steps(self) -> torch.Tensor:
        """The spacing of the code format at each code (1 for integer codes)."""
        if self.steps is None:
            return float_step(self.codes)
        return torch.from_numpy(self.steps).float()[self.codes.contiguous().view(torch.uint8).long()]

    def step_table(self) -> Optional[np.ndarray]:
        """Per-byte spacing of 1-byte float codes for the kernel (``steps``, else the dtype's; None for ints)."""
        return self.steps if self.steps is not None else step_table(self.codes.dtype)

    def rebased(self, lo: int) -> "Scaled":
        """The same rows with the grid expanded to one grid row per element row (``br`` 1): for rows that
        start inside a block of ``br`` rows, ``lo`` rows into it."""
        br, bc = self.block
        if br == 1 or lo == 0:
            return self
        R = self.codes.shape[0]
        g = self.grid.repeat_interleave(br, 0)[lo:lo + R]
        return Scaled(self.codes, g, (1, bc), self.dense, self.steps)


class BlockScaled(LazyTensor):
    """A logical float tensor stored as codes and per-block scales (see the module docstring)."""
    nibbles = False  # 4-bit codes packed two per byte (the diagnosis then tries the swapped nibble order)

    def __init__(self, name: str, shape, origin: str, encoding: str, bound: float, stored: tuple = ()):
        super().__init__(name, shape, torch.float32, origin)
        self.encoding = encoding  # shown in reports in place of a dtype
        self._bound = bound
        self.stored = tuple(stored)

    @property
    def bound(self) -> float:
        return self._bound

    # -- what an encoding implements -------------------------------------------
    def scaled(self, start: int, stop: int) -> Scaled:
        raise NotImplementedError

    def raw(self, start: int, stop: int) -> torch.Tensor:
        """Stored bytes of rows [start, stop): codes then scales (exact comparison in one encoding)."""
        s = self.scaled(start, stop)
        return torch.cat([s.codes.contiguous().reshape(-1).view(torch.uint8),
                          s.grid.contiguous().reshape(-1).view(torch.uint8)])

    def problems(self, s: Scaled) -> list[str]:
        """Faults of stored codes and scales on their own (the default: non-finite scales)."""
        return [] if s.dense or bool(torch.isfinite(s.grid).all()) else ["non-finite block scales"]

    def reference(self, x: torch.Tensor) -> Optional[Scaled]:
        """A correct encoding of float rows ``x`` (flattened to 2-D like ``scaled``), or None."""
        return None

    # -- derived ---------------------------------------------------------------
    def _shape_rows(self, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return t.reshape((stop - start,) + self.shape[1:])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self._shape_rows(self.scaled(start, stop).values(), start, stop)

    def units(self, start: int, stop: int) -> torch.Tensor:
        return self._shape_rows(self.scaled(start, stop).units(), start, stop)

    def load(self) -> torch.Tensor:
        return self.rows(0, self.nrows)

    def dequantized(self) -> torch.Tensor:
        """The whole logical tensor, dequantized to float32."""
        return self.load()

    @property
    def row_elems(self) -> int:
        """Elements of one logical row along dim 0."""
        return max(1, math.prod(self.shape[1:]))

    @property
    def row_align(self) -> int:
        """Row blocks starting at a multiple of this need no grid expansion (``Scaled.rebased``)."""
        return 1


class RowGathered(BlockScaled):
    """A 2-D block-scaled tensor moved through a row-moving op of a layout table (a rotary permutation, a
    split): the same codes and scales with the rows in the table's order, so a moved encoded side is still
    judged in units of its own scales."""

    def __init__(self, name: str, src: BlockScaled, rows: torch.Tensor):
        super().__init__(name, (len(rows), src.shape[1]), src.origin, src.encoding, src.bound, src.stored)
        self.src, self.map = src, rows
        self.nibbles = src.nibbles

    @property
    def bound(self) -> float:
        return self.src.bound

    def scaled(self, start: int, stop: int) -> Scaled:
        rows = self.map[start:stop]
        if not len(rows):
            return self.src.scaled(0, 0)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        s = self.src.scaled(lo, hi)
        R = hi - lo
        grid = s.grid.repeat_interleave(s.block[0], 0)[:R] if s.block[0] > 1 else s.grid
        sel = rows - lo
        return Scaled(s.codes.index_select(0, sel), grid.index_select(0, sel), (1, s.block[1]), s.dense, s.steps)

    def problems(self, s: Scaled) -> list[str]:
        return self.src.problems(s)

    def reference(self, x: torch.Tensor) -> Optional[Scaled]:
        return None  # a reference of moved rows would need the inverse move: the diagnosis reads values


def through_table(tensors: dict) -> dict:
    """Tensors mapped through layout tables (one or several passes), with each 2-D row move of one
    block-scaled tensor kept block-scaled (``RowGathered``); everything else as it is."""
    from ckdiff.tensor.lazy import _SRC_SHIFT, DerivedTensor
    from ckdiff.tensor.table import Renamed
    memo: dict = {}

    def resolve(t):
        if id(t) in memo:
            return memo[id(t)]
        out = t
        if isinstance(t, Renamed) and isinstance(resolve(t.base), BlockScaled):
            out = resolve(t.base)  # the same data under the table's name
        elif isinstance(t, DerivedTensor) and len(t.shape) == 2 and len(t.group.inputs) == 1:
            src = resolve(t.group.inputs[0])
            if isinstance(src, BlockScaled) and len(src.shape) == 2:
                m = t.group.row_map(t.index)
                if m is not None and bool(((m >> _SRC_SHIFT) == 0).all()):
                    out = RowGathered(t.name, src, m & ((1 << _SRC_SHIFT) - 1))
        memo[id(t)] = out
        return out
    return {k: resolve(t) for k, t in tensors.items()}


class Reencoded(LazyTensor):
    """A float tensor as a correct encoding of it in ``like``'s encoding reads back (``like.reference``
    quantized, then dequantized): the logit check's reference for a quantized side with the same names."""

    def __init__(self, t: LazyTensor, like: BlockScaled):
        super().__init__(t.name, t.shape, torch.float32, t.origin)
        self.t, self.like = t, like

    def load(self) -> torch.Tensor:
        x = self.t.load().float().reshape(-1, self.shape[-1])
        return self.like.reference(x).values().reshape(self.shape)


def reencoded(floats: dict, encoded: dict) -> Optional[dict]:
    """``floats`` with each tensor whose namesake in ``encoded`` is a block-scaled view replaced by its
    reference encoding (``Reencoded``); None when a view has no float namesake of its shape or no quantizer
    (the names differ across layouts, or the encoding has no ``reference``)."""
    views = {k: t for k, t in encoded.items() if isinstance(t, BlockScaled)}
    if not views:
        return None
    out = dict(floats)
    for k, v in views.items():
        f = floats.get(k)
        if f is None or isinstance(f, BlockScaled) or tuple(f.shape) != tuple(v.shape) \
                or (len(v.shape) != 2 and not getattr(v, "flat_reference", False)) or not f.dtype.is_floating_point \
                or v.reference(f.rows(0, min(1, f.nrows)).float().reshape(-1, v.shape[-1])) is None:
            return None
        out[k] = Reencoded(f, v)
    return out


def is_block_scaled(t) -> bool:
    return isinstance(t, BlockScaled)


def fold(ck: Checkpoint, views: dict, encoding: str, note: str) -> Checkpoint:
    """``ck`` with each view replacing its stored tensors, in the order of the first stored tensor;
    ``meta["folded"]`` says where each stored tensor went (coverage accounts for it)."""
    if not views:
        return ck
    first = {v.stored[0]: v for v in views.values()}
    gone = {s for v in views.values() for s in v.stored}
    out: dict = {}
    for k, t in ck.tensors.items():
        if k in first:
            out[first[k].name] = first[k]
        elif k not in gone:
            out[k] = t
    folded = dict((ck.meta or {}).get("folded", {}))
    folded.update({s: f"folded into {v.name} ({encoding})" for v in views.values() for s in v.stored if s != v.name})
    meta = {**(ck.meta or {}), "folded": folded, "notes": list((ck.meta or {}).get("notes", [])) + [note]}
    return Checkpoint(ck.path, ck.format, out, ck.config, meta)


ViewFn = Callable[[Checkpoint], Checkpoint]

__all__ = ["BlockScaled", "Scaled", "RowGathered", "Reencoded", "reencoded", "through_table", "is_block_scaled",
           "fold", "float_step", "step_table", "FLOAT8"]
