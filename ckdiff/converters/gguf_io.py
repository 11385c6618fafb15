"""GGUF files (llama.cpp), read through llama.cpp's own ``gguf`` package, mapped to HF by a table.

Facts (gguf 0.19.0, ``gguf/gguf_reader.py``, ``gguf/quants.py``, ``gguf/constants.py``; llama.cpp
``convert_hf_to_gguf.py`` ``LlamaModel``; /work/shared/specs/formats-today.md section 3):

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
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import families
from ..errors import InputError
from ..families import Mlp
from .inputs import open_input
from .config import ModelConfig
from .lazy import Checkpoint, LazyTensor
from .ops import Identity, PermuteRope, Stack
from .table import R

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
UNIT = {"Q8_0": (32, 0.6), "Q4_0": (32, 1.02), "Q4_K": (32, 1.0), "Q6_K": (16, 1.0)}


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
    if qtype in ("Q8_0", "Q4_0"):
        bs = 34 if qtype == "Q8_0" else 18
        b = np.ascontiguousarray(raw).reshape(-1, bs)
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


class GgufQuant(LazyTensor):
    """A block-quantized GGUF tensor. ``rows`` dequantizes just those rows through the gguf package;
    ``units`` gives each element's own block scale and ``bound`` the rounding bound in those units;
    ``raw_rows`` the stored bytes (codes and scales) for exact comparison of two quantized files."""

    def __init__(self, name, rt, path):
        self.rt = rt
        self.qtype = rt.tensor_type.name
        shape = tuple(int(x) for x in reversed(rt.shape.tolist()))
        super().__init__(name, shape, torch.float32, str(path))
        self.bound = UNIT[self.qtype][1] if self.qtype in UNIT else None

    @property
    def nbytes(self) -> int:  # stored bytes (codes and scales), not the dequantized size
        return int(self.rt.n_bytes)

    def raw_rows(self, start, stop) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.rt.data[start:stop]).copy())

    def rows(self, start, stop):
        gguf = _gguf()
        try:
            x = gguf.quants.dequantize(np.ascontiguousarray(self.rt.data[start:stop]), self.rt.tensor_type)
        except NotImplementedError:
            raise InputError(self.origin, f"{self.name}: the gguf package cannot dequantize {self.qtype}") from None
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape((stop - start,) + self.shape[1:])

    def units(self, start, stop) -> torch.Tensor | None:
        if self.bound is None:
            return None
        u = _units(self.qtype, self.rt.data[start:stop])
        return torch.from_numpy(np.ascontiguousarray(u)).reshape((stop - start,) + self.shape[1:])

    def load(self):
        return self.rows(0, self.shape[0])


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


def read_gguf(p: Path, **_) -> Checkpoint:
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(p), "r")
    except Exception as e:  # noqa: BLE001 - whatever a broken file makes the package raise
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else e.__class__.__name__
        raise InputError(p, f"not a readable GGUF file ({msg})") from None
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    tensors: dict[str, LazyTensor] = {}
    for rt in reader.tensors:
        if rt.name in tensors:
            raise InputError(p, f"tensor {rt.name!r} appears twice")
        tensors[rt.name] = GgufTensor(rt.name, rt, p) if rt.tensor_type in plain else GgufQuant(rt.name, rt, p)
    fields = _fields(reader)
    types = sorted({t.qtype for t in tensors.values() if isinstance(t, GgufQuant)})
    notes = [f"GGUF quantized types {', '.join(types)}: dequantized row by row through the gguf package"] if types else []
    return Checkpoint(str(p), "gguf", tensors, config=fields, meta={"files": [str(p)], "notes": notes,
                                                                   "skipped": {}})


# ------------------------------------------------------------------ config
def config_from_gguf(f: dict, tensors: dict, where="gguf") -> ModelConfig:
    arch = f.get("general.architecture", "llama")
    if arch != "llama":
        raise InputError(where, f"GGUF architecture {arch!r}: only the llama family has a table here")
    g = lambda k, d=None: f.get(f"{arch}.{k}", d)  # noqa: E731
    try:
        D, L, H = g("embedding_length"), g("block_count"), g("attention.head_count")
        if None in (D, L, H):
            raise KeyError("embedding_length/block_count/attention.head_count")
    except KeyError as e:
        raise InputError(where, f"GGUF metadata lacks {e.args[0]}") from None
    K = g("attention.head_count_kv") or H
    emb = tensors.get(GGUF["embed"])
    E = g("expert_count") or 0
    fam = families.for_block("gguf", mlp=Mlp.MOE if E else Mlp.GLU)
    return ModelConfig(
        family=fam.name, hidden=D, layers=L, heads=H, kv_heads=K,
        head_dim=g("attention.key_length") or D // H, ffn=g("feed_forward_length") or 4 * D,
        vocab=emb.shape[0] if emb is not None else g("vocab_size"),
        norm_eps=float(g("attention.layer_norm_rms_epsilon") or 1e-5), rope_theta=float(g("rope.freq_base") or 10000.0),
        tied=GGUF["head"] not in tensors, max_pos=g("context_length") or 2048, experts=E,
        rope_scaling=_rope_scaling(g, where), rope_freq_factors=_freq_factors(tensors, where),
        experts_per_tok=g("expert_used_count") or 0, hf_model_type=fam.hf_model_types[0]).check(where)


def _rope_scaling(g, where) -> dict | None:
    """``{arch}.rope.scaling.*`` as transformers' rope_scaling: linear (factor), yarn (factor, original
    context length, attention factor); llama.cpp writes type "none" or no key for plain rope."""
    kind = g("rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = g("rope.scaling.factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1e6:
        raise InputError(where, f"GGUF rope.scaling.factor {factor!r}: expected a positive number")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        orig = g("rope.scaling.original_context_length")
        if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
            raise InputError(where, f"GGUF rope.scaling.original_context_length {orig!r}: expected a positive integer")
        out = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": orig}
        att = g("rope.scaling.attn_factor")
        if isinstance(att, (int, float)) and not isinstance(att, bool) and att > 0:
            out["attention_factor"] = float(att)
        return out
    raise InputError(where, f"GGUF rope.scaling.type {kind!r}: only none, linear and yarn are read")


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
               tied=c.tied, activation="silu", max_pos=c.max_pos)
    if c.experts:
        out.update(experts=c.experts, experts_per_tok=c.experts_per_tok)
    return out


# ------------------------------------------------------------------ layout table (HF -> GGUF)
def hf_to_gguf(cfg: ModelConfig) -> list:
    from .layouts import HF, MOE_HF, family_for
    fam = family_for(cfg, "gguf")
    rules = [R(HF["embed"], GGUF["embed"]),
             R(HF["attn_norm"], GGUF["attn_norm"]),
             R(HF["q"], GGUF["q"], PermuteRope(cfg.heads, cfg.head_dim)),  # q permuted with H
             R(HF["k"], GGUF["k"], PermuteRope(cfg.kv_heads, cfg.head_dim)),  # k permuted with K
             R(HF["v"], GGUF["v"]), R(HF["o"], GGUF["o"]), R(HF["mlp_norm"], GGUF["mlp_norm"])]
    if fam.block.mlp is Mlp.MOE:
        E = cfg.experts
        rules.append(R(MOE_HF["router"], GGUF["router"]))
        for n, w in ((1, "gate"), (2, "down"), (3, "up")):
            rules.append(R([MOE_HF["w"].format(e=e, n=n) for e in range(E)], GGUF["exps"].replace("{w}", w), Stack(E)))
    else:
        rules += [R(HF[s], GGUF[s], Identity()) for s in ("gate", "up", "down")]
    rules.append(R(HF["norm"], GGUF["norm"]))
    if not cfg.tied:
        rules.append(R(HF["head"], GGUF["head"]))
    return rules


# ------------------------------------------------------------------ writer (fixtures, golden entries)
def write_gguf(path: Path, hf: dict, cfg: ModelConfig, qtype: str = "F16", keep_float=("norm",),
               faults=None) -> Path:
    """A llama GGUF file of the HF tensors ``hf``, written by the gguf package's writer; 2-D weights are
    quantized to ``qtype`` by the package's own quantizer (norms stay F32, as llama.cpp keeps them).
    ``faults`` (tests only, converters/faults.py) sees the table."""
    from .faults import NONE
    gguf = _gguf()
    from .lazy import EagerTensor
    from .table import apply
    src = {k: EagerTensor(k, v, "<generated>") for k, v in hf.items()}
    table = (faults or NONE).on_rules("gguf", cfg, hf_to_gguf(cfg))
    tensors = {k: v.load().float().numpy() for k, v in apply(src, table, cfg.layers).items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.layers)
    w.add_embedding_length(cfg.hidden)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_context_length(cfg.max_pos)
    w.add_vocab_size(cfg.vocab)
    if cfg.experts:
        w.add_expert_count(cfg.experts)
        w.add_expert_used_count(cfg.experts_per_tok)
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


# ------------------------------------------------------------------ declaration (converters/registry.py)
def _declare() -> None:
    from .layouts import DROP
    from .registry import Format, Input, Runtime, register
    register(Format("gguf", "a .gguf file (llama.cpp), read through the gguf package", is_gguf, read_gguf,
                    priority=20, input=Input.FILE, layout="gguf", config_file=".", config=config_from_gguf,
                    canonical=canonical, drop=tuple(DROP["gguf"]), runtime=Runtime.VIA_HF,
                    layer=r"^blk\.(\d+)\."))


_declare()
