"""compressed-tensors checkpoints (llm-compressor, vLLM): HF directories whose ``config.json`` has
``quantization_config.quant_method == "compressed-tensors"``, read as lazy dequantizing views.

Facts (compressed-tensors 0.20.0: ``compressors/quantized_compressors/fp8_quantized.py``,
``compressors/pack_quantized/helpers.py`` ``pack_to_int32``, ``compressors/nvfp4/helpers.py``
``pack_fp4_to_uint8``, ``quantization/utils/helpers.py`` ``calculate_qparams``; checked on files its
``ModelCompressor.compress_model`` wrote, tests/test_producer_compressed_tensors.py):

- ``float-quantized``: ``<m>.weight`` holds float8_e4m3fn codes, ``<m>.weight_scale`` float32 multiplies
  them: ``[1]`` (tensor), ``[rows, 1]`` (channel), ``[ceil(rows/b0), ceil(cols/b1)]`` (block, ``block_structure``).
- ``pack-quantized``: ``<m>.weight_packed`` int32, ``<m>.weight_shape`` int64 ``[rows, cols]``; each row is a
  dense little-endian bit stream of ``num_bits``-bit codes stored as ``code + 2**(num_bits-1)``;
  ``<m>.weight_scale`` ``[rows, 1]`` (channel) or ``[rows, cols/group_size]`` (group);
  ``<m>.weight_zero_point`` (asymmetric only) packed the same way along dim 0.
  ``w = (code - zero_point) * scale``.
- ``nvfp4-pack-quantized``: ``<m>.weight_packed`` uint8, two FP4 (e2m1) codes per byte, low nibble first,
  bit 3 the sign, magnitudes ``[0, .5, 1, 1.5, 2, 3, 4, 6]``; ``<m>.weight_scale`` float8_e4m3fn per 16
  columns and ``<m>.weight_global_scale`` float32: ``w = fp4 * weight_scale / weight_global_scale``.

Each element is judged in units of its own quantization step: the scale for integer codes (bound 0.55
symmetric: round to nearest; 1.05 with a zero point: the rounded zero point moves the grid by up to half a
step, so an extreme value may clamp), the FP8/FP4 spacing at the code times the scale for float codes
(bound 0.55). A format, strategy or type not listed here is refused with one line naming it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InputError
from .fp8 import _ulp
from .lazy import Checkpoint, LazyTensor

METHOD = "compressed-tensors"
FORMATS = ("float-quantized", "pack-quantized", "nvfp4-pack-quantized")
STRATEGIES = {"float-quantized": ("tensor", "channel", "block"), "pack-quantized": ("channel", "group"),
              "nvfp4-pack-quantized": ("tensor_group",)}
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP4_STEP = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0])  # spacing at each magnitude


def quant_config(ck: Checkpoint):
    q = (ck.config or {}).get("quantization_config")
    return q if isinstance(q, dict) else None


def _unpack_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 words [rows, W] -> the first ``n`` unsigned ``bits``-bit values of each row's bit stream."""
    b = np.ascontiguousarray(words.numpy().astype("<i4")).view(np.uint8)
    stream = np.unpackbits(b, axis=1, bitorder="little")
    m = stream.shape[1] // bits
    v = stream[:, :m * bits].reshape(stream.shape[0], m, bits).astype(np.int64) @ (1 << np.arange(bits))
    return torch.from_numpy(v[:, :n])


class _View(LazyTensor):
    """A dequantizing view: ``rows`` values, ``units`` the step of each element, ``bound`` in those units."""

    def load(self):
        return self.rows(0, self.shape[0])


