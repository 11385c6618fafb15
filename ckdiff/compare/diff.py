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

import fnmatch
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from ..converters.formats import dtype_name
from ..converters.lazy import Checkpoint, LazyTensor

# rtol, atol per dtype (torch.testing's _DTYPE_PRECISIONS, fp32/fp64 from its defaults)
DTYPE_TOL = {
    torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7), torch.float8_e4m3fn: (1.25e-1, 1e-3), torch.float8_e5m2: (2.5e-1, 1e-3),
}
PRECISION_ORDER = [torch.float8_e5m2, torch.float8_e4m3fn, torch.bfloat16, torch.float16,
                   torch.float32, torch.float64]


@dataclass
class Tolerance:
    atol: float
    rtol: float
    source: str  # "exact" | "dtype <name>" | "--atol/--rtol" | "pattern <p>"


@dataclass
class TensorResult:
    name: str
    # equal (bytes identical) | close (within an explicit tolerance) | cast (dtypes differ, values
    # within the cast's rounding) | quant (dequantized, within its scale bound) | dtype (cast refused by --strict-dtype) | differ | shape | only-a | only-b
    # | reordered (differs only by a permutation applied consistently across tensors: same function)
    status: str
    shape_a: Optional[list] = None
    shape_b: Optional[list] = None
    dtype_a: Optional[str] = None
    dtype_b: Optional[str] = None
    bit_exact: Optional[bool] = None
    numel: int = 0
    max_abs: float = 0.0
    max_abs_index: Optional[list] = None
    mean_abs: float = 0.0
    max_rel: float = 0.0
    cosine: Optional[float] = None
    n_over_tol: int = 0
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    atol: Optional[float] = None
    rtol: Optional[float] = None
    tol_source: Optional[str] = None
    diagnosis: list = field(default_factory=list)
    note: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status in ("equal", "close", "cast", "quant", "reordered")


@dataclass
class CompareResult:
    a: str
    b: str
    format_a: str
    format_b: str
    tensors: list[TensorResult]
    # [field, value_a, value_b]: function-changing differences of the canonical configs
    config_diff: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    mapping: list = field(default_factory=list)  # [source keys, target keys, op] when a converter was involved
    config_findings: list = field(default_factory=list)  # "A: ..." config disagrees with its own tensors

    @property
    def equivalent(self) -> bool:
        """Equivalent only when every tensor is, and the configs define the same function and fit
        their tensors (fields that do not change the function never count)."""
        return all(t.ok for t in self.tensors) and not self.config_diff and not self.config_findings

    def counts(self) -> dict:
        c: dict = {}
        for t in self.tensors:
            c[t.status] = c.get(t.status, 0) + 1
        return c

    def verdict(self) -> str:
        return "equivalent" if self.equivalent else "differ"

    def worst_first(self) -> list[TensorResult]:
        order = {"only-a": 0, "only-b": 0, "shape": 1, "differ": 2, "dtype": 3, "cast": 4, "quant": 5, "reordered": 6, "close": 6, "equal": 7}
        return sorted(self.tensors, key=lambda t: (order.get(t.status, 9), -(t.n_over_tol or 0),
                                                   -(t.max_abs or 0.0), t.name))

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict(), "a": self.a, "b": self.b,
            "format_a": self.format_a, "format_b": self.format_b,
            "counts": self.counts(), "options": self.options, "notes": self.notes,
            "config_diff": self.config_diff, "config_findings": self.config_findings, "mapping": self.mapping,
            "tensors": [asdict(t) for t in self.tensors],
        }


def default_tolerance(da: torch.dtype, db: torch.dtype) -> Tolerance:
    if da == db:
        return Tolerance(0.0, 0.0, "exact")
    floats = [d for d in (da, db) if d in DTYPE_TOL]
    if not floats:
        return Tolerance(0.0, 0.0, "exact")
    low = min(floats, key=PRECISION_ORDER.index)
    rtol, atol = DTYPE_TOL[low]
    return Tolerance(atol, rtol, f"dtype {dtype_name(low)}")


