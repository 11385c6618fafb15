"""Tensor-by-tensor comparison of two checkpoints, streamed in bounded chunks.

Policy (documented in the README):
- Same dtype: a tensor matches only if its bytes are identical (no float math).
- Different dtypes (a cast happened): element ``i`` is within tolerance when
  ``|a_i - b_i| <= atol + rtol * |a_i|`` with the per-dtype defaults of the less
  precise dtype (``torch.testing``'s table); ``--atol/--rtol`` and per-pattern
  overrides replace them, and the report shows which applied.
- NaN: NaN in both at the same element counts as equal; NaN on one side only is
  over tolerance. Inf must match sign. NaN/Inf counts are reported per side.
"""
from __future__ import annotations


import sys
from typing import TYPE_CHECKING, Callable, Optional

from ckdiff.tensor.dtype_names import dtype_name
from ckdiff.compare.bytes_equal import bytes_equal
from ckdiff.compare.status import Status
from ckdiff.compare.result import Options, TensorResult
from ckdiff.compare.stream import _fill_stats, _kin, _new_stats, _pairs, _ranges, _raw

if TYPE_CHECKING:
    from ckdiff.tensor.lazy import LazyTensor


def _block_scaled(t) -> bool:
    """Whether ``t`` is an encoding's block-scaled view. Such views exist only once their module is loaded
    (with torch), so a comparison that never loaded it (compare/lane.py) has none."""
    mod = sys.modules.get("ckdiff.tensor.blockscaled")
    return mod is not None and isinstance(t, mod.BlockScaled)


def compare_tensor(name: str, ta: LazyTensor, tb: LazyTensor, opts: Options,
                   progress: Optional[Callable[[int], None]] = None) -> TensorResult:
    """One pass over both tensors: bytes first, and from the first differing chunk on every
    metric from the fused kernel (chunks before it are read once more for their norms)."""
    r = TensorResult(name=name, status=Status.EQUAL, shape_a=ta.shape, shape_b=tb.shape,
                     dtype_a=dtype_name(ta.dtype), dtype_b=dtype_name(tb.dtype), numel=ta.numel)
    if ta.shape != tb.shape:
        r.status, r.bit_exact = Status.SHAPE, False
        if progress:
            progress(ta.nbytes + tb.nbytes)
        return r
    if _block_scaled(ta) or _block_scaled(tb):  # encodings: judged in scale units
        from ckdiff.compare.quantized import compare_scaled
        out = compare_scaled(name, ta, tb, opts.chunk_bytes)
        if progress:
            progress(ta.nbytes + tb.nbytes)
        return out
    tol = opts.tolerance(name, ta.dtype, tb.dtype)
    r.atol, r.rtol, r.tol_source = tol.atol, tol.rtol, tol.source
    same_dtype = ta.dtype == tb.dtype
    ranges, row = _ranges(ta, tb, opts.chunk_bytes, _raw(ta) and _raw(tb))
    # the fused kernel, made at the first differing chunk: numba's (Options.device None) or torch's on a device
    stats, kin = None, _kin
    if opts.device is not None:
        import torch
        from ckdiff.compare.kernels_torch import TorchStats
        stats = TorchStats(torch.device(opts.device))
        kin = stats.input
    first_diff = None if same_dtype else 0
    for k, (lo, hi, ca, cb) in enumerate(_pairs(ta, tb, ranges, row)):
        if first_diff is None:
            if bytes_equal(ca, cb):
                if progress:
                    progress((hi - lo) * (ta.dtype.itemsize + tb.dtype.itemsize))
                continue
            first_diff = k
        stats = stats or _new_stats()
        stats.add(kin(ca, ta.dtype), kin(cb, tb.dtype), lo, tol.atol, tol.rtol)
        del ca, cb  # a window is unmapped as soon as it is dropped
        if progress:
            progress((hi - lo) * (ta.dtype.itemsize + tb.dtype.itemsize))
    r.bit_exact = first_diff is None
    if r.bit_exact:
        r.cosine = 1.0 if ta.numel else None
        return r
    stats = stats or _new_stats()  # (an empty tensor cast to another dtype has no chunk)
    if first_diff:  # the equal chunks before the first difference still count in norms and NaN/Inf
        for lo, hi, ca, cb in _pairs(ta, tb, ranges[:first_diff], row):
            stats.add(kin(ca, ta.dtype), kin(cb, tb.dtype), lo, tol.atol, tol.rtol)
    _fill_stats(r, stats, ta.shape, ta.numel)
    r.status = Status.DIFFER if stats.over else (Status.CLOSE if same_dtype else Status.CAST)
    if not same_dtype and r.status == Status.CAST and opts.strict_dtype:
        r.status = Status.DTYPE
    if not same_dtype:
        r.note = f"cast {r.dtype_a} -> {r.dtype_b}"
    elif r.status == Status.CLOSE and tol.source == "exact":
        r.note = "bytes differ only in NaN payloads or signed zeros"
    return r
