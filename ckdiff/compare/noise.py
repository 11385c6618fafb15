"""The noise floor of a logit comparison: what B's precision and encoding alone do to A's function.

A checkpoint's *encoding* is how its weights are stored: float32/float16/bfloat16, JetStream int8/int4
(per channel or in 128-blocks), a GGUF block quant (Q8_0, Q4_0, ...), FP8 with block scales. The floor of a
pair applies the lossier side's encoding (quantize, then dequantize; or cast) to the other side's weights,
in that side's own layout, and runs that side's runtime on the result: the divergence between the two runs
is what a correct conversion into the lossy encoding reaches on these weights and prompts. ``compare_logits``
then judges the observed divergence against a multiple of that floor (profiles below).

Per-row and per-row-block encodings commute with the row permutations between layouts (rotary, head
order), so the floor of a block-quantized side is its own quantization's error in expectation; a fused
QKV or GLU regroups rows across FP8's 128-row blocks, where the floor is an estimate of the same size.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ckdiff.tensor.lazy import Checkpoint, LazyTensor

# embeddings and output heads in any layout (FP8 checkpoints usually keep these in 16 bits)
EMBED_OR_HEAD = re.compile(r"(embed|tok_embeddings|word_embeddings|embedder|token_embd|lm_head|(^|\.)output\.weight$|"
                           r"output_layer)")


@dataclass(frozen=True)
class Encoding:
    kind: str   # float | jetstream | gguf | fp8
    name: str   # float dtype, JetStream quantize_type, GGUF type, FP8 dtype
    rank: int   # how lossy: the floor applies the higher rank's encoding to the other side
    block: tuple = ()
    embed_too: bool = True  # FP8: embeddings and head encoded as well
    rest: str = ""  # FP8: the float dtype of the tensors stored without FP8 (norms, embeddings)
    # "views": the checkpoint whose block-scaled views (compressed-tensors, any encoding declared on the
    # protocol) give each weight's reference quantizer (tensor/blockscaled.py reencoded)
    ref: object = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        if self.kind == "float":
            return self.name
        if self.kind == "fp8":
            return f"{self.name} block {self.block[0]}x{self.block[1]}" + ("" if self.embed_too else
                                                                          " (embeddings and head unquantized)")
        return f"{self.kind} {self.name}"


WEIGHT_PRECISION = ["float8_e5m2", "float8_e4m3fn", "bfloat16", "float16", "float32", "float64"]


def weight_dtype(ck: Checkpoint) -> Optional[str]:
    """The least precise float dtype among a checkpoint's weights (quantization scales aside)."""
    seen = {str(t.dtype).replace("torch.", "") for k, t in ck.tensors.items()
            if t.dtype.is_floating_point and not k.endswith("_scaler")}
    seen &= set(WEIGHT_PRECISION)
    return min(seen, key=WEIGHT_PRECISION.index) if seen else None


FLOAT_RANK = {"float64": 0, "float32": 0, "float16": 1, "bfloat16": 2}
GGUF_RANK = {"F32": 0, "F16": 1, "BF16": 2, "Q8_0": 3, "Q6_K": 4}  # the rest (4-5 bit) rank 5


def encoding_of(ck: Checkpoint) -> Encoding:
    from ckdiff.formats.fp8 import Fp8Block, _block, fp8_pairs
    from ckdiff.formats.jetstream_quant import is_quantized, qtype_of
    t = ck.tensors
    # FP8 weights as stored (codes + _scale_inv) or as the logical views open_checkpoint makes of them
    pairs = fp8_pairs(t) or {k: k for k, v in t.items() if isinstance(v, Fp8Block)}
    if pairs:
        first = t[next(iter(pairs))]
        w = first.w if isinstance(first, Fp8Block) else first
        rest = {str(v.dtype).replace("torch.", "") for k, v in t.items()
                if k not in pairs and v.dtype.is_floating_point and not k.endswith("_scale_inv")}
        rest = min(rest & set(WEIGHT_PRECISION), key=WEIGHT_PRECISION.index, default="")
        return Encoding("fp8", str(w.dtype).replace("torch.", ""), 3, _block(ck),
                        embed_too=any(EMBED_OR_HEAD.search(k) for k in pairs), rest=rest)
    if is_quantized(t):
        q = qtype_of(ck.config or {}, t)
        return Encoding("jetstream", q, 5 if q.startswith("int4") else 3)
    from ckdiff.formats import registry
    f = registry.lookup(ck.format)
    if f is not None and f.layout == "gguf" and "->" not in ck.format:  # gguf, gguf-kvb: the lossiest type its
        # weights (2-D, stacked experts 3-D) are stored in, the most common among equals (norms stay F32 in every
        # GGUF; GPT-OSS keeps attention in F16 beside MXFP4 experts)
        names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
        kinds = Counter(getattr(v, "qtype", None) or names.get(v.dtype, "F32") for v in t.values()
                        if len(v.shape) >= 2)
        q = max(kinds, key=lambda k: (GGUF_RANK.get(k, 5), kinds[k])) if kinds else "F32"
        return Encoding("gguf", q, GGUF_RANK.get(q, 5), ref=ck)
    from ckdiff.tensor.blockscaled import BlockScaled
    views = sorted({v.encoding for v in t.values() if isinstance(v, BlockScaled)})
    if views:  # another encoding on the block-scaled protocol: each view's own reference quantizer
        return Encoding("views", ", ".join(views), 4, ref=ck)
    d = weight_dtype(ck) or "float32"
    return Encoding("float", d, FLOAT_RANK.get(d, 3))


