"""compressed-tensors checkpoints (llm-compressor, vLLM) read as logical block-scaled views.

An HF directory whose ``config.json`` has ``quantization_config.quant_method == "compressed-tensors"``
stores each quantized Linear as codes and scales under the module's name; every such group becomes one
:class:`~ckdiff.tensor.blockscaled.BlockScaled` view under ``<m>.weight`` with the logical ``[out, in]``
shape, so alignment, coverage, diagnosis and the runtimes see logical tensors only.

Facts (compressed-tensors 0.20.0: ``compressors/naive_quantized/base.py`` ``FloatQuantizationCompressor``,
``compressors/pack_quantized/base.py`` and ``helpers.py`` ``pack_to_int32``, ``compressors/nvfp4/base.py``
and ``helpers.py`` ``unpack_fp4_from_uint8``, ``quantization/utils/helpers.py`` ``calculate_qparams`` /
``generate_gparam``, ``quantization/lifecycle/forward_helpers.py`` ``_quantize`` / ``_dequantize``,
``quantization/utils/fp4_utils.py`` ``_round_to_fp4``; checked on files its ``ModelCompressor.compress_model``
wrote, tests/test_producer_compressed_tensors.py):

- ``float-quantized``: ``<m>.weight`` float8_e4m3fn codes, ``<m>.weight_scale`` (the model's dtype) multiplies
  them: ``[1]`` (tensor), ``[out, 1]`` (channel), ``[out, ceil(in/g)]`` (group),
  ``[ceil(out/b0), ceil(in/b1)]`` (block, ``block_structure``; the last block may be partial).
  Quantizer: ``s = max|x| / 448`` per unit, codes ``x / s`` clamped to +-448 and cast to FP8.
- ``pack-quantized``: ``<m>.weight_packed`` int32 ``[out, ceil(in * bits / 32)]``: each row a dense
  little-endian bit stream of ``bits``-bit fields holding ``q + 2**(bits-1)``; ``<m>.weight_shape`` int64
  ``[out, in]``; ``<m>.weight_scale`` ``[out, 1]`` (channel) or ``[out, ceil(in/g)]`` (group);
  ``<m>.weight_zero_point`` (asymmetric only) int32 ``[ceil(out * bits / 32), groups]``, packed the same way
  along dim 0. ``w = (q - z) * s``. Quantizer: symmetric ``s = max|x| / ((qmax - qmin) / 2)`` (7.5 for
  int4, 127.5 for int8), ``z = 0``; asymmetric ``s = (max - min) / (2**bits - 1)`` over ``[min(x, 0),
  max(x, 0)]``, ``z = round(qmin - min / s)``; ``q = clamp(round(x / s + z), qmin, qmax)``.
- ``nvfp4-pack-quantized``: ``<m>.weight_packed`` uint8 ``[out, in/2]``, two FP4 (e2m1) codes per byte, the
  even column in the low nibble, bit 3 the sign, magnitudes ``0, .5, 1, 1.5, 2, 3, 4, 6``;
  ``<m>.weight_scale`` float8_e4m3fn ``[out, in/16]``, ``<m>.weight_global_scale`` float32 ``[1]``:
  ``w = fp4 * weight_scale / weight_global_scale``. Quantizer: ``gs = 448 * 6 / max|x|``,
  ``weight_scale = fp8(gs * max|group| / 6)``, codes ``x * gs / weight_scale`` rounded to FP4.

How each is seen (``Scaled``): FP8 codes times the scale grid; int codes (int8) times the scale per group or
row. A zero point is folded honestly into the codes: ``q - z`` (int16; exact) times the scale is the
value compressed-tensors' ``_dequantize`` computes, so the view stays codes-times-scale and each element's
unit is its own scale (not the ``dense`` path). NVFP4 codes are held exactly as float8_e4m3fn values with
the FP4 spacing as their step table (``Scaled.steps``) and ``weight_scale / weight_global_scale`` as the
grid. Every element is judged in units of its own quantization step (the scale for integer codes, the
FP8/FP4 spacing at the code times the scale for float codes): bound 0.55 with float32 scales (round to
nearest, and a rounded zero point shifts the grid by at most half a step, so clamping stays within it),
widened by the rounding of 16-bit arithmetic when the scales are bf16/fp16 (``_bound``). An NVFP4 view lists
the ways a converter misreads it (``misreadings``: the global scale multiplied as modelopt's is, nibbles
swapped, a larger block hard-coded, the bytes read as FP8 or the nibbles as int4); a float side equal to one is
named by it. So do the FP8 views (codes read as e5m2 or uint8, scales divided or applied along the other axis)
and the packed int views (the field offset not subtracted or subtracted twice, each word's fields reversed, the
zero point added, scales divided, a wider group).

Activation and KV-cache quantization parameters (``input_scale``, ``k_scale`` ...) are run-time settings,
not weights: the reader skips them by name (coverage lists them). Anything else in ``quantization_config``
that this reader does not know (a quant_method, format, strategy, type, num_bits, sparsity or transform
config, activation-ordered groups, a non-compressed status) is refused with one line naming it and the
config file: such a checkpoint is never compared as raw codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ckdiff.errors import InputError
from ckdiff.tensor.fp4 import (  # noqa: F401 (FP4: re-exported)
    _FP4_BYTES, FP4, FP4_STEPS, FP4_VALUES, INT4_VALUES, READ_BLOCKS, blocks_misread, round_fp4,
)
from ckdiff.tensor.blockscaled import FLOAT8, BlockScaled, Scaled, fold
from ckdiff.tensor.lazy import Checkpoint, LazyTensor

METHOD = "compressed-tensors"
# quantization_config quant_methods some reader here handles: "fp8" is the block-scaled FP8 of DeepSeek-V3 and
# transformers' FineGrainedFP8 (``<name>_scale_inv``, formats/fp8.py)
KNOWN_METHODS = (METHOD, "fp8", "mxfp4", "modelopt")  # read by formats/fp8.py, mxfp4.py, modelopt.py
FORMATS = ("float-quantized", "pack-quantized", "nvfp4-pack-quantized")
STRATEGIES = {"float-quantized": ("tensor", "channel", "group", "block"), "pack-quantized": ("channel", "group"),
              "nvfp4-pack-quantized": ("tensor_group",)}
TYPES = {"float-quantized": ("float", (8,)), "pack-quantized": ("int", tuple(range(2, 9))),
         "nvfp4-pack-quantized": ("float", (4,))}
# run-time activation / KV-cache quantization parameters stored beside the weights: skipped, not weights
RUNTIME_SUFFIXES = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
                    "output_global_scale", "k_scale", "v_scale", "q_scale", "k_zero_point", "v_zero_point")
WEIGHT_PARTS = ("weight_scale", "weight_packed", "weight_shape", "weight_zero_point", "weight_global_scale",
                "weight_g_idx")
E4M3_MAX = 448.0
FP4_MAX = 6.0
MAX_DIM = 1 << 31
ARITH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}  # config.json dtype
BOUND = 0.55




# ------------------------------------------------------------------ quantization_config
@dataclass(frozen=True)
class Scheme:
    """The weight scheme of a compressed-tensors checkpoint, every field checked."""
    format: str
    type: str
    bits: int
    strategy: str
    symmetric: bool
    group: Optional[int]
    block: Optional[tuple]

    def describe(self) -> str:
        how = {"group": f"group {self.group}", "tensor_group": f"group {self.group}",
               "block": f"block {self.block[0]}x{self.block[1]}" if self.block else "block"}.get(self.strategy,
                                                                                               self.strategy)
        kind = "nvfp4" if self.format == "nvfp4-pack-quantized" else \
            (f"fp{self.bits}" if self.type == "float" else f"int{self.bits}")
        return f"{kind} {how}" + ("" if self.symmetric else " asymmetric")


def quant_config(ck: Checkpoint):
    cfg = ck.config if isinstance(ck.config, dict) else {}
    return cfg.get("quantization_config")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v) -> str:
    """A config value for a message: its repr, cut to 60 characters (one line whatever it holds)."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _refuse(where: str, what: str, known: str = ""):
    """One line naming the value of quantization_config that is not read (and what is)."""
    raise InputError(where, f"quantization_config: compressed-tensors {what} is not read" +
                     (f" (read: {known})" if known else ""))


