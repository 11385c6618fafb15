"""Comparing a JetStream quantized checkpoint with a float one.

The quantized side is dequantized and each element is judged in units of its
own stored scale: ``|W - W~| <= 1.5 s`` for int8 and ``1.0 s`` for int4
(meta-jetstream-format.md section 6, measured 1.14 and 0.53 with bf16
arithmetic). Two quantized checkpoints need nothing special: codes and scales
are compared exactly like any same-dtype tensor.
"""
from __future__ import annotations

import math

import torch

from ..converters.formats import dtype_name
from ..converters.lazy import Checkpoint
from ..converters.quant import (BLOCK, BOUND, EMBED, SCALER, dequantize, float_shape, is_quantized,
                                scale_per_element)
from .diff import TensorResult, _unravel
from .kernels import Stats, as_kernel_input


def quant_bits(ck: Checkpoint) -> int | None:
    qt = (ck.config or {}).get("quantize_type")
    if qt:
        return 8 if "int8" in qt else 4
    return None


def quantized_side(a: Checkpoint, b: Checkpoint):
    """'a' or 'b' when exactly one side is quantized, else None."""
    qa, qb = is_quantized(a.tensors), is_quantized(b.tensors)
    if qa == qb:
        return None
    return "a" if qa else "b"


def _blocks(flt, q, s, shape, emb: bool, chunk_bytes: int):
    """(flat offset, float rows, dequantized rows, per-element scale) chunk by chunk."""
    if len(shape) == 2 and len(q.shape) == 3:  # blockwise [nb, 128, out]: codes and scales of this tensor read once
        codes, scale = q.load(), s.load().to(torch.float32)
        nb, out, n = codes.shape[0], shape[0], shape[1]
        scale = scale.reshape(nb, out)
        step = max(1, chunk_bytes // max(1, 4 * n))
        for lo in range(0, out, step):
            hi = min(out, lo + step)
            sc = scale[:, lo:hi].reshape(nb, 1, hi - lo)
            deq = (codes[:, :, lo:hi].to(torch.float32) * sc).permute(2, 0, 1).reshape(hi - lo, n)
            per = sc.expand(nb, BLOCK, hi - lo).permute(2, 0, 1).reshape(hi - lo, n)
            yield lo * n, flt.rows(lo, hi), deq, per, codes[:, :, lo:hi]
        return
    nrows = shape[0]
    row = max(1, math.prod(shape[1:]))
    step = max(1, chunk_bytes // (4 * row))
    full_scale = s.load() if emb else None
    for lo in range(0, nrows, step):
        hi = min(nrows, lo + step)
        codes = q.rows(lo, hi)
        sc = full_scale if emb else (s.rows(lo, hi) if s.shape else s.load())
        shp = (hi - lo,) + tuple(shape[1:])
        deq = dequantize(codes, sc, shp, emb)
        per = scale_per_element(sc, codes, shp, emb)
        yield lo * row, flt.rows(lo, hi), deq, per, codes


def compare_quantized(name: str, flt, q, s, bits: int | None, chunk_bytes: int = 8 << 20) -> TensorResult:
    """Float tensor ``flt`` vs codes ``q`` with scales ``s`` (all lazy), streamed by row blocks."""
    emb = bool(EMBED.search(name))
    shape = float_shape(q)
    r = TensorResult(name=name, status="quant", shape_a=list(flt.shape), shape_b=list(shape),
                     dtype_a=dtype_name(flt.dtype), dtype_b=f"{dtype_name(q.dtype)}+{dtype_name(s.dtype)} scale",
                     numel=flt.numel)
    if tuple(flt.shape) != tuple(shape):
        r.status = "shape"
        return r
    if emb:
        bits = 8  # the embedding is int8 per column whatever the quantize type
    stats = Stats()
    over = {8: 0, 4: 0}
    umax, cmin, cmax, scale_ok = 0.0, 0, 0, True
    for off, w, deq, per, codes in _blocks(flt, q, s, shape, emb, chunk_bytes):
        w = w.to(torch.float32).contiguous()
        stats.add(as_kernel_input(w), as_kernel_input(deq.contiguous()), off, 0.0, 0.0)
        units = (w - deq).abs_().div_(per.clamp(min=1e-30))
        for b in over:
            over[b] += int((units > BOUND[b]).sum())
        umax = max(umax, float(units.max())) if units.numel() else umax
        if codes.numel():
            cmin, cmax = min(cmin, int(codes.min())), max(cmax, int(codes.max()))
        scale_ok = scale_ok and bool((per > 0).all())
    if bits is None:
        bits = 4 if cmax <= 8 and cmin >= -8 else 8
    bound = BOUND[8 if bits == 8 else 4]
    r.max_abs = max(0.0, stats.max_abs)
    r.max_abs_index = _unravel(stats.max_idx, shape) if stats.max_idx is not None else None
    r.mean_abs = stats.sum_abs / max(1, flt.numel)
    r.max_rel = stats.max_rel
    r.cosine = stats.cosine
    r.n_over_tol = over[8 if bits == 8 else 4]
    r.nan_a, r.nan_b, r.inf_a = stats.nan_a, 0, stats.inf_a
    r.atol, r.rtol, r.tol_source = None, None, f"{bound} x scale (int{bits})"
    r.note = (f"dequantized int{bits}{' embedding per column' if emb else ''}; "
              f"max error {umax:.3g} x scale (bound {bound})")
    codes_ok = cmin >= -(2 ** (bits - 1)) and cmax <= 2 ** (bits - 1) - 1
    if not codes_ok:
        r.note += f"; codes outside the int{bits} range"
    if r.n_over_tol or not codes_ok or not scale_ok:
        r.status = "differ"
    return r


def compare_mixed(a: Checkpoint, b: Checkpoint, side: str, selected) -> tuple[list[TensorResult], set]:
    """Results for every quantized tensor, and the names they consumed on each side."""
    fl, qu = (b, a) if side == "a" else (a, b)
    bits = quant_bits(qu)
    results, used = [], set()
    for k in qu.tensors:
        if k.endswith(SCALER) or k + SCALER not in qu.tensors or k not in fl.tensors or not selected(k):
            continue
        r = compare_quantized(k, fl.tensors[k], qu.tensors[k], qu.tensors[k + SCALER], bits)
        if side == "a":  # keep A/B columns the right way round
            r.shape_a, r.shape_b, r.dtype_a, r.dtype_b = r.shape_b, r.shape_a, r.dtype_b, r.dtype_a
        results.append(r)
        used.update({k, k + SCALER})
    return results, used
