"""Block-scaled tensors (GGUF block quantization, FP8 with 128x128 block scales) judged in scale units.

A block-scaled lazy tensor has ``rows`` (dequantized float32), ``units(lo, hi)`` (each element's
own block scale) and ``bound`` (the rounding bound in those units). Element ``i`` of a comparison is
within tolerance when ``|a_i - b_i| <= bound_a * unit_a_i + bound_b * unit_b_i`` (a float side
contributes 0). Two tensors of the same block format compare their stored codes and scales exactly
(``raw_rows``). Rows are streamed in bounded blocks.
"""
from __future__ import annotations

import math

import torch

from ..converters.formats import dtype_name
from .status import Status


def is_block_scaled(t) -> bool:
    return callable(getattr(t, "units", None)) and getattr(t, "bound", None) is not None


def _kind(t) -> str:
    return getattr(t, "qtype", None) or dtype_name(t.dtype)


def compare_block_scaled(name, ta, tb, chunk_bytes: int = 8 << 20):
    from .diff import TensorResult, _unravel
    r = TensorResult(name=name, status=Status.QUANT, shape_a=list(ta.shape), shape_b=list(tb.shape),
                     dtype_a=_kind(ta), dtype_b=_kind(tb), numel=ta.numel)
    if tuple(ta.shape) != tuple(tb.shape):
        r.status = Status.SHAPE
        return r
    n = ta.shape[0] if ta.shape else 1
    row = max(1, math.prod(ta.shape[1:]))
    step = max(1, chunk_bytes // (16 * row))
    same = is_block_scaled(ta) and is_block_scaled(tb) and _kind(ta) == _kind(tb) and hasattr(ta, "raw_rows")
    if same:
        equal = all(torch.equal(ta.raw_rows(lo, min(n, lo + step)), tb.raw_rows(lo, min(n, lo + step)))
                    for lo in range(0, n, step))
        if equal:
            r.status, r.bit_exact, r.cosine, r.tol_source = Status.EQUAL, True, 1.0, "exact (codes and scales)"
            r.note = f"{_kind(ta)} codes and scales identical"
            return r
    over = 0
    max_abs, max_idx, max_units, sum_abs = -1.0, None, 0.0, 0.0
    dot = na = nb = 0.0
    bad_units = False
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        xa, xb = ta.rows(lo, hi).float().reshape(-1), tb.rows(lo, hi).float().reshape(-1)
        tol = torch.zeros_like(xa)
        for t in (ta, tb):
            if is_block_scaled(t):
                u = t.units(lo, hi).float().reshape(-1)
                bad_units |= bool((~torch.isfinite(u)).any())
                tol += t.bound * u
        d = (xa - xb).abs()
        over += int((d > tol).sum()) + int(torch.isnan(d).sum())
        if d.numel():
            i = int(torch.nan_to_num(d, nan=float("inf")).argmax())
            if float(d[i]) > max_abs or math.isnan(float(d[i])):
                max_abs, max_idx = float(d[i]), lo * row + i
            unit = tol.clamp_min(torch.finfo(torch.float32).tiny)
            max_units = max(max_units, float(torch.nan_to_num(d / unit * (d > 0), nan=float("inf")).max()))
        sum_abs += float(torch.nan_to_num(d).sum())
        dot += float((xa.double() * xb.double()).sum())
        na += float((xa.double() ** 2).sum())
        nb += float((xb.double() ** 2).sum())
    r.max_abs = max(0.0, max_abs)
    r.max_abs_index = _unravel(max_idx, ta.shape) if max_idx is not None else None
    r.mean_abs = sum_abs / max(1, ta.numel)
    r.cosine = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else None
    r.n_over_tol = over
    r.bit_exact = False
    kinds = [f"{_kind(t)} {t.bound} x scale" for t in (ta, tb) if is_block_scaled(t)]
    r.tol_source = " + ".join(kinds)
    r.note = f"dequantized; max error {max_units:.3g} x its bound ({r.tol_source})"
    if over or bad_units:
        r.status = Status.DIFFER
        if bad_units:
            r.note += "; non-finite block scales"
    return r
