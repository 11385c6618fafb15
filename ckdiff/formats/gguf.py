"""GGUF files (llama.cpp), read through llama.cpp's own ``gguf`` package, mapped to HF by a table.

Facts (gguf 0.19.0, ``gguf/gguf_reader.py``, ``gguf/quants.py``, ``gguf/constants.py``; llama.cpp
``convert_hf_to_gguf.py`` ``LlamaModel``, from the llama-cpp-python 0.3.36 source distribution):

- ``GGUFReader`` memory-maps the file; each tensor's ``data`` is a numpy view in logical row order
  (HF ``[out, in]`` order), raw ``uint8`` row bytes for block-quantized types (BF16 included).
  Rows are dequantized on demand by ``gguf.quants.dequantize`` of just those rows.
- Llama names: ``token_embd``, ``blk.{i}.attn_norm|attn_q|attn_k|attn_v|attn_output|ffn_norm|
  ffn_gate|ffn_up|ffn_down``, ``output_norm``, ``output`` (absent when tied), MoE
  ``ffn_gate_inp`` and stacked ``ffn_{gate,down,up}_exps``.
- The converter permutes q with the query head count and k with the KV head count (HF's rotate_half
  rows to interleaved pairs per head): ``PermuteRope(H)`` / ``PermuteRope(K)`` in the table.
- Scale of each element (what a quantized value is judged in): Q8_0 and Q4_0 the block's fp16 ``d``
  (32 elements); Q4_K the sub-block step ``d * sc`` (32 elements, 6-bit ``sc``); Q6_K ``d * sc``
  (16 elements, int8 ``sc``).
- A float side equal to a misreading of the legacy blocks (``GgufQuant.misreadings``: nibbles interleaved or
  halves swapped, fp16 scales decoded as bfloat16, the offset or the minimum's sign wrong; Q4_K's 6-bit sub-block
  scales unpacked wrong) is named by it.
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional

from pathlib import Path

import numpy as np
import torch

from ckdiff.models import families
from ckdiff.errors import InputError
from ckdiff.models.families import Mlp
from ckdiff.io.inputs import open_input
from ckdiff.models.config import ModelConfig
from ckdiff.models.fields import Fields
from ckdiff.tensor.blockscaled import BlockScaled, Scaled
from ckdiff.tensor.lazy import Checkpoint, LazyTensor
from ckdiff.tensor.ops import AddConst, Identity, PermuteRope, Stack
from ckdiff.tensor.table import R

MAGIC = b"GGUF"
_B = "blk.{i}."
GGUF = {
    "embed": "token_embd.weight", "norm": "output_norm.weight", "head": "output.weight",
    "attn_norm": _B + "attn_norm.weight", "q": _B + "attn_q.weight", "k": _B + "attn_k.weight",
    "v": _B + "attn_v.weight", "o": _B + "attn_output.weight", "mlp_norm": _B + "ffn_norm.weight",
    "gate": _B + "ffn_gate.weight", "up": _B + "ffn_up.weight", "down": _B + "ffn_down.weight",
    "router": _B + "ffn_gate_inp.weight", "exps": _B + "ffn_{w}_exps.weight",
}
# per quantized type: (elements per scale, bound on |float - dequantized| in units of that scale).
# Q8_0: round-to-nearest 0.5 plus the fp16 rounding of d over 127 codes (<= 0.062); Q4_0: clamping
# the code opposite the block's extreme to 15 costs up to 1.0. K-quants: codes are recomputed with
# the final stored step, so 0.5 plus clamping: 1.0 (not measured against llama.cpp's C quantizer,
# the Python package has none for K-quants).
UNIT = {"Q8_0": (32, 0.6), "Q4_0": (32, 1.02), "Q4_K": (32, 1.0), "Q6_K": (16, 1.0),
        # the other 32-element legacy types, unit their fp16 d (ggml-quants.c quantize_row_*_ref): Q4_1 and
        # Q5_1 round (x - m) / d to the nearest code (0.5 plus fp16 rounding of d and m, as Q8_0), Q5_0 clamps
        # the code opposite the block's extreme as Q4_0 does
        "Q4_1": (32, 0.6), "Q5_0": (32, 1.02), "Q5_1": (32, 0.6),
        # MXFP4 (GPT-OSS experts, repacked from HF's MXFP4 blocks without rounding): e2m1 codes times the block's
        # E8M0 scale, judged in units of the code's FP4 spacing times that scale, with the OCP quantizer's bound
        "MXFP4": (32, 1.05)}
LEGACY_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}  # per 32 elements, d (fp16) first


def _gguf():
    try:
        import gguf
    except ImportError:
        raise InputError("gguf", "reading GGUF needs the gguf package (pip install 'ckdiff[gguf]')") from None
    return gguf


def is_gguf(p: Path) -> bool:
    if not p.is_file():
        return False
    if p.suffix == ".gguf":
        return True
    try:
        with open_input(p) as f:
            return f.read(4) == MAGIC
    except (OSError, InputError):
        return False


def _units(qtype: str, raw: np.ndarray) -> np.ndarray:
    """Per element scale of the rows ``raw`` (uint8 [rows..., bytes]) of a ``qtype`` tensor."""
    gguf = _gguf()
    lead = raw.shape[:-1]
    if qtype in LEGACY_BYTES:
        b = np.ascontiguousarray(raw).reshape(-1, LEGACY_BYTES[qtype])
        u = np.abs(b[:, :2].copy().view(np.float16).astype(np.float32))
        return np.repeat(u, 32, axis=1).reshape(*lead, -1)
    if qtype == "Q4_K":
        b = np.ascontiguousarray(raw).reshape(-1, 144)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        sc, _m = gguf.quants.Q4_K.get_scale_min(b[:, 4:16].copy())
        return np.repeat(np.abs(d * sc.astype(np.float32)), 32, axis=1).reshape(*lead, -1)
    if qtype == "Q6_K":
        b = np.ascontiguousarray(raw).reshape(-1, 210)
        sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
        d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
        return np.repeat(np.abs(d * sc), 16, axis=1).reshape(*lead, -1)
    raise KeyError(qtype)


class GgufTensor(LazyTensor):
    """A plain (F32, F16, BF16) GGUF tensor: rows read from the memory map."""

    def __init__(self, name, rt, path):
        self.rt = rt
        gguf = _gguf()
        shape = tuple(int(x) for x in reversed(rt.shape.tolist()))
        q = rt.tensor_type
        dt = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16,
              gguf.GGMLQuantizationType.BF16: torch.bfloat16}[q]
        super().__init__(name, shape, dt, str(path))

    def rows(self, start, stop):
        a = np.ascontiguousarray(self.rt.data[start:stop])
        t = torch.from_numpy(a.copy())
        if self.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.reshape((stop - start,) + self.shape[1:]) if self.shape else t

    def load(self):
        return self.rows(0, self.shape[0]) if self.shape else self.rows(0, 1).reshape(())


class GgufQuant(BlockScaled):
    """A block-quantized GGUF tensor as its logical float tensor. Q8_0 and Q4_0 are codes times the block's
    fp16 ``d`` (32 elements); the K-quants (a step and a minimum per sub-block) are read dense: the gguf
    package's dequantized values with each element's sub-block step as its unit."""

    def __init__(self, name, rt, path):
        self.rt = rt
        self.qtype = rt.tensor_type.name
        shape = tuple(int(x) for x in reversed(rt.shape.tolist()))
        bound = UNIT[self.qtype][1] if self.qtype in UNIT else None
        super().__init__(name, shape, str(path), self.qtype, bound, (name,))
        self.nibbles = self.qtype == "Q4_0"  # two 4-bit codes per byte, halves of a block in low/high nibbles

    @property
    def nbytes(self) -> int:  # stored bytes (codes and scales), not the dequantized size
        return int(self.rt.n_bytes)

    def _bytes(self, start, stop) -> np.ndarray:
        """Stored bytes of rows [start, stop) as [rows of the last dim, bytes per row]."""
        raw = np.ascontiguousarray(self.rt.data[start:stop])
        return raw.reshape(-1, raw.shape[-1]) if raw.size else raw.reshape(0, max(1, raw.shape[-1]))

    def raw(self, start, stop) -> torch.Tensor:
        return torch.from_numpy(self._bytes(start, stop).copy()).reshape(-1)

    def dense(self, start, stop) -> np.ndarray:
        gguf = _gguf()
        try:
            x = gguf.quants.dequantize(self._bytes(start, stop), self.rt.tensor_type)
        except NotImplementedError:
            raise InputError(self.origin, f"{self.name}: the gguf package cannot dequantize {self.qtype}") from None
        return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.shape[-1])

    def scaled(self, start, stop) -> Scaled:
        raw = self._bytes(start, stop)
        if self.qtype in BLOCKS:
            return _split(self.qtype, raw, self.shape[-1])
        if self.bound is None:  # a type without a unit here: its values, judged as floats
            x = torch.from_numpy(self.dense(start, stop))
            return Scaled(x, torch.zeros_like(x), (1, 1), dense=True)
        x = torch.from_numpy(self.dense(start, stop))
        u = torch.from_numpy(np.ascontiguousarray(_units(self.qtype, raw), dtype=np.float32)).reshape(x.shape)
        return Scaled(x, u, (1, 1), dense=True)

    def rows(self, start, stop):
        if self.qtype in BLOCKS:
            return super().rows(start, stop)
        return torch.from_numpy(self.dense(start, stop)).reshape((stop - start,) + self.shape[1:])

    def misreadings(self, start, stop) -> dict:
        """Values a converter that misreads the 32-element legacy blocks (and MXFP4's) writes, by the finding each
        names (``compare/diagnose_scaled.py`` tries them). The 4- and 5-bit types hold element j of a block in the
        low nibble of byte j and element j + 16 in the high one: read as interleaved pairs (element 2j low, 2j + 1
        high: the order of HF's MXFP4, compressed-tensors' and NVFP4's packing, ``nibbles-interleaved``) or with
        the halves exchanged (``nibbles-swapped``). The fp16 ``d`` (and Q4_1/Q5_1's ``m``) decoded as bfloat16
        (``scale-of-another-encoding``, judged in the misread scale's own steps: its values are about 1e-20 of
        the right ones); ``d`` dividing (``scale-reciprocal``); Q4_0/Q5_0's stored ``code + 8`` / ``code + 16``
        read without the offset or with it subtracted twice (``code-offset-wrong``); Q4_1/Q5_1's minimum
        subtracted, ``d * q - m`` (``offset-sign-wrong``). Q4_K: ``_q4k_misread``."""
        if self.qtype not in LEGACY_BYTES and self.qtype not in ("MXFP4", "Q4_K"):
            return {}
        raw = self._bytes(start, stop)
        C = self.shape[-1]
        R, nb = raw.shape[0], C // 32
        if not R or C % 32:
            return {}
        if self.qtype == "Q4_K":
            return _q4k_misread(raw, C)
        out = {}
        if self.qtype == "MXFP4":
            right = self.rows(start, stop).reshape(R, C)
        else:
            codes, d, m, dbf, mbf = _legacy(self.qtype, raw)
            per = lambda g: g.repeat_interleave(32, 1)  # noqa: E731 (a block's value for each element)
            base = per(m) if m is not None else 0.0
            right = codes * per(d) + base
            out["scale-of-another-encoding"] = (
                {"scales": "fp16 d and m" if m is not None else "fp16 d", "read": "bfloat16"},
                codes * per(dbf) + (per(mbf) if m is not None else 0.0), per(dbf).abs())
            out["scale-reciprocal"] = ({"unit": "block"}, lambda: codes / per(d) + base)
            if self.qtype in ("Q4_0", "Q5_0"):
                off = 8 if self.qtype == "Q4_0" else 16
                out["code-offset-wrong"] = [
                    ({"how": "as their stored fields, without subtracting the offset", "offset": off},
                     lambda: (codes + off) * per(d)),
                    ({"how": "with the offset subtracted twice", "offset": off}, lambda: (codes - off) * per(d))]
            if m is not None:
                out["offset-sign-wrong"] = ({"read": "subtracts each block's minimum, d * q - m",
                                             "right": "d * q + m"}, lambda: codes * per(d) - base)
        if self.qtype != "Q8_0":
            halves = lambda: right.reshape(R, nb, 2, 16)  # noqa: E731
            out["nibbles-interleaved"] = ({"half": 16, "blocks": R * nb},
                                          lambda: halves().transpose(2, 3).reshape(R, C))
            out["nibbles-swapped"] = ({"blocks": R * nb}, lambda: halves().flip(2).reshape(R, C))
        return out

    def reference(self, x: torch.Tensor):
        """The gguf package's own quantizer on float rows ``x``."""
        if self.qtype not in BLOCKS:
            return None
        gguf = _gguf()
        try:
            raw = gguf.quants.quantize(x.float().numpy(), self.rt.tensor_type)
        except (NotImplementedError, ValueError):
            return None
        return _split(self.qtype, raw.reshape(x.shape[0], -1), x.shape[-1])


# Q8_0 and Q4_0 blocks: (bytes per block, elements per block); d (fp16) first, then the codes. MXFP4: its E8M0
# scale byte first, then 16 bytes of nibbles
BLOCKS = {"Q8_0": (34, 32), "Q4_0": (18, 32), "MXFP4": (17, 32)}


def _split(qtype: str, raw: np.ndarray, C: int) -> Scaled:
    """Codes [R, C] (int8, in element order) and the block scales [R, C / 32] of Q8_0 / Q4_0 / MXFP4 row bytes.
    Q4_0 packs element j of a block in the low nibble of byte j and element j + 16 in the high nibble,
    stored as code + 8 (gguf ``quants.Q4_0``)."""
    bs, n = BLOCKS[qtype]
    R = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(R, -1, bs)
    if qtype == "MXFP4":  # gguf quants.MXFP4: element j in the low nibble of byte j, j + 16 in the high one; a
        # nibble's bit 3 the sign, bits 0-2 the e2m1 magnitude (tensor/fp4.py's order); scale 2 ** (byte - 127)
        from ckdiff.tensor.fp4 import FP4_BYTES, FP4_STEPS, e8m0_scales
        qs = b[:, :, 1:]
        nib = torch.from_numpy(np.ascontiguousarray(np.concatenate([qs & 0x0F, qs >> 4], axis=2)).reshape(R, C))
        codes = FP4_BYTES[nib.long()].view(torch.float8_e4m3fn)
        return Scaled(codes, e8m0_scales(torch.from_numpy(b[:, :, 0].copy())), (1, n), steps=FP4_STEPS)
    d = torch.from_numpy(b[:, :, :2].copy().view(np.float16).astype(np.float32).reshape(R, -1))
    if qtype == "Q8_0":
        codes = torch.from_numpy(b[:, :, 2:].copy().view(np.int8).reshape(R, C))
    else:
        qs = b[:, :, 2:]
        nib = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.int8) - 8
        codes = torch.from_numpy(np.ascontiguousarray(nib).reshape(R, C))
    return Scaled(codes, d, (1, n))


def _legacy(qtype: str, raw: np.ndarray) -> tuple:
    """(codes [R, C], d, m, d and m decoded as bfloat16 [R, C / 32]; float32) of legacy-type row bytes, each element
    ``codes * d + m`` (m None for the types without a minimum). The codes are the gguf package's own decoding of
    the blocks with d set to 1 and m to 0 (``quants.dequantize``), so they carry its nibble and fifth-bit order."""
    gguf = _gguf()
    bs, R = LEGACY_BYTES[qtype], raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(R, -1, bs).copy()
    as16 = lambda lo: np.ascontiguousarray(b[:, :, lo:lo + 2]).view(np.uint16)[..., 0]  # noqa: E731
    bf16 = lambda u: torch.from_numpy((u.astype(np.uint32) << 16).view(np.float32))  # noqa: E731 (the top half)
    fp16 = lambda u: torch.from_numpy(u.view(np.float16).astype(np.float32))  # noqa: E731
    du = as16(0)
    mu = as16(2) if qtype in ("Q4_1", "Q5_1") else None
    b[:, :, :2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    if mu is not None:
        b[:, :, 2:4] = 0
    codes = gguf.quants.dequantize(b.reshape(R, -1), gguf.GGMLQuantizationType[qtype])
    codes = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.float32).reshape(R, -1))
    return (codes, fp16(du), fp16(mu) if mu is not None else None, bf16(du),
            bf16(mu) if mu is not None else None)


Q4K_BYTES = 144  # per 256 elements: d, dmin (fp16), 12 bytes of 6-bit scales and minimums, 128 bytes of nibbles


def _q4k_misread(raw: np.ndarray, C: int) -> dict:
    """Misreadings of Q4_K row bytes (gguf ``quants.Q4_K``): each 256-element super-block holds eight 32-element
    sub-blocks with a 6-bit scale and minimum each, ``d * sc * q - dmin * m``. Bytes 0-3 hold scales 0-3 (low 6
    bits), 4-7 minimums 0-3, 8-11 the low nibbles of scale and minimum 4-7 whose top two bits are the top bits of
    bytes 0-3 / 4-7 (``get_scale_min``). A dequantizer that drops those top bits, reads sub-blocks 4-7 by the rule
    of 0-3, or exchanges the two nibbles of bytes 8-11 writes ``sub-scales-misread``; one that places each byte's
    nibbles at adjacent elements (each 64 elements hold 32 bytes' low nibbles, then their high ones) writes
    ``nibbles-interleaved``."""
    gguf = _gguf()
    R = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(-1, Q4K_BYTES)
    fp16 = lambda lo: b[:, lo:lo + 2].copy().view(np.float16).astype(np.float32)  # noqa: E731 ([n, 1])
    d, dmin = fp16(0), fp16(2)
    ones = b.copy()  # d 1, dmin 0, every scale 1 and minimum 0: the package's own decoding gives the codes
    ones[:, 0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    ones[:, 2:4] = 0
    ones[:, 4:16] = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=np.uint8)
    qt = gguf.GGMLQuantizationType.Q4_K
    codes = np.ascontiguousarray(gguf.quants.dequantize(ones, qt), dtype=np.float32).reshape(-1, 8, 32)
    q = b[:, 4:16].reshape(-1, 3, 4)
    lo, mn, hi = q[:, 0], q[:, 1], q[:, 2]

    def values(sc, m):
        v = d[:, :, None] * sc[:, :, None].astype(np.float32) * codes - dmin[:, :, None] * m[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32).reshape(R, C))
    cat = lambda x, y: np.concatenate([x, y], axis=1)  # noqa: E731 (sub-blocks 0-3, then 4-7)
    reads = [("without the top two bits held in bytes 0-7", hi & 0x0F, hi >> 4),
             ("by the rule of sub-blocks 0-3 (bytes 4-7 as their scales, 8-11 as their minimums)", mn & 0x3F,
              hi & 0x3F),
             ("with the two nibbles of bytes 8-11 exchanged", (hi >> 4) | ((lo >> 2) & 0x30),
              (hi & 0x0F) | ((mn >> 2) & 0x30))]
    out = {"sub-scales-misread": [({"how": how}, lambda s4=s4, m4=m4: values(cat(lo & 0x3F, s4), cat(mn & 0x3F, m4)))
                                  for how, s4, m4 in reads]}
    sc, m = gguf.quants.Q4_K.get_scale_min(b[:, 4:16].copy())
    right = values(sc, m)
    out["nibbles-interleaved"] = ({"half": 32, "blocks": R * C // 64},
                                  lambda: right.reshape(R, -1, 2, 32).transpose(2, 3).reshape(R, C))
    return out


def _fields(reader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        try:
            v = f.contents()
        except Exception:  # noqa: BLE001 - a field the package cannot decode is left out
            continue
        if isinstance(v, list):
            if k == "tokenizer.ggml.tokens":
                out["tokenizer.ggml.tokens.count"] = len(v)
            continue
        if isinstance(v, float):  # GGUF stores float32: read back the shortest decimal that rounds to it
            v = float(np.format_float_positional(np.float32(v), unique=True, trim="-"))
        if isinstance(v, (int, float, str, bool)):
            out[k] = v
    return out


_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


# llama.cpp stores a layer's experts as one tensor: its largest models (DeepSeek-V3, Qwen3-MoE 235B) hold
# about a thousand tensors. The gguf package builds numpy views per tensor (10^5 tensors: 16 s, 1.35 GB
# before anything is compared), so a header claiming far more is refused before it is parsed.
MAX_TENSORS = 1 << 16
MAX_KEYS = 1 << 16


def check_layout(p: Path, gguf) -> None:
    """Walk a GGUF header before the gguf package does: every count (keys, tensors, array elements,
    string lengths, tensor bytes) is checked against what is left of the file, so a 10-byte claim of
    10**9 elements is refused at once instead of being walked; a big-endian file is named as such.
    Field layout from ggml's docs/gguf.md (ggml-org/ggml, GGUF v3)."""
    import mmap
    import struct
    with open_input(p) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            raise InputError(p, "not a GGUF file (shorter than its header)")
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if m[:4] != b"GGUF":
            raise InputError(p, "not a GGUF file (no GGUF magic)")
        (version,) = struct.unpack_from("<I", m, 4)
        if version not in (2, 3) and struct.unpack_from(">I", m, 4)[0] in (2, 3):
            raise InputError(p, "big-endian GGUF is not supported (a little-endian file is what llama.cpp "
                                "writes by default)")
        if version not in (2, 3):
            raise InputError(p, f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = struct.unpack_from("<QQ", m, 8)
        pos = 24

        def need(n: int, what: str) -> None:
            if n < 0 or pos + n > size:
                raise InputError(p, f"GGUF header: {what} needs {n} bytes, {size - pos} are left in the file")

        def u(fmt: str, what: str):
            nonlocal pos
            k = struct.calcsize(fmt)
            need(k, what)
            v = struct.unpack_from("<" + fmt, m, pos)
            pos += k
            return v[0] if len(v) == 1 else v

        def string(what: str) -> None:
            nonlocal pos
            n = u("Q", what)
            need(n, what)
            pos += n

        if n_kv * 13 > size or n_tensors * 28 > size:  # the smallest key-value and tensor-info records
            raise InputError(p, f"GGUF header claims {n_kv} metadata keys and {n_tensors} tensors in {size} bytes")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KEYS:
            raise InputError(p, f"GGUF header claims {n_tensors} tensors and {n_kv} metadata keys: more than any "
                                f"model file holds (limits {MAX_TENSORS} and {MAX_KEYS})")
        for _ in range(n_kv):
            string("a metadata key")
            t = u("I", "a value type")
            if t in _SCALAR:
                need(_SCALAR[t], "a value")
                pos += _SCALAR[t]
            elif t == _STRING:
                string("a string value")
            elif t == _ARRAY:
                it, count = u("I", "an array type"), u("Q", "an array length")
                if it in _SCALAR:
                    need(count * _SCALAR[it], f"an array of {count} elements")
                    pos += count * _SCALAR[it]
                elif it == _STRING:
                    need(count * 8, f"an array of {count} strings")
                    for _ in range(count):
                        string("an array string")
                else:
                    raise InputError(p, f"GGUF header: array of value type {it} is not supported")
            else:
                raise InputError(p, f"GGUF header: unknown value type {t}")
        for _ in range(n_tensors):
            string("a tensor name")
            nd = u("I", "a tensor's dimension count")
            if not 1 <= nd <= 4:
                raise InputError(p, f"GGUF header: a tensor with {nd} dimensions (1 to 4 are valid)")
            dims = [u("Q", "a tensor dimension") for _ in range(nd)]
            qt, _off = u("I", "a tensor type"), u("Q", "a tensor offset")
            block, nbytes = gguf.GGML_QUANT_SIZES.get(gguf.GGMLQuantizationType(qt), (None, None)) \
                if qt in gguf.GGMLQuantizationType._value2member_map_ else (None, None)
            if block is None:
                raise InputError(p, f"GGUF header: unknown tensor type {qt}")
            n = 1
            for dim in dims:
                n *= dim
            if n // block * nbytes > size:
                raise InputError(p, f"GGUF header: a tensor of shape {dims} needs {n // block * nbytes} bytes, "
                                    f"the file has {size}")
    finally:
        m.close()


def _open(p: Path, gguf):
    """One GGUF file's header, parsed by the gguf package after ``check_layout``; its data stays mapped."""
    check_layout(p, gguf)
    try:
        return gguf.GGUFReader(str(p), "r")
    except Exception as e:  # noqa: BLE001 - whatever a broken file makes the package raise
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else e.__class__.__name__
        raise InputError(p, f"not a readable GGUF file ({msg})") from None


def _add_tensors(reader, p: Path, gguf, tensors: dict, owner: dict) -> None:
    """``reader``'s tensors into ``tensors`` (lazy views of the file's map); ``owner`` names the file each came
    from, so a name that repeats across the shards of a split set is named with both files."""
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    for rt in reader.tensors:
        if rt.name in tensors:
            again = "twice" if owner[rt.name] == p else f"again (it is also in {owner[rt.name].name})"
            raise InputError(p, f"tensor {rt.name!r} appears {again}")
        tensors[rt.name] = GgufTensor(rt.name, rt, p) if rt.tensor_type in plain else GgufQuant(rt.name, rt, p)
        owner[rt.name] = p


# split GGUF sets (llama.cpp src/llama.cpp llama_split_path / llama_split_prefix; gguf-py GGUFWriter and
# tools/gguf-split write them): shard k of n (1-based) is named "<prefix>-%05d-of-%05d.gguf"; every shard holds
# split.no (0-based, uint16), split.count (uint16) and split.tensors.count (the set's tensors, int32); the first
# holds the model's metadata, the others only the split keys and their own tensors
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>[0-9]{5,})-of-(?P<count>[0-9]{5,})\.gguf$")
MAX_SPLITS = (1 << 16) - 1  # split.count is a uint16


def split_name(prefix: str, no: int, count: int) -> str:
    """llama.cpp's name of shard ``no`` (0-based) of ``count``."""
    return f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


def _split_keys(f: dict, p: Path) -> Optional[tuple]:
    """(split.no, split.count, split.tensors.count) of a shard, type- and range-checked; None for a file that is
    not part of a split set (no split.count, 0 or 1)."""
    F = Fields(f, str(p), "metadata key")
    count = F.int("split.count", lo=0, hi=MAX_SPLITS)
    no = F.int("split.no", lo=0, hi=MAX_SPLITS)
    total = F.int("split.tensors.count", lo=0, hi=MAX_TENSORS)  # the set's views cost what one file's would
    if count is None or count <= 1:  # llama.cpp reads the other split keys only for a split.count above 1; a set
        # merged by llama-gguf-split --merge says 0 (tools/gguf-split/gguf-split.cpp)
        return None
    if no is None or total is None:
        raise InputError(p, f"split.count is {count} but split.{'no' if no is None else 'tensors.count'} is missing")
    if no >= count:
        F.fail("split.no", f"a shard number below split.count ({count})", no)
    return no, count, total


def read_gguf(p: Path, **_) -> Checkpoint:
    gguf = _gguf()
    reader = _open(p, gguf)
    tensors: dict[str, LazyTensor] = {}
    fields = _fields(reader)
    split = _split_keys(fields, p)
    files = [p]
    if split is None:  # one file: its own tensors (a set of one shard says split.tensors.count: checked)
        _add_tensors(reader, p, gguf, tensors, {})
        total = fields.get("split.tensors.count")
        if "split.count" in fields and total is not None and total != len(tensors):
            raise InputError(p, f"split.tensors.count is {total}, the file holds {len(tensors)} tensors")
    else:
        files, fields = _read_split(p, reader, fields, split, gguf, tensors)
    types = sorted({t.qtype for t in tensors.values() if isinstance(t, GgufQuant)})
    notes = [f"GGUF quantized types {', '.join(types)}: dequantized row by row through the gguf package"] if types else []
    meta = {"files": [str(f) for f in files], "notes": notes, "skipped": {}}
    if len(files) > 1:
        meta["shards"] = len(files)
        notes.append(f"split GGUF set of {len(files)} shards ({files[0].name} ... {files[-1].name}): read as one "
                     "checkpoint, metadata from the first shard")
    return Checkpoint(str(files[0]), _mla_layout(fields, tensors, files[0]), tensors, config=fields, meta=meta)


# deepseek2 files written before llama.cpp split kv_b_proj for MLA's weight absorption (llama.cpp PR 12801) hold
# one attn_kv_b a layer and no attention.key_length_mla / value_length_mla; llama.cpp still runs them
# (src/models/deepseek2.cpp: without the MLA lengths the file is run as MHA through wkv_b)
KV_B = _B + "attn_kv_b.weight"
_KV_B = re.compile(r"^blk\.\d+\.attn_kv_b\.weight$")
_K_B = re.compile(r"^blk\.\d+\.attn_[kv]_b\.weight$")


def _mla_layout(fields: dict, tensors: dict, p: Path) -> str:
    """The format a file's tensors follow: ``gguf-kvb`` for a deepseek2 file with ``attn_kv_b``, else ``gguf``.
    A file that mixes the two layouts, or whose MLA metadata says the other one, is refused."""
    if fields.get("general.architecture") != "deepseek2":
        return "gguf"
    fused, split = any(_KV_B.match(n) for n in tensors), any(_K_B.match(n) for n in tensors)
    mla = [k for k in ("deepseek2.attention.key_length_mla", "deepseek2.attention.value_length_mla") if k in fields]
    if fused and split:
        raise InputError(p, "holds both attn_kv_b and attn_k_b / attn_v_b (llama.cpp writes one layout or the other)")
    if fused and mla:
        raise InputError(p, f"holds attn_kv_b (the layout from before llama.cpp split kv_b_proj) but its metadata has "
                            f"{mla[0]}, which only files with attn_k_b / attn_v_b have")
    if split and len(mla) < 2:
        raise InputError(p, "holds attn_k_b / attn_v_b but its metadata lacks deepseek2.attention.key_length_mla or "
                            "value_length_mla, which llama.cpp needs to run them")
    return "gguf-kvb" if fused else "gguf"


def _read_split(p: Path, reader, fields: dict, split: tuple, gguf, tensors: dict) -> tuple:
    """Every shard of the split set ``p`` belongs to, found by llama.cpp's naming and checked as llama.cpp's
    loader checks them (llama-model-loader.cpp): each present, of the same split.count, with its own split.no
    and the same split.tensors.count, no tensor name twice, the tensors adding up to split.tensors.count; the
    metadata is the first shard's, which no other shard may contradict. Returns (the shards' paths, the
    set's metadata)."""
    no, count, total = split
    m = SPLIT_NAME.match(p.name)
    if m is None or p.name != split_name(m["prefix"], no, count):
        raise InputError(p, f"a shard of a split GGUF set (split.no {no}, split.count {count}) must be named "
                            f"{split_name('<name>', no, count)} (llama.cpp's naming), so its other shards can be found")
    paths = [p.with_name(split_name(m["prefix"], i, count)) for i in range(count)]
    for i, q in enumerate(paths):
        if not q.is_file():
            raise InputError(q, f"shard {i + 1} of the split GGUF set of {count} is missing (given {p.name})")
    owner: dict = {}
    first = fields
    for i, q in enumerate(paths):
        r, f = (reader, fields) if q == p else (None, None)
        if r is None:
            r = _open(q, gguf)
            f = _fields(r)
        s = _split_keys(f, q)
        if s is None:
            raise InputError(q, f"not a shard of a split set (no split.count above 1), but named as shard {i + 1} "
                                f"of {count}")
        if s[1] != count:
            raise InputError(q, f"split.count is {s[1]}, {p.name} says {count}")
        if s[0] != i:
            raise InputError(q, f"split.no is {s[0]}, but the file is shard {i + 1} of {count} (split.no {i})")
        if s[2] != total:
            raise InputError(q, f"split.tensors.count is {s[2]}, {p.name} says {total}")
        if i == 0:
            first = f
        else:
            _agree(first, f, paths[0], q)
        _add_tensors(r, q, gguf, tensors, owner)
    if len(tensors) != total:
        raise InputError(paths[0], f"split.tensors.count is {total}, the {count} shards hold {len(tensors)} tensors")
    return paths, {k: v for k, v in first.items() if k not in SPLIT_KEYS}


def _agree(first: dict, other: dict, p0: Path, q: Path) -> None:
    """A later shard's metadata against the first's: a key both hold must have one value (llama.cpp reads the
    model from the first shard only, so a different value elsewhere is a file that contradicts its set). The
    gguf package's own header fields (GGUF.*: version, tensor and key counts) are per file."""
    for k, v in other.items():
        if k in SPLIT_KEYS or k.startswith("GGUF.") or k not in first:
            continue
        if first[k] != v:
            raise InputError(q, f"metadata key {k!r} is {v!r}, the first shard {p0.name} says {first[k]!r}")


def _shards_in(p: Path) -> Optional[dict]:
    """{(prefix, count): shard paths} of a directory whose .gguf files are all named as split shards, else None."""
    try:
        files = [q for q in p.iterdir() if q.name.endswith(".gguf")]
    except OSError:
        return None
    sets: dict = {}
    for q in files:
        m = SPLIT_NAME.match(q.name)
        if m is None:
            return None
        sets.setdefault((m["prefix"], m["count"]), []).append(q)
    return sets or None


def is_gguf_split_dir(p: Path) -> bool:
    """A directory whose .gguf files are all shards of split sets (<name>-NNNNN-of-NNNNN.gguf)."""
    return p.is_dir() and _shards_in(p) is not None


def read_gguf_split_dir(p: Path, **kw) -> Checkpoint:
    """The split set a directory holds, read from its first shard by name (or, if that one is missing, from
    the first there is: the missing shard is then named). A directory of several sets names them."""
    sets = _shards_in(p)
    if not sets:
        raise InputError(p, "no split GGUF shards (<name>-00001-of-0000N.gguf) in the directory")
    if len(sets) > 1:
        names = ", ".join(sorted(f"{prefix}-*-of-{count}.gguf" for prefix, count in sets))
        raise InputError(p, f"holds {len(sets)} split GGUF sets ({names}): name one shard of the set to read")
    return read_gguf(min(next(iter(sets.values()))), **kw)


# ------------------------------------------------------------------ config
def config_from_gguf(f: dict, tensors: dict, where="gguf") -> ModelConfig:
    arch = f.get("general.architecture", "llama")
    if not isinstance(arch, str) or arch not in families.gguf_archs():
        raise InputError(where, f"GGUF architecture {arch!r} has no table here (declared: "
                                f"{', '.join(families.gguf_archs())})")
    F = Fields(f, where, "metadata key")
    from ckdiff.models.fields import MAX_POSITIONS, MAX_SIZE, MAX_VOCAB
    sizes = {"embedding_length": MAX_SIZE, "feed_forward_length": MAX_SIZE, "attention.key_length": MAX_SIZE,
             "context_length": MAX_POSITIONS, "vocab_size": MAX_VOCAB}
    ints = {k: F.int(f"{arch}.{k}", lo=0 if k.startswith("expert") else 1, hi=sizes.get(k, 1 << 16)) for k in (
        "embedding_length", "block_count", "attention.head_count", "attention.head_count_kv", "attention.key_length",
        "feed_forward_length", "context_length", "vocab_size", "expert_count", "expert_used_count")}
    nums = {k: F.num(f"{arch}.{k}") for k in ("attention.layer_norm_rms_epsilon", "rope.freq_base")}
    g = lambda k, d=None: ints[k] if k in ints else nums[k] if k in nums else f.get(f"{arch}.{k}", d)  # noqa: E731
    D, L, H = g("embedding_length"), g("block_count"), g("attention.head_count")
    if None in (D, L, H):
        raise InputError(where, "GGUF metadata lacks embedding_length/block_count/attention.head_count")
    K = g("attention.head_count_kv") or H
    emb = tensors.get(GGUF["embed"])
    E = g("expert_count") or 0
    fam = families.for_gguf(arch, bool(E))
    if fam is None:
        raise InputError(where, f"GGUF architecture {arch!r} {'with' if E else 'without'} experts: no family declares it")
    extra = gguf_extra(fam, f, where)
    own = fam.gguf_read(F, arch) if fam.gguf_read else {}
    extra.update(own.get("extra", {}))
    return ModelConfig(
        family=fam.name, hidden=D, layers=L, heads=H, kv_heads=own.get("kv_heads", K),
        head_dim=own.get("head_dim") or g("attention.key_length") or D // H,
        ffn=own.get("ffn") or g("feed_forward_length") or 4 * D,
        vocab=emb.shape[0] if emb is not None else g("vocab_size"),
        norm_eps=g("attention.layer_norm_rms_epsilon") or 1e-5, rope_theta=g("rope.freq_base") or 10000.0,
        tied=GGUF["head"] not in tensors, max_pos=g("context_length") or 2048, experts=E,
        experts_per_tok=g("expert_used_count") or 0, hf_model_type=fam.hf_model_types[0],
        rope_scaling=rope_scaling(f, arch, where), rope_freq_factors=_freq_factors(tensors, where),
        sliding_window=own.get("sliding_window"), extra=extra).check(where)


def gguf_extra(fam, f: dict, where="gguf") -> dict:
    """The family's extra config values a GGUF file says (``Family.gguf_extra``): metadata keys read where
    present, type- and range-checked as the family declares the value (an integer, a positive number, a
    flag); values llama.cpp's graph fixes for the arch as they are."""
    from ckdiff.models.fields import MAX_SIZE
    out = {}
    F = Fields(f, where, "metadata key")
    for name, key in fam.gguf_extra.items():
        if not isinstance(key, str):
            out[name] = key
            continue
        k, ex = f"{fam.gguf_arch}.{key}", fam.extra_keys.get(name)
        kind = ex.kind if ex is not None else None
        v = (F.int(k, lo=ex.lo, hi=MAX_SIZE) if kind == "int" else F.num(k) if kind == "num"
             else F.flag(k) if kind == "flag" else f.get(k))
        if v is not None:
            out[name] = v
    return out


def rope_scaling(f: dict, arch: str, where="gguf") -> Optional[dict]:
    """``{arch}.rope.scaling.*`` (llama.cpp's keys: type none/linear/yarn/longrope, factor, original context
    length; YaRN's betas and deepseek2's log multiplier) as HF spells rope scaling; None for none. Values are
    type-checked (one line naming the key)."""
    from ckdiff.models.config import Fields
    sub = {k[len(f"{arch}.rope.scaling."):]: v for k, v in f.items() if k.startswith(f"{arch}.rope.scaling.")}
    if not sub:
        return None
    x = Fields(sub, where, f"metadata key '{arch}.rope.scaling.'")
    kind = x.text("type", choices=("none", "linear", "yarn", "longrope")) or "none"
    factor = x.num("factor")
    orig = x.int("original_context_length", hi=1 << 32)
    if kind == "none":
        return None
    out = {"rope_type": kind, "factor": factor if factor is not None else 1.0}
    if orig is not None:
        out["original_max_position_embeddings"] = orig
    if kind == "yarn":
        # the correction range's betas are HF's beta_fast / beta_slow. llama.cpp's other YaRN values (extension
        # and attention factors, another arch's log multiplier) are not HF's keys: kept under their own names, so
        # a file that sets them differs from a config that cannot say them. ggml always rounds the correction
        # range outward (ggml_rope_yarn_corr_dims: floor / ceil), HF's truncate true (its default, left out)
        for k, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if x.num(k) is not None:
                out[hf] = x.num(k)
        for k in ("yarn_ext_factor", "yarn_attn_factor", "yarn_log_multiplier"):
            v = sub.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                x.fail(k, "a finite number", v)
            if v is not None:
                out[k] = float(v)
        if arch in YARN_LOG_MUL_IS_MSCALE and "yarn_log_multiplier" in out:
            out.update(yarn_mscales(out.pop("yarn_log_multiplier"), x))
    return out


# archs whose ``rope.scaling.yarn_log_multiplier`` is 0.1 x HF's mscale_all_dim (llama.cpp conversion/deepseek.py,
# DeepseekV2Model.set_gguf_parameters; llama.cpp PR 17945). The file has one value where HF has two (mscale for
# the cos/sin factor, mscale_all_dim for the score scale): llama.cpp's deepseek2 graph takes them as equal
YARN_LOG_MUL_IS_MSCALE = ("deepseek2",)


def yarn_mscales(mul: float, x) -> dict:
    """HF's ``mscale`` and ``mscale_all_dim``, both multiplier / 0.1, to float32 precision (the file stores the
    multiplier in float32: the shortest decimal that rounds to the same float32)."""
    if mul < 0:
        x.fail("yarn_log_multiplier", "a finite number >= 0", mul)
    m = float(np.format_float_positional(np.float32(mul / 0.1), unique=True, trim="-"))
    return {"mscale": m, "mscale_all_dim": m}


def yarn_log_multiplier(sc: dict, where) -> Optional[float]:
    """What llama.cpp's converter writes as deepseek2's ``rope.scaling.yarn_log_multiplier`` for HF rope scaling
    ``sc``: 0.1 x mscale_all_dim, None without one. The file cannot say an mscale other than mscale_all_dim
    (which sets the cos/sin attention factor to mscale(factor, mscale) / mscale(factor, mscale_all_dim)):
    refused, as no GGUF says that function."""
    m = sc.get("mscale_all_dim")
    if m is None:
        return None
    if m and (sc.get("rope_type") or sc.get("type")) == "yarn" and sc.get("mscale") != m:
        raise InputError(where, f"rope scaling mscale {sc.get('mscale')!r} != mscale_all_dim {m!r}: a deepseek2 "
                                "GGUF has one yarn_log_multiplier (0.1 x mscale_all_dim) for both")
    return 0.1 * float(m)


GGUF_FREQS = "rope_freqs.weight"


def _freq_factors(tensors: dict, where) -> tuple | None:
    """llama.cpp's ``rope_freqs.weight`` (Llama 3.1+ converted by convert_hf_to_gguf.py): one divisor per
    rotary frequency, applied by ggml's rope as theta / factor."""
    t = tensors.get("rope_freqs.weight")
    if t is None:
        return None
    v = t.load().double().reshape(-1)
    if not bool(torch.isfinite(v).all()) or not bool((v > 0).all()):
        raise InputError(where, "rope_freqs.weight holds values that are not positive finite numbers")
    return tuple(float(x) for x in v)


def canonical(f: dict, tensors: dict) -> dict:
    c = config_from_gguf(f, tensors)
    out = dict(family=c.family, hidden=c.hidden, layers=c.layers, heads=c.heads, kv_heads=c.kv_heads,
               head_dim=c.head_dim, ffn=c.ffn, vocab=c.vocab, norm_eps=c.norm_eps, rope_theta=c.rope_theta,
               tied=c.tied, activation=families.family(c.family).activation, max_pos=c.max_pos)
    if GGUF_FREQS not in tensors:  # llama.cpp stores Llama-3 scaling as per-frequency factors (rope_freqs.weight)
        from ckdiff.models.config import _rope_scaling
        out["rope_scaling"] = _rope_scaling(c.rope_scaling)
    if c.experts:
        out.update(experts=c.experts, experts_per_tok=c.experts_per_tok)
    if c.sliding_window:  # where the family reads a window from the file (GPT-OSS)
        out["sliding_window"] = c.sliding_window
    out.update(c.extra)  # what the file says of the family's own values (llama.cpp's fixed ones included)
    return out


# ------------------------------------------------------------------ layout table (HF -> GGUF)
def hf_to_gguf(cfg: ModelConfig, kv_b: bool = False) -> list:
    """The table of llama.cpp's converter for ``cfg``'s family, derived from its declaration: its GGUF names
    (``layout_names["gguf"]`` where declared, else llama's), q/k permuted to interleaved pairs (q with the query
    head count, k with the KV head count) unless the family declares the GGUF rotary half-split; norms stored
    as ``1 + w`` for a ``1 + w`` norm (Gemma); q/k/v and o biases, sinks and q/k norms when the block has them;
    per-expert HF tensors stacked over the experts (``ffn_{gate,up,down}_exps``).

    A slot whose GGUF name is a pair is split by the converter: MLA's ``kv_b_proj`` into ``attn_k_b`` (each
    head's k part transposed) and ``attn_v_b`` (llama.cpp ``conversion/deepseek.py``), GPT-OSS's fused
    ``gate_up_proj`` (gate and up alternating) into ``ffn_gate_exps`` / ``ffn_up_exps`` with its ``down_proj``
    transposed to ``[E, D, F]`` (``conversion/gpt_oss.py``). An MoE model's dense first layers (DeepSeek's
    first_k_dense_replace) keep ``ffn_{gate,up,down}``; the MoE rows apply to the other layers.

    ``kv_b``: the deepseek2 layout of files written before llama.cpp split ``kv_b_proj`` (format ``gguf-kvb``):
    ``attn_kv_b`` is ``kv_b_proj`` as it is."""
    from ckdiff.formats.layouts import MOE_HF, family_for
    from ckdiff.models.families import Attn, Norm, Rotary
    from ckdiff.tensor.ops_fused import Deinterleave, SplitKvB, SwapLast
    fam = family_for(cfg, "gguf")
    hf, G = fam.hf_names, fam.layout_names.get("gguf") or GGUF
    if fam.layout_rotary.get("gguf", Rotary.INTERLEAVED) is Rotary.INTERLEAVED:
        qop, kop = PermuteRope(cfg.heads, cfg.head_dim), PermuteRope(cfg.kv_heads, cfg.head_dim)
    else:
        qop = kop = Identity()
    norm = AddConst(1.0) if fam.block.norm is Norm.RMS_PLUS_ONE else Identity()
    x = cfg.extra or {}
    rules = [R(hf["embed"], G["embed"]), R(hf["attn_norm"], G["attn_norm"], norm)]
    if fam.block.attn is Attn.MLA:  # DeepSeek: no rotary permutation (llama.cpp's deepseek2 ropes adjacent pairs,
        # as DeepSeek's rope_interleave weights are laid out)
        q = ("q_down", "q_down_norm", "q_up") if x.get("q_lora_rank") is not None else ("mla_q",)
        rules += [R(hf[s], G[s]) for s in q + ("kv_down", "kv_down_norm")]
        rules.append(R(hf["kv_up"], KV_B) if kv_b else
                     R(hf["kv_up"], G["kv_up"], SplitKvB(cfg.heads, x["qk_nope_head_dim"], x["v_head_dim"])))
    else:
        rules += [R(hf["q"], G["q"], qop), R(hf["k"], G["k"], kop), R(hf["v"], G["v"])]
    rules.append(R(hf["o"], G["o"]))
    if fam.block.o_bias:
        rules.append(R(hf["o_b"], G["o_b"]))
    if fam.block.sinks:
        rules.append(R(hf["sinks"], G["sinks"]))
    rules.append(R(hf["mlp_norm"], G["mlp_norm"], norm))
    if fam.block.qkv_bias:
        rules += [R(hf[f"{s}_b"], G[f"{s}_b"] if f"{s}_b" in G else G[s].replace(".weight", ".bias"), op)
                  for s, op in (("q", qop), ("k", kop), ("v", Identity()))]
    if fam.block.qk_norm:  # per-head RMS norms over head_dim: no rows to permute
        rules += [R(hf[s], G[s], norm) for s in ("q_norm", "k_norm")]
    dense = [i for i in range(cfg.layers) if families.dense_layer(cfg, i)]
    if dense and "gate" not in G:
        raise InputError("config", f"{fam.name}: layers {dense} have a dense MLP, which llama.cpp's {fam.gguf_arch} "
                                   "has no tensors for (every layer's MLP is the MoE there)")
    if fam.block.mlp is Mlp.MOE:
        E = cfg.experts
        moe = [i for i in range(cfg.layers) if i not in dense] if dense else None
        if "expert" in hf:  # Mixtral: experts.{e}.w{n}
            rules.append(R(MOE_HF["router"], GGUF["router"]))
            for n, w in ((1, "gate"), (2, "down"), (3, "up")):
                rules.append(R([MOE_HF["w"].format(e=e, n=n) for e in range(E)], GGUF["exps"].replace("{w}", w),
                               Stack(E)))
        elif "experts_gate_up" in hf:  # GPT-OSS: experts fused over E, gate and up alternating
            rules += [R(hf["router"], G["router"], layers=moe), R(hf["router_b"], G["router_b"], layers=moe),
                      R(hf["experts_gate_up"], G["experts_gate_up"], Deinterleave(transpose=True), layers=moe),
                      R(hf["experts_gate_up_b"], G["experts_gate_up_b"], Deinterleave(), layers=moe),
                      R(hf["experts_down"], G["experts_down"], SwapLast(), layers=moe),
                      R(hf["experts_down_b"], G["experts_down_b"], layers=moe)]
        else:  # one HF slot per expert weight (Qwen3-MoE's, DeepSeek's experts.{e}.gate_proj ...)
            rules.append(R(hf["router"], G["router"], layers=moe))
            for s in ("expert_gate", "expert_down", "expert_up"):
                t = hf[s].replace("{i}", "{{i}}")
                rules.append(R([t.format(e=e) for e in range(E)], G[s], Stack(E), layers=moe))
        if "e_bias" in hf:
            rules.append(R(hf["e_bias"], G["e_bias"], layers=moe))
        if fam.block.shared_expert:
            rules += [R(hf[s], G[s], layers=moe) for s in ("shared_gate", "shared_up", "shared_down")]
        if dense:
            rules += [R(hf[s], G[s], layers=dense) for s in ("gate", "up", "down")]
    else:
        rules += [R(hf[s], G[s], Identity()) for s in ("gate", "up", "down")]
    rules.append(R(hf["norm"], G["norm"], norm))
    if not cfg.tied:
        rules.append(R(hf["head"], G["head"]))
    return rules


# ------------------------------------------------------------------ writer (fixtures, golden entries)
def write_gguf(path: Path, hf: dict, cfg: ModelConfig, qtype: str = "F16", keep_float=("norm",),
               faults=None) -> Path:
    """A GGUF file (the family's arch) of the HF tensors ``hf``, written by the gguf package's writer, with the
    metadata keys llama.cpp's converter writes (the family's own through ``gguf_write``); 2-D weights are
    quantized to ``qtype`` by the package's own quantizer (norms stay F32, as llama.cpp keeps them).
    ``faults`` (tests only, convert/faults.py) sees the table."""
    from ckdiff.convert.faults import NONE
    gguf = _gguf()
    from ckdiff.tensor.lazy import EagerTensor
    from ckdiff.tensor.table import apply
    src = {k: EagerTensor(k, v, "<generated>") for k, v in hf.items()}
    table = (faults or NONE).on_rules("gguf", cfg, hf_to_gguf(cfg))
    tensors = {k: v.load().float().numpy() for k, v in apply(src, table, cfg.layers).items()}
    fam = families.family(cfg.family)
    sc = cfg.rope_scaling or {}
    mul = yarn_log_multiplier(sc, str(path)) if fam.gguf_arch in YARN_LOG_MUL_IS_MSCALE else None
    w = gguf.GGUFWriter(str(path), fam.gguf_arch)
    meta = {"block_count": cfg.layers, "embedding_length": cfg.hidden, "feed_forward_length": cfg.ffn,
            "attention.head_count": cfg.heads, "attention.head_count_kv": cfg.kv_heads,
            "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
            "attention.layer_norm_rms_epsilon": float(cfg.norm_eps), "rope.freq_base": float(cfg.rope_theta),
            "context_length": cfg.max_pos, "vocab_size": cfg.vocab}
    if cfg.experts:
        meta.update({"expert_count": cfg.experts, "expert_used_count": cfg.experts_per_tok})
    meta.update(fam.gguf_write(cfg) if fam.gguf_write else {})  # what llama.cpp writes for the arch on its own
    for key, v in meta.items():
        k = f"{fam.gguf_arch}.{key}"
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif v is not None:
            w.add_float32(k, float(v))
    kind = sc.get("rope_type") or sc.get("type")
    if kind in ("linear", "yarn", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(float(sc.get("factor", 1.0)))
        if sc.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(sc["original_max_position_embeddings"]))
        if kind == "yarn" and sc.get("beta_fast") is not None:  # as llama.cpp's converter writes them
            w.add_rope_scaling_yarn_beta_fast(float(sc["beta_fast"]))
        if kind == "yarn" and sc.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(sc["beta_slow"]))
    elif kind not in (None, "default"):
        raise InputError(str(path), f"rope scaling {kind!r}: llama.cpp keeps it as rope_freqs factors, which "
                                    "this writer does not write")
    if mul is not None:  # whatever the rope type, as llama.cpp's converter writes it
        w.add_rope_scaling_yarn_log_mul(mul)
    for name, key in fam.gguf_extra.items():  # the family's values llama.cpp keeps as metadata
        v = (cfg.extra or {}).get(name)
        if isinstance(key, str) and isinstance(v, int) and not isinstance(v, bool) and key not in meta:
            w.add_uint32(f"{fam.gguf_arch}.{key}", v)
    qt = gguf.GGMLQuantizationType[qtype]
    for k, a in tensors.items():
        if a.ndim == 1 or any(s in k for s in keep_float):
            w.add_tensor(k, a.astype(np.float32))
        elif qtype == "F16" or a.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:  # llama.cpp falls back likewise
            w.add_tensor(k, a.astype(np.float16))
        elif qtype == "F32":
            w.add_tensor(k, a.astype(np.float32))
        else:
            w.add_tensor(k, gguf.quants.quantize(a, qt), raw_dtype=qt)  # byte shape; logical from the type
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# ------------------------------------------------------------------ declaration (formats/registry.py)
def _declare() -> None:
    from ckdiff.formats.layouts import DROP, register_table
    from ckdiff.formats.registry import Format, Input, Runtime, register
    register_table("gguf", lambda cfg: hf_to_gguf(cfg))  # looked up per call: tests patch the table
    same = dict(layout="gguf", config_file=".", config=config_from_gguf, canonical=canonical, drop=tuple(DROP["gguf"]),
                runtime=Runtime.VIA_HF, layer=r"^blk\.(\d+)\.", mapped_into=True)
    register(Format("gguf", "a .gguf file (llama.cpp), read through the gguf package; a shard of a split set "
                            "(<name>-00001-of-0000N.gguf) reads the whole set", is_gguf, read_gguf, priority=20,
                    input=Input.FILE, **same))
    register(Format("gguf-split", "a directory holding the shards of one split GGUF set, read as one gguf checkpoint",
                    is_gguf_split_dir, read_gguf_split_dir, priority=70, **same))
    # never detected: the gguf reader names a file of this layout so (its tensor names differ from gguf's)
    register(Format("gguf-kvb", "a deepseek2 .gguf from before llama.cpp split MLA's kv_b_proj (one attn_kv_b a "
                                "layer), as the gguf reader finds it", lambda p: False, read_gguf, priority=25,
                    input=Input.FILE, **{**same, "names": "gguf-kvb", "table": lambda cfg: hf_to_gguf(cfg, kv_b=True)}))


_declare()