@dataclass
class Options:
    atol: Optional[float] = None
    rtol: Optional[float] = None
    patterns: list = field(default_factory=list)  # [(glob, atol, rtol, reason)]
    only: list = field(default_factory=list)
    ignore: list = field(default_factory=list)
    diagnose: bool = True
    strict_dtype: bool = False
    chunk_bytes: int = 32 * 1024 * 1024

    def tolerance(self, name: str, da, db) -> Tolerance:
        for pat, atol, rtol, reason in self.patterns:
            if fnmatch.fnmatchcase(name, pat):
                return Tolerance(atol, rtol if rtol is not None else 0.0,
                                 f"pattern {pat}" + (f" ({reason})" if reason else ""))
        if self.atol is not None or self.rtol is not None:
            return Tolerance(self.atol or 0.0, self.rtol or 0.0, "--atol/--rtol")
        return default_tolerance(da, db)

    def selected(self, name: str) -> bool:
        if self.only and not any(fnmatch.fnmatchcase(name, p) for p in self.only):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.ignore)


def _u8_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equality of two flat uint8 tensors, compared 8 bytes at a time (uint8 compares are slow)."""
    n = x.numel()
    if n != y.numel():
        return False
    k = n - n % 8
    try:
        if k and not torch.equal(x[:k].view(torch.int64), y[:k].view(torch.int64)):
            return False
    except RuntimeError:  # storage offset not 8-byte aligned: compare bytes one by one
        return torch.equal(x, y)
    return k == n or torch.equal(x[k:], y[k:])


def _bytes_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    x, y = x.contiguous(), y.contiguous()
    if x.numel() == 0:
        return True
    return _u8_equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


def _raw(t: LazyTensor) -> bool:
    return hasattr(t, "byte_chunks")


_BUFS: dict = {}


def _buffers(n: int):
    """Two reusable read buffers (bounded memory whatever the checkpoint size)."""
    if _BUFS.get("n") != n:
        _BUFS.update(n=n, a=bytearray(n), b=bytearray(n))
    return _BUFS["a"], _BUFS["b"]


def _raw_equal(ta, tb, chunk: int, progress) -> bool:
    """Compare two file-backed tensors' bytes with pread into reused buffers (no page faults)."""
    ba, bb = _buffers(chunk)
    for (_, va), (_, vb) in zip(ta.byte_chunks(ba, chunk), tb.byte_chunks(bb, chunk)):
        if len(va) and not _u8_equal(torch.frombuffer(va, dtype=torch.uint8),
                                     torch.frombuffer(vb, dtype=torch.uint8)):
            return False
        if progress:
            progress(2 * len(va))
    return True


def _unravel(flat: int, shape) -> list:
    idx = []
    for s in reversed(shape):
        idx.append(flat % s if s else 0)
        flat //= s if s else 1
    return list(reversed(idx))


class _Acc:
    """Running float64 metrics over chunks."""

    def __init__(self, tol: Tolerance):
        self.tol = tol
        self.max_abs, self.max_idx, self.sum_abs, self.max_rel = 0.0, None, 0.0, 0.0
        self.dot = self.na = self.nb = 0.0
        self.over = self.nan_a = self.nan_b = self.inf_a = self.inf_b = 0

    def add(self, a: torch.Tensor, b: torch.Tensor, offset: int):
        a = a.reshape(-1).to(torch.float64)
        b = b.reshape(-1).to(torch.float64)
        an, bn = torch.isnan(a), torch.isnan(b)
        ai, bi = torch.isinf(a), torch.isinf(b)
        self.nan_a += int(an.sum()); self.nan_b += int(bn.sum())
        self.inf_a += int(ai.sum()); self.inf_b += int(bi.sum())
        both_nan = an & bn
        same_inf = ai & bi & (a == b)
        diff = (a - b).abs()
        diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
        diff = torch.where((an ^ bn) | ((ai | bi) & ~same_inf), torch.full_like(diff, math.inf), diff)
        if diff.numel():
            m, i = torch.max(diff, 0)
            if float(m) > self.max_abs or self.max_idx is None:
                self.max_abs, self.max_idx = float(m), offset + int(i)
            finite = torch.isfinite(diff)
            self.sum_abs += float(diff[finite].sum())
            denom = a.abs()
            rel = torch.where(denom > 0, diff / denom, torch.where(diff > 0, torch.full_like(diff, math.inf), diff))
            self.max_rel = max(self.max_rel, float(rel.max()))
            self.over += int((diff > self.tol.atol + self.tol.rtol * a.abs()).sum())
            ok = torch.isfinite(a) & torch.isfinite(b)
            af, bf = a[ok], b[ok]
            self.dot += float((af * bf).sum()); self.na += float((af * af).sum()); self.nb += float((bf * bf).sum())


