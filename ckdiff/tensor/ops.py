"""Reversible tensor ops from which every converter is built.

An op maps a list of input tensors to a list of output tensors and knows its
reverse, so a converter written as a table of (source keys, target keys, op)
gets its inverse by reversing each row. Every op that depends on head counts
takes them explicitly: q and k are permuted with their own head counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import torch


# ---------------------------------------------------------------- cat / stack
# On the meta device (shape inference of lazy conversions) torch.cat and torch.stack run Python
# kernels whose first call imports torch._dynamo and sympy: ~66 MiB of RssAnon for a shape. These
# give the same shapes, dtypes and size errors with no kernel.
def _cat(xs: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    if not all(x.is_meta for x in xs):
        return torch.cat(list(xs), dim=dim)
    first = xs[0]
    d = dim % first.dim() if first.dim() else 0
    dtype = first.dtype
    for x in xs[1:]:
        if x.dim() != first.dim() or any(a != b for i, (a, b) in enumerate(zip(x.shape, first.shape)) if i != d):
            raise RuntimeError(f"Sizes of tensors must match except in dimension {d}: "
                               f"{list(first.shape)} and {list(x.shape)}")
        dtype = torch.promote_types(dtype, x.dtype)
    shape = list(first.shape)
    shape[d] = sum(x.shape[d] for x in xs)
    return torch.empty(shape, dtype=dtype, device="meta")


def _stack(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    if not all(x.is_meta for x in xs):
        return torch.stack(list(xs))
    for x in xs[1:]:
        if x.shape != xs[0].shape:
            raise RuntimeError(f"stack expects each tensor to be equal size, but got {list(xs[0].shape)} "
                               f"and {list(x.shape)}")
    return torch.empty((len(xs),) + tuple(xs[0].shape), dtype=xs[0].dtype, device="meta")


# ---------------------------------------------------------------- rotary helpers
def rope_to_interleaved(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """HF (rotate_half) row order -> Meta/Megatron (interleaved pairs), per head.

    ``out[h*hd + 2j + i] = w[h*hd + i*hd/2 + j]``. Only rows move.
    """
    if w.shape[0] != heads * head_dim or head_dim % 2:
        raise ValueError(f"rotary permutation: {w.shape[0]} rows is not {heads} heads x {head_dim} (even)")
    rest = w.shape[1:]
    return w.reshape(heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def rope_to_half(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Meta/Megatron (interleaved) row order -> HF (rotate_half), per head."""
    if w.shape[0] != heads * head_dim or head_dim % 2:
        raise ValueError(f"rotary permutation: {w.shape[0]} rows is not {heads} heads x {head_dim} (even)")
    rest = w.shape[1:]
    return w.reshape(heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- ops
class Op:
    n_in = 1
    n_out = 1
    rowwise = False  # True when the op only moves whole rows along dim 0 (lazy row reads)

    def __call__(self, xs: list) -> list:
        raise NotImplementedError

    def reverse(self) -> "Op":
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Identity(Op):
    rowwise = True

    def __call__(self, xs):
        return list(xs)

    def reverse(self):
        return self

    def describe(self):
        return "copy"


@dataclass(frozen=True)
class PermuteRope(Op):
    """Rotary row permutation of one q or k projection, with its own head count."""
    heads: int
    head_dim: int
    to_interleaved: bool = True
    rowwise = True

    def __call__(self, xs):
        f = rope_to_interleaved if self.to_interleaved else rope_to_half
        return [f(xs[0], self.heads, self.head_dim)]

    def reverse(self):
        return PermuteRope(self.heads, self.head_dim, not self.to_interleaved)

    def describe(self):
        d = "half->interleaved" if self.to_interleaved else "interleaved->half"
        return f"rope {d} ({self.heads} heads x {self.head_dim})"


@dataclass(frozen=True)
class _Sizes(Op):
    """Concat and Split: pieces of ``sizes`` along ``dim``."""
    sizes: tuple
    dim: int = 0

    @property
    def rowwise(self):
        return self.dim == 0


@dataclass(frozen=True)
class Concat(_Sizes):
    """Concatenate inputs along ``dim``; ``sizes`` makes the reverse exact."""

    @property
    def n_in(self):
        return len(self.sizes)

    def __call__(self, xs):
        for x, s in zip(xs, self.sizes):
            if x.shape[self.dim] != s:
                raise ValueError(f"concat: input has {x.shape[self.dim]} on dim {self.dim}, expected {s}")
        return [_cat(xs, self.dim)]

    def reverse(self):
        return Split(self.sizes, self.dim)

    def describe(self):
        return f"concat dim {self.dim} {list(self.sizes)}"


@dataclass(frozen=True)
class Split(_Sizes):
    """One input cut along ``dim`` into pieces of ``sizes``."""

    @property
    def n_out(self):
        return len(self.sizes)

    def __call__(self, xs):
        if xs[0].shape[self.dim] != sum(self.sizes):
            raise ValueError(f"split: {xs[0].shape[self.dim]} on dim {self.dim}, expected {sum(self.sizes)}")
        return list(torch.split(xs[0], list(self.sizes), dim=self.dim))

    def reverse(self):
        return Concat(self.sizes, self.dim)

    def describe(self):
        return f"split dim {self.dim} {list(self.sizes)}"


@dataclass(frozen=True)
class Stack(Op):
    """Stack ``n`` equally shaped inputs on a new dim 0 (e.g. MoE experts)."""
    n: int

    @property
    def n_in(self):
        return self.n

    def __call__(self, xs):
        return [_stack(xs)]

    def reverse(self):
        return Unstack(self.n)


@dataclass(frozen=True)
class Unstack(Op):
    n: int

    @property
    def n_out(self):
        return self.n

    def __call__(self, xs):
        return list(torch.unbind(xs[0]))

    def reverse(self):
        return Stack(self.n)


@dataclass(frozen=True)
class UnstackSplit(Op):
    """One [n, sum(sizes), ...] tensor -> n x len(sizes) tensors, slice e of dim 0 split along its dim 0 by
    ``sizes``, in the order (0, part 0), (0, part 1), (1, part 0), ... (transformers 5's fused MoE
    ``gate_up_proj`` [E, 2F, D] -> each expert's gate and up)."""
    n: int
    sizes: tuple

    @property
    def n_out(self):
        return self.n * len(self.sizes)

    def __call__(self, xs):
        x = xs[0]
        if x.dim() < 2 or x.shape[0] != self.n or x.shape[1] != sum(self.sizes):
            raise ValueError(f"unstack-split: shape {list(x.shape)}, expected [{self.n}, {sum(self.sizes)}, ...]")
        return [p.contiguous() for e in torch.unbind(x) for p in torch.split(e, list(self.sizes), dim=0)]

    def reverse(self):
        return StackConcat(self.n, self.sizes)

    def describe(self):
        return f"unstack {self.n} and split {list(self.sizes)}"


@dataclass(frozen=True)
class StackConcat(Op):
    """The reverse of UnstackSplit: each group of len(sizes) inputs concatenated, the groups stacked."""
    n: int
    sizes: tuple

    @property
    def n_in(self):
        return self.n * len(self.sizes)

    def __call__(self, xs):
        k = len(self.sizes)
        return [_stack([_cat(xs[e * k:(e + 1) * k], 0) for e in range(self.n)])]

    def reverse(self):
        return UnstackSplit(self.n, self.sizes)

    def describe(self):
        return f"concat {list(self.sizes)} and stack {self.n}"


@dataclass(frozen=True)
class FuseQKV(Op):
    """q [H*d], k [K*d], v [K*d] rows -> Megatron group order [q x H/K, k, v] x K."""
    heads: int
    kv_heads: int
    head_dim: int

    n_in = 3
    rowwise = True

    def __call__(self, xs):
        q, k, v = xs
        H, K, d = self.heads, self.kv_heads, self.head_dim
        if H % K:
            raise ValueError(f"{H} query heads not divisible by {K} KV heads")
        r = H // K
        rest = q.shape[1:]
        qg = q.reshape(K, r * d, *rest)
        return [_cat([qg, k.reshape(K, d, *rest), v.reshape(K, d, *rest)], 1).reshape(-1, *rest)]

    def reverse(self):
        return SplitQKV(self.heads, self.kv_heads, self.head_dim)

    def describe(self):
        return f"fuse qkv in groups ({self.heads} q, {self.kv_heads} kv heads x {self.head_dim})"


@dataclass(frozen=True)
class SplitQKV(Op):
    heads: int
    kv_heads: int
    head_dim: int

    n_out = 3
    rowwise = True

    def __call__(self, xs):
        w = xs[0]
        H, K, d = self.heads, self.kv_heads, self.head_dim
        r = H // K
        rest = w.shape[1:]
        if w.shape[0] != (H + 2 * K) * d:
            raise ValueError(f"fused qkv has {w.shape[0]} rows, expected ({H}+2*{K})*{d}")
        g = w.reshape(K, r + 2, d, *rest)
        return [g[:, :r].reshape(H * d, *rest), g[:, r].reshape(K * d, *rest), g[:, r + 1].reshape(K * d, *rest)]

    def reverse(self):
        return FuseQKV(self.heads, self.kv_heads, self.head_dim)

    def describe(self):
        return f"split grouped qkv ({self.heads} q, {self.kv_heads} kv heads x {self.head_dim})"


@dataclass(frozen=True)
class _Ops(Op):
    """Each and Chain: built of other ops; moves whole rows when every one of them does."""
    ops: tuple

    @property
    def rowwise(self):
        return all(op.rowwise for op in self.ops)


@dataclass(frozen=True)
class Each(_Ops):
    """Apply one op per input (e.g. permute q with H heads and k with K heads)."""

    @property
    def n_in(self):
        return len(self.ops)

    @property
    def n_out(self):
        return len(self.ops)

    def __call__(self, xs):
        return [op([x])[0] for op, x in zip(self.ops, xs)]

    def reverse(self):
        return Each(tuple(op.reverse() for op in self.ops))

    def describe(self):
        return "; ".join(op.describe() for op in self.ops)


@dataclass(frozen=True)
class Chain(_Ops):
    """The ops one after another."""

    def __call__(self, xs):
        for op in self.ops:
            xs = op(xs)
        return xs

    def reverse(self):
        return Chain(tuple(op.reverse() for op in reversed(self.ops)))

    def describe(self):
        return " -> ".join(op.describe() for op in self.ops)


@dataclass(frozen=True)
class Transpose(Op):
    """Swap the two axes of a matrix (its own reverse). No correct converter here uses it."""

    def __call__(self, xs):
        return [x.T.contiguous() for x in xs]

    def reverse(self):
        return self


@dataclass(frozen=True)
class AddConst(Op):
    """``x + value``, computed in the tensor's dtype (llama.cpp stores Gemma's norm weights as ``1 + w``)."""
    value: float

    def __call__(self, xs):
        return [x + self.value for x in xs]

    def reverse(self):
        return AddConst(-self.value)

    def describe(self):
        return f"add {self.value:g}"


# ---------------------------------------------------------------- vocab padding
@dataclass(frozen=True)
class PadRows(Op):
    """``rows`` rows -> ``to`` rows, the extra rows copies of the last one (Megatron vocab padding).
    The reverse keeps the first ``rows`` rows (strips the padding)."""
    rows: int
    to: int
    rowwise = True

    def __call__(self, xs):
        x = xs[0]
        if x.shape[0] != self.rows or self.to < self.rows:
            raise ValueError(f"pad rows: {x.shape[0]} rows, expected {self.rows} (to pad to {self.to})")
        if self.to == self.rows:
            return [x]
        last = x[-1:]
        return [_cat([x, last.expand(self.to - self.rows, *x.shape[1:])], 0)]

    def reverse(self):
        return StripRows(self.rows, self.to)

    def describe(self):
        return f"pad rows {self.rows} -> {self.to} (copies of the last row)"


@dataclass(frozen=True)
class StripRows(Op):
    """``of`` rows -> the first ``rows`` (drops vocab padding); the reverse pads with the last row."""
    rows: int
    of: int
    rowwise = True

    def __call__(self, xs):
        x = xs[0]
        if x.shape[0] != self.of or self.rows > self.of:
            raise ValueError(f"strip rows: {x.shape[0]} rows, expected {self.of} (to keep {self.rows})")
        return [x[:self.rows]]

    def reverse(self):
        return PadRows(self.rows, self.of)

    def describe(self):
        return f"strip rows {self.of} -> {self.rows}"


# ---------------------------------------------------------------- sharding (TP ranks, Meta shards)
class Shard(str, Enum):
    """How one tensor is cut over ``n`` ranks (tensor parallel) or Meta ``consolidated`` shards."""
    ROWS = "rows"              # dim 0 in n equal blocks (column-parallel layers, vocab-parallel embeddings)
    COLS = "cols"              # dim 1 in n equal blocks (row-parallel layers)
    GLU = "glu"                # rows [up; gate]: each half cut in n blocks, rank r holds [up_r; gate_r]
    REPLICATED = "replicated"  # every rank holds the whole tensor (norms)

    @property
    def axis(self):
        """The dimension the pieces are cut along (None: not cut)."""
        return {Shard.ROWS: 0, Shard.GLU: 0, Shard.COLS: 1}.get(self)


def _shard_size(x: torch.Tensor, how: Shard, n: int) -> int:
    """Rows (columns) each piece gets; ValueError where ``n`` does not divide the tensor."""
    if how is Shard.COLS:
        if x.dim() < 2 or x.shape[1] % n:
            raise ValueError(f"cannot cut {list(x.shape)} into {n} column blocks")
        return x.shape[1] // n
    total = x.shape[0] // 2 if how is Shard.GLU else x.shape[0]
    if x.dim() < 1 or (how is Shard.GLU and x.shape[0] % 2) or total % n:
        what = "two halves of " if how is Shard.GLU else ""
        raise ValueError(f"cannot cut {what}{list(x.shape)} into {n} row blocks")
    return total // n


@dataclass(frozen=True)
class _Sharding(Op):
    """ShardSplit and ShardMerge: ``n`` pieces cut as ``how``."""
    how: Shard
    n: int

    @property
    def rowwise(self):
        return self.how is not Shard.COLS

    @property
    def rowlocal(self):  # a column cut: output rows come from the same input rows
        return self.how is Shard.COLS


@dataclass(frozen=True)
class ShardSplit(_Sharding):
    """One tensor -> its ``n`` pieces, cut as ``how`` says; the reverse merges them."""

    @property
    def n_out(self):
        return self.n

    def __call__(self, xs):
        x, n, how = xs[0], self.n, self.how
        if how is Shard.REPLICATED:
            return [x] * n
        m = _shard_size(x, how, n)
        if how is Shard.COLS:
            return [x[:, r * m:(r + 1) * m] for r in range(n)]
        if how is Shard.ROWS:
            return [x[r * m:(r + 1) * m] for r in range(n)]
        f = x.shape[0] // 2
        return [_cat([x[r * m:(r + 1) * m], x[f + r * m:f + (r + 1) * m]], 0) for r in range(n)]

    def reverse(self):
        return ShardMerge(self.how, self.n)

    def describe(self):
        return f"split in {self.n} ({self.how.value})"


@dataclass(frozen=True)
class ShardMerge(_Sharding):
    """``n`` pieces -> the whole tensor (a replicated tensor: rank 0's copy)."""

    @property
    def n_in(self):
        return self.n

    def __call__(self, xs):
        if len(xs) != self.n:
            raise ValueError(f"merge of {self.n} pieces given {len(xs)}")
        how = self.how
        if how is Shard.REPLICATED:
            return [xs[0]]
        if how is Shard.COLS:
            return [_cat(xs, 1)]
        if how is Shard.ROWS:
            return [_cat(xs, 0)]
        h = xs[0].shape[0] // 2
        if xs[0].shape[0] % 2:
            raise ValueError(f"GLU piece of {xs[0].shape[0]} rows has no two halves")
        return [_cat([x[:h] for x in xs] + [x[h:] for x in xs], 0)]

    def reverse(self):
        return ShardSplit(self.how, self.n)

    def describe(self):
        return f"merge {self.n} pieces ({self.how.value})"


@dataclass(frozen=True)
class ShardRow:
    """One row of a sharding table: keys matching ``pattern`` are cut as ``how``; ``how`` may map a
    variant (e.g. the Llama version) to its cut."""
    pattern: str
    how: object  # Shard | Mapping[variant, Shard]

    def cut(self, variant=None) -> Shard:
        if isinstance(self.how, Shard):
            return self.how
        return self.how[variant] if variant in self.how else next(iter(self.how.values()))


class ShardTable:
    """Which cut each tensor of a format gets. The writer splits with ``split(key, n)``, the reader
    merges with its reverse: one table, both directions."""

    def __init__(self, rows: Sequence[ShardRow]):
        import re
        self.rows = list(rows)
        self._re = [(re.compile(r.pattern), r) for r in self.rows]

    def row(self, key: str) -> "ShardRow | None":
        return next((r for rx, r in self._re if rx.search(key)), None)

    def cut(self, key: str, variant=None) -> "Shard | None":
        """The cut of ``key`` (None: the table has no row for it)."""
        r = self.row(key)
        return None if r is None else r.cut(variant)

    def split(self, key: str, n: int, variant=None) -> "ShardSplit | None":
        how = self.cut(key, variant)
        return None if how is None else ShardSplit(how, n)

    def merge(self, key: str, n: int, variant=None) -> "ShardMerge | None":
        op = self.split(key, n, variant)
        return None if op is None else op.reverse()


def map_ops(op: Op, fn) -> Op:
    """Rebuild ``op`` with ``fn`` applied to every leaf op (used by the mutation self-test)."""
    if isinstance(op, Chain):
        return Chain(tuple(map_ops(o, fn) for o in op.ops))
    if isinstance(op, Each):
        return Each(tuple(map_ops(o, fn) for o in op.ops))
    return fn(op)


def round_trip_ok(op: Op, xs: Sequence[torch.Tensor]) -> bool:
    """op.reverse()(op(xs)) == xs bit for bit."""
    back = op.reverse()(op(list(xs)))
    return len(back) == len(xs) and all(torch.equal(a, b) for a, b in zip(back, xs))