def lossier(ea: Encoding, eb: Encoding) -> tuple[Encoding, str]:
    """(the encoding the floor applies, the side it is applied to), the same whichever side is A: the
    higher rank's encoding onto the other side; equal ranks break by name, equal encodings by path."""
    ka, kb = (ea.rank, ea.kind, ea.name), (eb.rank, eb.kind, eb.name)
    if ka > kb:
        return ea, "B"
    if kb > ka:
        return eb, "A"
    return ea, ""  # the same encoding: the caller picks the side


class Encoded(LazyTensor):
    """``fn`` applied to a tensor a block of ``block_rows`` rows at a time (rows keep their own blocks)."""

    def __init__(self, t: LazyTensor, fn: Callable, block_rows: int = 1):
        super().__init__(t.name, t.shape, torch.float32, t.origin)
        self.t, self.fn, self.block_rows = t, fn, max(1, block_rows)

    def rows(self, start, stop):
        b = self.block_rows
        lo, hi = (start // b) * b, min(self.shape[0], -(-stop // b) * b)
        return self.fn(self.t.rows(lo, hi).float())[start - lo:stop - lo]

    def load(self):
        return self.rows(0, self.shape[0]) if self.shape else self.fn(self.t.load().float())


def _cast(dtype: torch.dtype) -> Callable:
    return lambda x: x.to(dtype).float()


def _gguf(qtype: str) -> Callable:
    import gguf
    qt = gguf.GGMLQuantizationType[qtype]

    def fn(x):
        a = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt),
                                                     dtype=np.float32)).reshape(x.shape)
    return fn


