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
import queue
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ckdiff.models.config import (
    ConfigError,
    Finding,
    canonical_config,
    compare_configs,
    config_findings,
    config_where,
)
from ckdiff.formats.readers import dtype_name
from ckdiff.tensor.lazy import Checkpoint, LazyTensor
from ckdiff.tensor.blockscaled import BlockScaled
from ckdiff.compare.bytes_equal import bytes_equal
from ckdiff.compare.status import Status, rank

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


@dataclass(slots=True)  # one per tensor, and a checkpoint can hold 10^6 of them: no per-instance dict
class TensorResult:
    name: str
    status: Status  # compare/status.py: equal, close, cast, quant, reordered, dtype, differ, shape, only-a, only-b
    shape_a: Optional[tuple] = None  # the lazy tensors' own shape tuples (shared, not copied); lists in to_dict
    shape_b: Optional[tuple] = None
    dtype_a: Optional[str] = None
    dtype_b: Optional[str] = None
    bit_exact: Optional[bool] = None
    numel: int = 0
    max_abs: float = 0.0
    max_abs_index: Optional[list] = None
    mean_abs: float = 0.0
    max_rel: float = 0.0
    cosine: Optional[float] = None
    norm_a: Optional[float] = None  # L2 norms of the finite elements (with cosine: the diagnosis's L2 bounds)
    norm_b: Optional[float] = None
    n_over_tol: int = 0
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    atol: Optional[float] = None
    rtol: Optional[float] = None
    tol_source: Optional[str] = None
    # () until the diagnosis assigns a list: an equal tensor (most of 10^6) allocates none
    diagnosis: Sequence = ()  # texts, rendered from ``findings`` where those are typed
    findings: Sequence = ()  # typed findings ({"kind", **params}, compare/findings.py)
    note: Optional[str] = None

    @property
    def ok(self) -> bool:
        return Status(self.status).ok

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("shape_a", "shape_b", "diagnosis", "findings"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


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
    # per side: tensors read, consumed by rules, dropped (name -> named rule), unaccounted (compare/coverage.py)
    coverage: dict = field(default_factory=dict)
    # findings about both checkpoints alike ("A and B: ..."): not a difference between them; fail with strict
    warnings: list = field(default_factory=list)
    strict: bool = False

    @property
    def equivalent(self) -> bool:
        """Equivalent only when every tensor is, and the configs define the same function and fit
        their tensors (fields that do not change the function never count). A finding shared by both
        sides is a warning: it fails only with ``strict``."""
        return all(t.ok for t in self.tensors) and not self.config_diff and not self.config_findings \
            and not any(c.get("unaccounted") for c in self.coverage.values()) \
            and not (self.strict and self.warnings)

    def counts(self) -> dict:
        c: dict = {}
        for t in self.tensors:
            c[t.status] = c.get(t.status, 0) + 1
        return c

    def counts_text(self) -> str:
        """The counts in words, worst status first: ``1 differ, 20 equal``."""
        return counts_text(self.counts())

    def reasons(self) -> list[str]:
        """Why the pair is not equivalent beyond its tensors (see :func:`reasons`)."""
        return reasons({"config_diff": self.config_diff, "config_findings": self.config_findings,
                        "coverage": self.coverage})

    def verdict(self) -> str:
        return "equivalent" if self.equivalent else "differ"

    def worst_first(self) -> list[TensorResult]:
        return sorted(self.tensors, key=lambda t: (rank(t.status), -(t.n_over_tol or 0),
                                                   -(t.max_abs or 0.0), t.name))

    def to_dict(self, tensors: bool = True) -> dict:
        """The JSON-ready result; ``tensors=False`` leaves the per-tensor rows out (``tensor_dicts`` streams
        them: 10^6 rows as one list of dicts would take gigabytes)."""
        return {
            "verdict": self.verdict(), "a": self.a, "b": self.b,
            "format_a": self.format_a, "format_b": self.format_b,
            "counts": self.counts(), "options": self.options, "notes": self.notes,
            "config_diff": self.config_diff, "config_findings": self.config_findings, "warnings": self.warnings,
            "strict": self.strict, "mapping": self.mapping,
            "coverage": self.coverage, **({"tensors": list(self.tensor_dicts())} if tensors else {}),
        }

    def tensor_dicts(self):
        return (t.to_dict() for t in self.tensors)


def counts_text(counts: dict) -> str:
    """{status: n} in words, worst status first: ``1 differ, 20 equal``."""
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: (rank(kv[0]), str(kv[0]))))


