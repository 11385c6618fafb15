"""MLX quantized safetensors (mlx-lm's affine quantization), read as logical block-scaled views.

Facts (ml-explore/mlx 0.32 ``mlx.core.quantize`` / ``dequantize``, mode ``affine``, and the packing in
``mlx/backend/cpu/quantized.cpp`` at commit 784203f ``extract_bits`` / ``get_pack_factor``; ml-explore/mlx-lm
0.32.2 ``mlx_lm/utils.py`` ``quantize_model`` (modules with ``to_quantized`` whose input width is a multiple of the
group size) / ``save_model`` / ``save_config``, whose files the tests read):

- config.json ``quantization`` (and the same object as ``quantization_config``): ``{"group_size": g, "bits":
  b, "mode": "affine"}``; a module path key inside it overrides one module (an object with its own
  ``group_size`` / ``bits``, or ``false`` for a module left in float).
- Per quantized module ``m`` (linears, the embedding, lm_head): ``m.weight`` uint32 ``[out, in * b / 32]``,
  each row one little-endian bit stream of ``b``-bit codes (element ``j`` in bits ``[j b, (j + 1) b)``, words
  straddled for 3, 5 and 6 bits); ``m.scales`` and ``m.biases`` ``[out, in / g]`` in the model's dtype.
- value ``= code * scale + bias`` per group of ``g`` along the row. Not codes times a scale alone, so the
  views give dequantized values with each element's unit ``|scale|`` (the protocol's dense form). mlx moves
  each group's bias onto a multiple of its scale so that zero is a code, which costs up to a whole step:
  measured on random groups (float32 scales) the largest error is 0.99-0.997 of the scale at 3, 4 and 8 bits,
  so the bound is 1.02 steps, the issue's "one step per side".

Converters that misread the encoding write values a view can reproduce (``misreadings``): scales and biases
swapped, the element order in each word reversed, another group size, a narrower bit width (4 read from an
8-bit file), a group's zero point (-bias / scale) wrapped or clipped in an unsigned field of the bit width; a
float side equal to one names it. A config naming other bits and group size than the codes were
written at (the shapes fit both) gives views of another width; ``refits`` reads them at the pairs the shapes fit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ckdiff.errors import InputError
from ckdiff.tensor.blockscaled import BlockScaled, Scaled, fold
from ckdiff.tensor.lazy import Checkpoint, LazyTensor

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
BOUND = 1.02


def _unpack(words: torch.Tensor, bits: int, cols: int, reverse: bool = False) -> torch.Tensor:
    """int64 codes ``[R, cols]`` of uint32 rows ``[R, W]`` read as little-endian bit streams (``reverse``: each
    word's elements read from its high end, a converter's mistake for 2, 4 and 8 bits)."""
    w = words.contiguous().view(torch.int32).numpy().view(np.uint32)
    if reverse:
        per = 32 // bits
        shifts = np.arange(per, dtype=np.uint32)[::-1] * bits
        codes = (w[..., None] >> shifts) & ((1 << bits) - 1)
        return torch.from_numpy(codes.reshape(w.shape[0], -1)[:, :cols].astype(np.int64))
    stream = np.unpackbits(w.view(np.uint8), axis=1, bitorder="little")[:, :cols * bits]
    codes = stream.reshape(w.shape[0], cols, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))
    return torch.from_numpy(codes)


class MlxAffine(BlockScaled):
    """A module's weight ``[out, in]`` from MLX's packed codes, scales and biases."""

    def __init__(self, name: str, packed: LazyTensor, scales: LazyTensor, biases: LazyTensor, bits: int, group: int):
        where = packed.origin
        if packed.dtype != torch.uint32 or len(packed.shape) != 2 or (packed.shape[1] * 32) % bits:
            raise InputError(where, f"{packed.name}: {list(packed.shape)} {packed.dtype} is not 2-D uint32 MLX "
                                    f"codes of {bits} bits")
        R, C = packed.shape[0], packed.shape[1] * 32 // bits
        if C % group or tuple(scales.shape) != (R, C // group) or tuple(biases.shape) != (R, C // group) \
                or not scales.dtype.is_floating_point or biases.dtype != scales.dtype:
            fit = [f"{b}-bit groups of {g}" for b, g in _fits(packed.shape[1], scales.shape)]
            raise InputError(where, f"{scales.name} {list(scales.shape)} / {biases.name} {list(biases.shape)} do not "
                                    f"fit MLX {name} [{R}, {C}] in groups of {group} (expected [{R}, {C // group}] "
                                    f"floats each)" + (f"; the stored shapes fit {', '.join(fit)}: config.json's "
                                                       f"quantization does not describe this module" if fit else ""))
        self.packed, self.scales, self.biases, self.bits, self.group = packed, scales, biases, bits, group
        super().__init__(name, (R, C), where, f"MLX affine {bits}-bit, group {group}", BOUND,
                         (packed.name, scales.name, biases.name))

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.biases.nbytes

    def _values(self, codes: torch.Tensor, s: torch.Tensor, b: torch.Tensor, group: int) -> torch.Tensor:
        return codes.float() * s.repeat_interleave(group, 1) + b.repeat_interleave(group, 1)

    def scaled(self, start: int, stop: int) -> Scaled:
        codes = _unpack(self.packed.rows(start, stop), self.bits, self.shape[1])
        s, b = self.scales.rows(start, stop).float(), self.biases.rows(start, stop).float()
        return Scaled(self._values(codes, s, b, self.group), s.abs().repeat_interleave(self.group, 1), (1, 1),
                      dense=True)

    def raw(self, start: int, stop: int) -> torch.Tensor:
        return torch.cat([self.packed.rows(start, stop).contiguous().view(torch.uint8).flatten(),
                          self.scales.rows(start, stop).contiguous().view(torch.uint8).flatten(),
                          self.biases.rows(start, stop).contiguous().view(torch.uint8).flatten()])

    def problems(self, s: Scaled) -> list[str]:
        return [] if bool(torch.isfinite(s.codes).all()) else ["non-finite scales or biases"]

    def reference(self, x: torch.Tensor) -> Scaled | None:
        """mlx's affine quantizer on float rows ``x`` (the logit check's noise floor re-encodes A with it): per
        group, the scale spans [min, max] in ``2**bits - 1`` steps, signed so that the larger-magnitude edge is a
        code, and the bias is that edge, so zero stays on the grid."""
        if x.dim() != 2 or x.shape[1] != self.shape[1]:
            return None
        n = (1 << self.bits) - 1
        g = x.float().reshape(x.shape[0], -1, self.group)
        lo, hi = g.amin(-1), g.amax(-1)
        low_edge = lo.abs() > hi.abs()
        scale = ((hi - lo) / n).clamp_min(1e-7)
        scale = torch.where(low_edge, scale, -scale)
        edge = torch.where(low_edge, lo, hi)
        q0 = torch.round(edge / scale)
        scale = torch.where(q0 != 0, edge / q0, scale)
        bias = torch.where(q0 == 0, torch.zeros_like(edge), edge)
        codes = torch.round((g - bias[..., None]) / scale[..., None]).clamp(0, n)
        values = (codes * scale[..., None] + bias[..., None]).reshape(x.shape)
        return Scaled(values, scale.abs().repeat_interleave(self.group, 1), (1, 1), dense=True)

    def refits(self) -> list:
        """The module read at each other (bits, group size) its stored shapes also fit (``bits * group`` the
        file's): ``(params, values, units)`` per reading. A float side of another shape that one of them matches
        within the bound says that the config's bits and group size are not the ones the codes were written at."""
        out = []
        W = self.packed.shape[1]
        for b, g in _fits(W, self.scales.shape):
            if (b, g) == (self.bits, self.group) or self.numel * self.bits // b > (1 << 26):
                continue
            C = W * 32 // b
            s, z = self.scales.load().float(), self.biases.load().float()
            values = self._values(_unpack(self.packed.load(), b, C), s, z, g)
            out.append(({"bits": b, "group": g, "config_bits": self.bits, "config_group": self.group}, values,
                        s.abs().repeat_interleave(g, 1)))
        return out

    def misreadings(self, start: int, stop: int) -> dict:
        """Values a converter that misreads the encoding writes, by the finding each names (a list where one
        finding has several variants: each narrower bit width)."""
        C = self.shape[1]
        words = self.packed.rows(start, stop)
        codes = _unpack(words, self.bits, C)
        s, b = self.scales.rows(start, stop).float(), self.biases.rows(start, stop).float()
        out = {"scales-biases-swapped": ({}, self._values(codes, b, s, self.group))}
        if 32 % self.bits == 0 and self.bits < 32:
            out["word-order-reversed"] = ({"bits": self.bits}, self._values(_unpack(words, self.bits, C, True), s, b,
                                                                            self.group))
        # a dequantizer with the bit width hard-coded (4 on an 8-bit file) that takes the logical shape from the
        # model config: it reads the first C fields of the row's bit stream at that width, in the file's groups;
        # a wider width runs past the row's words, so only narrower ones write a tensor of the logical shape
        narrower = [({"stored": self.bits, "read": w}, self._values(_unpack(words, w, C), s, b, self.group))
                    for w in BITS if w < self.bits]
        if narrower:
            out["bits-wrong"] = narrower
        zp = self._zero_points(codes, s, b)
        if zp:
            out["zero-point-underflow"] = zp
        for g in GROUPS:  # a larger group read: every element takes the scale and bias of group j // g
            if g > self.group and C % g == 0:
                idx = torch.arange(C) // g
                out.setdefault("group-size-wrong", ({"stored": self.group, "read": g},
                                                    codes.float() * s[:, idx] + b[:, idx]))
        return out

    def _zero_points(self, codes: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> list:
        """``zero-point-underflow`` variants: each group's values with its zero point ``z = -bias / scale`` (the code
        of 0.0, an integer since mlx keeps zero on the code grid; 0 for an all-zero group, past ``2**bits - 1``
        for a group of one sign) held in an unsigned ``bits``-bit field, as a converter to an integer zero-point
        format (GPTQ, AWQ) stores it: ``z - 1`` packed, so 0 underflows to ``2**bits - 1`` (ModelCloud/GPTQModel
        PR #2351, ``unpack_reorder_pack`` for the ExLlamaV2 AWQ kernel); ``z`` wrapped modulo ``2**bits``; ``z``
        clipped to ``[0, 2**bits - 1]`` (AWQ's quantizer clamps its zero points so). Values ``(code - z') * scale``;
        a variant that changes no group is left out."""
        n = (1 << self.bits) - 1
        z = torch.round(torch.where(s != 0, -b / torch.where(s != 0, s, 1.0), 0.0))
        out = []
        for how, zw in ((f"0 read as {n} (z - 1 packed)", torch.where(z == 0, float(n), z)),
                        (f"wrapped modulo {n + 1}", torch.remainder(z, n + 1)),
                        (f"clipped to [0, {n}]", z.clamp(0, n))):
            changed = zw != z
            if bool(changed.any()):
                shift = ((z - zw) * s).repeat_interleave(self.group, 1)  # (code - z') s = (code - z) s + (z - z') s
                out.append(({"bits": self.bits, "how": how, "groups": int(changed.sum())},
                            lambda shift=shift: self._values(codes, s, b, self.group) + shift))
        return out


def _fits(words: int, scales_shape) -> list:
    """The (bits, group size) pairs of MLX's choices that ``words`` uint32 per row and ``scales_shape`` fit."""
    if len(scales_shape) != 2 or not scales_shape[1]:
        return []
    return [(b, g) for b in BITS for g in GROUPS
            if (words * 32) % b == 0 and words * 32 // b == g * scales_shape[1]]


def _int(v, choices) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v in choices


def mlx_quantization(ck: Checkpoint):
    """(default {"bits", "group_size"}, per-module overrides) of an MLX checkpoint; None when it is not one."""
    cfg = ck.config if isinstance(ck.config, dict) else {}
    q = cfg.get("quantization")
    if q is None:
        return None
    where = str(Path(ck.path) / "config.json")
    if not isinstance(q, dict):
        raise InputError(where, f"'quantization' {str(q)[:40]!r} is not an object")
    mode = q.get("mode", "affine")
    if mode != "affine":
        raise InputError(where, f"MLX quantization mode {repr(mode)[:40]} is not read (read: affine)")

    def check(d: dict, what: str) -> dict:
        if not _int(d.get("bits"), BITS) or not _int(d.get("group_size"), GROUPS):
            raise InputError(where, f"{what}: bits {repr(d.get('bits'))[:20]} / group_size "
                                    f"{repr(d.get('group_size'))[:20]} (read: bits {BITS}, group sizes {GROUPS})")
        return {"bits": d["bits"], "group_size": d["group_size"]}
    default = check(q, "quantization")
    overrides = {}
    for k, v in q.items():
        if k in ("bits", "group_size", "mode"):
            continue
        if v is False:
            overrides[k] = None
        elif isinstance(v, dict):
            overrides[k] = check(v, f"quantization {k[:60]!r}")
        else:
            raise InputError(where, f"quantization key {k[:60]!r}: {repr(v)[:40]} is neither an object nor false")
    return default, overrides


def mlx_view(ck: Checkpoint) -> Checkpoint:
    """Each ``m.weight`` (uint32) + ``m.scales`` + ``m.biases`` of an MLX checkpoint becomes one view under
    ``m.weight``."""
    found = mlx_quantization(ck)
    if found is None:
        return ck
    default, overrides = found
    t = ck.tensors
    views = {}
    for k, w in t.items():
        if not k.endswith(".weight") or w.dtype != torch.uint32:
            continue
        m = k[: -len(".weight")]
        s, b = t.get(m + ".scales"), t.get(m + ".biases")
        q = overrides.get(m, default)
        if s is None or b is None or q is None:
            raise InputError(ck.path, f"{k}: uint32 MLX codes without {m}.scales and {m}.biases, or in a module the "
                                      f"config leaves unquantized")
        views[k] = MlxAffine(k, w, s, b, q["bits"], q["group_size"])
    note = (f"{len(views)} MLX affine-quantized weights ({default['bits']}-bit, groups of {default['group_size']}"
            f"{', with per-module overrides' if overrides else ''}): judged in units of each group's scale "
            f"(bound {BOUND})")
    return fold(ck, views, "MLX affine", note)


# ---------------------------------------------------------------- declaration (formats/registry.py)
def _declare() -> None:
    from ckdiff.formats.registry import Encoding, register_encoding
    register_encoding(Encoding("mlx", "MLX affine-quantized safetensors (uint32 codes + scales + biases), read as "
                                      "logical block-scaled views", mlx_view))


_declare()