def scheme_of(q: dict, where: str) -> Scheme:
    """The one weight scheme of a compressed-tensors quantization_config; refuses what is not read here."""
    status = q.get("quantization_status")
    if status != "compressed":
        _refuse(where, f"quantization_status {_show(status)}", "'compressed': codes and scales")
    for key in ("sparsity_config", "transform_config"):
        v = q.get(key)
        if v not in (None, {}):
            _refuse(where, f"{key} {_show(v)} (sparse or transformed weights)")
    top = q.get("format")
    if top is not None and not isinstance(top, str):
        _refuse(where, f"format {_show(top)}")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        _refuse(where, f"config_groups {_show(groups)}", "a non-empty mapping of schemes")
    found = []
    for gname, g in groups.items():
        if not isinstance(g, dict):
            _refuse(where, f"config group {_show(gname)}: {_show(g)}")
        w = g.get("weights")
        if not isinstance(w, dict):
            _refuse(where, f"config group {_show(gname)} without weight quantization args")
        fmt = g.get("format", None) or top
        found.append((fmt, _weights(fmt, w, where)))
    if any(f != found[0] for f in found):
        _refuse(where, "config groups with different weight schemes (" +
                ", ".join(sorted({f"{f} {s.describe()}" for f, s in found})) + ")")
    return found[0][1]


