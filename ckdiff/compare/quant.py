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
from ..converters.quant import BOUND, EMBED, SCALER, dequantize, float_shape, is_quantized, scale_per_element
from .diff import TensorResult, _unravel


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


def compare_quantized(name: str, flt, q, s, bits: int | None) -> TensorResult:
    """Float tensor ``flt`` vs codes ``q`` with scales ``s`` (all lazy)."""
    emb = bool(EMBED.search(name))
    shape = float_shape(q)
    r = TensorResult(name=name, status="quant", shape_a=list(flt.shape), shape_b=list(shape),
                     dtype_a=dtype_name(flt.dtype), dtype_b=f"{dtype_name(q.dtype)}+{dtype_name(s.dtype)} scale",
                     numel=flt.numel)
    if tuple(flt.shape) != tuple(shape):
        r.status = "shape"
        return r
    codes, scale = q.load(), s.load()
    w = flt.load().to(torch.float32)
    if emb:
        bits = 8  # the embedding is int8 per column whatever the quantize type
    if bits is None:
        bits = 4 if int(codes.abs().max()) <= 8 and int(codes.min()) >= -8 else 8
    bound = BOUND[8 if bits == 8 else 4]
    deq = dequantize(codes, scale, shape, emb)
    per = scale_per_element(scale, codes, shape, emb)
    diff = (w - deq).abs()
    units = diff / per.clamp(min=1e-30)
    m, i = torch.max(diff.reshape(-1), 0)
    r.max_abs, r.max_abs_index = float(m), _unravel(int(i), shape)
    r.mean_abs = float(diff.mean())
    r.max_rel = float((diff / w.abs().clamp(min=1e-30)).max())
    wf, df = w.reshape(-1).double(), deq.reshape(-1).double()
    den = math.sqrt(float(wf @ wf) * float(df @ df))
    r.cosine = float(wf @ df) / den if den else None
    r.n_over_tol = int((units > bound).sum())
    r.nan_a, r.nan_b = int(torch.isnan(w).sum()), 0
    r.atol, r.rtol, r.tol_source = None, None, f"{bound} x scale (int{bits})"
    r.note = (f"dequantized int{bits}{' embedding per column' if emb else ''}; "
              f"max error {float(units.max()):.3g} x scale (bound {bound})")
    codes_ok = int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
    if not codes_ok:
        r.note += f"; codes outside the int{bits} range"
    if r.n_over_tol or not codes_ok or not bool((scale > 0).all()):
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
