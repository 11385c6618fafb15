"""Name the likely cause of a mismatch (verification-lessons.md, section 3).

Works from the comparator's per-tensor metrics (TensorResult: n_over_tol, max_abs_index, cosine,
NaN/Inf counts) and from lazy tensors, within a time budget of half the tensor's estimated read time:

1. from the metrics alone, nothing read: overflow (+-Inf on one side only), NaN introduced, one
   element changed (isolated) or a handful of elements;
2. on a sample of rows: scaled by a constant, offset by a constant (norm conventions ``w - 1``,
   ``1 + w``); with a cosine ~ 1 and neither fitting, the difference is noise and the diagnosis is
   skipped with a note saying so;
3. localised: the differences confined to one row or to one head's rows (zeroed, replaced by
   another head's rows, or replaced);
4. equal to another tensor of A (another layer, another kind, the embedding for the head), tested
   on a sample of rows against every tensor of the same shape;
5. structural hypotheses as row or column maps (rotary permutation in either direction and with
   either head count, halves swapped, TP shards reversed) tested on a sample of rows first; then
   whole-tensor hypotheses (transpose, each TP shard transposed, shards concatenated on the wrong
   axis and reshaped, rows/columns permuted); only the winner is confirmed on the full tensor.

Across tensors: consistent reorderings that leave the function unchanged (MLP units permuted in
gate/up rows and down columns alike; heads permuted in q/k/v rows and o columns alike) become
status ``reordered`` with an "equivalent reordering" diagnosis, and a rotary permutation found in
some layers only says so.

All the math runs on numpy arrays (``_values``): a lazy tensor's ``load``/``rows`` may give torch tensors or
numpy arrays, and torch is imported only for an encoded side (compare/diagnose_scaled.py) and for a model
family's own diagnose hook, which take torch tensors.
"""
from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Optional

import numpy as np

from ckdiff.compare.result import CompareResult, TensorResult
from ckdiff.compare.findings import record
from ckdiff.compare.status import Status
from ckdiff.tensor.dtype_names import dtype_name

if TYPE_CHECKING:
    from ckdiff.tensor.lazy import Checkpoint, LazyTensor

MAX_NUMEL = 1 << 26  # largest tensor loaded whole (to confirm a winner, or for whole-tensor hypotheses)
SMALL_NUMEL = 1 << 21  # at or below: both sides are loaded once and every hypothesis indexes them
HASH_NUMEL = 1 << 24  # largest tensor whose rows are hashed to find a generic row permutation
READ_RATE = 1.5e9  # bytes/s, to estimate a tensor's read time for the budget
MIN_BUDGET = 1.0  # seconds: tiny tensors always get the cheap hypotheses
FEW = 8  # at most this many differing elements: reported as elements, no structural cause sought
NOISE_COSINE = 1 - 1e-4
SAMPLE = 12
HEAD_DIMS = (16, 24, 32, 48, 64, 80, 96, 128, 256)
LAYER = re.compile(r"(?<=\.)(\d+)(?=\.)")
ATTN = re.compile(r"q_proj|k_proj|v_proj|o_proj|\.w[qkvo]\.|query_key_value|attention\.dense|self_attn")


class Cause(Enum):
    """The kind of a structural hypothesis (a row or column map) that explains a mismatch."""
    ROTARY = "rotary permutation"
    ROTARY_HEADS = "rotary permutation with the wrong head count"
    HALVES = "halves swapped"
    TP_ORDER = "TP shard order reversed"
    QKV_ORDER = "QKV fused in the wrong order"
    QKV_KV_SWAP = "k and v swapped in the fused QKV"
    QKV_PARTS = "a part of the fused QKV permuted"


@dataclass(frozen=True)
class Finding:
    """One diagnosis: its kind, whether it involves a rotary permutation, and the text reports show."""
    cause: Cause
    text: str
    rotary: bool = False


def _rotary(cause: Cause, text: str) -> Finding:
    return Finding(cause, text, rotary=True)


# ---------------------------------------------------------------- helpers
# dtypes whose values numpy holds as they are; every other dtype (bfloat16, float16, float8) is widened to
# float32, which holds each of its values exactly
_AS_IS = frozenset({"float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                    "bool", "complex64", "complex128"})


def _values(x) -> np.ndarray:
    """The values of a tensor as a numpy array: a numpy array as it is (a non-numeric one, such as an
    ml_dtypes bfloat16 array, widened to float32), a torch tensor as its numpy view, or widened to float32
    (bfloat16, float16, float8). Every hypothesis below works on these arrays; the tensors' own dtypes
    (``LazyTensor.dtype``) decide what is exact, since bfloat16 and float32 are both float32 here."""
    if isinstance(x, np.ndarray):
        return x if x.dtype.kind in "biufc" else x.astype(np.float32)
    name = dtype_name(x.dtype)
    if name in _AS_IS:
        return x.numpy()
    # bfloat16 and float16 widened by numpy: 4x and 2x as fast as torch's .float() (4M elements: 2 and 4 ms, 8 ms)
    if name == "bfloat16":
        return _widen(_bits(x), name)
    if name == "float16":
        return x.numpy().astype(np.float32)
    return x.float().numpy()


def _bits(x) -> np.ndarray:
    """A numpy array holding a tensor's elements as stored, byte for byte: its values where numpy has the
    dtype, else the same bytes as unsigned integers of the same width (bfloat16 as 16-bit words)."""
    if isinstance(x, np.ndarray):
        return x if x.dtype.kind in "biufc" else x.view(f"u{x.dtype.itemsize}")
    if dtype_name(x.dtype) in _AS_IS or dtype_name(x.dtype) == "float16":
        return x.numpy()
    import torch  # x is a torch tensor: torch is loaded already
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]).numpy()


def _widen(u: np.ndarray, name: str) -> Optional[np.ndarray]:
    """The values of ``u`` (from ``_bits``) of a tensor of dtype ``name``, where numpy can make them: values
    numpy holds (floats, complex, the integers of an integer dtype) as they are, the 16-bit words of a
    bfloat16 as float32 (a bfloat16 is the upper half of the float32 of the same value); else None."""
    if u.dtype.kind in "fc" or (name in _AS_IS and u.dtype.kind in "biu"):
        return u
    if name == "bfloat16" and u.dtype.itemsize == 2:
        w = u.view(np.uint16).astype(np.uint32)
        w <<= 16
        return w.view(np.float32)
    return None


def _is_float(name: str) -> bool:
    """Whether a dtype name names a floating-point dtype (torch's ``is_floating_point``: not complex)."""
    return name.startswith(("float", "bfloat"))


def _allclose(x: np.ndarray, y: np.ndarray, rtol: float, atol: float, equal_nan: bool) -> bool:
    """torch.allclose: every element has ``|x - y| <= atol + rtol |y|`` with a finite difference, or is equal
    (infinities of one sign), or (``equal_nan``) NaN on both sides."""
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(x - y)
        ok = d <= atol + rtol * np.abs(y)
        ok &= d < np.inf
        if ok.all():
            return True
        bad = ~ok
        xb, yb = x[bad], y[bad]
        close = xb == yb
        if equal_nan:
            close |= np.isnan(xb) & np.isnan(yb)
        return bool(close.all())


_BLOCK = 1 << 16  # elements compared at a time by _array_equal