def _weights(fmt, w: dict, where: str) -> Scheme:
    if fmt not in FORMATS:
        _refuse(where, f"format {_show(fmt)}", ", ".join(FORMATS))
    typ, nb = w.get("type"), w.get("num_bits")
    want_type, want_bits = TYPES[fmt]
    if typ != want_type:
        _refuse(where, f"{fmt} with weight type {_show(typ)}", want_type)
    if not _int(nb) or nb not in want_bits:
        _refuse(where, f"{fmt} with num_bits {_show(nb)}", ", ".join(map(str, want_bits)))
    sym = w.get("symmetric", True)
    if not isinstance(sym, bool):
        _refuse(where, f"symmetric {_show(sym)}", "true, false")
    if not sym and fmt != "pack-quantized":
        _refuse(where, f"{fmt} with asymmetric weights (symmetric: false)")
    if w.get("dynamic", False) is not False:
        _refuse(where, f"dynamic {_show(w.get('dynamic'))} weight quantization (no stored scales)")
    act = w.get("actorder")
    if act not in (None, False, "static", "weight"):
        _refuse(where, f"actorder {_show(act)} (activation-ordered groups with weight_g_idx)")
    g = w.get("group_size")
    strategy = w.get("strategy")
    if strategy is None:  # compressed-tensors infers it from group_size (quant_args.py)
        strategy = "tensor" if g is None else ("channel" if g == -1 else "group")
    if not isinstance(strategy, str) or strategy not in STRATEGIES[fmt]:
        _refuse(where, f"{fmt} with strategy {_show(strategy)}", ", ".join(STRATEGIES[fmt]))
    group = block = None
    if strategy in ("group", "tensor_group"):
        if not _int(g) or not 0 < g <= MAX_DIM:
            _refuse(where, f"{strategy} strategy with group_size {_show(g)}")
        if fmt == "nvfp4-pack-quantized" and g != 16:
            _refuse(where, f"{fmt} with group_size {_show(g)} (NVFP4 groups are 16)")
        group = g
    if strategy == "block":
        b = w.get("block_structure")
        if not (isinstance(b, list) and len(b) == 2 and all(_int(x) and 0 < x <= MAX_DIM for x in b)):
            _refuse(where, f"block strategy with block_structure {_show(b)}")
        block = tuple(b)
    sd = w.get("scale_dtype")
    if fmt == "nvfp4-pack-quantized" and sd not in (None, "torch.float8_e4m3fn"):
        _refuse(where, f"{fmt} with scale_dtype {_show(sd)}")
    if fmt != "nvfp4-pack-quantized" and sd is not None:
        _refuse(where, f"{fmt} with scale_dtype {_show(sd)}")
    return Scheme(fmt, typ, nb, strategy, sym, group, block)


# ------------------------------------------------------------------ views
def _arith(scale_dtype: torch.dtype) -> torch.dtype:
    """The dtype compressed-tensors' quantizer computes in when config.json does not say: the weight's, which
    is its scales' (float32 for other scale dtypes)."""
    return scale_dtype if scale_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def _eps(dtype: torch.dtype) -> float:
    """compressed-tensors' stand-in for a zero scale (``_get_dtype_eps``)."""
    if dtype == torch.float8_e4m3fn:
        return 0.125
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 1.0


