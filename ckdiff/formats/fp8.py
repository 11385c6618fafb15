"""FP8 block-scaled safetensors (DeepSeek-V3 style), read as logical block-scaled views.

Facts (DeepSeek-V3 ``inference/kernel.py`` ``weight_dequant_kernel`` / ``weight_quant``,
``inference/fp8_cast_bf16.py``; llama.cpp ``convert_hf_to_gguf.py`` ``dequant_simple``):

- ``<name>.weight`` is ``float8_e4m3fn`` ``[M, N]``; ``<name>.weight_scale_inv`` is float32
  ``[ceil(M/128), ceil(N/128)]``; despite its name it multiplies: ``w[i, j] * s[i//128, j//128]``.
  The block size comes from ``quantization_config.weight_block_size`` (default 128 x 128); the last
  block row/column may be partial. Only 1-byte weights with a ``_scale_inv`` sibling are FP8.
- The quantizer stores ``s = amax / 448`` per block and rounds ``x / s`` to the nearest FP8 value,
  so ``|x - w s| <= 0.5 ulp(w) s``: each element's unit is ``ulp(w) * s`` (its own block scale times
  the FP8 spacing at its code), bound 0.5 plus a little for fp32 arithmetic.

Every such pair becomes one ``Fp8Block`` view under the weight's name when the checkpoint is read
(``tensor/blockscaled.py``); two FP8 checkpoints compare codes and scales exactly. A float side equal to the
e4m3 codes decoded as e5m2 times their scales names that misreading (``misreadings``).
"""
from __future__ import annotations

import math

import torch

from ckdiff.errors import InputError
from ckdiff.tensor.blockscaled import FLOAT8, BlockScaled, Scaled, fold
from ckdiff.tensor.lazy import Checkpoint, LazyTensor

SCALE_SUFFIX = "_scale_inv"
FP8 = FLOAT8
BOUND = 0.55
E4M3_MAX = 448.0


class Fp8Block(BlockScaled):
    """An FP8 weight with its block scales, as its logical float tensor."""

    def __init__(self, name: str, w: LazyTensor, s: LazyTensor, block=(128, 128)):
        self.w, self.s, self.block = w, s, tuple(block)
        super().__init__(name, w.shape, w.origin, f"{str(w.dtype).replace('torch.', '')} block {block[0]}x{block[1]}",
                         BOUND, (w.name, s.name))
        want = tuple(math.ceil(n / b) for n, b in zip(w.shape[-2:], block))
        if len(w.shape) < 2 or tuple(s.shape[-2:]) != want or tuple(s.shape[:-2]) != tuple(w.shape[:-2]):
            raise InputError(w.origin, f"{s.name}: scale grid {list(s.shape)} does not fit {name} {list(w.shape)} "
                                       f"in {block[0]}x{block[1]} blocks (expected {list(w.shape[:-2]) + list(want)})")

    @property
    def nbytes(self) -> int:  # stored bytes: codes and scales
        return self.w.nbytes + self.s.nbytes

    @property
    def row_align(self) -> int:
        return self.block[0] if len(self.shape) == 2 else 1

    def scaled(self, start: int, stop: int) -> Scaled:
        bm, bn = self.block
        codes = self.w.rows(start, stop)
        if len(self.shape) == 2:
            g0 = start // bm
            grid = self.s.rows(g0, -(-stop // bm)).float()
            return Scaled(codes, grid, (bm, bn)).rebased(start - g0 * bm)
        # stacked experts [E, M, N]: each expert's own grid, one grid row per element row
        M = self.shape[-2]
        grid = self.s.rows(start, stop).float().repeat_interleave(bm, -2)[..., :M, :]
        return Scaled(codes.reshape(-1, self.shape[-1]), grid.reshape(-1, grid.shape[-1]), (1, bn))

    def misreadings(self, start: int, stop: int) -> dict:
        """Values a converter that misreads the encoding writes, by the finding each names: e4m3 codes decoded as
        e5m2 (a dequantizer that takes any one-byte weight for the other FP8 format), or their bytes cast to float
        as integers 0..255."""
        if self.w.dtype != torch.float8_e4m3fn:
            return {}
        return {"codes-of-another-encoding": e4m3_misread(self.scaled(start, stop))}

    def reference(self, x: torch.Tensor) -> Scaled | None:
        """DeepSeek's quantizer (``fp8_quantize``) on float rows ``x``."""
        if len(self.shape) != 2 or self.w.dtype != torch.float8_e4m3fn:
            return None
        codes, s = fp8_quantize(x, self.block)
        return Scaled(codes, s, self.block)


def e4m3_misread(s: Scaled) -> list:
    """``codes-of-another-encoding`` variants of float8_e4m3fn codes times their scales (``s``): the codes decoded
    as e5m2 (a dequantizer that takes any one-byte weight for the other FP8 format), or their bytes cast to float
    as the integers 0..255 (a uint8 tensor cast without decoding). Values made when called."""
    return [({"codes": "FP8 e4m3", "read": "FP8 e5m2", "shape": ""},
             lambda: s.codes.view(torch.float8_e5m2).float() * s.per_element()),
            ({"codes": "FP8 e4m3", "read": "uint8, each byte an unsigned integer", "shape": ""},
             lambda: s.codes.view(torch.uint8).float() * s.per_element())]


def fp8_quantize(x: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes, float32 scales ``[ceil(M/bm), ceil(N/bn)]``) of a 2-D weight as DeepSeek-V3's
    ``weight_quant`` writes them: ``s = amax / 448`` per block, codes ``x / s`` rounded to the nearest FP8."""
    bm, bn = block
    R, C = x.shape
    xp = torch.zeros(-(-R // bm) * bm, -(-C // bn) * bn)
    xp[:R, :C] = x.float()
    s = xp.reshape(xp.shape[0] // bm, bm, xp.shape[1] // bn, bn).abs().amax(dim=(1, 3)).clamp_min(1e-12) / E4M3_MAX
    codes = (x.float() / Scaled(x, s, (bm, bn)).per_element()).to(torch.float8_e4m3fn)
    return codes, s


def fp8_pairs(tensors) -> dict:
    return {k: k + SCALE_SUFFIX for k, t in tensors.items()
            if t.dtype in FP8 and k + SCALE_SUFFIX in tensors}


def _block(ck: Checkpoint):
    q = (ck.config or {}).get("quantization_config") or {}
    b = q.get("weight_block_size") if isinstance(q, dict) else None
    if isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                            and 0 < x <= 1 << 16 for x in b):
        return tuple(b)
    return (128, 128)


def fp8_view(ck: Checkpoint) -> Checkpoint:
    """Each FP8 weight with its ``_scale_inv`` sibling becomes one ``Fp8Block`` view under the weight's name."""
    pairs = fp8_pairs(ck.tensors)
    if not pairs:
        return ck
    blk = _block(ck)
    views = {k: Fp8Block(k, ck.tensors[k], ck.tensors[s], blk) for k, s in pairs.items()}
    note = (f"{len(pairs)} FP8 weights with {blk[0]}x{blk[1]} block scales: read as their dequantized values, "
            f"judged in units of each element's FP8 spacing times its block scale (bound {BOUND})")
    return fold(ck, views, "FP8 block scale", note)


# ---------------------------------------------------------------- declaration (formats/registry.py)
def _declare() -> None:
    from ckdiff.formats.registry import Encoding, register_encoding
    register_encoding(Encoding("fp8", "FP8 weights with block scales (<name>_scale_inv), read as logical "
                                      "block-scaled views", fp8_view))


_declare()
