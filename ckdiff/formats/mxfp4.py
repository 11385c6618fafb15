"""MXFP4 (OCP Microscaling) expert weights as GPT-OSS ships them in HF safetensors, read as logical
block-scaled views.

Facts (transformers 5.25 ``integrations/mxfp4.py`` ``_convert_moe_packed_tensors``; OCP Microscaling Formats
(MX) v1.0, sections 5.3-6.3):

- ``<p>_blocks`` uint8 ``[E, R, G, 16]``: per expert and output row ``r``, ``G`` blocks of 32 FP4 (e2m1) codes
  along the input dimension, two per byte, the even element in the low nibble (``tensor/fp4.py``).
- ``<p>_scales`` uint8 ``[E, R, G]``: one E8M0 scale per block, ``2 ** (byte - 127)``; the byte 255 is NaN.
- value ``[e, r, 32 g + j] = fp4(code) * 2 ** (scale[e, r, g] - 127)``; the logical tensor is its transpose over
  the last two dimensions, ``[E, 32 G, R]``: GPT-OSS's ``gate_up_proj`` ``[E, hidden, 2 x intermediate]`` and
  ``down_proj`` ``[E, intermediate, hidden]``, the names the family declares (``models/families/gpt_oss.py``).
- The OCP quantizer takes the shared exponent ``floor(log2(amax)) - 2`` (2: e2m1's largest exponent) and
  rounds ``x / 2 ** e`` to the nearest e2m1 value, saturating at 6: half a step of the code's FP4 spacing
  times the block scale inside the range, up to one step at the top of a block. Bound 1.05 steps.

Every ``<p>_blocks`` + ``<p>_scales`` pair of uint8 tensors of these shapes becomes one ``Mxfp4`` view under
``<p>``. The diagnosis also tries the ways a converter misreads the encoding (``misreadings``): a float side
equal to one of them names the bug (E8M0 bytes used as values, nibble order swapped, the scale grid read in
the stored order, the dequantized experts left untransposed, each scale applied to 64 or 128 elements, the
bytes decoded by an FP8 dequantizer: one e4m3 value per byte, experts of half the input width).
"""
from __future__ import annotations

import torch

from ckdiff.errors import InputError
from ckdiff.tensor.blockscaled import BlockScaled, Scaled, fold
from ckdiff.tensor.fp4 import (
    E8M0_BIAS, FP4_BYTES, FP4_STEPS, FP4_VALUES, INT4_VALUES, blocks_misread, e8m0_problems, e8m0_scales, round_fp4,
)
from ckdiff.tensor.lazy import Checkpoint, LazyTensor

BLOCKS, SCALES = "_blocks", "_scales"
BLOCK = 32
BOUND = 1.05


