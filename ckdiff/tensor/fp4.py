"""FP4 (e2m1: one sign, two exponent, one mantissa bit) as microscaling encodings store it: the values of the 16
codes, their spacing, and rounding to them; and the E8M0 block scales those encodings pair it with.

A nibble ``n`` holds the sign in bit 3 and the magnitude ``FP4[n & 7]`` (0, 0.5, 1, 1.5, 2, 3, 4, 6; OCP
Microscaling Formats v1.0, section 5.3.3). Every FP4 value is exactly a float8_e4m3fn value, so decoded codes are
held as float8_e4m3fn bytes (``FP4_BYTES``) with the FP4 spacing as their step table (``FP4_STEPS``, the
block-scaled protocol's ``Scaled.steps``). ``blocks_misread`` gives what a dequantizer with another block size
hard-coded makes of the microscaling encodings (MXFP4, NVFP4, MXFP8), for their ``misreadings``."""
from __future__ import annotations

import numpy as np
import torch

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _fp4_steps() -> np.ndarray:
    """The FP4 (e2m1) spacing at each FP4 value, indexed by that value's float8_e4m3fn byte (other bytes:
    the FP8 spacing; FP4 codes never hold them)."""
    from ckdiff.tensor.blockscaled import step_table
    t = step_table(torch.float8_e4m3fn).copy()
    for v, st in zip(FP4.tolist(), (0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0)):
        for sv in (v, -v):
            b = int(torch.tensor([sv]).to(torch.float8_e4m3fn).view(torch.uint8))
            t[b] = st
    return t


FP4_STEPS = _fp4_steps()
# nibble -> the byte of its FP4 value as a float8_e4m3fn code
_FP4_BYTES = torch.cat([FP4, -FP4]).to(torch.float8_e4m3fn).view(torch.uint8)
FP4_BYTES = _FP4_BYTES
FP4_VALUES = torch.cat([FP4, -FP4])  # nibble -> FP4 value as float32
INT4_VALUES = torch.cat([torch.arange(8.0), torch.arange(-8.0, 0.0)])  # nibble -> its two's-complement int4 value
E8M0_BIAS = 127


def e8m0_scales(b: torch.Tensor) -> torch.Tensor:
    """float32 scales ``2 ** (byte - 127)`` of E8M0 bytes (OCP MX v1.0, 5.4.1); the byte 255 is NaN."""
    g = torch.ldexp(torch.ones(b.shape), b.to(torch.int32) - E8M0_BIAS)
    return torch.where(b == 255, torch.tensor(float("nan")), g)


def e8m0_problems(grid: torch.Tensor) -> list[str]:
    """The NaN scales (byte 255) of a grid made by ``e8m0_scales``, as a problem line."""
    n = int(torch.isnan(grid).sum())
    return [f"{n} E8M0 scales are 255 (NaN)"] if n else []


def round_fp4(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 (e2m1) value, ties as compressed-tensors' ``_round_to_fp4``."""
    a = x.abs()
    r = torch.zeros_like(a)
    for thr, v, incl in ((0.25, 0.5, False), (0.75, 1.0, True), (1.25, 1.5, False), (1.75, 2.0, True),
                         (2.5, 3.0, False), (3.5, 4.0, True), (5.0, 6.0, False)):
        r = torch.where(a >= thr if incl else a > thr, torch.tensor(v), r)
    return torch.where(x < 0, -r, r)


READ_BLOCKS = (16, 32, 64, 128)  # block sizes a dequantizer may have hard-coded (NVFP4's, MX's, int4 groups')


def blocks_misread(values: torch.Tensor, scales: torch.Tensor, stored: int, flat_scales: torch.Tensor,
                   offset: int = 0, logical=None) -> list:
    """``block-size-wrong`` variants: stored-order code values ``[..., K]`` (each row's blocks of ``stored`` along
    the last dim) with their scales ``[..., K / stored]`` applied by a dequantizer that has another block size
    ``b`` hard-coded: per row (element ``j`` takes its row's scale ``j // b``: the grid expanded ``b`` times
    and cut to the row), or as one stream (element ``n`` of the flat codes takes scale ``n // b`` of the flat
    scales ``flat_scales``: a kernel computing its own strides; ``offset`` is the flat index of ``values``' first
    element). A smaller ``b`` runs past the scales (a crash, or other memory read), so only larger ones write a
    tensor of the logical shape. ``logical`` maps stored-order values to the view's rows; each variant's values
    are made when called."""
    K = values.shape[-1]
    logical = logical or (lambda v: v)
    flat = flat_scales.reshape(-1)

    def per_row(b):
        return logical(values * scales[..., torch.arange(K) // b])

    def stream(b):
        n = torch.arange(offset, offset + values.numel()).reshape(values.shape)
        return logical(values * flat[n // b])
    out = []
    for b in READ_BLOCKS:
        if b > stored:
            out.append(({"stored": stored, "read": b, "order": "each row's own scales"}, lambda b=b: per_row(b)))
            out.append(({"stored": stored, "read": b, "order": "the scales read as one stream across rows"},
                        lambda b=b: stream(b)))
    return out