def compare_tensor(name: str, ta: LazyTensor, tb: LazyTensor, opts: Options,
                   progress: Optional[Callable[[int], None]] = None) -> TensorResult:
    r = TensorResult(name=name, status="equal", shape_a=list(ta.shape), shape_b=list(tb.shape),
                     dtype_a=dtype_name(ta.dtype), dtype_b=dtype_name(tb.dtype), numel=ta.numel)
    if ta.shape != tb.shape:
        r.status, r.bit_exact = "shape", False
        if progress:
            progress(ta.nbytes + tb.nbytes)
        return r
    tol = opts.tolerance(name, ta.dtype, tb.dtype)
    r.atol, r.rtol, r.tol_source = tol.atol, tol.rtol, tol.source
    same_dtype = ta.dtype == tb.dtype
    # Pass 1: bytes only. Identical tensors never touch float math.
    exact = same_dtype
    if same_dtype and _raw(ta) and _raw(tb):
        exact = _raw_equal(ta, tb, opts.chunk_bytes, progress)
    elif same_dtype:
        for lo, hi in ta.row_chunks(opts.chunk_bytes):
            ca, cb = ta.rows(lo, hi), tb.rows(lo, hi)
            if not _bytes_equal(ca, cb):
                exact = False
                break
            if progress:
                progress(ca.numel() * ca.element_size() * 2)
    r.bit_exact = exact
    if exact:
        r.cosine = 1.0 if ta.numel else None
        return r
    # Pass 2: float metrics over every chunk.
    acc = _Acc(tol)
    offset = 0
    for lo, hi in ta.row_chunks(opts.chunk_bytes):
        ca, cb = ta.rows(lo, hi), tb.rows(lo, hi)
        acc.add(ca, cb, offset)
        offset += ca.numel()
        if progress:
            progress(ca.numel() * (ca.element_size() + cb.element_size()))
    r.max_abs = acc.max_abs
    r.max_abs_index = _unravel(acc.max_idx, ta.shape) if acc.max_idx is not None else None
    r.mean_abs = acc.sum_abs / max(1, ta.numel)
    r.max_rel = acc.max_rel
    r.cosine = acc.dot / math.sqrt(acc.na * acc.nb) if acc.na > 0 and acc.nb > 0 else None
    r.n_over_tol = acc.over
    r.nan_a, r.nan_b, r.inf_a, r.inf_b = acc.nan_a, acc.nan_b, acc.inf_a, acc.inf_b
    r.status = "differ" if acc.over else ("close" if same_dtype else "cast")
    if not same_dtype and r.status == "cast" and opts.strict_dtype:
        r.status = "dtype"
    if not same_dtype:
        r.note = f"cast {r.dtype_a} -> {r.dtype_b}"
    elif r.status == "close" and tol.source == "exact":
        r.note = "bytes differ only in NaN payloads or signed zeros"
    return r


