"""NVFP4 and MXFP8 checkpoints in NVIDIA Model Optimizer's unified HF export, read as logical block-scaled views.

Facts (NVIDIA/TensorRT-Model-Optimizer ``modelopt/torch/quantization/qtensor/nvfp4_tensor.py``
``NVFP4QTensor`` at commit ``0ad6e5f``; ``docs/source/deployment/3_unified_hf.rst``):

- The directory holds ``hf_quant_config.json`` ``{"quantization": {"quant_algo": "NVFP4", "group_size": 16,
  ...}}`` (newer exports also write ``config.json`` ``quantization_config.quant_method: modelopt``).
- Per quantized linear ``m``: ``m.weight`` uint8 ``[out, in/2]``, two FP4 (e2m1) codes per byte, the even
  column in the low nibble; ``m.weight_scale`` float8_e4m3fn ``[out, in/16]``; ``m.weight_scale_2`` float32,
  one per tensor; ``m.input_scale`` float32 (activations, not a weight: folded, unused).
- value ``= fp4 * weight_scale * weight_scale_2``, with ``weight_scale_2 = amax / (6 * 448)``: the reciprocal
  of compressed-tensors' ``weight_global_scale = 6 * 448 / amax``, which divides (``formats/compressed_tensors.py``).
  A converter between the two that forgets the inversion writes every value scaled by ``amax**2 / 2688**2``.
- Quantizer: block scale ``amax_block / (6 * weight_scale_2)`` cast to float8_e4m3fn (0 -> 1), codes rounded
  to e2m1 with ties at 0.75, 1.75 and 2.5 going up and the others down (``_cast_fp4``): half a step, bound 0.55.
- MXFP8 (``quant_algo: MXFP8``, ``mxfp8_tensor.py`` ``MXFP8QTensor``): ``m.weight`` float8_e4m3fn ``[out, in]``,
  ``m.weight_scale`` uint8 ``[out, in/32]`` E8M0 (``2 ** (byte - 127)``); exponent ``ceil(log2(amax / 448))``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ckdiff.errors import InputError
from ckdiff.io.inputs import read_json_object
from ckdiff.tensor.blockscaled import BlockScaled, Scaled, fold
from ckdiff.tensor.fp4 import FP4_BYTES, FP4_STEPS, FP4_VALUES, INT4_VALUES, blocks_misread, e8m0_problems, e8m0_scales
from ckdiff.tensor.lazy import Checkpoint, LazyTensor

QUANT_FILE = "hf_quant_config.json"
READ_ALGOS = ("NVFP4", "MXFP8")
GROUP = {"NVFP4": 16, "MXFP8": 32}
E4M3_MAX, FP4_MAX = 448.0, 6.0
BOUND = 0.55
G16, G32 = GROUP["NVFP4"], GROUP["MXFP8"]
_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def cast_fp4(x: torch.Tensor) -> torch.Tensor:
    """e2m1 nibbles of ``x`` (already divided by its scales) as modelopt rounds them: the index of the first
    bound at or above ``|x|``, one more at the ties 0.75, 1.75 and 2.5; saturating at 6."""
    a = x.abs()
    idx = torch.searchsorted(_BOUNDS, a.contiguous()) + ((a == 0.75) | (a == 1.75) | (a == 2.5)).long()
    return idx.clamp(max=7) + 8 * (x < 0).long()


class ModeloptNvfp4(BlockScaled):
    """A linear's NVFP4 weight ``[out, in]`` from modelopt's packed codes, FP8 block scales and global scale."""

    def __init__(self, name: str, packed: LazyTensor, s: LazyTensor, s2: LazyTensor, extra: tuple = ()):
        where = packed.origin
        if packed.dtype != torch.uint8 or len(packed.shape) != 2:
            raise InputError(where, f"{packed.name}: {list(packed.shape)} {packed.dtype} is not 2-D uint8 NVFP4 codes")
        R, C = packed.shape[0], packed.shape[1] * 2
        if C % G16 or tuple(s.shape) != (R, C // G16) or s.dtype != torch.float8_e4m3fn:
            raise InputError(where, f"{s.name}: {list(s.shape)} {s.dtype} does not fit NVFP4 {name} [{R}, {C}] "
                                    f"(expected [{R}, {C // G16}] float8_e4m3fn)")
        if s2.numel != 1 or s2.dtype != torch.float32:
            raise InputError(where, f"{s2.name}: {list(s2.shape)} {s2.dtype} is not one float32 weight_scale_2")
        self.packed, self.s, self.s2 = packed, s, s2
        super().__init__(name, (R, C), where, "NVFP4 (modelopt) e2m1, e4m3 per 16", BOUND,
                         (packed.name, s.name, s2.name, *extra))

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.s.nbytes + self.s2.nbytes

    def global_scale(self) -> torch.Tensor:
        return self.s2.load().float().reshape(())

    def _nibbles(self, start: int, stop: int, swap: bool = False) -> torch.Tensor:
        b = self.packed.rows(start, stop).to(torch.int64)
        pair = (b >> 4, b & 15) if swap else (b & 15, b >> 4)
        return torch.stack(pair, -1).reshape(stop - start, self.shape[1])

    def scaled(self, start: int, stop: int) -> Scaled:
        codes = FP4_BYTES[self._nibbles(start, stop)].view(torch.float8_e4m3fn)
        return Scaled(codes, self.s.rows(start, stop).float() * self.global_scale(), (1, G16), steps=FP4_STEPS)

    def raw(self, start: int, stop: int) -> torch.Tensor:
        return torch.cat([self.packed.rows(start, stop).flatten(), self.s.rows(start, stop).view(torch.uint8).flatten(),
                          self.s2.load().reshape(-1).view(torch.uint8)])

    def problems(self, s: Scaled) -> list[str]:
        g = self.global_scale()
        return [] if bool(torch.isfinite(g)) and float(g) > 0 else ["non-positive or non-finite weight_scale_2"]

    def reference(self, x: torch.Tensor) -> Scaled | None:
        """modelopt's NVFP4 quantizer on float rows ``x`` (``NVFP4QTensor.quantize``)."""
        if x.dim() != 2 or x.shape[1] != self.shape[1]:
            return None
        xf = x.float()
        amax = xf.abs().max() if xf.numel() else torch.tensor(0.0)
        s2 = amax / (FP4_MAX * E4M3_MAX) if float(amax) > 0 else torch.tensor(1.0)
        blocks = xf.reshape(xf.shape[0], -1, G16)
        s = blocks.abs().amax(-1) / (FP4_MAX * s2)
        s = torch.where(s == 0, torch.tensor(1.0), s).to(torch.float8_e4m3fn).float()
        nib = cast_fp4((blocks / (s * s2)[..., None]).reshape(xf.shape))
        return Scaled(FP4_BYTES[nib].view(torch.float8_e4m3fn), s * s2, (1, G16), steps=FP4_STEPS)

    def misreadings(self, start: int, stop: int) -> dict:
        """Values a converter that misreads the encoding writes, by the finding each names."""
        s = self.s.rows(start, stop).float().repeat_interleave(G16, 1)
        g = self.global_scale()
        return {
            # compressed-tensors' convention applied to modelopt's scale: divided instead of multiplied
            "scale-reciprocal": ({"unit": "global"}, FP4_VALUES[self._nibbles(start, stop)] * s / g),
            "nibbles-swapped": ({"blocks": (stop - start) * self.shape[1] // G16},
                                FP4_VALUES[self._nibbles(start, stop, swap=True)] * s * g),
            # a dequantizer with MX's 32 (or a larger group) hard-coded (tensor/fp4.py blocks_misread)
            "block-size-wrong": blocks_misread(FP4_VALUES[self._nibbles(start, stop)] * g,
                                               self.s.rows(start, stop).float(), G16, self.s.load().float(),
                                               start * self.shape[1]),
            # an FP8 dequantizer on the packed bytes: each byte one e4m3 value; its group size taken from the
            # shapes (8 bytes per scale), so each byte keeps the scale of the block it belongs to
            "codes-of-another-encoding": [
                ({"codes": "FP4 e2m1, two per byte", "read": "FP8 e4m3, one per byte",
                  "shape": f": a [{stop - start}, {self.shape[1] // 2}] tensor where the weight is "
                           f"[{stop - start}, {self.shape[1]}]"},
                 lambda: self.packed.rows(start, stop).contiguous().view(torch.float8_e4m3fn).float()
                 * self.s.rows(start, stop).float().repeat_interleave(G16 // 2, 1) * g),
                # an int4 dequantizer on the nibbles (compressed-tensors' pack-quantized reading): signed integers
                ({"codes": "FP4 e2m1, two per byte", "read": "int4, each nibble a signed integer", "shape": ""},
                 lambda: INT4_VALUES[self._nibbles(start, stop)] * s * g)],
        }


def quant_algo(ck: Checkpoint) -> str | None:
    """The ``quant_algo`` of a modelopt export (``hf_quant_config.json``, else config.json's
    ``quantization_config`` with ``quant_method: modelopt``); None when the checkpoint is not one."""
    d = Path(ck.path)
    if d.is_dir() and (d / QUANT_FILE).exists():
        where = d / QUANT_FILE
        q = read_json_object(where).get("quantization")
    else:
        qc = (ck.config or {}).get("quantization_config") if isinstance(ck.config, dict) else None
        if not isinstance(qc, dict) or qc.get("quant_method") != "modelopt":
            return None
        where, q = d / "config.json", qc
    if not isinstance(q, dict):
        raise InputError(where, "'quantization' is not an object")
    algo = q.get("quant_algo")
    if algo not in READ_ALGOS:
        raise InputError(where, f"modelopt quant_algo {repr(algo)[:40]} is not read (read: {', '.join(READ_ALGOS)})")
    group = q.get("group_size", GROUP[algo])
    if not isinstance(group, int) or isinstance(group, bool) or group != GROUP[algo]:
        raise InputError(where, f"modelopt {algo} group_size {repr(group)[:40]} ({algo} groups are {GROUP[algo]})")
    return algo


def modelopt_view(ck: Checkpoint) -> Checkpoint:
    """Each ``m.weight`` + ``m.weight_scale`` (+ ``m.weight_scale_2``) of a modelopt NVFP4 or MXFP8 export becomes
    one view under ``m.weight`` (``m.input_scale`` folded into it: an activation scale, not a weight)."""
    algo = quant_algo(ck)
    if algo is None:
        return ck
    if algo == "MXFP8":
        return _mxfp8_view(ck)
    t = ck.tensors
    views = {}
    for k, w in t.items():
        if not k.endswith(".weight") or w.dtype != torch.uint8:
            continue
        m = k[: -len(".weight")]
        s, s2 = t.get(m + ".weight_scale"), t.get(m + ".weight_scale_2")
        if s is None or s2 is None:
            raise InputError(ck.path, f"{k}: uint8 NVFP4 codes without {m}.weight_scale and {m}.weight_scale_2")
        extra = (m + ".input_scale",) if m + ".input_scale" in t else ()
        views[k] = ModeloptNvfp4(k, w, s, s2, extra)
    note = (f"{len(views)} NVFP4 weights (modelopt: e2m1 codes, an e4m3 scale per 16, weight_scale_2 multiplying): "
            f"judged in units of each element's FP4 spacing times its scales (bound {BOUND})")
    return fold(ck, views, "NVFP4 (modelopt)", note)


class ModeloptMxfp8(BlockScaled):
    """A linear's MXFP8 weight: float8_e4m3fn codes ``[out, in]`` and an E8M0 scale per 32 columns (uint8
    ``[out, in/32]``, ``2 ** (byte - 127)``). modelopt's quantizer (``MXFP8QTensor``) takes the exponent
    ``ceil(log2(amax / 448))`` and casts ``x / 2**e`` to e4m3 (round to nearest): half an FP8 step."""

    def __init__(self, name: str, w: LazyTensor, s: LazyTensor, extra: tuple = ()):
        where = w.origin
        if w.dtype != torch.float8_e4m3fn or len(w.shape) != 2 or w.shape[1] % G32:
            raise InputError(where, f"{w.name}: {list(w.shape)} {w.dtype} is not 2-D float8_e4m3fn MXFP8 codes "
                                    f"in blocks of {G32}")
        R, C = w.shape
        if tuple(s.shape) != (R, C // G32) or s.dtype != torch.uint8:
            raise InputError(where, f"{s.name}: {list(s.shape)} {s.dtype} does not fit MXFP8 {name} [{R}, {C}] "
                                    f"(expected [{R}, {C // G32}] uint8 E8M0)")
        self.w, self.s = w, s
        super().__init__(name, (R, C), where, "MXFP8 (modelopt) e4m3, e8m0 per 32", BOUND, (w.name, s.name, *extra))

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.s.nbytes

    def scaled(self, start: int, stop: int) -> Scaled:
        return Scaled(self.w.rows(start, stop), e8m0_scales(self.s.rows(start, stop)), (1, G32))

    def raw(self, start: int, stop: int) -> torch.Tensor:
        return torch.cat([self.w.rows(start, stop).view(torch.uint8).flatten(), self.s.rows(start, stop).flatten()])

    def problems(self, s: Scaled) -> list[str]:
        return e8m0_problems(s.grid)

    def reference(self, x: torch.Tensor) -> Scaled | None:
        """modelopt's MXFP8 quantizer on float rows ``x``."""
        if x.dim() != 2 or x.shape[1] != self.shape[1]:
            return None
        b = x.float().reshape(x.shape[0], -1, G32)
        d = b.abs().amax(-1) / E4M3_MAX
        e = torch.where(d > 0, torch.ceil(torch.log2(d)), torch.full_like(d, -127.0)).clamp(-127, 127)
        codes = (b * torch.exp2(-e)[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return Scaled(codes.reshape(x.shape), torch.exp2(e), (1, G32))

    def misreadings(self, start: int, stop: int) -> dict:
        e = self.s.rows(start, stop).float().repeat_interleave(G32, 1)
        w = self.w.rows(start, stop)
        right = e8m0_scales(self.s.rows(start, stop))
        return {"e8m0-as-value": ({}, w.float() * e),
                # a dequantizer with a larger block hard-coded (tensor/fp4.py blocks_misread)
                "block-size-wrong": blocks_misread(w.float(), right, G32, e8m0_scales(self.s.load()),
                                                   start * self.shape[1]),
                # the e4m3 bytes decoded as e5m2 (same size, another split of exponent and mantissa)
                "codes-of-another-encoding": [
                    ({"codes": "FP8 e4m3", "read": "FP8 e5m2", "shape": ""},
                     lambda: w.view(torch.float8_e5m2).float() * right.repeat_interleave(G32, 1)),
                    # the bytes cast as integers (a uint8 tensor cast to float without decoding)
                    ({"codes": "FP8 e4m3", "read": "uint8, each byte an unsigned integer", "shape": ""},
                     lambda: w.view(torch.uint8).float() * right.repeat_interleave(G32, 1))]}


def _mxfp8_view(ck: Checkpoint) -> Checkpoint:
    t = ck.tensors
    views = {}
    for k, w in t.items():
        if not k.endswith(".weight") or w.dtype != torch.float8_e4m3fn:
            continue
        m = k[: -len(".weight")]
        s = t.get(m + ".weight_scale")
        if s is None:
            raise InputError(ck.path, f"{k}: float8 MXFP8 codes without {m}.weight_scale")
        extra = (m + ".input_scale",) if m + ".input_scale" in t else ()
        views[k] = ModeloptMxfp8(k, w, s, extra)
    note = (f"{len(views)} MXFP8 weights (modelopt: e4m3 codes, an E8M0 scale per 32): judged in units of each "
            f"element's FP8 spacing times its block scale (bound {BOUND})")
    return fold(ck, views, "MXFP8 (modelopt)", note)


# ---------------------------------------------------------------- declaration (formats/registry.py)
def _declare() -> None:
    from ckdiff.formats.registry import Encoding, register_encoding
    register_encoding(Encoding("modelopt", "NVIDIA Model Optimizer NVFP4 exports (hf_quant_config.json), read as "
                                           "logical block-scaled views", modelopt_view))


_declare()
