"""Fused comparison kernels: every metric of a chunk pair in one pass, both cores.

``Stats.add`` runs ``_metrics`` over two equally long chunks of raw element data:
max |a - b| with its first index, the sums of |a - b|, a.b, a.a and b.b (float64,
kept per 2048-element block), max relative difference, the count over tolerance
and NaN/Inf counts per side. No full-size temporaries: each thread decodes 2048
elements at a time into small float64 buffers (bf16 by a shift, fp16 by exponent
arithmetic, fp8/8- and 16-bit integers through an exact table) and runs a
branch-free loop over them that LLVM vectorises. For that the block functions
carry their own ``fastmath`` (numba's IR-level inlining would compile them with
the caller's flags) and ``error_model="numpy"`` (no zero-division branch), and
take maxima as integer maxima of the float bits (a float maximum without 'nnan'
is not vectorised). A block holding a NaN or Inf is redone element by element
with the NaN/Inf policy of compare/tensor.py. ``ScaledStats.add`` does the same for two
sides in scale units, each plain values, codes times a block scale, or values with a unit per element
(the block-scaled protocol, tensor/blockscaled.py): one kernel for every encoding.

numba compiles each array-type signature once and caches it on disk.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numba
import numpy as np

from ckdiff.tensor.dtype_names import dtype_name

if TYPE_CHECKING:
    import torch

# numba's own thread pool, not a second OpenMP runtime spinning beside torch's on the same cores
numba.config.THREADING_LAYER = "workqueue"
from numba import njit, prange  # noqa: E402


def _load_numba_registries() -> None:
    """Load numba's CPU registries now, without scipy.linalg. The first compiled function numba loads
    imports its numpy implementations, one of which probes for BLAS by importing scipy.linalg (~0.2 s of a
    compare's start-up); these kernels call no BLAS routine. The probe then finds no BLAS (numba's own
    ``np.dot`` and ``np.linalg`` stay unavailable to jitted code in this process) and scipy.linalg imports
    normally for anyone else afterwards."""
    import sys
    blocked = "scipy.linalg" not in sys.modules
    if blocked:
        sys.modules["scipy.linalg"] = None  # an import of it raises ImportError while this is set
    try:
        from numba.core.registry import cpu_target
        cpu_target.target_context.refresh()
    finally:
        if blocked and sys.modules.get("scipy.linalg", 0) is None:
            del sys.modules["scipy.linalg"]


_load_numba_registries()

BLOCK = 2048
SBLOCK = 512  # the scaled kernel's block: its six float64 buffers stay in a core's L1 cache
_BIG = 1.7976931348623157e308
_FM = {"reassoc", "nsz"}  # sums may be reordered; no contraction or reciprocals, NaN/Inf kept

# decode modes: every chunk arrives as raw bytes (one compiled signature for every dtype pair)
F32, F64, BF16, LUT16, LUT8, FP16, I8 = 0, 1, 2, 3, 4, 5, 6


@njit(cache=True, nogil=True, inline="always")
def _decode(src, lo, m, mode, lut, out, tmp):
    if mode == 0:
        v = src[lo * 4:(lo + m) * 4].view(np.float32)
        for j in range(m):
            out[j] = np.float64(v[j])
    elif mode == 1:
        v = src[lo * 8:(lo + m) * 8].view(np.float64)
        for j in range(m):
            out[j] = v[j]
    elif mode == 2:  # bfloat16: the high half of a float32
        u = src[lo * 2:(lo + m) * 2].view(np.uint16)
        for j in range(m):
            tmp[j] = np.uint32(u[j]) << 16
        f = tmp.view(np.float32)
        for j in range(m):
            out[j] = np.float64(f[j])
    elif mode == 3:  # exact table of every 16-bit value
        u = src[lo * 2:(lo + m) * 2].view(np.uint16)
        for j in range(m):
            out[j] = lut[u[j]]
    elif mode == 5:  # float16 by its bits: as a float32 2**112 times too small, then scaled back (exact)
        u = src[lo * 2:(lo + m) * 2].view(np.uint16)
        for j in range(m):
            h = np.uint32(u[j])
            mag = (h & np.uint32(0x7FFF)) << 13
            if (h & np.uint32(0x7C00)) == np.uint32(0x7C00):  # Inf and NaN keep an all-ones exponent
                mag = mag | np.uint32(0x7F800000)
            tmp[j] = mag | ((h & np.uint32(0x8000)) << 16)
        f = tmp.view(np.float32)
        for j in range(m):
            out[j] = np.float64(f[j]) * 5.192296858534828e33
    elif mode == 6:  # int8 codes
        v = src[lo:lo + m].view(np.int8)
        for j in range(m):
            out[j] = np.float64(v[j])
    else:  # exact table of every 8-bit value
        for j in range(m):
            out[j] = lut[src[lo + j]]


_INF_BITS = np.uint64(0x7FF0000000000000)
_TINY = 2.0 ** -1000  # below this a running max relative difference is treated as 0 (see _fast)
_SLACK = 1.0 - 2.0 ** -40


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def _fast(x, y, m, atol, rtol, rmc, dbuf):
    """One block, branch-free so that LLVM vectorises it: the four sums, the over-tolerance
    count, |a - b| into ``dbuf`` with the bits of its maximum (an integer maximum: non-negative
    floats order like their bit patterns, NaN and Inf above every finite value; a float maximum
    does not vectorise without 'nnan'), and ``hit``, the number of elements whose relative
    difference may exceed ``rmc`` (a running maximum lowered by 2**-40, so that rounding of
    ``rmc * |a|`` never hides one; below 2**-1022 the product is subnormal and any d > 0 counts)."""
    s = 0.0
    dot = 0.0
    na = 0.0
    nb = 0.0
    over = 0
    hit = 0
    for j in range(m):
        xv = x[j]
        yv = y[j]
        d = abs(xv - yv)
        ax = abs(xv)
        s += d
        dot += xv * yv
        na += xv * xv
        nb += yv * yv
        over += d > atol + rtol * ax
        p = rmc * ax
        hit += (d > p) | ((d > 0.0) & (p < 2.2250738585072014e-308))
        dbuf[j] = d
    du = dbuf.view(np.uint64)
    dm = np.uint64(0)
    for j in range(m):
        dm = max(dm, du[j])
    return s, dot, na, nb, dm, over, hit


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def _rel(x, dbuf, m, rbuf):
    """Bits of the largest |a - b| / |a| of a block of finite values (0 where they are equal, Inf
    where a is 0 and b is not)."""
    for j in range(m):
        d = dbuf[j]
        r = d / abs(x[j])
        rbuf[j] = 0.0 if d == 0.0 else r
    ru = rbuf.view(np.uint64)
    rm = np.uint64(0)
    for j in range(m):
        rm = max(rm, ru[j])
    return rm


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _metrics(a, mode_a, lut_a, b, mode_b, lut_b, n, atol, rtol, nstripe, outf, outi, sf, si):
    """Blocks of BLOCK elements, split into ``nstripe`` runs of consecutive blocks, one thread each.
    Per block: ``outf`` = sum |d|, dot, a.a, b.b and ``outi`` = count over tolerance (fixed block
    sums: the result does not depend on the thread count). Per stripe: ``sf`` = max |d|, max rel;
    ``si`` = index of that max |d| (first), NaN a, NaN b, Inf a, Inf b."""
    nblk = (n + BLOCK - 1) // BLOCK
    per = (nblk + nstripe - 1) // nstripe
    for t in prange(nstripe):
        x = np.empty(BLOCK, np.float64)
        y = np.empty(BLOCK, np.float64)
        tmp = np.empty(BLOCK, np.uint32)
        dbuf = np.empty(BLOCK, np.float64)
        rbuf = np.empty(BLOCK, np.float64)
        one = np.empty(1, np.uint64)
        mx = -1.0
        mi = -1
        mr = 0.0
        nan_a = 0
        nan_b = 0
        inf_a = 0
        inf_b = 0
        for kb in range(t * per, min(nblk, (t + 1) * per)):
            lo = kb * BLOCK
            m = min(n, lo + BLOCK) - lo
            _decode(a, lo, m, mode_a, lut_a, x, tmp)
            _decode(b, lo, m, mode_b, lut_b, y, tmp)
            rmc = mr * _SLACK if mr >= _TINY else 0.0
            bs, bdot, bna, bnb, dm, bover, hit = _fast(x, y, m, atol, rtol, rmc, dbuf)
            if dm < _INF_BITS:
                outf[kb, 0] = bs
                outf[kb, 1] = bdot
                outf[kb, 2] = bna
                outf[kb, 3] = bnb
                outi[kb] = bover
                if hit:
                    one[0] = _rel(x, dbuf, m, rbuf)
                    mr = max(mr, one.view(np.float64)[0])
                one[0] = dm
                bm = one.view(np.float64)[0]
                if bm > mx:
                    for j in range(m):
                        if dbuf[j] == bm:
                            mx = bm
                            mi = lo + j
                            break
                continue
            s = 0.0
            dot = 0.0
            na = 0.0
            nb = 0.0
            over = 0
            for j in range(m):  # a NaN or Inf in this block: element by element
                xv = x[j]
                yv = y[j]
                ax = abs(xv)
                if math.isfinite(xv) and math.isfinite(yv):
                    d = abs(xv - yv)
                    dot += xv * yv
                    na += xv * xv
                    nb += yv * yv
                    s += d
                    if d > 0.0:
                        r = d / ax if ax > 0.0 else math.inf
                        if r > mr:
                            mr = r
                        if d > atol + rtol * ax:
                            over += 1
                else:
                    xn = xv != xv
                    yn = yv != yv
                    if xn:
                        nan_a += 1
                    if yn:
                        nan_b += 1
                    if math.isinf(xv):
                        inf_a += 1
                    if math.isinf(yv):
                        inf_b += 1
                    if (xn and yn) or xv == yv:
                        d = 0.0
                    else:
                        d = math.inf
                        over += 1
                        mr = math.inf
                if d > mx:
                    mx = d
                    mi = lo + j
            outf[kb, 0] = s
            outf[kb, 1] = dot
            outf[kb, 2] = na
            outf[kb, 3] = nb
            outi[kb] = over
        sf[t, 0] = mx
        sf[t, 1] = mr
        si[t, 0] = mi
        si[t, 1] = nan_a
        si[t, 2] = nan_b
        si[t, 3] = inf_a
        si[t, 4] = inf_b


# byte equality lives in compare/bytes_equal.py (no numba: an identical pair never loads the kernels)
from ckdiff.compare.bytes_equal import _SPLIT, bytes_equal, memory_equal  # noqa: E402,F401 (re-exported)


@njit(cache=True, nogil=True, inline="always")
def _side(src, mode, lut, steps, grid, br, ncb, bc, kind, i, C, j0, m, val, unit, tmp):
    """Values and units of elements [j0, j0 + m) of row ``i`` of one side: ``kind`` 0 plain values (unit
    0), 1 codes times the scale ``grid[(i // br) * ncb + j // bc]`` in float32 (unit: |scale| times the
    code's float step when ``steps`` has one per byte), 2 values with their units in ``grid``."""
    _decode(src, i * C + j0, m, mode, lut, val, tmp)
    if kind == 0:  # the caller's unit buffer of a plain side stays 0
        return
    g = (i // br) * ncb
    if kind == 2 or bc == 1:
        for j in range(m):
            sv = grid[g + (j0 + j) // bc]
            if kind == 1:
                val[j] = np.float64(np.float32(val[j]) * sv)
            unit[j] = abs(np.float64(sv))
    else:
        j = 0
        while j < m:
            col = (j0 + j) // bc
            end = min(m, (col + 1) * bc - j0)
            sv = grid[g + col]
            su = abs(np.float64(sv))
            for jj in range(j, end):
                val[jj] = np.float64(np.float32(val[jj]) * sv)
                unit[jj] = su
            j = end
    if kind == 1 and steps.size > 1:  # float codes (FP8): the spacing of the format at each code
        base = i * C + j0
        for j in range(m):
            unit[j] *= steps[src[base + j]]


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def _sfast(x, ux, y, uy, m, ba, bb, rmc, umc, dbuf):
    """One block of two sides with their units, branch-free (see _fast): the four sums, the count over
    ``ba * ux + bb * uy``, the rel ``hit`` count, ``uhit`` (elements whose error in units ``d / (ux + uy)``
    may exceed ``umc``, the running maximum lowered by 2**-40: only such blocks take the division pass of
    _units) and the bits of max |d| (``dbuf``). An element of B equal to 0 where A is not has a relative
    error of exactly 1 (``zero`` counts them) and is left out of ``hit`` (most blocks hold one once the
    running maximum is 1, and would otherwise all take the division pass of _rel)."""
    s = 0.0
    dot = 0.0
    na = 0.0
    nb = 0.0
    over = 0
    hit = 0
    uhit = 0
    zero = 0
    for j in range(m):
        xv = x[j]
        yv = y[j]
        d = abs(xv - yv)
        u = ux[j] + uy[j]
        s += d
        dot += xv * yv
        na += xv * xv
        nb += yv * yv
        over += d > ba * ux[j] + bb * uy[j]
        uhit += d > umc * u
        p = rmc * abs(xv)
        nz = yv != 0.0
        hit += ((d > p) | ((d > 0.0) & (p < 2.2250738585072014e-308))) & nz
        zero += (d > 0.0) & ~nz
        dbuf[j] = d
    du = dbuf.view(np.uint64)
    dm = np.uint64(0)
    for j in range(m):
        dm = max(dm, du[j])
    return s, dot, na, nb, over, hit, uhit, zero, dm


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def _units(ux, uy, dbuf, m, ubuf):
    """Bits of the largest error in units ``d / (ux + uy)`` of a block of finite values."""
    for j in range(m):
        ubuf[j] = dbuf[j] / max(ux[j] + uy[j], 1e-30)
    uu = ubuf.view(np.uint64)
    um = np.uint64(0)
    for j in range(m):
        um = max(um, uu[j])
    return um


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def _qrun(x, q, sv, m, bb, rmc, dbuf):
    """The common case in one pass (see _sfast): float ``x`` against int8 codes ``q`` times one scale
    ``sv`` (a run of elements sharing a block scale), dequantized in float32 as runtimes do."""
    s = 0.0
    dot = 0.0
    na = 0.0
    nb = 0.0
    over = 0
    hit = 0
    zero = 0
    tol = bb * abs(np.float64(sv))
    for j in range(m):
        xv = x[j]
        yv = np.float64(np.float32(q[j]) * sv)
        d = abs(xv - yv)
        s += d
        dot += xv * yv
        na += xv * xv
        nb += yv * yv
        over += d > tol
        p = rmc * abs(xv)
        nz = yv != 0.0
        hit += ((d > p) | ((d > 0.0) & (p < 2.2250738585072014e-308))) & nz
        zero += (d > 0.0) & ~nz
        dbuf[j] = d
    du = dbuf.view(np.uint64)
    dm = np.uint64(0)
    for j in range(m):
        dm = max(dm, du[j])
    return s, dot, na, nb, over, hit, zero, dm


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def _qcols(x, q, sv, m, bb, rmc, dbuf, ubuf):
    """``_qrun`` for a scale per element (per-column scales, JetStream's embedding): float ``x`` against
    int8 codes ``q`` times ``sv[j]``; also the bits of the largest error in units of its own scale."""
    s = 0.0
    dot = 0.0
    na = 0.0
    nb = 0.0
    over = 0
    hit = 0
    zero = 0
    for j in range(m):
        xv = x[j]
        u = abs(np.float64(sv[j]))
        yv = np.float64(np.float32(q[j]) * sv[j])
        d = abs(xv - yv)
        s += d
        dot += xv * yv
        na += xv * xv
        nb += yv * yv
        over += d > bb * u
        p = rmc * abs(xv)
        nz = yv != 0.0
        hit += ((d > p) | ((d > 0.0) & (p < 2.2250738585072014e-308))) & nz
        zero += (d > 0.0) & ~nz
        dbuf[j] = d
        ubuf[j] = d / max(u, 1e-30)
    du = dbuf.view(np.uint64)
    uu = ubuf.view(np.uint64)
    dm = np.uint64(0)
    um = np.uint64(0)
    for j in range(m):
        dm = max(dm, du[j])
        um = max(um, uu[j])
    return s, dot, na, nb, over, hit, zero, dm, um


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _scaled_metrics(a, mode_a, lut_a, steps_a, grid_a, br_a, ncb_a, bc_a, kind_a,
                    b, mode_b, lut_b, steps_b, grid_b, br_b, ncb_b, bc_b, kind_b,
                    R, C, ba, bb, nstripe, outf, outi, sf, si):
    """Rows [R, C] of two sides, each plain values, codes times block scales, or values with units
    (``_side``), compared element by element within ``ba * unit_a + bb * unit_b``. Rows are split into
    ``nstripe`` runs, one thread each, each row in blocks of BLOCK elements. Per row: ``outf`` = sum |d|,
    dot, a.a, b.b; ``outi`` = count over the bound. Per stripe: ``sf`` = max |d|, max rel, max units;
    ``si`` = index of max |d| (first), NaN a, NaN b, Inf a, Inf b."""
    per = (R + nstripe - 1) // nstripe
    fast = kind_a == 0 and kind_b == 1 and mode_b == 6 and steps_b.size == 1
    for t in prange(nstripe):
        x = np.empty(SBLOCK, np.float64)
        y = np.empty(SBLOCK, np.float64)
        ux = np.zeros(SBLOCK, np.float64)
        uy = np.zeros(SBLOCK, np.float64)
        tmp = np.empty(SBLOCK, np.uint32)
        dbuf = np.empty(SBLOCK, np.float64)
        ubuf = np.empty(SBLOCK, np.float64)
        rbuf = np.empty(SBLOCK, np.float64)
        one = np.empty(1, np.uint64)
        mx = -1.0
        mi = -1
        mr = 0.0
        umax = 0.0
        nan_a = 0
        nan_b = 0
        inf_a = 0
        inf_b = 0
        for i in range(t * per, min(R, (t + 1) * per)):
            s = 0.0
            dot = 0.0
            na = 0.0
            nb = 0.0
            over = 0
            j0 = 0
            while j0 < C:
                m = min(C, j0 + SBLOCK) - j0
                if fast and bc_b == 1:  # a scale per column: one pass over a block of them
                    g0 = (i // br_b) * ncb_b + j0
                    _decode(a, i * C + j0, m, mode_a, lut_a, x, tmp)
                    rmc = mr * _SLACK if mr >= _TINY else 0.0
                    qv = b[i * C + j0:i * C + j0 + m].view(np.int8)
                    bs, bdot, bna, bnb, bover, hit, zero, dm, um = _qcols(x, qv, grid_b[g0:g0 + m], m, bb, rmc,
                                                                          dbuf, ubuf)
                    if dm < _INF_BITS:
                        s += bs
                        dot += bdot
                        na += bna
                        nb += bnb
                        over += bover
                        if zero:
                            mr = max(mr, 1.0)
                        if hit:
                            one[0] = _rel(x, dbuf, m, rbuf)
                            mr = max(mr, one.view(np.float64)[0])
                        one[0] = um
                        umax = max(umax, one.view(np.float64)[0])
                        one[0] = dm
                        bm = one.view(np.float64)[0]
                        if bm > mx:
                            for j in range(m):
                                if dbuf[j] == bm:
                                    mx = bm
                                    mi = i * C + j0 + j
                                    break
                        j0 += m
                        continue
                    for j in range(m):  # uy stays 0: the scale is applied below
                        y[j] = np.float64(np.float32(qv[j]) * grid_b[g0 + j])
                        uy[j] = abs(np.float64(grid_b[g0 + j]))
                elif fast:  # a float side against int8 codes: runs of one block scale, in one pass
                    col = j0 // bc_b
                    m = min(m, (col + 1) * bc_b - j0)
                    sv = grid_b[(i // br_b) * ncb_b + col]
                    _decode(a, i * C + j0, m, mode_a, lut_a, x, tmp)
                    rmc = mr * _SLACK if mr >= _TINY else 0.0
                    qv = b[i * C + j0:i * C + j0 + m].view(np.int8)
                    bs, bdot, bna, bnb, bover, hit, zero, dm = _qrun(x, qv, sv, m, bb, rmc, dbuf)
                    if dm < _INF_BITS:
                        s += bs
                        dot += bdot
                        na += bna
                        nb += bnb
                        over += bover
                        if zero:
                            mr = max(mr, 1.0)
                        if hit:
                            one[0] = _rel(x, dbuf, m, rbuf)
                            mr = max(mr, one.view(np.float64)[0])
                        one[0] = dm
                        bm = one.view(np.float64)[0]
                        umax = max(umax, bm / max(abs(np.float64(sv)), 1e-30))
                        if bm > mx:
                            for j in range(m):
                                if dbuf[j] == bm:
                                    mx = bm
                                    mi = i * C + j0 + j
                                    break
                        j0 += m
                        continue
                    for j in range(m):  # uy stays 0: the scale is applied below
                        y[j] = np.float64(np.float32(qv[j]) * sv)
                        uy[j] = abs(np.float64(sv))
                else:
                    _side(a, mode_a, lut_a, steps_a, grid_a, br_a, ncb_a, bc_a, kind_a, i, C, j0, m, x, ux, tmp)
                    _side(b, mode_b, lut_b, steps_b, grid_b, br_b, ncb_b, bc_b, kind_b, i, C, j0, m, y, uy, tmp)
                rmc = mr * _SLACK if mr >= _TINY else 0.0
                umc = umax * _SLACK
                bs, bdot, bna, bnb, bover, hit, uhit, zero, dm = _sfast(x, ux, y, uy, m, ba, bb, rmc, umc, dbuf)
                if dm < _INF_BITS:
                    s += bs
                    dot += bdot
                    na += bna
                    nb += bnb
                    over += bover
                    if zero:  # B is 0 where A is not: |a - 0| / |a| is exactly 1
                        mr = max(mr, 1.0)
                    if hit:
                        one[0] = _rel(x, dbuf, m, rbuf)
                        mr = max(mr, one.view(np.float64)[0])
                    if uhit:
                        one[0] = _units(ux, uy, dbuf, m, ubuf)
                        umax = max(umax, one.view(np.float64)[0])
                    one[0] = dm
                    bm = one.view(np.float64)[0]
                    if bm > mx:
                        for j in range(m):
                            if dbuf[j] == bm:
                                mx = bm
                                mi = i * C + j0 + j
                                break
                    j0 += m
                    continue
                for j in range(m):  # a NaN or Inf in this block: element by element
                    xv = x[j]
                    yv = y[j]
                    if math.isfinite(xv) and math.isfinite(yv):
                        d = abs(xv - yv)
                        s += d
                        dot += xv * yv
                        na += xv * xv
                        nb += yv * yv
                        ax = abs(xv)
                        if d > 0.0:
                            mr = max(mr, d / ax if ax > 0.0 else math.inf)
                        if d > ba * ux[j] + bb * uy[j]:
                            over += 1
                        umax = max(umax, d / max(ux[j] + uy[j], 1e-30))
                    else:
                        xn = xv != xv
                        yn = yv != yv
                        if xn:
                            nan_a += 1
                        if yn:
                            nan_b += 1
                        if math.isinf(xv):
                            inf_a += 1
                        if math.isinf(yv):
                            inf_b += 1
                        if (xn and yn) or xv == yv:
                            d = 0.0
                        else:  # over the bound; the max rel stays that of the finite elements
                            d = math.inf
                            over += 1
                            umax = math.inf
                    if d > mx:
                        mx = d
                        mi = i * C + j0 + j
                j0 += m
            outf[i, 0] = s
            outf[i, 1] = dot
            outf[i, 2] = na
            outf[i, 3] = nb
            outi[i] = over
        sf[t, 0] = mx
        sf[t, 1] = mr
        sf[t, 2] = umax
        si[t, 0] = mi
        si[t, 1] = nan_a
        si[t, 2] = nan_b
        si[t, 3] = inf_a
        si[t, 4] = inf_b


# ------------------------------------------------------------------ host side
_LUTS: dict = {}
_NO_LUT = np.zeros(1, np.float64)
# dtypes decoded through an exact table of every code's value, by name (the plain floats need no table, so a
# comparison of float checkpoints runs without torch: compare/lane.py)
_INT16 = ("float16", "int16", "uint16")
_INT8 = ("float8_e4m3fn", "float8_e5m2", "int8", "uint8", "bool")
_DIRECT = {"float32": F32, "float64": F64, "bfloat16": BF16, "float16": FP16, "int8": I8}


def _lut(dtype) -> np.ndarray:
    name = dtype_name(dtype)
    if name not in _LUTS:
        import torch  # the table dtypes are torch's own (fp8, unsigned 16-bit)
        dt = getattr(torch, name)
        if name in _INT16:
            codes = torch.from_numpy(np.arange(65536, dtype=np.uint16).view(np.int16))
            vals = codes if dt == torch.int16 else codes.view(dt)
        else:
            codes = torch.from_numpy(np.arange(256, dtype=np.uint8))
            vals = (codes != 0) if dt == torch.bool else codes.view(dt)
        _LUTS[name] = vals.to(torch.float64).numpy().copy()
    return _LUTS[name]


def plan(dtype):
    """(decode mode, lut) for element data of ``dtype`` (a torch dtype or its name); None when the data
    must be converted to float64 first (32- and 64-bit integers)."""
    name = dtype_name(dtype)
    mode = _DIRECT.get(name)
    if mode is not None:
        return mode, _NO_LUT
    if name in _INT16:
        return LUT16, _lut(name)
    if name in _INT8:
        return LUT8, _lut(name)
    return None


def as_kernel_input(t):
    """(raw bytes as a uint8 numpy view, element count, decode mode, table) for a torch tensor."""
    import torch
    t = t.reshape(-1)
    p = plan(t.dtype)
    if p is None:
        t, p = t.to(torch.float64), (F64, _NO_LUT)
    t = t.contiguous()
    return t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8), t.numel(), p[0], p[1]


class _Sums:
    """Float sums kept per chunk and added in offset order at the end, so a result does not
    depend on the number of threads, on the order chunks were visited or on the rank that
    computed it (each chunk's own sum is over fixed 2048-element blocks)."""

    def __init__(self):
        self._parts: list = []

    def _fold(self, k: int) -> float:
        return float(sum(p[k] for p in sorted(self._parts, key=lambda p: p[0])))


class Stats(_Sums):
    """Running metrics of one tensor pair, merged from chunk results."""

    def __init__(self):
        super().__init__()
        self.max_abs, self.max_idx, self.max_rel = -1.0, None, 0.0
        self.over = self.nan_a = self.nan_b = self.inf_a = self.inf_b = 0

    sum_abs = property(lambda self: self._fold(1))
    dot = property(lambda self: self._fold(2))
    na = property(lambda self: self._fold(3))
    nb = property(lambda self: self._fold(4))

    def add(self, a, b, offset: int, atol: float, rtol: float) -> None:
        """``a``, ``b``: kernel inputs (``as_kernel_input``) of the same length, at flat ``offset``."""
        (xa, n, ma, la), (xb, nb_, mb, lb) = a, b
        if n == 0:
            return
        if n != nb_:
            raise ValueError(f"chunks of {n} and {nb_} elements")
        nblk = (n + BLOCK - 1) // BLOCK
        nstripe = min(nblk, 4 * numba.get_num_threads())
        f, i = np.empty((nblk, 4)), np.empty(nblk, np.int64)
        sf, si = np.empty((nstripe, 2)), np.empty((nstripe, 5), np.int64)
        _metrics(xa, ma, la, xb, mb, lb, n, float(atol), float(rtol), nstripe, f, i, sf, si)
        found = si[:, 0] >= 0
        if found.any():
            m = float(sf[found, 0].max())  # never NaN: a NaN difference counts as Inf
            idx = offset + int(si[found & (sf[:, 0] == m), 0].min())
            if m > self.max_abs or (m == self.max_abs and (self.max_idx is None or idx < self.max_idx)):
                self.max_abs, self.max_idx = m, idx
        s = f.sum(axis=0)
        self._parts.append((offset, float(s[0]), float(s[1]), float(s[2]), float(s[3])))
        self.max_rel = max(self.max_rel, float(sf[:, 1].max()))
        c = si.sum(axis=0)
        self.over += int(i.sum())
        self.nan_a += int(c[1])
        self.nan_b += int(c[2])
        self.inf_a += int(c[3])
        self.inf_b += int(c[4])

    @property
    def cosine(self):
        if self.na > 0 and self.nb > 0:
            return self.dot / math.sqrt(self.na * self.nb)
        return None


_NO_STEPS = np.ones(1, np.float64)
_NO_GRID = np.zeros(1, np.float32)


class Side:
    """One side of a scaled comparison, rows [R, C]: ``kind`` 0 plain values, 1 codes times a scale grid
    (``grid[(i // br) * ncb + j // bc]``, flat float32), 2 values with a unit per element in ``grid``."""

    def __init__(self, data: torch.Tensor, kind: int = 0, grid: Optional[torch.Tensor] = None, block=(1, 1),
                 steps: Optional[np.ndarray] = None):
        self.R, self.C = data.shape
        self.src, _, self.mode, self.lut = as_kernel_input(data)
        self.kind = kind
        if kind:
            import torch
            g = grid.to(torch.float32).contiguous()
            self.ncb = g.shape[1] if g.dim() == 2 else 1
            self.grid = g.reshape(-1).numpy() if g.numel() else _NO_GRID
        else:
            self.grid, self.ncb = _NO_GRID, 1
        self.br, self.bc = (max(1, int(block[0])), max(1, int(block[1])))
        self.steps = steps if steps is not None else _NO_STEPS

    def args(self) -> tuple:
        return (self.src, self.mode, self.lut, self.steps, self.grid, self.br, self.ncb, self.bc, self.kind)


class ScaledStats(_Sums):
    """Running metrics of two sides in scale units (a float tensor against its encoding, or two encodings),
    merged from row-block results."""

    sum_abs = property(lambda self: self._fold(1))
    dot = property(lambda self: self._fold(2))
    na = property(lambda self: self._fold(3))
    nb = property(lambda self: self._fold(4))

    def __init__(self):
        super().__init__()
        self.max_abs, self.max_idx, self.max_rel = -1.0, None, 0.0
        self.max_units = 0.0
        self.over = self.nan_a = self.nan_b = self.inf_a = self.inf_b = 0

    def add(self, a: Side, b: Side, bound_a: float, bound_b: float, offset: int) -> None:
        """Rows of ``a`` and ``b`` (the same [R, C]) at flat element ``offset``."""
        R, C = a.R, a.C
        if (R, C) != (b.R, b.C):
            raise ValueError(f"rows [{R}, {C}] and [{b.R}, {b.C}]")
        if R * C == 0:
            return
        nstripe = min(R, 4 * numba.get_num_threads())
        f, i = np.empty((R, 4)), np.empty(R, np.int64)
        sf, si = np.empty((nstripe, 3)), np.empty((nstripe, 5), np.int64)
        _scaled_metrics(*a.args(), *b.args(), R, C, float(bound_a), float(bound_b), nstripe, f, i, sf, si)
        found = si[:, 0] >= 0
        if found.any():
            m = float(sf[found, 0].max())
            idx = offset + int(si[found & (sf[:, 0] == m), 0].min())
            if m > self.max_abs or (m == self.max_abs and (self.max_idx is None or idx < self.max_idx)):
                self.max_abs, self.max_idx = m, idx
        t = f.sum(axis=0)
        self._parts.append((offset, float(t[0]), float(t[1]), float(t[2]), float(t[3])))
        self.max_rel = max(self.max_rel, float(sf[:, 1].max()))
        self.max_units = max(self.max_units, float(sf[:, 2].max()))
        self.over += int(i.sum())
        c = si.sum(axis=0)
        self.nan_a += int(c[1])
        self.nan_b += int(c[2])
        self.inf_a += int(c[3])
        self.inf_b += int(c[4])

    @property
    def cosine(self):
        if self.na > 0 and self.nb > 0:
            return self.dot / math.sqrt(self.na * self.nb)
        return None


def warm() -> None:
    """Compile (or load from numba's on-disk cache) every kernel once, on tiny inputs."""
    import torch
    a = torch.arange(8192, dtype=torch.float32).to(torch.bfloat16)
    b = a.clone()
    b[3] += 1
    bytes_equal(a, b)
    Stats().add(as_kernel_input(a), as_kernel_input(b), 0, 0.0, 0.0)
    w = a.reshape(64, 128)
    ScaledStats().add(Side(w), Side(torch.ones(64, 128, dtype=torch.int8), 1, torch.ones(64, 1), (1, 128)),
                      0.0, 1.5, 0)