def reasons(d: dict) -> list[str]:
    """The failures of a comparison that are not a tensor's, one line each, from a result or its
    to_dict(): function-changing config differences, config findings, tensors no rule accounts for."""
    from ckdiff.compare.coverage import unaccounted_note
    out = [f"config {k}: A={a!r} B={b!r}" for k, a, b in d.get("config_diff") or []]
    out += [str(f) for f in d.get("config_findings") or []]
    return out + unaccounted_note(d.get("coverage") or {})


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
    strict: bool = False  # warnings (findings that hold on both sides) fail the comparison
    # per side: the window mapped of a file-backed side (32 MiB: a quarter as many unmaps, each of which
    # interrupts the kernel's threads, as 8 MiB); rows gathered through a table go a sixteenth of it at a
    # time, block-scaled rows a quarter
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


def _raw(t: LazyTensor) -> bool:
    """A tensor stored as plain bytes at ``lo`` of a file that maps windows (safetensors)."""
    return hasattr(t, "lo") and hasattr(getattr(t, "file", None), "window")


def _prefetch(items: Iterator, depth: int = 1, torch_threads: Optional[int] = None) -> Iterator:
    """Iterate ``items`` on a reader thread, ``depth`` items ahead (torch ops release the GIL).
    ``torch_threads``: torch's intra-op threads for the reader thread's own ops (a per-thread setting)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def run():
        if torch_threads:
            torch.set_num_threads(torch_threads)
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put((done, e))

    th = threading.Thread(target=run, name="ckdiff-read-ahead", daemon=True)
    th.start()
    try:
        while True:
            x = q.get()
            if isinstance(x, tuple) and len(x) == 2 and x[0] is done:
                if x[1] is not None:
                    raise x[1]
                return
            yield x
    finally:
        stop.set()
        th.join()


def _window(t, lo: int, hi: int, ahead: int = 0) -> np.ndarray:
    """Raw bytes of elements [lo, hi) of a file-backed tensor, over a map of the page cache (no
    copy); the next ``ahead`` elements are asked of the disk meanwhile (a cold cache)."""
    isz = t.dtype.itemsize
    if ahead:
        t.file.will_need(t.lo + hi * isz, ahead * isz)
    return t.file.window(t.lo + lo * isz, (hi - lo) * isz)


def _read_rows(t: LazyTensor, lo: int, hi: int, row: int) -> torch.Tensor:
    if not t.shape:
        return t.load().reshape(1)
    return t.rows(lo // row, hi // row).contiguous().reshape(-1)


def _ranges(ta: LazyTensor, tb: LazyTensor, chunk_bytes: int, raw: bool) -> tuple[list, int]:
    """Element ranges covering both tensors; whole rows unless both sides are file-backed."""
    n = ta.numel
    isz = max(ta.dtype.itemsize, tb.dtype.itemsize)
    row = max(1, n // max(1, ta.nrows)) if ta.shape else 1
    if raw:
        step = max(1, chunk_bytes // isz)
    else:  # rows gathered through a table (a TP merge, a QKV split) pass through temporaries several
        # times their size: 2 MiB at a time keeps the peak flat (HF vs Megatron TP=2, 1 GiB: peak
        # RssAnon 436 MiB with 8 MiB, 255 MiB with 2 MiB, no slower)
        step = max(1, max(1, chunk_bytes // 16) // max(1, row * isz)) * row
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)], row


def _pairs(ta, tb, ranges, row: int) -> Iterator:
    """(lo, hi, chunk a, chunk b) for each range: a file-backed side as its raw bytes over a map
    (uint8 numpy, nothing copied), any other side as a flat tensor gathered through its table.
    Chunks with a gathered side are made on a thread one chunk ahead. (Two gathering threads were
    no faster and raced on a group's computed outputs: 4 GiB HF vs Megatron TP=2, 240 -> 669 MiB.)"""
    raw_a, raw_b = _raw(ta), _raw(tb)

    def gen():
        for lo, hi in ranges:
            ahead = hi - lo
            ca = _window(ta, lo, hi, min(ahead, ta.numel - hi)) if raw_a else _read_rows(ta, lo, hi, row)
            cb = _window(tb, lo, hi, min(ahead, tb.numel - hi)) if raw_b else _read_rows(tb, lo, hi, row)
            yield lo, hi, ca, cb
    return gen() if (raw_a and raw_b) or len(ranges) < 2 else _prefetch(gen())


def _kin(x, dtype: torch.dtype):
    """Kernel input (compare/kernels.py) for a chunk: raw bytes of ``dtype`` or a tensor."""
    if isinstance(x, np.ndarray):
        from ckdiff.compare.kernels import plan  # numba: loaded once a chunk differs
        p = plan(dtype)
        if p is not None:
            return x, x.size // dtype.itemsize, p[0], p[1]
        x = torch.frombuffer(x, dtype=dtype) if x.size else torch.empty(0, dtype=dtype)
    from ckdiff.compare.kernels import as_kernel_input
    return as_kernel_input(x)


def _unravel(flat: int, shape) -> list:
    idx = []
    for s in reversed(shape):
        idx.append(flat % s if s else 0)
        flat //= s if s else 1
    return list(reversed(idx))


def _new_stats():
    from ckdiff.compare.kernels import Stats  # numba: loaded once a chunk differs
    return Stats()


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
    if isinstance(ta, BlockScaled) or isinstance(tb, BlockScaled):  # encodings: judged in scale units
        from ckdiff.compare.quantized import compare_scaled
        out = compare_scaled(name, ta, tb, opts.chunk_bytes)
        if progress:
            progress(ta.nbytes + tb.nbytes)
        return out
    tol = opts.tolerance(name, ta.dtype, tb.dtype)
    r.atol, r.rtol, r.tol_source = tol.atol, tol.rtol, tol.source
    same_dtype = ta.dtype == tb.dtype
    ranges, row = _ranges(ta, tb, opts.chunk_bytes, _raw(ta) and _raw(tb))
    stats = None  # the fused kernel (numba), made at the first differing chunk
    first_diff = None if same_dtype else 0
    for k, (lo, hi, ca, cb) in enumerate(_pairs(ta, tb, ranges, row)):
        if first_diff is None:
            if bytes_equal(ca, cb):
                if progress:
                    progress((hi - lo) * (ta.dtype.itemsize + tb.dtype.itemsize))
                continue
            first_diff = k
        stats = stats or _new_stats()
        stats.add(_kin(ca, ta.dtype), _kin(cb, tb.dtype), lo, tol.atol, tol.rtol)
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
            stats.add(_kin(ca, ta.dtype), _kin(cb, tb.dtype), lo, tol.atol, tol.rtol)
    r.max_abs = max(0.0, stats.max_abs)
    r.max_abs_index = _unravel(stats.max_idx, ta.shape) if stats.max_idx is not None else None
    r.mean_abs = stats.sum_abs / max(1, ta.numel)
    r.max_rel = stats.max_rel
    r.cosine = stats.cosine
    r.norm_a, r.norm_b = math.sqrt(max(0.0, stats.na)), math.sqrt(max(0.0, stats.nb))
    r.n_over_tol = stats.over
    r.nan_a, r.nan_b, r.inf_a, r.inf_b = stats.nan_a, stats.nan_b, stats.inf_a, stats.inf_b
    r.status = Status.DIFFER if stats.over else (Status.CLOSE if same_dtype else Status.CAST)
    if not same_dtype and r.status == Status.CAST and opts.strict_dtype:
        r.status = Status.DTYPE
    if not same_dtype:
        r.note = f"cast {r.dtype_a} -> {r.dtype_b}"
    elif r.status == Status.CLOSE and tol.source == "exact":
        r.note = "bytes differ only in NaN payloads or signed zeros"
    return r


def compare_checkpoints(a: Checkpoint, b: Checkpoint, opts: Optional[Options] = None,
                        progress_factory=None, diagnose_fn=None, map_layouts: bool = True,
                        shard=None) -> Optional[CompareResult]:
    """Compare every tensor of the union of keys; never stop at the first mismatch.

    Checkpoints of different layouts are lined up first (compare/align.py) unless ``map_layouts``
    is false; the mapping used is part of the result. With ``shard`` (ckdiff.distributed.Shard)
    the tensors are spread over its ranks and the result exists on rank 0 only (None elsewhere),
    identical to the one a single process computes."""
    opts = opts or Options()
    notes: list[str] = []
    mapping: list = []
    cdiff, cfindings, cnotes, cwarnings = compare_config_semantics(a, b)
    a0, b0 = a, b
    if map_layouts:
        from ckdiff.compare.align import align
        a, b, mapping, notes = align(a, b)
    notes += [f"{side}: {n}" for side, ck in (("A", a0), ("B", b0)) for n in (ck.meta or {}).get("notes", [])]
    notes += cnotes
    from ckdiff.compare.align import tied_head_views
    a, b, tie_views = tied_head_views(a, b, {"A": _tied(a0), "B": _tied(b0)})
    consumed: set = set()
    names_a = [n for n in a.tensors if opts.selected(n)]
    names_b = [n for n in b.tensors if opts.selected(n)]
    set_b = set(names_b)
    common = [n for n in names_a if n in set_b]
    one_sided: list[TensorResult] = []
    for n in names_a:
        if n not in set_b:
            t = a.tensors[n]
            one_sided.append(TensorResult(n, Status.ONLY_A, shape_a=t.shape, dtype_a=dtype_name(t.dtype), numel=t.numel))
    for n in names_b:
        if n not in a.tensors:
            t = b.tensors[n]
            one_sided.append(TensorResult(n, Status.ONLY_B, shape_b=t.shape, dtype_b=dtype_name(t.dtype), numel=t.numel))
    jobs = [(n, a.tensors[n].nbytes + b.tensors[n].nbytes,
             lambda n=n, progress=None: compare_tensor(n, a.tensors[n], b.tensors[n], opts, progress))
            for n in common]
    if shard is not None:
        done = shard.map(jobs)
        if done is None:
            return None
    else:
        total = sum(nb for _, nb, _ in jobs)
        progress = progress_factory(total) if progress_factory else None
        done = [fn(progress=progress) for _, _, fn in jobs]
        if progress is not None and hasattr(progress, "stop"):
            progress.stop()
    results = one_sided + done
    res = CompareResult(a.path, b.path, a.format, b.format, results,
                        config_diff=cdiff, config_findings=cfindings, warnings=cwarnings, strict=opts.strict,
                        options={"atol": opts.atol, "rtol": opts.rtol, "only": opts.only, "ignore": opts.ignore,
                                 "patterns": [list(p) for p in opts.patterns]}, notes=notes, mapping=mapping)
    _tied_equivalence(res, tie_views)
    from ckdiff.compare.coverage import coverage, unaccounted_note
    res.coverage = coverage(a0, b0, a, b, results, consumed, opts.selected)
    res.notes += unaccounted_note(res.coverage)
    if opts.diagnose:
        from ckdiff.compare.diagnose import diagnose_result
        (diagnose_fn or diagnose_result)(res, a, b)
    return res


def _tied(ck: Checkpoint) -> bool:
    """Whether a checkpoint's own config ties the output head (False when it has none or cannot say)."""
    try:
        c = canonical_config(ck.format, ck.config, ck.tensors, config_where(ck))
    except (ConfigError, TypeError, ValueError, KeyError, ZeroDivisionError):
        return False
    return bool(c and c.get("tied"))


def _tied_equivalence(res: CompareResult, views: dict) -> None:
    """A named equivalence: one side ties its head, the other stores a head equal to its embedding. The
    tied side's embedding was compared under the head's name; when that head and the embeddings match,
    the configs' differing tie flag defines the same function and is no difference."""
    for side, (emb, head) in views.items():
        by = {t.name: t for t in res.tensors}
        h, e = by.get(head), by.get(emb)
        if h is None or e is None or not (h.ok and e.ok):
            continue
        other = "B" if side == "A" else "A"
        h.note = f"{side} ties its head: compared as {side}[{emb}]"
        res.config_diff = [d for d in res.config_diff if d[0] != "tied"]
        res.notes.append(f"named equivalence (tied head): {side} ties its output head to {emb}, {other} stores "
                         f"{head} equal to its embedding; the same function")


def compare_config_semantics(a: Checkpoint, b: Checkpoint) -> tuple[list, list, list, list]:
    """(function-changing config differences, config-vs-tensor findings, notes, warnings) of two checkpoints.

    Each side's own config (HF ``config.json`` v4/v5, Meta/JetStream ``params.json``, Megatron ``args``)
    is read into one canonical dict (models/config.py), so spellings, explicit defaults and fields
    that do not change the function never show; across layouts the same fields line up.

    A finding about one checkpoint is a difference only when the other side does not share it: one
    of the same kind on both sides (an untied config without a head in A and in B, the same bad
    value) says nothing about A vs B and is returned once, as a warning about both."""
    canon, found = {}, {}
    for side, ck in (("A", a), ("B", b)):
        try:  # a malformed value is a finding (verdict DIFFER), not a crash: same-layout tensors need no config
            canon[side] = canonical_config(ck.format, ck.config, ck.tensors, config_where(ck))
            found[side] = []
        except ConfigError as e:
            canon[side] = None
            found[side] = [Finding(f"invalid config, {e}", ("invalid", e.problem))]
        except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
            canon[side] = None
            found[side] = [Finding(f"config not read: {e}", ("unread", str(e)))]
    ca, cb = canon["A"], canon["B"]
    bad = any(c is None and f for c, f in ((ca, found["A"]), (cb, found["B"])))
    diffs, notes = compare_configs(ca, cb)
    for side, ck in (("A", a), ("B", b)):
        found[side] += config_findings(ck.format, ck.config, ck.tensors, canon[side])
    kinds = {side: {f.kind for f in fs} for side, fs in found.items()}
    both = kinds["A"] & kinds["B"]
    findings = [f"{side}: {f}" for side in ("A", "B") for f in found[side] if f.kind not in both]
    warnings = [f"A and B: {f}" for f in found["A"] if f.kind in both]
    notes += [f"config disagrees with its tensors, {f}" for f in findings]  # every report shows it
    if (ca is None) != (cb is None) and not bad:
        notes.append(f"{'A' if ca is None else 'B'} has no model config: configurations were not compared")
    return diffs, findings, notes, warnings