def _units_max(x: torch.Tensor, br: int, bc: int) -> tuple:
    """(min(x, 0), max(x, 0)) over blocks of ``br`` x ``bc`` (zero padding changes neither)."""
    R, C = x.shape
    xp = torch.zeros(-(-R // br) * br, -(-C // bc) * bc)
    xp[:R, :C] = x.float()
    b = xp.reshape(xp.shape[0] // br, br, xp.shape[1] // bc, bc)
    return b.amin(dim=(1, 3)).clamp(max=0), b.amax(dim=(1, 3)).clamp(min=0)


def _bound(scale_dtype: torch.dtype, levels: float) -> float:
    """0.55 step plus the rounding of ``x / s`` in the scales' dtype (``levels``: the largest |x / s| in steps)."""
    u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(scale_dtype, 0.0)
    return round(BOUND + levels * u, 3)


class _CtView(BlockScaled):
    """Shared by the three formats: a scale tensor ``s`` read as a grid of blocks ``(br, bc)``."""
    scheme: Scheme
    arith: Optional[torch.dtype] = None  # the model's dtype (config.json), which the quantizer computed in

    def _scaled(self, codes: torch.Tensor, start: int, stop: int, **kw) -> Scaled:
        """``codes`` of rows [start, stop) with their scale grid: block rows of ``br`` read compactly (a row
        block starting inside a block row is expanded, ``Scaled.rebased``)."""
        br, bc = self.block
        if br == 1:
            grid = self.s.rows(start, stop).float().reshape(stop - start, -1)
            return Scaled(codes, grid, (1, bc), **kw)
        g0, g1 = start // br, -(-stop // br)
        grid = self.s.rows(g0, g1).float() if len(self.s.shape) == 2 else self.s.load().float().reshape(1, 1)
        return Scaled(codes, grid, (br, bc), **kw).rebased(start - g0 * br)

    @property
    def row_align(self) -> int:
        return self.block[0] if self.block[0] < self.shape[0] else 1

    def problems(self, s: Scaled) -> list[str]:
        out = []
        if not bool((s.grid > 0).all()):
            out.append("non-positive or non-finite scales")
        if s.codes.dtype in FLOAT8 and s.codes.numel() and bool(torch.isnan(s.codes.float()).any()):
            out.append("NaN codes")
        return out


class CtFloat(_CtView):
    """float-quantized: float8_e4m3fn ``weight`` times ``weight_scale`` per tensor, row, group or block."""

    def __init__(self, name: str, w: LazyTensor, s: LazyTensor, sch: Scheme, where: str):
        self.w, self.s, self.scheme = w, s, sch
        if len(w.shape) != 2 or w.dtype != torch.float8_e4m3fn:
            raise InputError(where, f"{w.name}: {list(w.shape)} {str(w.dtype).replace('torch.', '')} is not a 2-D "
                                    f"float8_e4m3fn weight of compressed-tensors float-quantized")
        R, C = w.shape
        blk = {"tensor": (R, C), "channel": (1, C), "group": (1, sch.group), "block": sch.block}[sch.strategy]
        self.block = (min(blk[0], R) or 1, min(blk[1], C) or 1)
        want = (math.ceil(R / self.block[0]), math.ceil(C / self.block[1]))
        ok = tuple(s.shape) == want or (sch.strategy == "tensor" and tuple(s.shape) in ((1,), ()))
        if not ok or not s.dtype.is_floating_point:
            raise InputError(where, f"{s.name}: scales {list(s.shape)} {str(s.dtype).replace('torch.', '')} do not "
                                    f"fit {sch.describe()} quantization of {name} {list(w.shape)} "
                                    f"(expected {list(want)})")
        super().__init__(name, (R, C), w.origin, f"compressed-tensors {sch.describe()}",
                         _bound(s.dtype, 16), (w.name, s.name))

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.s.nbytes

    def scaled(self, start: int, stop: int) -> Scaled:
        return self._scaled(self.w.rows(start, stop), start, stop)

    def misreadings(self, start: int, stop: int) -> dict:
        """Values a converter that misreads the encoding writes, by the finding each names: the e4m3 codes decoded
        as e5m2 or cast as the integers 0..255 (``fp8.e4m3_misread``), each code divided by its scale (the scale
        taken for an inverse, as DeepSeek's ``weight_scale_inv`` is not), and, where the shapes let a broadcast
        through, the scales applied along the other axis: a per-channel scale ``[out, 1]`` flattened and
        broadcast over the columns of a square weight (column j takes row j's scale), a square grid of group or
        block scales read transposed."""
        from ckdiff.formats.fp8 import e4m3_misread
        s = self.scaled(start, stop)
        R, C = self.shape
        out = {"codes-of-another-encoding": e4m3_misread(s),
               "scale-reciprocal": ({"unit": self.scheme.strategy}, lambda: s.codes.float() / s.per_element())}
        br, bc = self.block
        full = self.s.load().float().reshape(-(-R // br), -(-C // bc))
        if self.scheme.strategy == "channel" and R == C > 1:
            out["scale-transposed"] = ({"unit": "per-output-channel"},
                                       lambda: s.codes.float() * full.reshape(1, -1))
        elif self.scheme.strategy in ("group", "block") and full.shape[0] == full.shape[1] > 1:
            def transposed():
                per = full.T.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:R, :C]
                return s.codes.float() * per[start:stop]
            out["scale-transposed"] = ({"unit": self.scheme.strategy}, transposed)
        return out

    def reference(self, x: torch.Tensor) -> Optional[Scaled]:
        """compressed-tensors' min-max quantizer on float rows ``x`` (``calculate_qparams`` + ``_quantize``)."""
        if x.shape[1] != self.shape[1]:
            return None
        br, bc = self.block
        dt = self.arith or _arith(self.s.dtype)
        lo, hi = (v.to(dt) for v in _units_max(x, br, bc))
        s = torch.maximum(-lo, hi) / torch.tensor(E4M3_MAX, dtype=dt)
        s = torch.where(s == 0, torch.tensor(_eps(dt), dtype=dt), s)
        per = s.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:x.shape[0], :x.shape[1]]
        codes = (x.to(dt) / per).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return Scaled(codes, s.float(), (br, bc))


def _unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 words ``[rows, W]`` -> the first ``n`` unsigned ``bits``-bit fields of each row's little-endian
    bit stream (``pack_to_int32``), as int16."""
    R = words.shape[0]
    w = words.contiguous().numpy().astype("<i4", copy=False).view("<u4")
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
        v = (w[:, :, None] >> shifts).astype(np.uint8) & np.uint8((1 << bits) - 1)  # fields of <= 8 bits
        v = v.reshape(R, -1)
    else:
        stream = np.unpackbits(w.view(np.uint8).reshape(R, -1), axis=1, bitorder="little")
        m = stream.shape[1] // bits
        v = (stream[:, :m * bits].reshape(R, m, bits).astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(-1)
    return torch.from_numpy(np.array(v[:, :n], dtype=np.int16))  # one copy


def _unpack_reversed(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` ``bits``-bit fields of each row (``bits`` dividing 32) with each 32-bit word's fields taken
    from its high end: what a reader that unpacks the word in the opposite order sees (float32)."""
    w = words.contiguous().numpy().astype("<i4", copy=False).view("<u4")
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32)[::-1] * bits).astype(np.uint32)
    v = (w[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    return torch.from_numpy(v.reshape(w.shape[0], -1)[:, :n].astype(np.float32))


class CtPacked(_CtView):
    """pack-quantized: int codes packed in int32 words, a scale per row or per group of columns, and a zero
    point per scale when asymmetric (folded into the codes: ``q - z``, int16)."""

    def __init__(self, name: str, packed: LazyTensor, shape, s: LazyTensor, zp: Optional[LazyTensor], sch: Scheme,
                 where: str):
        self.packed, self.s, self.zp, self.scheme = packed, s, zp, sch
        R, C = shape
        bits = sch.bits
        if packed.dtype != torch.int32 or tuple(packed.shape) != (R, math.ceil(C * bits / 32)):
            raise InputError(where, f"{packed.name}: {list(packed.shape)} {str(packed.dtype).replace('torch.', '')} is "
                                    f"not {R} rows of {C} int{bits} codes packed in int32 "
                                    f"(expected [{R}, {math.ceil(C * bits / 32)}] int32)")
        G = 1 if sch.strategy == "channel" else math.ceil(C / sch.group)
        self.block = (1, C if sch.strategy == "channel" else min(sch.group, C))
        if tuple(s.shape) != (R, G) or not s.dtype.is_floating_point:
            raise InputError(where, f"{s.name}: scales {list(s.shape)} {str(s.dtype).replace('torch.', '')} do not "
                                    f"fit {sch.describe()} quantization of {name} [{R}, {C}] (expected [{R}, {G}])")
        if zp is not None and (zp.dtype != torch.int32 or tuple(zp.shape) != (math.ceil(R * bits / 32), G)):
            raise InputError(where, f"{zp.name}: {list(zp.shape)} {str(zp.dtype).replace('torch.', '')} is not "
                                    f"{R} x {G} int{bits} zero points packed along rows "
                                    f"(expected [{math.ceil(R * bits / 32)}, {G}] int32)")
        self._z: Optional[torch.Tensor] = None
        levels = 2 ** bits if zp is not None else 2 ** (bits - 1)
        stored = (packed.name, name[: -len("weight")] + "weight_shape", s.name) + ((zp.name,) if zp is not None else ())
        super().__init__(name, (R, C), packed.origin, f"compressed-tensors {sch.describe()}",
                         _bound(s.dtype, levels), stored)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.s.nbytes + (self.zp.nbytes if self.zp is not None else 0)

    def zero_points(self) -> torch.Tensor:
        """Signed zero points [R, G] (int16), unpacked once."""
        if self._z is None:
            R = self.shape[0]
            self._z = _unpack(self.zp.load().T.contiguous(), self.scheme.bits, R).T.contiguous() \
                - (1 << (self.scheme.bits - 1))
        return self._z

    def scaled(self, start: int, stop: int) -> Scaled:
        bits, C = self.scheme.bits, self.shape[1]
        q = _unpack(self.packed.rows(start, stop), bits, C).sub_(1 << (bits - 1))
        if self.zp is None:
            return self._scaled(q.to(torch.int8), start, stop)
        z = self.zero_points()[start:stop]
        bc = self.block[1]
        return self._scaled(q.sub_(z.repeat_interleave(bc, 1)[:, :C] if bc > 1 else z), start, stop)

    def misreadings(self, start: int, stop: int) -> dict:
        """Values a converter that misreads the encoding writes, by the finding each names. The stored fields
        hold ``q + 2**(bits-1)`` (``pack_to_int32``): read as the codes (the offset never subtracted) or with it
        subtracted twice (``code-offset-wrong``); each 32-bit word's fields read from its high end for 2, 4 and 8
        bits (``word-order-reversed``); the zero point added instead of subtracted (``offset-sign-wrong``,
        asymmetric only); each code divided by its scale (``scale-reciprocal``); and a larger group size than the
        file's (16 to 128) hard-coded, element j taking the scale and zero point of group j // g of its row
        (``group-size-wrong``: a smaller one indexes past the scales)."""
        bits, C = self.scheme.bits, self.shape[1]
        off = 1 << (bits - 1)
        words = self.packed.rows(start, stop)
        fields = _unpack(words, bits, C).float()
        q = fields - off
        s = self.s.rows(start, stop).float().reshape(stop - start, -1)
        z = self.zero_points()[start:stop].float() if self.zp is not None else torch.zeros_like(s)
        bc = self.block[1]

        def val(codes, g=bc, sign=-1.0):
            idx = torch.arange(C) // g
            return (codes + sign * z[:, idx]) * s[:, idx]
        out = {"code-offset-wrong": [
            ({"how": "as their stored fields, without subtracting the offset", "offset": off}, lambda: val(fields)),
            ({"how": "with the offset subtracted twice", "offset": off}, lambda: val(q - off))]}
        if 32 % bits == 0 and bits < 32:
            out["word-order-reversed"] = ({"bits": bits}, lambda: val(_unpack_reversed(words, bits, C) - off))
        if self.zp is not None:
            out["offset-sign-wrong"] = ({"read": "adds each group's zero point to the codes, (q + z) * s",
                                         "right": "(q - z) * s"}, lambda: val(q, sign=1.0))
        out["scale-reciprocal"] = ({"unit": self.scheme.strategy},
                                   lambda: (q - z[:, torch.arange(C) // bc]) / s[:, torch.arange(C) // bc])
        if self.scheme.strategy == "group":
            # from the first g >= C on, every element takes its row's first group: one variant of those
            reads = [g for g in READ_BLOCKS if g > bc and not any(bc < h < g and h >= C for h in READ_BLOCKS)]
            wider = [({"stored": bc, "read": g}, lambda g=g: val(q, g)) for g in reads]
            if wider:
                out["group-size-wrong"] = wider
        return out

    def reference(self, x: torch.Tensor) -> Optional[Scaled]:
        """compressed-tensors' min-max quantizer on float rows ``x`` (``calculate_qparams`` + ``_quantize``)."""
        if x.shape[1] != self.shape[1]:
            return None
        bits, bc = self.scheme.bits, self.block[1]
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        dt = self.arith or _arith(self.s.dtype)
        lo, hi = (v.to(dt) for v in _units_max(x, 1, bc))
        if self.zp is None:
            s = torch.maximum(-lo, hi) / torch.tensor((qmax - qmin) / 2, dtype=dt)
            z = torch.zeros_like(s)
        else:
            s = (hi - lo) / torch.tensor(qmax - qmin, dtype=dt)
            z = torch.round((qmin - lo / s).clamp(qmin, qmax)).nan_to_num(0.0)  # before the eps, as upstream
        s = torch.where(s == 0, torch.tensor(_eps(dt), dtype=dt), s)
        C = x.shape[1]
        per_s = s.repeat_interleave(bc, 1)[:, :C]
        per_z = z.repeat_interleave(bc, 1)[:, :C]
        q = torch.round(x.to(dt) / per_s + per_z).clamp(qmin, qmax)
        codes = (q.float() - per_z.float()).to(torch.int8 if self.zp is None else torch.int16)
        return Scaled(codes, s.float(), self.block)


class CtNvfp4(_CtView):
    """nvfp4-pack-quantized: FP4 (e2m1) codes two per byte, an FP8 scale per 16 columns, a global scale."""

    def __init__(self, name: str, packed: LazyTensor, s: LazyTensor, gs: LazyTensor, sch: Scheme, where: str):
        self.packed, self.s, self.gs, self.scheme = packed, s, gs, sch
        if packed.dtype != torch.uint8 or len(packed.shape) != 2:
            raise InputError(where, f"{packed.name}: {list(packed.shape)} {str(packed.dtype).replace('torch.', '')} "
                                    "is not 2-D uint8 NVFP4 codes")
        R, C = packed.shape[0], packed.shape[1] * 2
        G = math.ceil(C / sch.group)
        self.block = (1, sch.group)
        if tuple(s.shape) != (R, G) or s.dtype != torch.float8_e4m3fn:
            raise InputError(where, f"{s.name}: scales {list(s.shape)} {str(s.dtype).replace('torch.', '')} do not fit "
                                    f"NVFP4 {name} [{R}, {C}] (expected [{R}, {G}] float8_e4m3fn)")
        if gs.numel != 1 or gs.dtype != torch.float32:
            raise InputError(where, f"{gs.name}: {list(gs.shape)} {str(gs.dtype).replace('torch.', '')} is not one "
                                    "float32 global scale")
        self._g: Optional[float] = None
        super().__init__(name, (R, C), packed.origin, f"compressed-tensors {sch.describe()}", BOUND,
                         (packed.name, s.name, gs.name))

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.s.nbytes + self.gs.nbytes

    def global_scale(self) -> torch.Tensor:
        return self.gs.load().float().reshape(())

    def _nibbles(self, start: int, stop: int, swap: bool = False) -> torch.Tensor:
        b = self.packed.rows(start, stop).to(torch.int64)
        return torch.stack([b >> 4, b & 15] if swap else [b & 15, b >> 4], -1).reshape(stop - start, self.shape[1])

    def misreadings(self, start: int, stop: int) -> dict:
        """Values a converter that misreads the encoding writes, by the finding each names (the kinds and readings
        of modelopt's NVFP4, ``formats/modelopt.py``; ``compare/diagnose_scaled.py`` tries them)."""
        s, g, C = self.s.rows(start, stop).float(), self.global_scale(), self.shape[1]
        grp = self.block[1]
        nib = self._nibbles(start, stop)
        return {
            # modelopt's convention applied to compressed-tensors' global scale: multiplied instead of divided
            "scale-reciprocal": ({"unit": "global"}, FP4_VALUES[nib] * s.repeat_interleave(grp, 1)[:, :C] * g),
            "nibbles-swapped": ({"blocks": int(s.numel())},
                                FP4_VALUES[self._nibbles(start, stop, True)] * s.repeat_interleave(grp, 1)[:, :C] / g),
            "block-size-wrong": blocks_misread(FP4_VALUES[nib] / g, s, grp, self.s.load().float(), start * C),
            "codes-of-another-encoding": [
                ({"codes": "FP4 e2m1, two per byte", "read": "FP8 e4m3, one per byte",
                  "shape": f": a [{stop - start}, {C // 2}] tensor where the weight is [{stop - start}, {C}]"},
                 lambda: self.packed.rows(start, stop).contiguous().view(torch.float8_e4m3fn).float()
                 * s.repeat_interleave(grp // 2, 1)[:, :C // 2] / g),
                ({"codes": "FP4 e2m1, two per byte", "read": "int4, each nibble a signed integer", "shape": ""},
                 lambda: INT4_VALUES[nib] * s.repeat_interleave(grp, 1)[:, :C] / g)],
        }

    def scaled(self, start: int, stop: int) -> Scaled:
        idx = self._nibbles(start, stop)
        codes = _FP4_BYTES[idx].view(torch.float8_e4m3fn)
        grid = self.s.rows(start, stop).float() / self.global_scale()
        return Scaled(codes, grid, self.block, steps=FP4_STEPS)

    def problems(self, s: Scaled) -> list[str]:
        out = super().problems(s)
        g = self.global_scale()
        if not bool(torch.isfinite(g)) or float(g) <= 0:
            out.append("non-positive or non-finite global scale")
        return out

    def reference(self, x: torch.Tensor) -> Optional[Scaled]:
        """compressed-tensors' NVFP4 quantizer on float rows ``x`` (``generate_gparam``, ``calculate_qparams``,
        ``_round_to_fp4``)."""
        if x.shape[1] != self.shape[1]:
            return None
        xf, dt = x.float(), self.arith or torch.float32
        amax = x.to(dt).abs().max().clamp(min=torch.finfo(dt).tiny) if x.numel() else torch.tensor(1.0, dtype=dt)
        gs = (E4M3_MAX * FP4_MAX / amax).float()
        gs = gs if bool(torch.isfinite(gs)) else torch.tensor(1.0)
        lo, hi = (v.to(dt) for v in _units_max(xf, 1, self.block[1]))
        local = (torch.maximum(-lo, hi) / torch.tensor(FP4_MAX, dtype=dt)).float()
        s = (gs * local).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
        s = torch.where(s == 0, torch.tensor(0.125), s)
        eff = (s / gs).repeat_interleave(self.block[1], 1)[:, :x.shape[1]]
        codes = round_fp4((xf / eff).clamp(-FP4_MAX, FP4_MAX)).to(torch.float8_e4m3fn)
        return Scaled(codes, s / gs, self.block, steps=FP4_STEPS)


# ------------------------------------------------------------------ the encoding
def _weight_shape(t: LazyTensor, where: str) -> tuple:
    if t.dtype not in (torch.int64, torch.int32) or t.numel != 2:
        raise InputError(where, f"{t.name}: {list(t.shape)} {str(t.dtype).replace('torch.', '')} is not a 2-entry "
                                "integer weight_shape")
    v = [int(x) for x in t.load().reshape(-1).tolist()]
    if not all(0 < x <= MAX_DIM for x in v):
        raise InputError(where, f"{t.name}: weight_shape {v} out of range")
    return tuple(v)


def ct_view(ck: Checkpoint) -> Checkpoint:
    """A compressed-tensors checkpoint with each quantized module's codes and scales as one view under
    ``<m>.weight``; a quantization_config of a quant_method no reader here knows is refused by name."""
    q = quant_config(ck)
    if q is None:
        return ck
    where = str(Path(ck.path) / "config.json") if Path(ck.path).is_dir() else str(ck.path)
    if not isinstance(q, dict):
        raise InputError(where, f"quantization_config {str(q)[:60]!r} is not a mapping")
    method = q.get("quant_method")
    if method is None and isinstance((ck.config or {}).get("quantization"), dict):
        return ck  # mlx-lm writes its "quantization" object under this name too (formats/mlx.py)
    if method not in KNOWN_METHODS:
        raise InputError(where, f"quantization_config quant_method {_show(method)} is not read "
                                f"(read: {', '.join(KNOWN_METHODS)})")
    if method != METHOD:
        return ck
    sch = scheme_of(q, where)
    t = ck.tensors
    mods: dict = {}
    skipped: dict = {}
    for k, v in t.items():
        m, _, leaf = k.rpartition(".")
        if leaf in RUNTIME_SUFFIXES:
            skipped[k] = "activation / KV-cache quantization parameter (applied at run time, not a weight)"
        elif leaf in WEIGHT_PARTS or (leaf == "weight" and v.dtype in FLOAT8):
            mods.setdefault(m, set()).add(leaf)
    views: dict = {}
    cfg = ck.config if isinstance(ck.config, dict) else {}
    model_dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    arith = ARITH.get(model_dtype) if isinstance(model_dtype, str) else None
    for m, parts in mods.items():
        name = f"{m}.weight"
        p = lambda leaf: t.get(f"{m}.{leaf}")  # noqa: E731
        need = {"float-quantized": ("weight", "weight_scale"),
                "pack-quantized": ("weight_packed", "weight_shape", "weight_scale"),
                "nvfp4-pack-quantized": ("weight_packed", "weight_scale", "weight_global_scale")}[sch.format]
        need += ("weight_zero_point",) if not sch.symmetric else ()
        missing = [f"{m}.{n}" for n in need if f"{m}.{n}" not in t]
        if missing:
            raise InputError(where, f"{name}: {', '.join(missing)} missing for {sch.format} {sch.describe()}")
        if sch.format != "float-quantized" and name in t:
            raise InputError(where, f"{name}: a float weight stored beside its {sch.format} codes "
                                    f"({m}.weight_packed): which one is the weight is ambiguous")
        extra = sorted(parts - set(need) - {"weight"})
        if extra:
            raise InputError(where, f"{name}: {', '.join(f'{m}.{e}' for e in extra)} not expected for {sch.format} "
                                    f"{sch.describe()}")
        if sch.format == "float-quantized":
            views[name] = CtFloat(name, p("weight"), p("weight_scale"), sch, where)
        elif sch.format == "pack-quantized":
            if len(p("weight_packed").shape) != 2:
                raise InputError(where, f"{m}.weight_packed: {list(p('weight_packed').shape)}: only 2-D packed "
                                        "weights are read")
            views[name] = CtPacked(name, p("weight_packed"), _weight_shape(p("weight_shape"), where),
                                   p("weight_scale"), p("weight_zero_point"), sch, where)
        else:
            views[name] = CtNvfp4(name, p("weight_packed"), p("weight_scale"), p("weight_global_scale"), sch, where)
    for v in views.values():
        v.arith = arith
    if skipped:
        ck = Checkpoint(ck.path, ck.format, {k: v for k, v in t.items() if k not in skipped}, ck.config,
                        {**(ck.meta or {}), "skipped": {**(ck.meta or {}).get("skipped", {}), **skipped}})
    if not views:
        return ck
    bound = sorted({v.bound for v in views.values()})
    note = (f"compressed-tensors {sch.format} ({sch.describe()}): {len(views)} weights read as their dequantized "
            f"values, judged in units of each element's own quantization step (bound {', '.join(map(str, bound))})")
    return fold(ck, views, f"compressed-tensors {sch.format}", note)


def _declare() -> None:
    from ckdiff.formats.registry import Encoding, register_encoding
    register_encoding(Encoding("compressed-tensors", "compressed-tensors float-quantized (FP8), pack-quantized "
                                                     "(int2..int8, zero points folded) and nvfp4-pack-quantized "
                                                     "weights, read as logical block-scaled views", ct_view))


_declare()
