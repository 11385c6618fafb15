"""Causes for an encoded tensor (``tensor/blockscaled.py``) that misses the float tensor it should encode.

The stored codes and block scales are compared with a reference encoding of the float side in the same
encoding (the view's own ``reference`` quantizer), in scale units: which blocks' scales are off and by what
(zeroed, multiplied by a constant, reciprocal, transposed grid, shifted by one block, another tensor's, or
otherwise stale), whether the codes are permuted inside their blocks (4-bit nibble order), not sign-extended,
or blocked along the wrong axis, or whether the encoded tensor is a correct encoding of another float tensor
(swapped or misnamed: judged in its own units, the comparator's rule). Every finding is typed
(``findings.Kind`` with parameters). When the encoding has no reference quantizer (K-quants) or nothing here
fits, the ordinary diagnosis runs on the dequantized values (compare/diagnose.py).
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from ckdiff.tensor.lazy import Checkpoint, LazyTensor
from ckdiff.tensor.blockscaled import FLOAT8, BlockScaled, Scaled
from ckdiff.compare.findings import Finding, Kind

MAX_NUMEL = 1 << 26
RTOL = 1e-2  # scales agree within this (bf16 scales, fp16 GGUF d)
MAX_OTHERS = 16  # float tensors of the same shape tried as what an encoded tensor encodes instead


def _ints(codes: torch.Tensor) -> torch.Tensor:
    """Codes as integers; float8 codes by their bytes (adjacent values of one sign differ by 1)."""
    if codes.dtype in FLOAT8:
        return codes.view(torch.uint8).to(torch.int32)
    return codes.to(torch.int32)


def _agree(cs: torch.Tensor, cr: torch.Tensor) -> bool:
    """Codes agree with the reference's: at most 1 % differ, by at most one step (another quantizer rounds
    a tie the other way)."""
    if cs.shape != cr.shape:
        return False
    d = (cs - cr).abs()
    return int((d > 0).sum()) <= cs.numel() // 100 and int(d.max()) <= 1 if d.numel() else True


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and bool(torch.allclose(x.float(), y.float(), rtol=RTOL, atol=0))


def _unit(enc: BlockScaled, s: Scaled) -> str:
    br, bc = s.block
    C = s.codes.shape[1]
    if br == 1 and bc >= C:
        return "row"
    if bc == 1 and br >= s.codes.shape[0]:
        return "column"
    return "block"


def _shifted(x: torch.Tensor, ref: torch.Tensor, dim: int) -> Optional[int]:
    """+1 when x[i] == ref[i-1] along ``dim`` (every entry but the first), -1 when x[i] == ref[i+1]."""
    n = x.shape[dim]
    if n < 3:
        return None
    if _close(x.narrow(dim, 1, n - 1), ref.narrow(dim, 0, n - 1)):
        return 1
    if _close(x.narrow(dim, 0, n - 1), ref.narrow(dim, 1, n - 1)):
        return -1
    return None


def _scales(name: str, enc: BlockScaled, s: Scaled, ref: Scaled, eck: Checkpoint, fck: Checkpoint) -> Finding:
    """The cause when the codes agree and the scales do not."""
    g, gr = s.grid.float(), ref.grid.float()
    p = {"encoding": enc.encoding, "unit": _unit(enc, s)}
    bad = ~torch.isclose(g, gr, rtol=RTOL, atol=0)
    total, n_bad = g.numel(), int(bad.sum())
    first = [int(i) for i in torch.nonzero(bad)[0]] if n_bad else []
    zero = bad & (g == 0) & (gr != 0)
    if n_bad and int(zero.sum()) == n_bad:
        return Finding(Kind.SCALE_ZEROED, {**p, "blocks": n_bad, "total": total, "first": first})
    nz = bad & (gr != 0)
    if n_bad and int(nz.sum()) == n_bad:
        ratio = g[bad] / gr[bad]
        k = float(ratio.median())
        glob = getattr(enc, "global_scale", None)
        if glob is not None and n_bad == total and k > 0:  # every block off by the stored global squared (or
            g0 = float(glob())                               # its inverse): the global stored inverted
            if g0 > 0 and any(abs(k / t - 1) < RTOL for t in (g0 * g0, 1 / (g0 * g0))):
                return Finding(Kind.SCALE_RECIPROCAL, {**p, "unit": "global"})
        if k != 0 and bool(torch.allclose(ratio, torch.full_like(ratio, k), rtol=RTOL, atol=0)) \
                and not (n_bad == total and _close(g, 1 / gr.clamp_min(1e-30))):
            return Finding(Kind.SCALE_MULTIPLIED, {**p, "factor": float(f"{k:.3g}"), "blocks": n_bad, "total": total,
                                                   "first": first})
    if bool((gr != 0).all()) and _close(g, 1 / gr):
        return Finding(Kind.SCALE_RECIPROCAL, p)
    if g.dim() == 2 and g.shape[0] == g.shape[1] > 1 and _close(g, gr.T):
        return Finding(Kind.SCALE_TRANSPOSED, p)
    br, bc = s.block
    for dim, unit in ((0, "row" if br == 1 else "block row"), (1, "column" if bc == 1 else "block")):
        k = _shifted(g, gr, dim) if dim < g.dim() else None
        if k:
            return Finding(Kind.SCALE_SHIFTED, {**p, "unit": unit, "sign": "-" if k > 0 else "+"})
    for other, ot in eck.tensors.items():  # another tensor's scales
        ft = fck.tensors.get(other)
        if other == name or not isinstance(ot, BlockScaled) or ft is None or ot.shape != enc.shape \
                or ft.numel > MAX_NUMEL:
            continue
        ro = ot.reference(ft.load().float().reshape(-1, enc.shape[-1]))
        if ro is not None and _close(g, ro.grid):
            return Finding(Kind.SCALE_SWAPPED, {**p, "tensor": name, "other": other})
    r = (g / gr.clamp_min(1e-30))[gr != 0]
    return Finding(Kind.SCALE_STALE, {**p, "lo": float(r.min()) if r.numel() else 0.0,
                                      "hi": float(r.max()) if r.numel() else 0.0})


LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _within(enc: BlockScaled, f: LazyTensor, lo: int, hi: int) -> bool:
    """Rows [lo, hi) of ``enc`` within its bound (in its own units) of the float ``f``'s."""
    x = f.rows(lo, hi).float()
    return bool(((enc.rows(lo, hi) - x).abs() <= enc.bound * enc.units(lo, hi) * (1 + 1e-6)).all())


