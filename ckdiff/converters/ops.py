"""Reversible tensor ops from which every converter is built.

An op maps a list of input tensors to a list of output tensors and knows its
reverse, so a converter written as a table of (source keys, target keys, op)
gets its inverse by reversing each row. Every op that depends on head counts
takes them explicitly: q and k are permuted with their own head counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


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
class Concat(Op):
    """Concatenate inputs along ``dim``; ``sizes`` makes the reverse exact."""
    sizes: tuple
    dim: int = 0

    @property
    def rowwise(self):
        return self.dim == 0

    @property
    def n_in(self):
        return len(self.sizes)

    def __call__(self, xs):
        for x, s in zip(xs, self.sizes):
            if x.shape[self.dim] != s:
                raise ValueError(f"concat: input has {x.shape[self.dim]} on dim {self.dim}, expected {s}")
        return [torch.cat(list(xs), dim=self.dim)]

    def reverse(self):
        return Split(self.sizes, self.dim)

    def describe(self):
        return f"concat dim {self.dim} {list(self.sizes)}"


@dataclass(frozen=True)
class Split(Op):
    sizes: tuple
    dim: int = 0

    @property
    def rowwise(self):
        return self.dim == 0

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
        return [torch.stack(list(xs))]

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
        return [torch.cat([qg, k.reshape(K, d, *rest), v.reshape(K, d, *rest)], dim=1).reshape(-1, *rest)]

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
class Each(Op):
    """Apply one op per input (e.g. permute q with H heads and k with K heads)."""
    ops: tuple

    @property
    def rowwise(self):
        return all(op.rowwise for op in self.ops)

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
class Chain(Op):
    ops: tuple

    @property
    def rowwise(self):
        return all(op.rowwise for op in self.ops)

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
