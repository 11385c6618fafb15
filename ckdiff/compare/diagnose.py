"""Name the likely cause of a mismatch (verification-lessons.md, section 3).

Each hypothesis is a cheap test on the two tensors (plus, for "another layer",
the same key at other layer indices). Tests run cheapest first; every one that
holds is reported. Tensors above ``MAX_NUMEL`` elements are not diagnosed.
"""
from __future__ import annotations

import re

import torch

from ..converters.lazy import Checkpoint
from ..converters.ops import rope_to_half, rope_to_interleaved
from .diff import CompareResult

MAX_NUMEL = 1 << 26
HEAD_DIMS = (16, 24, 32, 48, 64, 80, 96, 128, 256)
LAYER = re.compile(r"(?<=\.)(\d+)(?=\.)")


def _eq(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.shape != y.shape:
        return False
    if x.dtype == y.dtype:
        return torch.equal(x, y)
    return torch.allclose(x.double(), y.double(), rtol=1.6e-2, atol=1e-5)


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
    seen, out = set(), []
    for c in cands:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _which_heads(expected: int, used: int, config: dict) -> str:
    q = config.get("num_attention_heads") or config.get("n_heads")
    kv = config.get("num_key_value_heads") or config.get("n_kv_heads") or config.get("num_attention_heads_kv")
    if used == q and expected == kv:
        return " (the query head count was used where the KV head count belongs)"
    if used == kv and expected == q:
        return " (the KV head count was used where the query head count belongs)"
    return ""


def _row_perm(a: torch.Tensor, b: torch.Tensor):
    """If b's rows are a permutation of a's rows, the source row for each row of b."""
    if a.dim() != 2 or a.shape[0] < 2:
        return None
    ka = [bytes(r.contiguous().view(torch.uint8).numpy()) for r in a]
    kb = [bytes(r.contiguous().view(torch.uint8).numpy()) for r in b]
    if sorted(ka) != sorted(kb):
        return None
    where: dict = {}
    for i, k in enumerate(ka):
        where.setdefault(k, []).append(i)
    return [where[k].pop(0) for k in kb]


def _describe_perm(src: list[int]) -> str:
    n = len(src)
    for blk in (n // 2, *[d for d in HEAD_DIMS if n % d == 0 and d < n]):
        if blk <= 0 or n % blk:
            continue
        blocks = [src[i:i + blk] for i in range(0, n, blk)]
        if all(b == list(range(b[0], b[0] + blk)) and b[0] % blk == 0 for b in blocks):
            order = [b[0] // blk for b in blocks]
            if order != sorted(order):
                return f"{blk}-row blocks reordered: B holds A's blocks {order}"
    return f"rows permuted (first rows of B come from A rows {src[:8]})"


def diagnose_pair(name: str, a: torch.Tensor, b: torch.Tensor, config: dict | None = None) -> list[str]:
    config = config or {}
    notes: list[str] = []
    if a.shape != b.shape:
        if a.dim() == b.dim() and a.shape[1:] == b.shape[1:] and a.dim() >= 1:
            n = min(a.shape[0], b.shape[0])
            if _eq(a[:n], b[:n]):
                big, which = (a, "A") if a.shape[0] > b.shape[0] else (b, "B")
                extra = big[n:]
                kind = "copies of the last real row" if _eq(extra, big[n - 1:n].expand_as(extra)) else (
                    "zeros" if not extra.any() else "other values")
                notes.append(f"padding: the first {n} rows agree; {which} has {big.shape[0] - n} extra rows ({kind})")
        if a.dim() == 2 and a.shape == b.shape[::-1] and _eq(a.T, b):
            notes.append("transposed: B == A^T")
        return notes
    if a.dim() == 2 and a.shape[0] == a.shape[1] and _eq(a.T, b):
        notes.append("transposed: B == A^T")
    if a.dim() == 2 and a.shape[0] % 2 == 0:
        for heads, hd in _head_counts(a.shape[0], config):
            if _eq(rope_to_interleaved(a, heads, hd), b):
                notes.append(f"rotary permutation: B == P(A), half-split -> interleaved, {heads} heads x {hd} rows")
            if _eq(rope_to_half(a, heads, hd), b):
                notes.append(f"rotary permutation: B == P^-1(A), interleaved -> half-split, {heads} heads x {hd} rows")
        cands = _head_counts(a.shape[0], config)
        if not any(n.startswith("rotary") for n in notes):
            # undo the permutation with one head count, redo it with another (interleaved layouts first)
            redo = [lambda x, h1, d1, h2, d2: rope_to_interleaved(rope_to_half(x, h1, d1), h2, d2),
                    lambda x, h1, d1, h2, d2: rope_to_half(rope_to_interleaved(x, h1, d1), h2, d2)]
            hd = config.get("head_dim") or (config.get("hidden_size", 0) // max(1, config.get("num_attention_heads", 1))
                                            if "hidden_size" in config else
                                            config.get("dim", 0) // max(1, config.get("n_heads", 1)))
            firsts = sorted(cands, key=lambda c: c[1] != hd)  # A most likely uses the true head_dim
            hit = next(((h1, d1, h2, d2) for f in redo for h1, d1 in firsts for h2, d2 in cands
                        if h1 != h2 and _eq(f(a, h1, d1, h2, d2), b)), None)
            if hit:
                h1, d1, h2, d2 = hit
                notes.append(f"rotary permutation with the wrong head count: B == A re-permuted as {h2} heads x "
                             f"{d2} rows where A is {h1} heads x {d1}" + _which_heads(h1, h2, config))
        h = a.shape[0] // 2
        if _eq(torch.cat([a[h:], a[:h]]), b):
            notes.append("halves swapped: B == [A[half:]; A[:half]] (e.g. [gate; up] vs [up; gate], or k/v)")
    if a.is_floating_point() and b.is_floating_point():
        af, bf = a.double().reshape(-1), b.double().reshape(-1)
        den = float(af @ af)
        if den > 0:
            c = float(af @ bf) / den
            if abs(c - 1) > 1e-9 and torch.allclose(af * c, bf, rtol=1e-3, atol=1e-7):
                notes.append(f"scaled: B == {c:.6g} * A")
    if not any(n.startswith("rotary") or n.startswith("halves") for n in notes):
        perm = _row_perm(a, b)
        if perm is not None and perm != list(range(len(perm))):
            notes.append(_describe_perm(perm))
        elif a.dim() == 2 and a.shape[1] > 1:
            perm = _row_perm(a.T.contiguous(), b.T.contiguous())
            if perm is not None and perm != list(range(len(perm))):
                notes.append("columns " + _describe_perm(perm).replace("rows", "columns", 1)
                             .replace("-row", "-column"))
    return notes


def _other_layers(name: str, a: Checkpoint, b_tensor: torch.Tensor) -> list[str]:
    m = list(LAYER.finditer(name))
    if not m:
        return []
    last = m[-1]
    hits = []
    pattern = re.compile(re.escape(name[:last.start()]) + r"(\d+)" + re.escape(name[last.end():]) + "$")
    for other, t in a.tensors.items():
        mm = pattern.match(other)
        if mm and other != name and t.shape == tuple(b_tensor.shape) and t.numel <= MAX_NUMEL:
            if _eq(t.load(), b_tensor):
                hits.append(f"another layer's tensor: B[{name}] == A[{other}]")
    return hits


def diagnose_result(res: CompareResult, a: Checkpoint, b: Checkpoint) -> None:
    """Fill ``diagnosis`` for every mismatching tensor of ``res`` (in place)."""
    config = {**(b.config or {}), **(a.config or {})}
    for r in res.tensors:
        if r.status not in ("differ", "shape"):
            continue
        ta, tb = a.tensors[r.name], b.tensors[r.name]
        if ta.numel > MAX_NUMEL or tb.numel > MAX_NUMEL:
            continue
        ra, rb = ta.load(), tb.load()
        r.diagnosis = diagnose_pair(r.name, ra, rb, config)
        if r.status == "differ":
            r.diagnosis += _other_layers(r.name, a, rb)
    swapped = [r.name for r in res.tensors if r.status == "only-a"]
    if swapped and any(r.status == "only-b" for r in res.tensors):
        res.notes.append("key sets differ: the two checkpoints may use different naming "
                         "(compare like with like, or convert one side first)")