class FloatQuant(_View):
    def __init__(self, name, w: LazyTensor, s: LazyTensor, strategy: str, block=None):
        super().__init__(name, w.shape, torch.float32, w.origin)
        self.w, self.s, self.strategy, self.block, self.bound = w, s, strategy, block, 0.55
        self.qtype = f"compressed-tensors {str(w.dtype).replace('torch.', '')} {strategy}"
        R, C = w.shape
        want = {"tensor": (1,), "channel": (R, 1),
                "block": (math.ceil(R / block[0]), math.ceil(C / block[1])) if block else None}[strategy]
        if tuple(s.shape) not in (want, (1, 1) if strategy == "tensor" else want):
            raise InputError(w.origin, f"{s.name}: scale shape {list(s.shape)} does not fit {strategy} "
                                       f"quantization of {name} {list(w.shape)} (expected {list(want)})")

    def _scales(self, lo, hi):
        if self.strategy == "tensor":
            return self.s.load().float().reshape(1, 1)
        if self.strategy == "channel":
            return self.s.rows(lo, hi).float()
        b0, b1 = self.block
        s = self.s.rows(lo // b0, -(-hi // b0)).float().repeat_interleave(b0, 0)[lo - (lo // b0) * b0:][: hi - lo]
        return s.repeat_interleave(b1, 1)[:, : self.shape[1]]

    def rows(self, lo, hi):
        return self.w.rows(lo, hi).float() * self._scales(lo, hi)

    def units(self, lo, hi):
        return (_ulp(self.w.rows(lo, hi)) * self._scales(lo, hi).abs()).expand(hi - lo, self.shape[1])


class PackedInt(_View):
    def __init__(self, name, packed, shape, s, zp, bits: int, strategy: str, group):
        super().__init__(name, shape, torch.float32, packed.origin)
        self.packed, self.s, self.zp, self.bits, self.strategy = packed, s, zp, bits, strategy
        self.group = group if strategy == "group" else shape[1]
        self.bound = 0.55 if zp is None else 1.05
        self.qtype = f"compressed-tensors int{bits} {strategy}" + (" asymmetric" if zp is not None else "")
        R, C = shape
        if C % self.group or tuple(s.shape) != (R, C // self.group):
            raise InputError(packed.origin, f"{s.name}: scale shape {list(s.shape)} does not fit int{bits} {strategy} "
                                            f"of {name} {list(shape)} (expected {[R, C // self.group]})")
        if tuple(packed.shape) != (R, math.ceil(C / 32) * bits):
            raise InputError(packed.origin, f"{packed.name}: {list(packed.shape)} is not {R} rows of {C} packed "
                                            f"int{bits} codes")

    def codes(self, lo, hi):
        return _unpack_bits(self.packed.rows(lo, hi), self.bits, self.shape[1]) - (1 << (self.bits - 1))

    def _zero(self, lo, hi):
        if self.zp is None:
            return 0
        z = _unpack_bits(self.zp.load().T.contiguous(), self.bits, self.shape[0]).T - (1 << (self.bits - 1))
        return z[lo:hi].repeat_interleave(self.group, 1).double()

    def _scales(self, lo, hi):
        return self.s.rows(lo, hi).double().repeat_interleave(self.group, 1)

    def rows(self, lo, hi):
        return ((self.codes(lo, hi).double() - self._zero(lo, hi)) * self._scales(lo, hi)).float()

    def units(self, lo, hi):
        return self._scales(lo, hi).abs().float()


class PackedFp4(_View):
    def __init__(self, name, packed, s, gs, group: int):
        R, half = packed.shape
        super().__init__(name, (R, half * 2), torch.float32, packed.origin)
        self.packed, self.s, self.gs, self.group, self.bound = packed, s, gs, group, 0.55
        self.qtype = f"compressed-tensors nvfp4 group {group}"
        if tuple(s.shape) != (R, half * 2 // group):
            raise InputError(packed.origin, f"{s.name}: scale shape {list(s.shape)} does not fit {name} "
                                            f"{[R, half * 2]} in groups of {group}")

    def _idx(self, lo, hi):
        b = self.packed.rows(lo, hi).to(torch.int64)
        return torch.stack([b & 15, b >> 4], -1).reshape(hi - lo, self.shape[1])

    def _scales(self, lo, hi):
        return (self.s.rows(lo, hi).float() / self.gs.load().float().reshape(())).repeat_interleave(self.group, 1)

    def rows(self, lo, hi):
        i = self._idx(lo, hi)
        v = FP4[i & 7] * torch.where(i & 8 > 0, -1.0, 1.0)
        return v * self._scales(lo, hi)

    def units(self, lo, hi):
        return FP4_STEP[self._idx(lo, hi) & 7] * self._scales(lo, hi).abs()


def _weight_args(q: dict, where) -> tuple:
    """(format, weight args) of a compressed-tensors quantization_config; refuses what is not read here."""
    fmt = q.get("format")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise InputError(where, "compressed-tensors quantization_config without config_groups")
    args = []
    for g in groups.values():
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict):
            raise InputError(where, "compressed-tensors config group without weight quantization args")
        fmt = g.get("format") or fmt
        args.append((fmt, {k: w.get(k) for k in ("num_bits", "type", "strategy", "symmetric", "group_size",
                                                 "block_structure")}))
    if any(a != args[0] for a in args):
        raise InputError(where, "compressed-tensors config groups with different weight schemes are not read yet")
    fmt, w = args[0]
    if fmt not in FORMATS:
        raise InputError(where, f"compressed-tensors format {fmt!r} is not read (read: {', '.join(FORMATS)})")
    if w["strategy"] not in STRATEGIES[fmt]:
        raise InputError(where, f"compressed-tensors {fmt} with strategy {w['strategy']!r} is not read "
                                f"(read: {', '.join(STRATEGIES[fmt])})")
    want = {"float-quantized": ("float", (8,)), "pack-quantized": ("int", tuple(range(2, 9))),
            "nvfp4-pack-quantized": ("float", (4,))}[fmt]
    if w["type"] != want[0] or w["num_bits"] not in want[1]:
        raise InputError(where, f"compressed-tensors {fmt} with {w['type']} {w['num_bits']}-bit weights is not read")
    for k in ("group_size",) if w["strategy"] in ("group", "tensor_group") else ():
        if not isinstance(w[k], int) or w[k] <= 0:
            raise InputError(where, f"compressed-tensors {w['strategy']} strategy with group_size {w[k]!r}")
    if w["strategy"] == "block":
        b = w["block_structure"]
        if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
            raise InputError(where, f"compressed-tensors block strategy with block_structure {b!r}")
    return fmt, w


def views(ck: Checkpoint) -> tuple[dict, dict, str]:
    """(tensors with each quantized module's weight as one dequantizing view, folded names, note)."""
    q = quant_config(ck)
    where = f"{ck.path}/config.json"
    if q.get("quantization_status") not in (None, "compressed"):
        raise InputError(where, f"compressed-tensors quantization_status {q.get('quantization_status')!r}: "
                                "only compressed checkpoints are read")
    fmt, w = _weight_args(q, where)
    t = ck.tensors
    out, folded = {}, {}
    for k in t:
        if not k.endswith(".weight_scale"):
            continue
        m = k[: -len("weight_scale")]
        if fmt == "float-quantized":
            view = FloatQuant(m + "weight", t[m + "weight"], t[k], w["strategy"], w["block_structure"])
            parts = [m + "weight", k]
        elif fmt == "pack-quantized":
            shape = tuple(int(x) for x in t[m + "weight_shape"].load().tolist())
            zp = t.get(m + "weight_zero_point") if not w["symmetric"] else None
            if not w["symmetric"] and zp is None:
                raise InputError(where, f"{m}weight: asymmetric scheme without weight_zero_point")
            view = PackedInt(m + "weight", t[m + "weight_packed"], shape, t[k], zp, w["num_bits"], w["strategy"],
                             w["group_size"])
            parts = [m + "weight_packed", m + "weight_shape", k] + ([m + "weight_zero_point"] if zp is not None else [])
        else:
            view = PackedFp4(m + "weight", t[m + "weight_packed"], t[k], t[m + "weight_global_scale"], w["group_size"])
            parts = [m + "weight_packed", k, m + "weight_global_scale"]
        missing = [p for p in parts if p not in t]
        if missing:
            raise InputError(where, f"{m}weight: {', '.join(missing)} missing for {fmt}")
        out[m + "weight"] = view
        folded.update({p: f"folded into {m}weight ({fmt})" for p in parts if p != m + "weight"})
    rest = {k: v for k, v in t.items() if k not in folded and k not in out}
    note = (f"compressed-tensors {fmt} ({w['type']} {w['num_bits']}-bit, {w['strategy']}"
            f"{', zero points' if w['symmetric'] is False else ''}): {len(out)} weights dequantized and judged in "
            "units of each element's own quantization step")
    return {**rest, **out}, folded, note


def fold(a: Checkpoint, b: Checkpoint) -> tuple[Checkpoint, Checkpoint, list]:
    """When exactly one side is a compressed-tensors checkpoint, its weights become dequantizing views;
    two compressed-tensors checkpoints compare codes and scales exactly. A quantization_config whose
    quant_method no reader here knows is refused by name."""
    for ck in (a, b):
        q = quant_config(ck)
        if q is not None and q.get("quant_method") not in (METHOD, "fp8"):
            raise InputError(f"{ck.path}/config.json", f"quantization_config quant_method {q.get('quant_method')!r} "
                                                       f"is not read (read: {METHOD}, fp8 block scales)")
    ct = [(quant_config(ck) or {}).get("quant_method") == METHOD for ck in (a, b)]
    if ct[0] == ct[1]:
        return a, b, []
    side, ck = ("A", a) if ct[0] else ("B", b)
    tensors, folded, note = views(ck)
    new = Checkpoint(ck.path, ck.format, tensors, ck.config, {**(ck.meta or {}), "folded": {
        **(ck.meta or {}).get("folded", {}), **folded}})
    return (new, b, [f"A: {note}"]) if side == "A" else (a, new, [f"B: {note}"])


def _declare() -> None:
    from .registry import Encoding, register_encoding
    register_encoding(Encoding("compressed-tensors", "compressed-tensors float-quantized, pack-quantized and "
                                                     "nvfp4-pack-quantized weights, dequantized when the other side "
                                                     "is not compressed-tensors", fold))


_declare()