def compare_checkpoints(a: Checkpoint, b: Checkpoint, opts: Optional[Options] = None,
                        progress_factory=None, diagnose_fn=None, map_layouts: bool = True) -> CompareResult:
    """Compare every tensor of the union of keys; never stop at the first mismatch.

    Checkpoints of different layouts are lined up first (compare/align.py) unless ``map_layouts``
    is false; the mapping used is part of the result."""
    opts = opts or Options()
    from .quant import compare_mixed, quantized_side
    results: list[TensorResult] = []
    notes: list[str] = []
    mapping: list = []
    cdiff, cfindings, cnotes = compare_config_semantics(a, b)
    if map_layouts:
        from .align import align
        a, b, mapping, notes = align(a, b)
    notes += cnotes
    consumed: set = set()
    side = quantized_side(a, b)
    if side:
        qres, consumed = compare_mixed(a, b, side, opts.selected)
        results += qres
        notes.append(f"{side.upper()} is quantized: its tensors were dequantized and judged in units of "
                     "their own scale (int8 1.5 s, int4 1.0 s)")
    names_a = [n for n in a.tensors if opts.selected(n) and n not in consumed]
    names_b = [n for n in b.tensors if opts.selected(n) and n not in consumed]
    set_b = set(names_b)
    common = [n for n in names_a if n in set_b]
    total = sum(a.tensors[n].nbytes + b.tensors[n].nbytes for n in common)
    progress = progress_factory(total) if progress_factory else None
    for n in names_a:
        if n not in set_b:
            t = a.tensors[n]
            results.append(TensorResult(n, "only-a", shape_a=list(t.shape), dtype_a=dtype_name(t.dtype), numel=t.numel))
    for n in names_b:
        if n not in a.tensors:
            t = b.tensors[n]
            results.append(TensorResult(n, "only-b", shape_b=list(t.shape), dtype_b=dtype_name(t.dtype), numel=t.numel))
    for n in common:
        results.append(compare_tensor(n, a.tensors[n], b.tensors[n], opts, progress))
    if progress is not None and hasattr(progress, "stop"):
        progress.stop()
    res = CompareResult(a.path, b.path, a.format, b.format, results,
                        config_diff=cdiff, config_findings=cfindings,
                        options={"atol": opts.atol, "rtol": opts.rtol, "only": opts.only, "ignore": opts.ignore,
                                 "patterns": [list(p) for p in opts.patterns]}, notes=notes, mapping=mapping)
    if opts.diagnose:
        from .diagnose import diagnose_result
        (diagnose_fn or diagnose_result)(res, a, b)
    return res


def compare_config_semantics(a: Checkpoint, b: Checkpoint) -> tuple[list, list, list]:
    """(function-changing config differences, config-vs-tensor findings, notes) of two checkpoints.

    Each side's own config (HF ``config.json`` v4/v5, Meta/JetStream ``params.json``, Megatron ``args``)
    is read into one canonical dict (converters/config.py), so spellings, explicit defaults and fields
    that do not change the function never show; across layouts the same fields line up."""
    from ..converters.config import canonical_config, compare_configs, config_findings
    try:
        ca = canonical_config(a.format, a.config, a.tensors)
        cb = canonical_config(b.format, b.config, b.tensors)
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        return [], [], [f"configs not compared: {e}"]
    diffs, notes = compare_configs(ca, cb)
    findings = [f"{side}: {f}" for side, ck, c in (("A", a, ca), ("B", b, cb))
                for f in config_findings(ck.format, ck.config, ck.tensors, c)]
    notes += [f"config disagrees with its tensors, {f}" for f in findings]  # shown by every report
    if (ca is None) != (cb is None):
        notes.append(f"{'A' if ca is None else 'B'} has no model config: configurations were not compared")
    return diffs, findings, notes


def config_diff(ca: dict, cb: dict) -> list:
    """Differences between two configs of the same kind (skipped when the kinds differ)."""
    if not ca or not cb:
        return []
    shared = set(ca) & set(cb)
    if len(shared) < max(1, min(len(ca), len(cb)) // 3):
        return []  # different schemas (config.json vs params.json): nothing to line up
    out = []
    for k in sorted(set(ca) | set(cb)):
        if k.startswith("_") or k in ("transformers_version", "architectures"):
            continue
        va, vb = ca.get(k), cb.get(k)
        if va != vb:
            out.append([k, va, vb])
    return out

