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
from ..converters.quant import BLOCK, BOUND, EMBED, SCALER, float_shape, is_quantized
from .diff import TensorResult, _prefetch, _unravel
from .kernels import QuantStats
from .status import Status


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
    """(flat offset, float rows [R, C], codes [R, C] in float order, flat scales, row stride,
    block stride, block width, per column) chunk by chunk: element (i, j) has the scale
    ``scales[i * sr + (j // cdiv) * sc]``, or ``scales[i * sr + j]`` per column."""
    C = shape[-1]
    if len(shape) == 2 and len(q.shape) == 3:  # blockwise [nb, 128, out]: this tensor's codes read once
        codes, scale = q.load(), s.load()
        nb, out = codes.shape[0], shape[0]
        scale = scale.reshape(nb, out)
        step = max(1, chunk_bytes // max(1, 4 * C))
        for lo in range(0, out, step):
            hi = min(out, lo + step)
            cq = codes[:, :, lo:hi].permute(2, 0, 1).reshape(hi - lo, C)
            yield lo * C, flt.rows(lo, hi), cq, scale[:, lo:hi].T.contiguous(), nb, 1, BLOCK, False
        return
    rows = math.prod(shape[:-1])
    step = max(1, chunk_bytes // (4 * C * max(1, math.prod(shape[1:-1]))))
    full_scale = s.load() if emb else None
    for lo in range(0, shape[0], step):
        hi = min(shape[0], lo + step)
        codes = q.rows(lo, hi).reshape(-1, C)
        w = flt.rows(lo, hi).reshape(-1, C)
        if emb:
            yield lo * C, w, codes, full_scale, 0, 0, C, True
        else:
            sc = s.rows(lo, hi) if s.shape else s.load()
            yield lo * C * (rows // shape[0]), w, codes, sc, 1, 0, C, False


def compare_quantized(name: str, flt, q, s, bits: int | None, chunk_bytes: int = 32 << 20) -> TensorResult:
    """Float tensor ``flt`` vs codes ``q`` with scales ``s`` (all lazy), streamed by row blocks
    through one fused kernel (compare/kernels.py). Row blocks of 32 MiB of float32-equivalent rows:
    a quarter of the kernel launches and hand-offs of 8 MiB (4 GiB float vs int8: 2.6-3.1 -> 2.4-2.7 s
    in process, peak RssAnon +10 MiB)."""
    emb = bool(EMBED.search(name))
    shape = float_shape(q)
    r = TensorResult(name=name, status=Status.QUANT, shape_a=list(flt.shape), shape_b=list(shape),
                     dtype_a=dtype_name(flt.dtype), dtype_b=f"{dtype_name(q.dtype)}+{dtype_name(s.dtype)} scale",
                     numel=flt.numel)
    if tuple(flt.shape) != tuple(shape):
        r.status = Status.SHAPE
        return r
    if emb:
        bits = 8  # the embedding is int8 per column whatever the quantize type
    st = QuantStats()
    scale_ok = True
    # row blocks are read (and gathered, for a mapped float side) on a thread one block ahead, with
    # one torch thread: an OpenMP team of its own would spin beside the kernel's threads (measured)
    blocks = _prefetch(_blocks(flt, q, s, shape, emb, chunk_bytes), torch_threads=1)
    for off, w, codes, sc, sr, scol, cdiv, percol in blocks:
        st.add(w, codes.to(torch.int8), sc, sr, scol, cdiv, off, percol)
        scale_ok = scale_ok and bool((sc > 0).all())
    if bits is None:
        bits = 4 if st.cmax <= 8 and st.cmin >= -8 else 8
    bound = BOUND[8 if bits == 8 else 4]
    r.max_abs = max(0.0, st.max_abs)
    r.max_abs_index = _unravel(st.max_idx, shape) if st.max_idx is not None else None
    r.mean_abs = st.sum_abs / max(1, flt.numel)
    r.max_rel = st.max_rel
    r.cosine = st.cosine
    r.norm_a, r.norm_b = math.sqrt(max(0.0, st.na)), math.sqrt(max(0.0, st.nb))
    r.n_over_tol = st.over[bound]
    r.nan_a, r.nan_b, r.inf_a = st.nan, 0, st.inf
    r.atol, r.rtol, r.tol_source = None, None, f"{bound} x scale (int{bits})"
    r.note = (f"dequantized int{bits}{' embedding per column' if emb else ''}; "
              f"max error {st.max_units:.3g} x scale (bound {bound})")
    codes_ok = st.cmin >= -(2 ** (bits - 1)) and st.cmax <= 2 ** (bits - 1) - 1
    if not codes_ok:
        r.note += f"; codes outside the int{bits} range"
    if r.n_over_tol or not codes_ok or not scale_ok:
        r.status = Status.DIFFER
    return r


def mixed_jobs(a: Checkpoint, b: Checkpoint, side: str, selected) -> tuple[list, set]:
    """(jobs, consumed names): one job ``(name, bytes, fn)`` per quantized tensor, ``fn() -> TensorResult``."""
    fl, qu = (b, a) if side == "a" else (a, b)
    bits = quant_bits(qu)
    jobs, used = [], set()
    for k in qu.tensors:
        if k.endswith(SCALER) or k + SCALER not in qu.tensors or k not in fl.tensors or not selected(k):
            continue

        def run(k=k):
            r = compare_quantized(k, fl.tensors[k], qu.tensors[k], qu.tensors[k + SCALER], bits)
            if side == "a":  # keep A/B columns the right way round
                r.shape_a, r.shape_b, r.dtype_a, r.dtype_b = r.shape_b, r.shape_a, r.dtype_b, r.dtype_a
            return r
        nbytes = fl.tensors[k].nbytes + qu.tensors[k].nbytes + qu.tensors[k + SCALER].nbytes
        jobs.append((k, nbytes, run))
        used.update({k, k + SCALER})
    return jobs, used


def compare_mixed(a: Checkpoint, b: Checkpoint, side: str, selected) -> tuple[list[TensorResult], set]:
    """Results for every quantized tensor, and the names they consumed on each side."""
    jobs, used = mixed_jobs(a, b, side, selected)
    return [fn() for _, _, fn in jobs], used