def fp8_block_roundtrip(x: torch.Tensor, block: tuple, dtype=torch.float8_e4m3fn) -> torch.Tensor:
    """DeepSeek-V3's block quantizer and its inverse: per (bm x bn) block s = amax / fp8 max, codes x / s
    rounded to FP8, dequantized as codes * s (inference/kernel.py weight_quant / weight_dequant)."""
    bm, bn = block
    M, N = x.shape
    fmax = float(torch.finfo(dtype).max)
    pm, pn = -(-M // bm) * bm, -(-N // bn) * bn
    xp = torch.zeros(pm, pn)
    xp[:M, :N] = x
    blocks = xp.reshape(pm // bm, bm, pn // bn, bn)
    s = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp_min(1e-12) / fmax
    q = (blocks / s).to(dtype).float() * s
    return q.reshape(pm, pn)[:M, :N]


def encode(tensors: dict, enc: Encoding) -> dict:
    """``tensors`` (float, logical) as they read back after ``enc``: quantized and dequantized, or cast."""
    if enc.kind == "float" and enc.rank == 0:
        return dict(tensors)
    if enc.kind == "jetstream":
        from ckdiff.formats.jetstream_quant import fake_quantize
        return fake_quantize(tensors, enc.name)
    if enc.kind == "views":
        from ckdiff.tensor.blockscaled import reencoded
        out = reencoded(tensors, enc.ref.tensors)
        if out is None:
            from ckdiff.errors import InputError
            raise InputError(enc.ref.path, f"{enc.name}: no noise floor: the encoded tensors have no float "
                                           "namesake of their shape on the other side (compare like layouts)")
        return out
    out = {}
    for k, t in tensors.items():
        if not t.dtype.is_floating_point:
            out[k] = t
        elif enc.kind == "float":
            out[k] = Encoded(t, _cast(getattr(torch, enc.name)))
        elif enc.kind == "gguf":
            import gguf
            if len(t.shape) < 2 or "norm" in k:  # llama.cpp keeps 1-D tensors and norms in F32
                out[k] = t
            elif enc.name in ("F16", "BF16", "F32") or t.shape[-1] % gguf.GGML_QUANT_SIZES[
                    gguf.GGMLQuantizationType[enc.name]][0]:
                out[k] = Encoded(t, _cast(torch.bfloat16 if enc.name == "BF16" else
                                          torch.float32 if enc.name == "F32" else torch.float16))
            else:
                out[k] = Encoded(t, _gguf(enc.name))
        elif enc.kind == "fp8":
            if len(t.shape) == 2 and (enc.embed_too or not EMBED_OR_HEAD.search(k)):
                dt = getattr(torch, enc.name)
                out[k] = Encoded(t, lambda x, dt=dt: fp8_block_roundtrip(x, enc.block, dt), enc.block[0])
            elif enc.rest and FLOAT_RANK.get(enc.rest, 0) > 0:
                out[k] = Encoded(t, _cast(getattr(torch, enc.rest)))
            else:
                out[k] = t
        else:
            out[k] = t
    return out


def floor_checkpoint(ck: Checkpoint, enc: Encoding) -> Checkpoint:
    """``ck`` with its logical (dequantized) weights passed through ``enc``, for its own runtime. A GGUF
    encoding is applied as the file itself stores each tensor (``like_gguf_file``) where ``ck`` maps onto it,
    else by the type most of its 2-D tensors have."""
    from ckdiff.runtime.forward import logical_tensors
    tensors = logical_tensors(ck)
    out = like_gguf_file(ck, tensors, enc.ref) if enc.kind == "gguf" and enc.ref is not None else None
    return Checkpoint(ck.path, ck.format, out if out is not None else encode(tensors, enc), ck.config, ck.meta)


def like_gguf_file(ck: Checkpoint, tensors: dict, gguf_ck: Checkpoint) -> Optional[dict]:
    """``tensors`` (``ck``'s logical weights, in its layout) as the GGUF file ``gguf_ck`` stores them: mapped into
    the GGUF layout through the table, each tensor quantized or cast to the type the file holds under that name
    (llama.cpp keeps routers in F32, quantizes GPT-OSS's experts along the transposed axis, keeps MLA's small
    tensors in F16), and mapped back. None where ``ck`` does not map onto the file's tensors (another model,
    a layout without a table): the caller falls back to one type for every 2-D tensor."""
    from ckdiff.formats import registry
    from ckdiff.formats.layouts import convert_formats
    from ckdiff.models.config import model_config
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
    try:
        src, dst = registry.lookup(ck.format), registry.lookup(gguf_ck.format)
        same = ck.format == gguf_ck.format
        cfg = None if same else model_config(ck)
        mapped = tensors if same else convert_formats(tensors, src, dst, cfg, ck.path)
        out = {}
        for k, t in mapped.items():
            g = gguf_ck.tensors.get(k)
            if g is None or tuple(g.shape) != tuple(t.shape):
                return None
            q = getattr(g, "qtype", None) or names.get(g.dtype)
            if q is None or not t.dtype.is_floating_point:
                return None
            out[k] = t if q == "F32" else Encoded(t, _cast(torch.float16 if q == "F16" else torch.bfloat16)) \
                if q in ("F16", "BF16") else Encoded(t, _gguf(q))
        return out if same else convert_formats(out, dst, src, cfg, ck.path)
    except Exception:  # noqa: BLE001 - no mapping onto this file: the caller's one-type encoding
        return None


# ---------------------------------------------------------------- the profiles
@dataclass(frozen=True)
class Profile:
    """DIFFER when observed > ``kl_mult`` x floor + ``kl_abs`` for the mean, p99 or max per-token KL;
    when top-1 disagreement > ``top1_mult`` x the floor's + ``top1_abs``; or when a layer's hidden-state
    relative error > ``hidden_mult`` x the floor's + ``hidden_abs``; and, when one side's encoding is lossier,
    when that side's distance from the encoded reference (the floor run) exceeds ``close_mult`` x the floor
    (+ the same absolute margins): a correct conversion lands on nearly the same codes."""
    name: str
    kl_mult: float
    kl_abs: float
    top1_mult: float
    top1_abs: float
    hidden_mult: float
    hidden_abs: float
    close_mult: Optional[float]  # the other side against the encoded reference, a fraction of the floor
    #                              (None: not judged; for checkpoints quantized with other arithmetic)


PROFILES = {
    "strict": Profile("strict", 2.0, 1e-7, 1.5, 0.01, 2.0, 1e-5, 0.1),
    "standard": Profile("standard", 4.0, 1e-6, 2.0, 0.02, 4.0, 1e-4, 0.25),
    "relaxed": Profile("relaxed", 10.0, 1e-5, 3.0, 0.05, 10.0, 1e-3, None),
}


@dataclass
class Floor:
    mean_kl: float
    p99_kl: float
    max_kl: float
    top1_agreement: float
    layer_rel_errors: list
    encoding: str       # the encoding applied
    applied_to: str     # "A" or "B"
    reference: str      # what the encoded run is compared with


def p99(kl: torch.Tensor) -> float:
    """The 99th percentile of the per-token KL (linear interpolation, as numpy's default)."""
    return float(torch.quantile(kl.reshape(-1).double(), 0.99)) if kl.numel() else math.nan


def judge(profile: Profile, observed: dict, floor: Floor, max_kl_override: Optional[float] = None,
          encoded_ref: Optional[dict] = None) -> list:
    """One row per signal: name, observed, floor, limit, ratio observed / limit (> 1 fails).

    With ``encoded_ref`` (the other side measured against the floor run itself: the reference's weights in
    the other side's own encoding) three more signals: its mean KL, top-1 disagreement and worst layer's
    hidden-state error must stay within ``close_mult`` x the floor's (+ the same absolute margins)."""
    rows = []
    if encoded_ref is not None and profile.close_mult is not None:
        c = profile.close_mult
        rows.append({"signal": "mean_kl from the encoded reference", "observed": encoded_ref["mean_kl"],
                     "floor": floor.mean_kl, "limit": c * floor.mean_kl + profile.kl_abs})
        dis_f = 1.0 - floor.top1_agreement
        rows.append({"signal": "top1_disagreement from the encoded reference",
                     "observed": 1.0 - encoded_ref["top1_agreement"], "floor": dis_f,
                     "limit": c * dis_f + profile.top1_abs})
        eh, fh = encoded_ref.get("layer_rel_errors") or [], floor.layer_rel_errors or []
        if eh and len(eh) == len(fh):
            w = max(range(len(eh)), key=lambda i: eh[i] / (c * fh[i] + profile.hidden_abs))
            rows.append({"signal": f"hidden_rel_error layer {w} from the encoded reference", "observed": eh[w],
                         "floor": fh[w], "limit": c * fh[w] + profile.hidden_abs})
    for key in ("mean_kl", "p99_kl", "max_kl"):
        lim = profile.kl_mult * getattr(floor, key) + profile.kl_abs
        if key == "max_kl" and max_kl_override is not None:
            lim = max_kl_override
        rows.append({"signal": key, "observed": observed[key], "floor": getattr(floor, key), "limit": lim})
    dis_f = 1.0 - floor.top1_agreement
    rows.append({"signal": "top1_disagreement", "observed": 1.0 - observed["top1_agreement"], "floor": dis_f,
                 "limit": profile.top1_mult * dis_f + profile.top1_abs})
    obs_h, fl_h = observed.get("layer_rel_errors") or [], floor.layer_rel_errors or []
    if obs_h and len(obs_h) == len(fl_h):
        worst = max(range(len(obs_h)), key=lambda i: obs_h[i] / (profile.hidden_mult * fl_h[i] + profile.hidden_abs))
        rows.append({"signal": f"hidden_rel_error layer {worst}", "observed": obs_h[worst], "floor": fl_h[worst],
                     "limit": profile.hidden_mult * fl_h[worst] + profile.hidden_abs})
    for r in rows:
        o = r["observed"]
        r["ratio"] = math.inf if o != o else (o / r["limit"] if r["limit"] > 0 else (math.inf if o > 0 else 0.0))
    return rows


def first_divergent(profile: Profile, observed: list, floor: list) -> Optional[int]:
    """The first layer whose hidden-state error exceeds the profile's limit over the floor."""
    if not observed or len(observed) != len(floor):
        return None
    return next((i for i, (o, f) in enumerate(zip(observed, floor))
                 if not o <= profile.hidden_mult * f + profile.hidden_abs), None)
