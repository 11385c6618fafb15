"""Reversible ops on the fused tensors of MLA and fused-expert families, as llama.cpp's converter splits them.

- ``SplitKvB``: DeepSeek's ``kv_b_proj`` ``[H * (nope + v), r]`` (each head's rows ``[k_nope | v]``) into
  ``k_b`` ``[H, r, nope]`` (each head's k part transposed, for MLA's weight absorption) and ``v_b`` ``[H, v, r]``
  (llama.cpp ``conversion/deepseek.py`` ``DeepseekV2Model.modify_tensors``, llama-cpp-python 0.3.36 sdist).
- ``Deinterleave``: a fused gate/up tensor whose last dimension alternates gate and up (GPT-OSS's
  ``gate_up_proj`` ``[E, D, 2F]``, gate even, up odd) into gate and up, optionally transposing the last two
  dimensions first (llama.cpp ``conversion/gpt_oss.py`` ``GptOssModel.modify_tensors``: weights to
  ``[E, F, D]``, biases ``[E, F]`` as they are).
- ``SwapLast``: the last two dimensions of a stacked expert tensor swapped (GPT-OSS's ``down_proj``
  ``[E, F, D]`` to llama.cpp's ``[E, D, F]``).

Every op also runs on meta tensors (shape inference of lazy conversions): slicing, views and ``empty`` only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ckdiff.tensor.ops import Op


@dataclass(frozen=True)
class SplitKvB(Op):
    """``kv_b_proj`` ``[H * (nope + v), r]`` -> ``k_b`` ``[H, r, nope]``, ``v_b`` ``[H, v, r]``."""
    heads: int
    nope: int
    v: int
    n_out = 2

    def __call__(self, xs):
        x = xs[0]
        H, n, v = self.heads, self.nope, self.v
        if x.dim() != 2 or x.shape[0] != H * (n + v):
            raise ValueError(f"kv_b_proj {list(x.shape)}: expected [{H} heads x ({n} k_nope + {v} v), kv_lora_rank]")
        h = x.reshape(H, n + v, x.shape[1])
        return [h[:, :n].transpose(1, 2).contiguous(), h[:, n:].contiguous()]

    def reverse(self):
        return FuseKvB(self.heads, self.nope, self.v)

    def describe(self):
        return f"split kv_b per head into k_b (transposed, {self.nope}) and v_b ({self.v}), {self.heads} heads"


@dataclass(frozen=True)
class FuseKvB(Op):
    heads: int
    nope: int
    v: int
    n_in = 2

    def __call__(self, xs):
        k, v = xs
        H, n, dv = self.heads, self.nope, self.v
        if k.dim() != 3 or v.dim() != 3 or k.shape[0] != H or v.shape[0] != H or k.shape[2] != n \
                or v.shape[1] != dv or k.shape[1] != v.shape[2]:
            raise ValueError(f"k_b {list(k.shape)} / v_b {list(v.shape)}: expected [{H}, r, {n}] and [{H}, {dv}, r]")
        r = k.shape[1]
        out = torch.empty((H, n + dv, r), dtype=torch.promote_types(k.dtype, v.dtype), device=k.device)
        out[:, :n] = k.transpose(1, 2)
        out[:, n:] = v
        return [out.reshape(H * (n + dv), r)]

    def reverse(self):
        return SplitKvB(self.heads, self.nope, self.v)

    def describe(self):
        return f"fuse k_b (transposed back) and v_b per head into kv_b, {self.heads} heads"


@dataclass(frozen=True)
class Deinterleave(Op):
    """Last dimension alternating a, b -> a (even), b (odd); with ``transpose`` the last two dimensions are
    swapped first (then the alternation runs along the rows)."""
    transpose: bool = False
    n_out = 2

    def __call__(self, xs):
        x = xs[0]
        if self.transpose:
            if x.dim() < 2:
                raise ValueError(f"de-interleave: {list(x.shape)} has no two dimensions to transpose")
            x = x.transpose(-1, -2)
            if x.shape[-2] % 2:
                raise ValueError(f"de-interleave: {x.shape[-2]} rows do not alternate in pairs")
            return [x[..., ::2, :].contiguous(), x[..., 1::2, :].contiguous()]
        if x.shape[-1] % 2:
            raise ValueError(f"de-interleave: {x.shape[-1]} columns do not alternate in pairs")
        return [x[..., ::2].contiguous(), x[..., 1::2].contiguous()]

    def reverse(self):
        return Interleave(self.transpose)

    def describe(self):
        return ("transpose, then rows " if self.transpose else "columns ") + "even -> first, odd -> second"


@dataclass(frozen=True)
class Interleave(Op):
    transpose: bool = False
    n_in = 2

    def __call__(self, xs):
        a, b = xs
        if a.shape != b.shape:
            raise ValueError(f"interleave: {list(a.shape)} and {list(b.shape)} differ")
        dt = torch.promote_types(a.dtype, b.dtype)
        if self.transpose:
            out = torch.empty((*a.shape[:-2], 2 * a.shape[-2], a.shape[-1]), dtype=dt, device=a.device)
            out[..., ::2, :] = a
            out[..., 1::2, :] = b
            return [out.transpose(-1, -2).contiguous()]
        out = torch.empty((*a.shape[:-1], 2 * a.shape[-1]), dtype=dt, device=a.device)
        out[..., ::2] = a
        out[..., 1::2] = b
        return [out]

    def reverse(self):
        return Deinterleave(self.transpose)

    def describe(self):
        return "first -> even, second -> odd" + (", then transpose" if self.transpose else "")


@dataclass(frozen=True)
class SwapLast(Op):
    """The last two dimensions swapped (its own reverse)."""

    def __call__(self, xs):
        if xs[0].dim() < 2:
            raise ValueError(f"swap last dimensions: {list(xs[0].shape)}")
        return [x.transpose(-1, -2).contiguous() for x in xs]

    def reverse(self):
        return self

    def describe(self):
        return "swap the last two dimensions"