def _array_equal(x: np.ndarray, y: np.ndarray) -> bool:
    """np.array_equal of two arrays of one shape, a block of rows at a time, stopping at the first block that
    differs: a wrong hypothesis (a transpose, a row map) usually differs in its first rows already."""
    if x.ndim == 0 or x.size <= _BLOCK:
        return bool((x == y).all())
    step = max(1, _BLOCK // max(1, x.size // x.shape[0]))
    return all((x[i:i + step] == y[i:i + step]).all() for i in range(0, x.shape[0], step))


def _eq(x: np.ndarray, y: np.ndarray, atol: float = 0.0, rtol: float = 0.0, same: Optional[bool] = None) -> bool:
    """Equal (``same`` dtype, no tolerance: exact), else close within the tolerance in float64 with NaN equal
    to NaN. ``same`` says whether the tensors' own dtypes are one (default: the arrays' dtypes)."""
    if x.shape != y.shape:
        return False
    if same is None:
        same = x.dtype == y.dtype
    if same and not atol and not rtol:
        return _array_equal(x, y)
    return _allclose(x.astype(np.float64, copy=False), y.astype(np.float64, copy=False), max(rtol, 1e-12), atol,
                     equal_nan=True)


def _head_counts(rows: int, config: dict) -> list[tuple[int, int]]:
    """(heads, head_dim) splits of ``rows`` to try, config values first."""
    cands = []
    for h in (config.get("num_attention_heads"), config.get("num_key_value_heads"),
              config.get("n_heads"), config.get("n_kv_heads"), config.get("num_attention_heads_kv"),
              config.get("num_kv_heads")):
        if isinstance(h, int) and h > 0 and rows % h == 0 and (rows // h) % 2 == 0:
            cands.append((h, rows // h))
    for d in HEAD_DIMS:
        if rows % d == 0:
            cands.append((rows // d, d))
    hd = config.get("head_dim") or config.get("kv_channels")
    if isinstance(hd, int) and hd > 1 and rows % hd == 0 and hd % 2 == 0:
        cands.insert(0, (rows // hd, hd))
    seen, out = set(), []
    for c in cands:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _head_dim(config: dict) -> Optional[int]:
    hd = config.get("head_dim") or config.get("kv_channels")
    if hd:
        return hd
    if "hidden_size" in config and config.get("num_attention_heads"):
        return config["hidden_size"] // config["num_attention_heads"]
    if "dim" in config and config.get("n_heads"):
        return config["dim"] // config["n_heads"]
    return None


def _which_heads(expected: int, used: int, config: dict) -> str:
    q = config.get("num_attention_heads") or config.get("n_heads")
    kv = config.get("num_key_value_heads") or config.get("n_kv_heads") or config.get("num_attention_heads_kv")
    if used == q and expected == kv:
        return " (the query head count was used where the KV head count belongs)"
    if used == kv and expected == q:
        return " (the KV head count was used where the query head count belongs)"
    return ""


# Row maps as int64 index arrays (B row i is A row map[i]): the row moves of tensor/ops.py's rope_to_interleaved,
# rope_to_half and FuseQKV applied to arrays of row indices
def _to_interleaved(x: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Half-split (rotate_half) order -> interleaved pairs, per head: ``out[h*hd + 2j + i] = x[h*hd + i*hd/2 + j]``."""
    return x.reshape(heads, 2, head_dim // 2).transpose(0, 2, 1).reshape(-1)


def _to_half(x: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Interleaved pairs -> half-split order, per head (the inverse of ``_to_interleaved``)."""
    return x.reshape(heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def _fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """q [H*d], k [K*d], v [K*d] -> Megatron group order [q x H/K, k, v] x K."""
    r = heads // kv_heads
    return np.concatenate([q.reshape(kv_heads, r * head_dim), k.reshape(kv_heads, head_dim),
                           v.reshape(kv_heads, head_dim)], axis=1).reshape(-1)


def _arange(lo: int, hi: Optional[int] = None) -> np.ndarray:
    return np.arange(lo, dtype=np.int64) if hi is None else np.arange(lo, hi, dtype=np.int64)


# fixed odd multipliers of the row hash below (any odd values serve; fixed so a run repeats exactly)
_HASH_MUL = np.random.default_rng(0x636B64).integers(0, 1 << 63, 1 << 16, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _row_keys(u: np.ndarray) -> np.ndarray:
    """One 64-bit key per row of a 2-D uint8 array: its bytes read as words, each times a fixed odd
    multiplier, summed modulo 2^64. Equal rows get equal keys; distinct rows rarely collide, and a caller
    confirms any match on the bytes."""
    w = u.shape[1]
    size = next(s for s in (8, 4, 2, 1) if w % s == 0)
    words = u.view(np.dtype(f"<u{size}")).astype(np.uint64, copy=False)
    n = words.shape[1]
    mul = _HASH_MUL[:n] if n <= len(_HASH_MUL) else np.resize(_HASH_MUL, n)
    with np.errstate(over="ignore"):
        return (words * mul).sum(axis=1, dtype=np.uint64)


def _row_perm(a, b, same: Optional[bool] = None):
    """If b's rows are a permutation of a's rows, the source row for each row of b (equal rows are taken
    in order: the k-th copy in b comes from the k-th copy in a). Rows are matched on their stored bytes
    (``_bits``); ``same`` says whether the tensors' own dtypes are one (default: a's and b's dtypes)."""
    if same is None:
        same = a.dtype == b.dtype
    a, b = _bits(a), _bits(b)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape != b.shape or not same:
        return None
    rows = a.shape[0]
    ua = np.ascontiguousarray(a).view(np.uint8).reshape(rows, -1)
    ub = np.ascontiguousarray(b).view(np.uint8).reshape(rows, -1)
    if ua.shape[1] == 0:
        return None
    ka, kb = _row_keys(ua), _row_keys(ub)
    oa, ob = np.argsort(ka, kind="stable"), np.argsort(kb, kind="stable")
    if not np.array_equal(ka[oa], kb[ob]):
        return None  # different multisets of keys: different multisets of rows
    perm = np.empty(rows, np.int64)
    perm[ob] = oa
    if np.array_equal(ua[perm], ub):
        return perm.tolist()
    return _row_perm_exact(ua, ub)  # two distinct rows share a key: match on the bytes themselves


def _row_perm_exact(ua: np.ndarray, ub: np.ndarray):
    ka, kb = [r.tobytes() for r in ua], [r.tobytes() for r in ub]
    if sorted(ka) != sorted(kb):
        return None
    where: dict = {}
    for i, k in enumerate(ka):
        where.setdefault(k, []).append(i)
    return [where[k].pop(0) for k in kb]


def _describe_perm(src: list[int], what: str = "rows") -> str:
    n = len(src)
    one = what[:-1]
    for s in (2, 4, 8, 3, 6, 12, 16):
        if n % s or n // s < 1:
            continue
        blk = n // s
        blocks = [src[i:i + blk] for i in range(0, n, blk)]
        # a permutation inside each of S shards only, the same in each
        if all(sorted(b) == list(range(k * blk, (k + 1) * blk)) for k, b in enumerate(blocks)) and s > 1:
            local = list(blocks[0])
            if all([x - k * blk for x in b] == local for k, b in enumerate(blocks)) and local != list(range(blk)):
                return (f"{what} permuted inside each of {s} equal blocks only (TP shards or QKV groups of {blk} "
                        f"{what}, the same permutation in every block; first {what} of a block come from {local[:8]})")
    for blk in (n // 2, *[d for d in HEAD_DIMS if n % d == 0 and d < n], *[n // s for s in (4, 8) if n % s == 0]):
        if blk <= 0 or n % blk:
            continue
        blocks = [src[i:i + blk] for i in range(0, n, blk)]
        if all(b == list(range(b[0], b[0] + blk)) and b[0] % blk == 0 for b in blocks):
            order = [b[0] // blk for b in blocks]
            if order == list(range(len(order)))[::-1] and len(order) > 2:
                return f"TP shard order reversed: B holds A's {len(order)} {one} shards of {blk} in reverse order"
            if order != sorted(order):
                return f"{blk}-{one} blocks reordered: B holds A's blocks {order}"
    return f"{what} permuted (first {what} of B come from A {what} {src[:8]})"


def _fmt(x: float) -> str:
    return f"{x:.6g}"


@dataclass
class _Ctx:
    a: Checkpoint
    b: Checkpoint
    config: dict
    perms: dict = field(default_factory=dict)  # (name, "rows"|"cols") -> permutation list
    sample_cache: dict = field(default_factory=dict)
    rotary: set = field(default_factory=set)  # tensors whose diagnosis is a rotary permutation
    maps: dict = field(default_factory=dict)  # (builder, rows, unit) -> the row maps to try, built once per shape

    def row_maps(self, build, rows: int, *unit) -> list:
        """``build(rows, config, *unit)``, made once per checkpoint pair: every layer's tensor of one kind
        tries the same maps."""
        key = (build, rows, unit)
        if key not in self.maps:
            self.maps[key] = build(rows, self.config, *unit)
        return self.maps[key]


class _Side:
    """Row access to one side, as numpy arrays (``_values``): the whole tensor loaded when small (its values
    made only for the rows asked for until the whole is needed), else cached single-row reads. ``dtype`` is
    the tensor's own dtype name."""

    def __init__(self, t: LazyTensor, whole: bool):
        self.t = t
        self.dtype = dtype_name(t.dtype)
        self.raw = t.load() if whole else None  # the loaded tensor, as ``load`` gave it
        self.full: Optional[np.ndarray] = None  # its values
        self.cache: dict = {}

    def row(self, i: int) -> np.ndarray:
        if self.full is not None:
            return self.full[i]
        if i not in self.cache:
            self.cache[i] = _values(self.raw[i:i + 1] if self.raw is not None else self.t.rows(i, i + 1))[0]
        return self.cache[i]

    def rows_at(self, idx) -> np.ndarray:
        if self.full is not None:
            return self.full[np.asarray(list(idx), dtype=np.int64)]
        if self.raw is not None and isinstance(idx, range) and idx.step == 1:
            return _values(self.raw[idx.start:idx.stop])
        return np.stack([self.row(int(i)) for i in idx])

    def load(self) -> np.ndarray:
        if self.full is None:
            if self.raw is None:
                self.raw = self.t.load()
            self.full = _values(self.raw)
        return self.full

    def bits(self) -> np.ndarray:
        """The whole tensor's stored bytes (``_bits``); a tensor that gives its stored elements itself
        (compare/lane.py's ``stored``) gives them unconverted."""
        stored = getattr(self.t, "stored", None)
        if self.raw is None and stored is not None:
            return stored()
        if self.raw is None:
            self.raw = self.t.load()
        return _bits(self.raw)

    def columns(self, idx) -> np.ndarray:
        """Values of columns ``idx`` of the whole (2-D) tensor, widened from its bytes where numpy can."""
        if self.full is None:
            cols = _widen(self.bits()[:, list(idx)], self.dtype)
            if cols is not None:
                return cols
        return self.load()[:, list(idx)]


def _sample_rows(n: int, extra: Optional[int] = None) -> list[int]:
    idx = {int(i * (n - 1) / max(1, SAMPLE - 1)) for i in range(min(n, SAMPLE))}
    if extra is not None and 0 <= extra < n:
        idx.add(extra)
    return sorted(idx)


# ---------------------------------------------------------------- one tensor
def _nonfinite(r: TensorResult) -> tuple[list[str], int]:
    notes, n = [], 0
    where = f" (e.g. at {r.max_abs_index})" if r.max_abs_index is not None else ""
    for side, other, k in (("B", "A", r.inf_b - r.inf_a), ("A", "B", r.inf_a - r.inf_b)):
        if k > 0:
            notes.append(f"overflow: {k} element(s) are +-Inf in {side} where {other} is finite{where}: values "
                         f"beyond the range of a 16-bit staging cast (fp16 max 65504)")
            n += k
    for side, k in (("B", r.nan_b - r.nan_a), ("A", r.nan_a - r.nan_b)):
        if k > 0:
            notes.append(f"NaN introduced: {k} element(s) are NaN in {side} only{where}")
            n += k
    return notes, n


def _isolated(r: TensorResult, ta: LazyTensor, tb: LazyTensor) -> list[str]:
    idx = r.max_abs_index
    if idx is None:
        return []
    if r.n_over_tol == 1:
        try:
            i = idx[0] if idx else 0
            ra, rb = _values(ta.rows(i, i + 1)), _values(tb.rows(i, i + 1))
            j = tuple([0] + list(idx[1:]))
            vals = f": {float(ra[j]):.3g} -> {float(rb[j]):.3g}"
        except (IndexError, RuntimeError, TypeError, ValueError):
            vals = ""
        return [f"one element changed at {idx}, isolated{vals}"]
    return [f"{r.n_over_tol} isolated elements changed of {r.numel} (largest difference {_fmt(r.max_abs)} at {idx}); "
            "every other element agrees"]


def _scale_offset(A, B, name: str, dtypes: Optional[tuple[str, str]] = None) -> Optional[str]:
    """'scaled'/'offset' if B == c*A or B == A + c on these rows (float math, finite elements). ``dtypes``:
    the tensors' own dtype names (default: those of A and B)."""
    da, db = dtypes or (dtype_name(A.dtype), dtype_name(B.dtype))
    if not (_is_float(da) and _is_float(db)):
        return None
    af = _values(A).astype(np.float64, copy=False).reshape(-1)
    bf = _values(B).astype(np.float64, copy=False).reshape(-1)
    ok = np.isfinite(af) & np.isfinite(bf)
    af, bf = af[ok], bf[ok]
    if af.size == 0:
        return None
    den = float(af @ af)
    rtol, atol = _so_tol(da, db)
    with np.errstate(over="ignore", invalid="ignore"):
        if den > 0:
            c = float(af @ bf) / den
            if abs(c - 1) > 1e-9 and _allclose(af * c, bf, rtol, atol, equal_nan=False):
                return f"scaled: B == {c:.6g} * A"
        d = float((bf - af).mean())
        close = abs(d) > 1e-12 and _allclose(af + d, bf, rtol, atol, equal_nan=False)
    if close:
        hint = ""
        if abs(abs(d) - 1) < 1e-3 and re.search(r"norm|ln", name):
            hint = (" (norm weight convention: one side stores w - 1 and applies 1 + w, as Gemma does; "
                    "the other stores w)")
        return f"offset: B == A {'+' if d > 0 else '-'} {abs(d):.6g}" + hint
    return None


def _so_tol(da, db) -> tuple[float, float]:
    """(rtol, atol) of _scale_offset's element-wise test (dtypes or their names)."""
    return (2e-3 if dtype_name(da) != "float32" or dtype_name(db) != "float32" else 1e-5), 1e-7


def _may_scale_or_offset(r: TensorResult, ta: LazyTensor, tb: LazyTensor) -> bool:
    """False when the metrics alone rule out both B == c*A and B == A + d within _scale_offset's
    element-wise tolerance ``|b - fit| <= atol + rtol |b|``, nothing read: summed in squares those
    bounds give ``||b - fit||_2 <= atol sqrt(n) + rtol ||b||_2``, while the best scale leaves
    ``||b||^2 (1 - cos^2)`` and the best offset at least ``||b - a||^2 - (sum |b - a|)^2 / n``. Noise
    (a fine-tune, a numerics change) is ruled out here instead of on a sample of rows."""
    if r.norm_a is None or r.norm_b is None or r.cosine is None or r.nan_a or r.nan_b or r.inf_a or r.inf_b:
        return True
    if not (_is_float(dtype_name(ta.dtype)) and _is_float(dtype_name(tb.dtype))):
        return True
    rtol, atol = _so_tol(ta.dtype, tb.dtype)
    n, na, nb = max(1, r.numel), r.norm_a ** 2, r.norm_b ** 2
    cos = min(1.0, abs(r.cosine))
    bound = 1.01 * (atol * math.sqrt(n) + rtol * r.norm_b) ** 2 + 1e-9 * (na + nb)  # + rounding of the sums
    scale_left = nb * (1.0 - cos * cos)
    offset_left = na + nb - 2.0 * r.cosine * r.norm_a * r.norm_b - (r.mean_abs * r.numel) ** 2 / n
    return scale_left <= bound or offset_left <= bound


def _localised(r: TensorResult, A: _Side, B: _Side, config: dict) -> Optional[str]:
    """The differences confined to one row or to one head's block of rows."""
    idx = r.max_abs_index
    if idx is None or len(idx) != 2 or not r.n_over_tol:
        return None
    rows, cols = r.shape_a
    i0 = idx[0]
    tol = (r.atol or 0.0, r.rtol or 0.0)

    def over(lo, hi) -> int:
        a = A.rows_at(range(lo, hi)).astype(np.float64)
        b = B.rows_at(range(lo, hi)).astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(a - b)
            bad = ~(d <= tol[0] + tol[1] * np.abs(a))
        bad &= ~(np.isnan(a) & np.isnan(b))
        return int(bad.sum())

    if r.n_over_tol <= cols and over(i0, i0 + 1) == r.n_over_tol:
        rb = B.row(i0)
        what = "zeroed" if not rb.any() else "replaced"
        return f"only row {i0} differs ({r.n_over_tol} of its {cols} elements): {what}"
    if not ATTN.search(r.name):
        return None
    for heads, hd in _head_counts(rows, config):
        if hd < 2 or heads < 2 or r.n_over_tol > hd * cols:
            continue
        h = i0 // hd
        lo, hi = h * hd, (h + 1) * hd
        if over(lo, hi) != r.n_over_tol:
            continue
        blk = B.rows_at(range(lo, hi))
        desc = f"head {h} of {heads} (rows {lo}..{hi - 1}, head_dim {hd})"
        if not blk.any():
            return f"one head's rows zeroed: {desc} is all zeros in B; every other row agrees"
        for g in range(heads):
            if g != h and _eq(A.rows_at(range(g * hd, (g + 1) * hd)), blk, same=A.dtype == B.dtype):
                return f"one head's rows replaced: {desc} holds A's head {g}; every other row agrees"
        return f"one head's rows replaced: {desc} differs; every other row agrees"
    return None


def _other_tensor(name: str, B: _Side, shape, ctx: _Ctx, rows_idx) -> Optional[str]:
    """B[name] equals a different tensor of A of the same shape (sampled rows, then confirmed)."""
    db = B.dtype
    cands = [k for k, t in ctx.a.tensors.items() if k != name and tuple(t.shape) == tuple(shape)
             and (dtype_name(t.dtype) == db or (_is_float(dtype_name(t.dtype)) and _is_float(db)))]
    if not cands:
        return None
    bs = B.rows_at(rows_idx)
    for k in cands:
        t = ctx.a.tensors[k]
        key = (k, tuple(rows_idx))
        if key not in ctx.sample_cache:
            ctx.sample_cache[key] = np.stack([_values(t.rows(i, i + 1))[0] for i in rows_idx]) \
                if len(t.shape) >= 1 else None
        s = ctx.sample_cache[key]
        da = dtype_name(t.dtype)
        tol = _cast_tol(da, db)  # equal up to a cast's rounding when the dtypes differ
        if s is None or not _eq(s, bs, *tol, same=da == db):
            continue
        if t.numel <= MAX_NUMEL and not _eq(_values(t.load()), B.load(), *tol, same=da == db):
            continue
        m_self, m_other = LAYER.sub("{i}", name), LAYER.sub("{i}", k)
        if m_self == m_other:
            return f"another layer's tensor: B[{name}] == A[{k}]"
        la, lb = LAYER.findall(name), LAYER.findall(k)
        where = f" of layer {lb[-1]}" if lb else ""
        if lb and la and lb[-1] == la[-1]:
            where = " of the same layer"
        extra = ""
        if re.search(r"lm_head|output\.weight|lm_head$", name) and re.search(r"embed", k):
            extra = " (the untied output head was replaced by the embedding)"
        return f"another tensor: B[{name}] == A[{k}], a tensor of another kind{where}{extra}"
    return None


def _row_maps(rows: int, config: dict, unit: str = "rows") -> list[tuple[Finding, np.ndarray]]:
    """Row maps (``unit`` "rows") or column maps ("columns") to try, each with the finding it stands for."""
    maps = []
    cands = _head_counts(rows, config)
    for heads, hd in cands:
        maps.append((_rotary(Cause.ROTARY, f"rotary permutation: B == P(A), half-split -> interleaved, {heads} heads "
                                           f"x {hd} {unit}"),
                     _to_interleaved(_arange(rows), heads, hd)))
        maps.append((_rotary(Cause.ROTARY, f"rotary permutation: B == P^-1(A), interleaved -> half-split, {heads} "
                                           f"heads x {hd} {unit}"),
                     _to_half(_arange(rows), heads, hd)))
    hd0 = _head_dim(config)
    firsts = sorted(cands, key=lambda c: c[1] != hd0)  # A most likely uses the true head_dim
    for h1, d1 in firsts:
        for h2, d2 in cands:
            if h1 == h2:
                continue
            for f, g in ((_to_half, _to_interleaved), (_to_interleaved, _to_half)):
                m = g(f(_arange(rows), h1, d1), h2, d2)
                maps.append((_rotary(Cause.ROTARY_HEADS, f"rotary permutation with the wrong head count: B == A "
                                                         f"re-permuted as {h2} heads x {d2} {unit} where A is {h1} "
                                                         f"heads x {d1}" + _which_heads(h1, h2, config)), m))
    if rows % 2 == 0:
        h = rows // 2
        swapped = "[A[half:]; A[:half]]" if unit == "rows" else "[A[:, half:], A[:, :half]]"
        maps.append((Finding(Cause.HALVES, f"halves swapped: B == {swapped} (e.g. [gate; up] vs [up; gate], or k/v)"),
                     np.concatenate([_arange(h, rows), _arange(0, h)])))
    for s in (4, 8):
        if rows % s == 0 and rows // s > 1:
            blk = rows // s
            maps.append((Finding(Cause.TP_ORDER, f"TP shard order reversed: B holds A's {s} row shards of {blk} in "
                                                 "reverse order"),
                         np.concatenate([_arange(k * blk, (k + 1) * blk) for k in reversed(range(s))])))
    return maps


def _part_options(n: int, h_true: int, h_other: int, what: str, config: dict) -> list[tuple[str, np.ndarray]]:
    """Row maps one part of a fused QKV (q or k) may have gone through, with their labels."""
    opts = [("", _arange(n))]
    counts = [h for h in (h_true, h_other) if h and n % h == 0 and (n // h) % 2 == 0]
    for h in counts:
        d = n // h
        opts.append((f"{what}: rotary permutation P (half-split -> interleaved), {h} heads x {d} rows",
                     _to_interleaved(_arange(n), h, d)))
        opts.append((f"{what}: rotary permutation P^-1 (interleaved -> half-split), {h} heads x {d} rows",
                     _to_half(_arange(n), h, d)))
    if len(counts) == 2 and counts[0] != counts[1]:
        for h1, h2 in ((counts[0], counts[1]), (counts[1], counts[0])):
            d1, d2 = n // h1, n // h2
            for f, g in ((_to_half, _to_interleaved), (_to_interleaved, _to_half)):
                opts.append((f"{what}: rotary permutation with the wrong head count: re-permuted as {h2} heads x "
                             f"{d2} rows where it is {h1} heads x {d1}" + _which_heads(h1, h2, config),
                             g(f(_arange(n), h1, d1), h2, d2)))
    return opts


def _fused_qkv_maps(rows: int, config: dict) -> list[tuple[Finding, np.ndarray]]:
    """Hypotheses for a Megatron fused QKV ([q x H/K, k, v] x K): B row i = A row map[i]."""
    H = config.get("num_attention_heads") or config.get("n_heads")
    K = config.get("num_attention_heads_kv") or config.get("num_key_value_heads") or config.get("num_kv_heads") or H
    d = config.get("kv_channels") or config.get("head_dim") or _head_dim(config)
    if not (H and K and d) or rows != (H + 2 * K) * d or H % K:
        return []
    def fuse(q, k, v):
        return _fuse_qkv(q, k, v, H, K, d)
    q_ids, k_ids, v_ids = _arange(H * d), H * d + _arange(K * d), (H + K) * d + _arange(K * d)
    pos = np.argsort(fuse(q_ids, k_ids, v_ids))  # concatenated [Q; K; V] index -> row of the fused tensor
    maps = [(Finding(Cause.QKV_ORDER, "QKV fused as [Q; K; V] instead of Megatron's group order [q x H/K, k, v] x K"),
             pos)]
    kv_opts = [("", _arange(K * d))] + [(lab.split(": ", 1)[1], m) for lab, m in _part_options(K * d, K, 0, "kv", config)[1:]]
    for l1, m1 in kv_opts:
        for l2, m2 in kv_opts:
            extra = "; ".join(x for x in (l1 and f"v (in k's place): {l1}", l2 and f"k (in v's place): {l2}") if x)
            maps.append((Finding(Cause.QKV_KV_SWAP, "k and v swapped in the fused QKV" + (f" ({extra})" if extra else ""),
                                 rotary=bool(l1 or l2)),
                         pos[fuse(q_ids, v_ids[m1], k_ids[m2])]))
    for lq, mq in _part_options(H * d, H, K, "q", config):
        for lk, mk in _part_options(K * d, K, H, "k", config):
            if not lq and not lk:
                continue
            idx = fuse(q_ids[mq], k_ids[mk], v_ids)
            maps.append((_rotary(Cause.QKV_PARTS, "in the fused QKV, " + "; ".join(x for x in (lq, lk) if x)), pos[idx]))
    return maps


def _try_maps(label_prefix: str, maps, A: _Side, B: _Side, rows_idx, cols: bool, r: TensorResult,
              deadline: float, perms: Optional[dict] = None) -> Optional[Finding]:
    tol = (r.atol or 0.0, r.rtol or 0.0)
    same = A.dtype == B.dtype
    bs = B.rows_at(rows_idx)
    sampled = A.rows_at(rows_idx) if cols else None
    ridx = np.asarray(rows_idx, dtype=np.int64)
    for finding, m in maps:
        if time.perf_counter() > deadline:
            return None
        if cols:
            pred = sampled[:, m]
        else:
            pred = A.rows_at(m[ridx].tolist())
        if not _eq(pred, bs, *tol, same=same):
            continue
        # the winner, confirmed on the whole tensor when it can be loaded
        numel = r.numel
        if numel <= MAX_NUMEL:
            a, b = A.load(), B.load()
            full = a[:, m] if cols else a[m]
            if not _eq(full, b, *tol, same=same):
                continue
            if perms is not None:
                perms[(r.name, "cols" if cols else "rows")] = m.tolist()
            return replace(finding, text=label_prefix + finding.text)
        return replace(finding, text=label_prefix + finding.text + f" (confirmed on {len(rows_idx)} sampled rows; the "
                                                                   "tensor is too large to load)")
    return None


def _whole_tensor(name: str, A: _Side, B: _Side, r: TensorResult, ctx: _Ctx, deadline: float,
                  rows_idx: list) -> Optional[str]:
    """Whole-tensor hypotheses on a 2-D tensor's values (rows moved: on their stored bytes); ``rows_idx``
    are the sampled rows, which a transpose must hold before the whole tensor is compared."""
    same, shape = A.dtype == B.dtype, A.t.shape
    tol = (r.atol or 0.0, r.rtol or 0.0)
    if len(shape) == 2 and shape[0] == shape[1] \
            and _eq(A.columns(rows_idx).T, B.rows_at(rows_idx), *tol, same=same) \
            and _eq(A.load().T, B.load(), *tol, same=same):
        return "transposed: B == A^T"
    # whole rows (or columns) moved first: one hash of each row finds it (~0.02 s for 4M elements), while
    # each TP-shard hypothesis below builds a full candidate (~0.007 s apiece, six of them)
    if len(shape) == 2 and A.t.numel <= HASH_NUMEL and time.perf_counter() <= deadline:
        ua, ub = A.bits(), B.bits()
        perm = _row_perm(ua, ub, same)
        if perm is not None and perm != list(range(len(perm))):
            ctx.perms[(name, "rows")] = perm
            return _describe_perm(perm, "rows")
        if shape[1] > 1:
            perm = _row_perm(np.ascontiguousarray(ua.T), np.ascontiguousarray(ub.T), same)
            if perm is not None and perm != list(range(len(perm))):
                ctx.perms[(name, "cols")] = perm
                return _describe_perm(perm, "columns")
    if len(shape) == 2:
        a, b = A.load(), B.load()
        for s in (2, 4, 8):
            for ax in (0, 1):
                if time.perf_counter() > deadline:
                    return None
                if a.shape[ax] % s or a.shape[ax] // s < 1:
                    continue
                parts = np.split(a, s, axis=ax)
                if _eq(np.concatenate([p.T.reshape(p.shape) for p in parts], axis=ax), b, *tol, same=same):
                    return (f"each TP shard transposed: A split into {s} shards along dim {ax}, each shard "
                            "transposed and reshaped back in place")
                if _eq(np.concatenate(parts, axis=1 - ax).reshape(a.shape), b, *tol, same=same):
                    return (f"TP shards concatenated on the wrong axis: {s} shards along dim {ax} were concatenated "
                            f"along dim {1 - ax} and reshaped to {list(a.shape)}")
    return None


def _cast_tol(da, db) -> tuple[float, float]:
    """(atol, rtol) of the less precise of two dtypes or dtype names (compare/result.py's table), exact for
    one dtype."""
    from ckdiff.compare.result import default_tolerance
    t = default_tolerance(dtype_name(da), dtype_name(db))
    return t.atol, t.rtol


def _diagnose_shape(a, b, dtypes: Optional[tuple[str, str]] = None) -> list[str]:
    """Causes of a shape mismatch; a cast between the sides is allowed its rounding. ``dtypes``: the tensors'
    own dtype names (default: those of a and b)."""
    da, db = dtypes or (dtype_name(a.dtype), dtype_name(b.dtype))
    if not math.prod(a.shape) or not math.prod(b.shape):
        return _diagnose_empty(tuple(a.shape), tuple(b.shape))
    a, b = _values(a), _values(b)
    tol = _cast_tol(da, db)
    _eq_ = lambda x, y, same=da == db: _eq(x, y, *tol, same=same)  # noqa: E731
    notes = []
    if a.ndim == b.ndim and a.ndim >= 1 and a.shape[1:] == b.shape[1:]:
        n = min(a.shape[0], b.shape[0])
        if _eq_(a[:n], b[:n]):
            big, which = (a, "A") if a.shape[0] > b.shape[0] else (b, "B")
            extra = big[n:]
            kind = "copies of the last real row" if _eq_(extra, np.broadcast_to(big[n - 1:n], extra.shape), True) \
                else ("zeros" if not extra.any() else "other values")
            notes.append(f"padding: the first {n} rows agree; {which} has {big.shape[0] - n} extra rows ({kind})")
    if a.ndim == 2 and a.shape == b.shape[::-1] and _eq_(a.T, b):
        notes.append("transposed: B == A^T")
    if a.ndim == 2 and b.ndim == 2 and a.size == b.size and not notes:
        for s in (2, 3, 4, 6, 8, 12, 16):
            for ax in (0, 1):
                if a.shape[ax] % s:
                    continue
                cat = np.concatenate(np.split(a, s, axis=ax), axis=1 - ax)
                if cat.shape == b.shape and _eq_(cat, b):
                    notes.append(f"shards concatenated on the wrong axis: B is A's {s} shards along dim {ax} "
                                 f"concatenated along dim {1 - ax} ({list(a.shape)} -> {list(b.shape)})")
                    return notes
    return notes


def _diagnose_empty(sa: tuple, sb: tuple) -> list[str]:
    """``_diagnose_shape`` where a side holds no elements, from the shapes alone (numpy holds no array of
    some empty shapes, such as (0, 2^31, 2^31)): any two empty tensors of one shape are equal. A side with no
    rows against one with some has no last real row: no padding is named."""
    notes = []
    if len(sa) == len(sb) >= 1 and sa[1:] == sb[1:]:
        n = min(sa[0], sb[0])
        if n:  # rows on both sides and no elements: both sides are empty
            big, which = (sa, "A") if sa[0] > sb[0] else (sb, "B")
            notes.append(f"padding: the first {n} rows agree; {which} has {big[0] - n} extra rows (copies of the "
                         "last real row)")
    if len(sa) == 2 and sa == sb[::-1]:
        notes.append("transposed: B == A^T")
    if len(sa) == 2 and len(sb) == 2 and math.prod(sa) == math.prod(sb) and not notes:
        for s in (2, 3, 4, 6, 8, 12, 16):
            for ax in (0, 1):
                if sa[ax] % s:
                    continue
                cat = list(sa)
                cat[ax], cat[1 - ax] = sa[ax] // s, sa[1 - ax] * s
                if tuple(cat) == sb:
                    notes.append(f"shards concatenated on the wrong axis: B is A's {s} shards along dim {ax} "
                                 f"concatenated along dim {1 - ax} ({list(sa)} -> {list(sb)})")
                    return notes
    return notes


def diagnose_pair(name: str, a, b, config: dict | None = None) -> list[str]:
    """Diagnose two in-memory torch tensors (for tests and callers without a checkpoint)."""
    from ckdiff.tensor.lazy import Checkpoint, EagerTensor
    from ckdiff.compare.result import Options
    from ckdiff.compare.tensor import compare_tensor
    if a.shape != b.shape:
        return _diagnose_shape(a, b)
    ta, tb = EagerTensor(name, a), EagerTensor(name + " ", b)
    r = compare_tensor(name, ta, tb, Options(diagnose=False))
    if r.ok:
        return []
    ck_a = Checkpoint("A", "tensors", {name: ta}, config or {}, {})
    ck_b = Checkpoint("B", "tensors", {name: tb}, config or {}, {})
    notes = diagnose_tensor(r, ta, tb, _Ctx(ck_a, ck_b, config or {}))
    return notes


def diagnose_tensor(r: TensorResult, ta: LazyTensor, tb: LazyTensor, ctx: _Ctx) -> list[str]:
    """Causes for one mismatching tensor; a skipped or cut-short diagnosis is said in ``r.note``."""
    if r.status == Status.SHAPE:
        if ta.numel > MAX_NUMEL or tb.numel > MAX_NUMEL:
            _skip(r, f"diagnosis skipped: the tensors are too large to load ({ta.numel} elements)")
            return []
        if not ta.numel or not tb.numel:  # named from the shapes: numpy holds no array of some empty shapes
            return _diagnose_empty(tuple(ta.shape), tuple(tb.shape))
        return _diagnose_shape(ta.load(), tb.load(), (dtype_name(ta.dtype), dtype_name(tb.dtype)))
    if not (_is_float(dtype_name(ta.dtype)) or dtype_name(ta.dtype) == dtype_name(tb.dtype)):
        return []
    t0 = time.perf_counter()
    budget = max(MIN_BUDGET, 0.5 * (ta.nbytes + tb.nbytes) / READ_RATE)
    deadline = t0 + budget
    # 1. from the metrics alone
    notes, nonfinite = _nonfinite(r)
    if notes and r.n_over_tol <= nonfinite:
        return notes  # the non-finite elements are the whole difference: no scale for the rest
    if r.n_over_tol - nonfinite <= FEW and not nonfinite:
        return _isolated(r, ta, tb)
    if len(ta.shape) == 0 or ta.numel == 0:
        return notes
    # 2. a sample of rows: constant scale or offset
    whole = ta.numel <= SMALL_NUMEL
    A, B = _Side(ta, whole), _Side(tb, whole)
    n = ta.shape[0]
    rows_idx = _sample_rows(n, r.max_abs_index[0] if r.max_abs_index else None)
    dtypes = (A.dtype, B.dtype)
    so = _scale_offset(A.rows_at(rows_idx), B.rows_at(rows_idx), r.name, dtypes) \
        if _may_scale_or_offset(r, ta, tb) else None
    if so and ta.numel <= MAX_NUMEL:
        so = _scale_offset(A.load(), B.load(), r.name, dtypes)  # confirm on the whole tensor
    if so:
        return notes + [so]
    if r.cosine is not None and r.cosine >= NOISE_COSINE:
        _skip(r, f"diagnosis skipped: no structural cause fits and the difference looks like noise "
                 f"(noise, cosine {r.cosine:.9g}, {r.n_over_tol} of {r.numel} elements over tolerance)")
        return notes
    # 3. another tensor of A
    other = _other_tensor(r.name, B, ta.shape, ctx, rows_idx[:3])
    if other:
        return notes + [other]
    if len(ta.shape) != 2:
        return notes
    # 4. localised to a row or a head
    loc = _localised(r, A, B, ctx.config)
    if loc:
        return notes + [loc]
    # 5. structural: row maps, column maps, then whole-tensor hypotheses
    found = None
    if "query_key_value" in r.name:
        found = _try_maps("", ctx.row_maps(_fused_qkv_maps, n), A, B, rows_idx, False, r, deadline, ctx.perms)
    if not found:
        found = _try_maps("", ctx.row_maps(_row_maps, n), A, B, rows_idx, False, r, deadline, ctx.perms)
    if not found:
        found = _try_maps("columns: ", ctx.row_maps(_row_maps, ta.shape[1], "columns"), A, B, rows_idx, True, r,
                          deadline, ctx.perms)
    if found:
        text = found.text
        m = re.search(r"(v_proj|\.wv\.|o_proj|\.wo\.|dense\.weight|down_proj|\.w2\.)", r.name)
        if m and found.cause in (Cause.ROTARY, Cause.ROTARY_HEADS):
            text += f" (applied to the wrong tensor: {m.group(1).strip('.')} takes no rotary permutation)"
        if found.rotary:
            ctx.rotary.add(r.name)
        return notes + [text]
    whole = None
    if ta.numel <= MAX_NUMEL and time.perf_counter() <= deadline:
        whole = _whole_tensor(r.name, A, B, r, ctx, deadline, rows_idx)
    if whole:
        return notes + [whole]
    if time.perf_counter() > deadline:
        _skip(r, f"diagnosis stopped: its time budget ({budget:.2g} s, half the tensor's estimated read time) "
                 "was spent before a cause was found")
    return notes


def _skip(r: TensorResult, text: str) -> None:
    r.note = f"{r.note}; {text}" if r.note else text


# ---------------------------------------------------------------- across tensors
_MLP = [(r"mlp\.gate_proj\.weight$", r"mlp\.up_proj\.weight$", r"mlp\.down_proj\.weight$"),
        (r"feed_forward\.w1\.weight$", r"feed_forward\.w3\.weight$", r"feed_forward\.w2\.weight$")]
_ATTN = [("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"),
         ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight")]


def _block_perm(perm: list, blk: int) -> Optional[list]:
    """The block order if ``perm`` moves whole blocks of ``blk`` entries, else None."""
    n = len(perm)
    if blk < 1 or n % blk:
        return None
    order = []
    for k in range(0, n, blk):
        b = perm[k:k + blk]
        if b[0] % blk or b != list(range(b[0], b[0] + blk)):
            return None
        order.append(b[0] // blk)
    return order


def _equivalent_reorderings(res: CompareResult, ctx: _Ctx) -> None:
    by = {t.name: t for t in res.tensors}
    perms = ctx.perms

    def mark(names, text):
        for nm in names:
            t = by[nm]
            t.status = Status.REORDERED
            t.diagnosis = [text]
            ctx.rotary.discard(nm)

    for g, u, d in _MLP:
        for name in list(by):
            if not re.search(g, name):
                continue
            pre = name[:re.search(g, name).start()]
            un = next((k for k in by if k.startswith(pre) and re.search(u, k)), None)
            dn = next((k for k in by if k.startswith(pre) and re.search(d, k)), None)
            pg, pu, pd = perms.get((name, "rows")), perms.get((un, "rows")), perms.get((dn, "cols"))
            if un and dn and pg and pg == pu == pd:
                mark((name, un, dn), f"equivalent reordering: MLP hidden units permuted alike in gate/up rows and "
                                     f"down columns (B unit i = A unit {pg[:8]}...); the function is unchanged")
    H = ctx.config.get("num_attention_heads") or ctx.config.get("n_heads")
    K = ctx.config.get("num_key_value_heads") or ctx.config.get("n_kv_heads") or H
    hd = _head_dim(ctx.config)
    if not (H and K and hd):
        return
    r = H // K
    for q, k, v, o in _ATTN:
        for name in list(by):
            if not name.endswith(q):
                continue
            pre = name[:-len(q)]
            kn, vn, on = pre + k, pre + v, pre + o
            pq, po = perms.get((name, "rows")), perms.get((on, "cols"))
            if not (pq and po and pq == po):
                continue
            oq = _block_perm(pq, hd)
            pk = perms.get((kn, "rows"), list(range(K * hd)) if by.get(kn) and by[kn].status == Status.EQUAL else None)
            pv = perms.get((vn, "rows"), list(range(K * hd)) if by.get(vn) and by[vn].status == Status.EQUAL else None)
            ok_, ov = (_block_perm(pk, hd) if pk else None), (_block_perm(pv, hd) if pv else None)
            if oq is None or ok_ is None or ok_ != ov:
                continue
            # each query head must still meet its own KV head: B's kv head h//r is A's kv head oq[h]//r
            if all(ok_[h // r] == oq[h] // r for h in range(H)):
                names = [x for x in (name, kn, vn, on) if (x, "rows") in perms or (x, "cols") in perms]
                mark(names, f"equivalent reordering: attention heads permuted alike in q/k/v rows and o columns "
                            f"(B query head i = A head {oq}, KV heads {ok_}); the function is unchanged")


# MoE experts: one tensor per expert (HF ``experts.{e}.w1``, Megatron-Core ``local_experts.{e}``) or stacked
# on axis 0 (JetStream ``cond_ffn.w1``, GGUF ``ffn_*_exps``); the router's rows are the experts, in order
_EXPERT = re.compile(r"^(?P<pre>.*experts\.)(?P<e>\d+)(?P<post>\..+)$")
_STACKED = re.compile(r"(?:cond_ffn\.w\d|_exps\.weight|experts\.(?:gate_up_proj|down_proj))$")
_ROUTER = re.compile(r"(?:block_sparse_moe\.gate|mlp\.gate|mlp\.router|ffn_gate_inp)\.weight$")


def _layer_of(name: str) -> Optional[str]:
    m = re.search(r"(?:^|\.)(?:layers|h|blk)\.(\d+)\.", name)
    return m.group(1) if m else None


def _match_perm(n: int, part_a, part_b, r: TensorResult) -> Optional[list]:
    """p with B part i == A part p[i] for i < n (within the result's tolerance), else None.
    ``part_x(j, rows)`` gives rows of part j (rows None: the whole part). Parts are fingerprinted by their
    first and middle rows; a candidate is confirmed on the whole part, two parts in memory at a time."""
    atol, rtol = (r.atol or 0.0), (r.rtol or 0.0)

    def f32(x):  # both sides' values as float32, so an untoleranced match is exact
        return _values(x).astype(np.float32, copy=False)

    def fp(part, j):
        return f32(part(j, (0, 1))).reshape(-1)
    fa = [fp(part_a, j) for j in range(n)]
    perm = []
    for i in range(n):
        fb = fp(part_b, i)
        hit = [j for j in range(n) if _eq(fa[j], fb, atol, rtol)]
        hit = [j for j in hit if _eq(f32(part_a(j, None)), f32(part_b(i, None)), atol, rtol)]
        if len(hit) != 1:
            return None
        perm.append(hit[0])
    return perm if sorted(perm) == list(range(n)) else None


def _part(t: LazyTensor, rows, j: Optional[int] = None) -> np.ndarray:
    """Rows ``rows`` (None: all) of tensor ``t``, or of its slice ``j`` on axis 0 (a stacked expert)."""
    if j is not None:
        x = _values(t.rows(j, j + 1))[0]
        return x if rows is None else x[rows[0]:rows[1]]
    return _values(t.load() if rows is None else t.rows(*rows))


def _expert_reorderings(res: CompareResult, ctx: _Ctx) -> None:
    """Experts permuted together with their router rows compute the same function (a named equivalence,
    REORDERED); experts permuted with the router left as it was (or the reverse) route tokens to the
    wrong experts, and the diagnosis says so."""
    by = {t.name: t for t in res.tensors}
    layers: dict = {}
    for name, t in by.items():
        lay = _layer_of(name)
        if lay is None or name not in ctx.a.tensors or name not in ctx.b.tensors:
            continue
        m = _EXPERT.match(name)
        if m:
            layers.setdefault(lay, {}).setdefault(("each", m["pre"], m["post"]), {})[int(m["e"])] = name
        elif _STACKED.search(name):
            layers.setdefault(lay, {})[("stacked", name)] = name
        elif _ROUTER.search(name):
            layers.setdefault(lay, {})[("router",)] = name
    for lay, kinds in layers.items():
        router = kinds.get(("router",))
        parts = {k: v for k, v in kinds.items() if k[0] != "router"}
        names = [n for v in parts.values() for n in (v.values() if isinstance(v, dict) else [v])]
        if router is None or not names or all(by[n].ok for n in names + [router]):
            continue
        E = ctx.a.tensors[router].shape[0]
        if not E:  # no experts: nothing can be permuted (and the router may be an empty shape numpy cannot hold)
            continue
        perms = []
        for k, v in parts.items():
            if k[0] == "each":
                if sorted(v) != list(range(E)):
                    break
                first = by[v[0]]
                perms.append(_match_perm(E, lambda j, rows, v=v: _part(ctx.a.tensors[v[j]], rows),
                                         lambda i, rows, v=v: _part(ctx.b.tensors[v[i]], rows), first))
            else:
                ta, tb = ctx.a.tensors[v], ctx.b.tensors[v]
                if not ta.shape or ta.shape[0] != E:
                    break
                perms.append(_match_perm(E, lambda j, rows, ta=ta: _part(ta, rows, j),
                                         lambda i, rows, tb=tb: _part(tb, rows, i), by[v]))
        else:
            if not perms or perms[0] is None or any(p != perms[0] for p in perms):
                continue
            p = perms[0]
            ra, rb = _values(ctx.a.tensors[router].load()), _values(ctx.b.tensors[router].load())
            r = by[router]
            rp = _match_perm(E, lambda j, rows: ra[j], lambda i, rows: rb[i], r)
            ident = list(range(E))
            if p == rp and p != ident:
                text = (f"equivalent reordering: the experts of layer {lay} are permuted together with their "
                        f"router rows (B expert i = A expert {p}); the function is unchanged")
                for nm in names + [router]:
                    if not by[nm].ok:
                        by[nm].status = Status.REORDERED
                        by[nm].diagnosis = [text]
            elif p != ident and rp != p:
                text = (f"experts of layer {lay} reordered (B expert i = A expert {p}) but the router rows are "
                        + ("not" if rp == ident else f"permuted otherwise ({rp})")
                        + ": tokens are routed to the wrong experts")
                for nm in names + [router]:
                    if not by[nm].ok:
                        by[nm].diagnosis = [text] + [d for d in by[nm].diagnosis if not d.startswith("another")]
            elif p == ident and rp not in (None, ident):
                text = (f"router rows of layer {lay} permuted ({rp}) while the experts are not: tokens are routed "
                        "to the wrong experts")
                by[router].diagnosis = [text] + by[router].diagnosis


def _rotary_some_layers(res: CompareResult, ctx: _Ctx) -> None:
    rot: dict = {}
    for t in res.tensors:
        kind = LAYER.sub("{i}", t.name)
        if kind == t.name:
            continue
        lay = LAYER.findall(t.name)[-1]
        rot.setdefault(kind, {})[int(lay)] = t.name in ctx.rotary, t.status
    for kind, layers in rot.items():
        hit = sorted(i for i, (has, _) in layers.items() if has)
        clean = sorted(i for i, (has, st) in layers.items() if not has and st == Status.EQUAL)
        if hit and clean:
            text = (f"rotary permutation in some layers only: {kind} differs by a rotary permutation in layers "
                    f"{hit} and is equal in layers {clean}")
            res.notes.append(text)
            for t in res.tensors:
                if LAYER.sub("{i}", t.name) == kind and t.name in ctx.rotary:
                    t.diagnosis = [*t.diagnosis, f"in some layers only (layers {hit}; layers {clean} are equal)"]


def diagnose_result(res: CompareResult, a: Checkpoint, b: Checkpoint) -> None:
    """Fill ``diagnosis`` for every mismatching tensor of ``res`` (in place)."""
    config = {**(b.config or {}), **(a.config or {})}
    ctx = _Ctx(a, b, config)
    for r in res.tensors:
        if r.status not in (Status.DIFFER, Status.SHAPE) or r.name not in a.tensors or r.name not in b.tensors:
            continue
        ta, tb = a.tensors[r.name], b.tensors[r.name]
        # an encoded tensor (tensor/blockscaled.py, a torch module) exists only once that module is loaded
        bs = sys.modules.get("ckdiff.tensor.blockscaled")
        if bs is not None and isinstance(ta, bs.BlockScaled) != isinstance(tb, bs.BlockScaled):
            # an encoding against its float source: first in scale units, on codes and block scales (of
            # another shape: the encoding read at other parameters its stored shapes fit)
            from ckdiff.compare.diagnose_scaled import diagnose_scaled
            enc, flt, eck, fck = (ta, tb, a, b) if isinstance(ta, bs.BlockScaled) else (tb, ta, b, a)
            found = diagnose_scaled(r.name, enc, flt, eck, fck)
            if found:
                r.diagnosis = record(r, found)
                continue
        r.diagnosis = diagnose_tensor(r, ta, tb, ctx)
    _family_findings(res, ctx)
    _equivalent_reorderings(res, ctx)
    _expert_reorderings(res, ctx)
    _rotary_some_layers(res, ctx)
    if any(t.status == Status.REORDERED for t in res.tensors):
        res.notes.append("equivalent reordering: some tensors differ only by a permutation applied consistently "
                         "to every tensor that uses it; the logits will agree")
    swapped = [r.name for r in res.tensors if r.status == Status.ONLY_A]
    # after a mapping both sides are in one naming: what is one-sided is missing, each row says where
    if swapped and any(r.status == Status.ONLY_B for r in res.tensors) and not res.mapping:
        res.notes.append("key sets differ: the two checkpoints may use different naming "
                         "(compare like with like, or convert one side first)")


def _family_findings(res: CompareResult, ctx: _Ctx) -> None:
    """What the model family's declaration (ckdiff/models/families/) says about a mismatch: the role of a tensor
    one side lacks (DeepSeek-V3's shared expert, GPT-OSS's sinks, ...), and the family's own diagnoses of a
    differing tensor (DeepSeek's MLA rotary rows), named before the generic ones."""
    from ckdiff.models import families
    fam = families.for_model_type(str(ctx.config.get("model_type") or ""))
    if fam is None or not (fam.dropped or fam.diagnose):
        return
    lost: dict = {}
    for r in res.tensors:
        slot = fam.slot_of(r.name)
        if r.status in (Status.ONLY_A, Status.ONLY_B) and slot in fam.dropped:
            side = "B" if r.status == Status.ONLY_A else "A"
            r.diagnosis = [f"{fam.dropped[slot]} dropped: {side} has no {r.name}"] + list(r.diagnosis or [])
            lost.setdefault((fam.dropped[slot], side), []).append(r.name)
        elif fam.diagnose and r.status == Status.DIFFER and slot and r.name in ctx.a.tensors \
                and r.name in ctx.b.tensors and ctx.a.tensors[r.name].numel <= MAX_NUMEL:
            from ckdiff.models.config import ModelConfig
            from ckdiff.errors import InputError
            try:
                cfg = ModelConfig.from_hf(ctx.a.config or {}, ctx.a.tensors)
            except (InputError, ValueError):  # a config that does not read: the generic diagnoses only
                return
            text = fam.diagnose(slot, _torch_float(ctx.a.tensors[r.name].load()),
                                _torch_float(ctx.b.tensors[r.name].load()), cfg)
            if text:
                r.diagnosis = [text] + [d for d in (r.diagnosis or []) if d != text]
    for (role, side), names in lost.items():
        res.notes.append(f"{role} dropped: {side} lacks {len(names)} tensor(s) ({names[0]}"
                         f"{', ...' if len(names) > 1 else ''})")


def _torch_float(x):
    """A loaded tensor as a float32 torch tensor, for a family's diagnose hook (those work on torch tensors)."""
    if isinstance(x, np.ndarray):
        import torch
        return torch.from_numpy(np.ascontiguousarray(_values(x))).float()
    return x.float()