def _encodes_other(name: str, enc: BlockScaled, fck: Checkpoint) -> Optional[Finding]:
    """``enc`` is a correct encoding of another float tensor of the same shape (same layer first): sampled
    rows, then confirmed on the whole tensor, in the comparator's own rule (bound x units)."""
    if not enc.bound or not enc.nrows:
        return None
    layer = LAYER_INDEX.findall(name)
    cands = [k for k, t in fck.tensors.items() if k != name and tuple(t.shape) == tuple(enc.shape)
             and not isinstance(t, BlockScaled) and t.dtype.is_floating_point]
    cands.sort(key=lambda k: LAYER_INDEX.findall(k) != layer)
    n = enc.nrows
    sample = sorted({0, n // 2, n - 1})
    for k in cands[:MAX_OTHERS]:
        f = fck.tensors[k]
        if all(_within(enc, f, i, i + 1) for i in sample) and _within(enc, f, 0, n):
            lk = LAYER_INDEX.findall(k)
            where = "the same layer" if lk == layer else (f"layer {lk[-1]}" if lk else "no layer")
            return Finding(Kind.ENCODES_OTHER, {"tensor": name, "other": k, "encoding": enc.encoding, "where": where})
    return None


def _matches(a: torch.Tensor, b: torch.Tensor, slack) -> bool:
    """``a`` and ``b`` agree element by element within two bf16 roundings (2**-7 of the larger magnitude: a
    dequantizer computing in bf16, then writing bf16), plus ``slack`` (per element or a number) and float32 noise
    of the tensor's scale (1e-6 of its largest finite value); non-finite values agree only with the same
    non-finite value (a NaN with a NaN)."""
    if a.shape != b.shape:
        return False
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not bool((fa == fb).all()) or not bool(((a == b) | (torch.isnan(a) & torch.isnan(b)) | fa).all()):
        return False
    a, b = torch.where(fa, a, 0.0), torch.where(fb, b, 0.0)
    floor = 1e-6 * float(b.abs().max()) if b.numel() else 0.0
    return bool(((a - b).abs() <= 2.0 ** -7 * torch.maximum(a.abs(), b.abs()) + slack + floor).all())


def _variants(found):
    """(params, values, units) of a misreading: one ``(params, values)`` or ``(params, values, units)``, or a list
    of them (variants of one kind); ``values`` may be a callable that makes them (computed only when reached).
    ``units`` (optional, per element): the misread encoding's own steps, for a misreading whose values are far
    smaller than the right ones (a scale decoded as another float format): half of one is the slack then, where
    half a step of the right encoding would let any small float side match."""
    for item in (found if isinstance(found, list) else [found]):
        params, values, units = (tuple(item) + (None,))[:3]
        yield params, (values() if callable(values) else values), units


def _misread(enc: BlockScaled, flt: LazyTensor) -> Optional[Finding]:
    """The float side equals one of the ways a converter misreads ``enc`` (its ``misreadings``: E8M0 bytes used
    as values, nibbles swapped or interleaved, a scale grid or a layout not transposed, another block size, codes
    or scales decoded as another format, a code offset or a zero point's sign wrong, a zero point wrapped): that
    misreading names the bug. Values are rows ``[-1, last]``;
    a misreading of another shape than ``enc`` (FP4 bytes read one value each) is tried on a float side of its
    shape."""
    misreadings = getattr(enc, "misreadings", None)
    if misreadings is None or enc.numel > MAX_NUMEL or flt.numel > MAX_NUMEL or isinstance(flt, BlockScaled) \
            or not flt.dtype.is_floating_point or not len(flt.shape) or not flt.numel:
        return None
    x = flt.load().float().reshape(-1, flt.shape[-1])
    right = enc.rows(0, enc.nrows).reshape(-1, enc.shape[-1])
    unit = enc.units(0, enc.nrows).reshape(right.shape)
    for kind, found in misreadings(0, enc.nrows).items():
        for params, values, own in _variants(found):
            if values.shape != x.shape:
                continue
            same = values.shape == right.shape
            if same and _matches(values, right, enc.bound * unit):
                continue  # a misreading that reads as the right values here (within a step) names nothing
            slack = 0.5 * own if own is not None else (0.5 * unit if same else 0.0)
            if _matches(values, x, slack):
                return Finding(Kind(kind), {"encoding": enc.encoding, **params})
    return None


def _refit(enc: BlockScaled, flt: LazyTensor) -> Optional[Finding]:
    """A float side of another shape that ``enc`` read at other encoding parameters its stored shapes also fit
    (its ``refits``) matches within its bound: the parameters the file declares are not the codes' own."""
    refits = getattr(enc, "refits", None)
    if refits is None or flt.numel > MAX_NUMEL or isinstance(flt, BlockScaled) or not flt.dtype.is_floating_point \
            or len(flt.shape) != 2:
        return None
    x = flt.load().float()
    for params, values, units in refits():
        if values.shape == x.shape and bool(((values - x).abs() <= enc.bound * units * (1 + 1e-6)).all()):
            return Finding(Kind.QUANT_CONFIG_WRONG, {"encoding": enc.encoding, **params})
    return None


def diagnose_scaled(name: str, enc: BlockScaled, flt: LazyTensor, eck: Checkpoint, fck: Checkpoint) -> list[Finding]:
    """Typed causes for ``enc`` (an encoded tensor) against ``flt`` (the float tensor it should encode); of
    another shape, only a misreading of that shape or the encoding read at other parameters its stored shapes fit
    (``_refit``)."""
    if tuple(flt.shape) != tuple(enc.shape):
        found = _misread(enc, flt) or _refit(enc, flt)
        return [found] if found else []
    misread = _misread(enc, flt)
    if misread is not None:
        return [misread]
    found = _diagnose(name, enc, flt, eck, fck)
    if not found and enc.numel <= MAX_NUMEL and len(enc.shape) == 2 and flt.dtype.is_floating_point \
            and not isinstance(flt, BlockScaled):
        other = _encodes_other(name, enc, fck)
        found = [other] if other else []
    return found


def _diagnose(name: str, enc: BlockScaled, flt: LazyTensor, eck: Checkpoint, fck: Checkpoint) -> list[Finding]:
    if enc.numel > MAX_NUMEL or isinstance(flt, BlockScaled) or not flt.dtype.is_floating_point \
            or (len(enc.shape) != 2 and not getattr(enc, "flat_reference", False)):
        return []
    C = enc.shape[-1]
    x = flt.load().float().reshape(-1, C)
    s = enc.scaled(0, enc.nrows)
    if s.dense:
        return []
    ref = enc.reference(x)
    if ref is None or ref.codes.shape != s.codes.shape:
        return []
    cs, cr = _ints(s.codes), _ints(ref.codes)
    codes_ok = _agree(cs, cr)
    scales_ok = _close(s.grid, ref.grid)
    p = {"encoding": enc.encoding}
    if not codes_ok and cs.numel() and int(cs.min()) >= 0 and int(cs.max()) <= 15 and bool((cr < 0).any()) \
            and torch.equal(cs, cr & 15):
        return [Finding(Kind.INT4_UNSIGNED, {"count": int((cr < 0).sum()), "scales": "agree" if scales_ok
                                              else "differ too"})]
    bc = s.block[1]
    if not codes_ok and getattr(enc, "nibbles", False) and bc % 2 == 0 and C % bc == 0:
        swapped = cr.reshape(cr.shape[0], -1, 2, bc // 2).flip(2).reshape(cr.shape)
        if _agree(cs, swapped):
            blocks = int((cs.reshape(cs.shape[0], -1, bc) != cr.reshape(cr.shape[0], -1, bc)).any(-1).sum())
            return [Finding(Kind.NIBBLES_SWAPPED, {**p, "blocks": blocks})]
    if not codes_ok and s.block[0] == 1 and 1 < bc < C and x.shape[0] == x.shape[1]:
        rt = enc.reference(x.T.contiguous())
        if rt is not None and _agree(cs, _ints(rt.codes)) and _close(s.grid, rt.grid):
            return [Finding(Kind.BLOCKS_WRONG_AXIS, {"block": bc})]
    if codes_ok and not scales_ok and s.grid.shape == ref.grid.shape:
        return [_scales(name, enc, s, ref, eck, fck)]
    if scales_ok and not codes_ok:
        d = (s.codes.float() - ref.codes.float()).abs()
        return [Finding(Kind.CODES_DIFFER, {**p, "count": int((cs != cr).sum()), "largest": float(d.max())})]
    return []


__all__ = ["diagnose_scaled"]