class Mxfp4(BlockScaled):
    """GPT-OSS experts ``[E, 32 G, R]`` from MXFP4 blocks ``[E, R, G, 16]`` and E8M0 scales ``[E, R, G]``."""

    def __init__(self, name: str, blocks: LazyTensor, scales: LazyTensor):
        where = blocks.origin
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or len(blocks.shape) != 4 \
                or blocks.shape[-1] != BLOCK // 2 or tuple(scales.shape) != tuple(blocks.shape[:3]):
            raise InputError(where, f"{blocks.name} {list(blocks.shape)} {blocks.dtype} / {scales.name} "
                                    f"{list(scales.shape)} {scales.dtype}: not MXFP4 experts (uint8 blocks [E, R, G, 16] "
                                    f"and uint8 scales [E, R, G])")
        E, R, G, _ = blocks.shape
        self.blocks, self.scales = blocks, scales
        super().__init__(name, (E, G * BLOCK, R), where, "MXFP4 e2m1, e8m0 per 32", BOUND, (blocks.name, scales.name))

    flat_reference = True  # ``reference`` takes the experts' rows flattened to [E * 32 G, R]

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes + self.scales.nbytes

    @property
    def row_align(self) -> int:
        return 1  # rows are experts

    def _nibbles(self, start: int, stop: int, swap: bool = False) -> torch.Tensor:
        """Codes ``[n, R, 32 G]`` (nibbles 0..15) of experts [start, stop), in stored order."""
        b = self.blocks.rows(start, stop)
        lo, hi = b & 0x0F, b >> 4
        pair = (hi, lo) if swap else (lo, hi)
        return torch.stack(pair, -1).reshape(b.shape[0], b.shape[1], -1)

    def _exponents(self, start: int, stop: int) -> torch.Tensor:
        return self.scales.rows(start, stop).to(torch.int32) - E8M0_BIAS  # [n, R, G]

    def scaled(self, start: int, stop: int) -> Scaled:
        nib = self._nibbles(start, stop)
        codes = FP4_BYTES[nib.long()].transpose(1, 2).reshape(-1, self.shape[-1]).view(torch.float8_e4m3fn)
        grid = e8m0_scales(self.scales.rows(start, stop))
        return Scaled(codes, grid.transpose(1, 2).reshape(-1, self.shape[-1]), (BLOCK, 1), steps=FP4_STEPS)

    def raw(self, start: int, stop: int) -> torch.Tensor:
        return torch.cat([self.blocks.rows(start, stop).flatten(), self.scales.rows(start, stop).flatten()])

    def problems(self, s: Scaled) -> list[str]:
        return e8m0_problems(s.grid)

    def reference(self, x: torch.Tensor) -> Scaled | None:
        """The OCP quantizer on logical float rows ``x`` ``[n * 32 G, R]``: a shared exponent per 32 rows of a
        column, codes rounded to e2m1 and saturated."""
        R = self.shape[-1]
        if x.dim() != 2 or x.shape[1] != R or x.shape[0] % BLOCK:
            return None
        xb = x.float().reshape(-1, BLOCK, R)
        amax = xb.abs().amax(1)
        _, e2 = torch.frexp(amax)  # amax = m * 2 ** e2, m in [0.5, 1): floor(log2(amax)) = e2 - 1
        e = torch.where(amax > 0, e2 - 1 - 2, torch.full_like(e2, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)
        scale = torch.ldexp(torch.ones(e.shape), e)
        codes = round_fp4((xb / scale[:, None, :]).clamp(-6.0, 6.0)).to(torch.float8_e4m3fn)
        return Scaled(codes.reshape(-1, R), scale, (BLOCK, 1), steps=FP4_STEPS)

    def misreadings(self, start: int, stop: int) -> dict:
        """Logical float values ``[n * 32 G, R]`` a converter that misreads the encoding would write, by the
        finding each names."""
        R, K = self.shape[-1], self.shape[-2]
        e = self._exponents(start, stop).float()  # [n, R, G]

        def dequant(nib, scale):  # stored order [n, R, K] -> values
            return FP4_VALUES[nib.long()] * scale.repeat_interleave(BLOCK, -1)

        def logical(v):
            return v.transpose(1, 2).reshape(-1, R)
        nib = self._nibbles(start, stop)
        right = torch.exp2(e)
        n, G = e.shape[0], e.shape[2]
        return {  # finding kind (compare/findings.py) -> (its parameters, the values)
            "e8m0-as-value": ({}, logical(dequant(nib, e + E8M0_BIAS))),
            "nibbles-swapped": ({"blocks": int(nib.numel() // BLOCK)},
                                logical(dequant(self._nibbles(start, stop, swap=True), right))),
            # the [R, G] scale buffer read as if it were stored [G, R]
            "scale-transposed": ({"unit": "block"}, logical(dequant(nib, right.reshape(n, G, R).transpose(1, 2)))),
            # dequantized in the stored [R, K] order and reshaped to [K, R] without the transpose
            "not-transposed": ({"stored": f"[{R}, {K}]", "logical": f"[{K}, {R}]"}, dequant(nib, right).reshape(-1, R)),
            # a dequantizer with another block size hard-coded (tensor/fp4.py blocks_misread)
            "block-size-wrong": blocks_misread(FP4_VALUES[nib.long()], right, BLOCK,
                                               e8m0_scales(self.scales.load()), start * R * K, logical),
            "codes-of-another-encoding": [
                # an FP8 dequantizer on the FP4 bytes: each byte one e4m3 value, scaled by its block's scale
                ({"codes": "FP4 e2m1, two per byte", "read": "FP8 e4m3, one per byte",
                  "shape": f": experts [{n}, {K // 2}, {R}] where they are [{n}, {K}, {R}]"},
                 lambda: self._bytes_as_fp8(start, stop)),
                # an int4 dequantizer on the nibbles: each a two's-complement integer
                ({"codes": "FP4 e2m1, two per byte", "read": "int4, each nibble a signed integer", "shape": ""},
                 lambda: logical(INT4_VALUES[nib.long()] * right.repeat_interleave(BLOCK, -1)))],
        }

    def _bytes_as_fp8(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[n * 16 G, R]``: the packed bytes read as float8_e4m3fn values times their block's scale."""
        b = self.blocks.rows(start, stop)  # [n, R, G, 16]
        v = b.contiguous().view(torch.float8_e4m3fn).float() * e8m0_scales(self.scales.rows(start, stop))[..., None]
        return v.reshape(b.shape[0], b.shape[1], -1).transpose(1, 2).reshape(-1, self.shape[-1])


def mxfp4_pairs(tensors) -> dict:
    return {k[: -len(BLOCKS)]: (k, k[: -len(BLOCKS)] + SCALES) for k, t in tensors.items()
            if k.endswith(BLOCKS) and t.dtype == torch.uint8 and len(t.shape) == 4
            and k[: -len(BLOCKS)] + SCALES in tensors}


def mxfp4_view(ck: Checkpoint) -> Checkpoint:
    """Each ``<p>_blocks`` + ``<p>_scales`` pair becomes one ``Mxfp4`` view under ``<p>``."""
    pairs = mxfp4_pairs(ck.tensors)
    if not pairs:
        return ck
    taken = [p for p in pairs if p in ck.tensors]
    if taken:
        raise InputError(ck.path, f"{taken[0]} is stored both as a float tensor and as MXFP4 blocks and scales")
    views = {p: Mxfp4(p, ck.tensors[b], ck.tensors[s]) for p, (b, s) in pairs.items()}
    note = (f"{len(views)} MXFP4 expert weights (e2m1 codes, an E8M0 scale per 32): read as their dequantized "
            f"values [E, in, out], judged in units of each element's FP4 spacing times its block scale (bound {BOUND})")
    return fold(ck, views, "MXFP4", note)


# ---------------------------------------------------------------- declaration (formats/registry.py)
def _declare() -> None:
    from ckdiff.formats.registry import Encoding, register_encoding
    register_encoding(Encoding("mxfp4", "MXFP4 expert weights (<p>_blocks + <p>_scales, GPT-OSS), read as logical "
                                        "block-scaled views", mxfp4_view))


_declare()
