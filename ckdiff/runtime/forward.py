"""Reference forward passes, each reading a checkpoint in its own layout and conventions.

One generic decoder (``decoder``) is composed from the family's :class:`~ckdiff.models.families.Block` (norm,
activation, MLP kind, q/k/v biases, parallel residual, embedding scale) and a :class:`Layout` that says
how one layout stores the weights: the key of each slot, the q/k row order (hence which rotary formula
applies), a fused grouped QKV or separate q/k/v, a fused GLU ``[up; gate]`` or separate halves, experts
stacked or one by one, quantized weights, where the output head comes from.

Nothing here converts weights: the HF layout applies rotate_half rotary to HF q/k rows; Meta/JetStream
apply interleaved complex rotary to Meta rows (JetStream Gemma: half-split) and dequantize int8/int4
weights with their scales; Megatron-LLM splits the fused QKV into groups and the GLU into [up; gate] at
run time, as Megatron-LLM does. So each layout is read as it is, independently of the conversion tables'
row ops (the tables' key names are shared: the tensor diff checks those).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as Fn

from ckdiff.models.config import ModelConfig
from ckdiff.tensor.lazy import Checkpoint
from ckdiff.formats.layouts import GEMMA_JS, META, MEGATRON, MOE_JS
from ckdiff.errors import InputError
from ckdiff.models.families import (
    Act,
    Attn,
    Block,
    Family,
    Mlp,
    Norm,
    Rotary,
    Router,
    dense_layer,
    family,
    sliding_layer,
)


@dataclass
class Forward:
    logits: torch.Tensor  # [B, T, V] (float)
    hidden: list  # residual stream after each layer, [B, T, D]


# ---------------------------------------------------------------- shared pieces
def _scaling(cfg: ModelConfig) -> dict:
    sc = dict(cfg.rope_scaling or {})
    sc.setdefault("rope_type", sc.get("type", "default"))
    return sc


def _num(sc: dict, key: str, default=None, where: str = "rope_scaling") -> float:
    """One numeric rope-scaling parameter, range-checked (a positive finite number)."""
    v = sc.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
        raise InputError(where, f"rope_scaling {key!r} = {v!r}: expected a positive number")
    return float(v)


def rope_frequencies(cfg: ModelConfig, T: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [hd/2] in float64, attention factor on cos/sin) for a T-token prompt.

    The rope types of transformers' ``modeling_rope_utils`` (v5.x), written from their formulas:
    default; linear (frequencies / factor); dynamic NTK (base rescaled when T exceeds
    max_position_embeddings, for the whole prompt); YaRN (interpolation/extrapolation ramp between the
    beta_fast/beta_slow correction dims, attention factor 0.1 ln(factor) + 1 or from mscale); llama3
    (wavelength bands); longrope (short or long per-dimension factors by T against the original length,
    attention factor sqrt(1 + ln(factor)/ln(original))). GGUF ``rope_freqs.weight`` (llama.cpp's
    per-dimension frequency divisors) applies on top when the config carries it."""
    hd = cfg.head_dim
    base = cfg.rope_theta
    exps = torch.arange(0, hd, 2, dtype=torch.float64) / hd
    f = 1.0 / (base ** exps)
    sc = _scaling(cfg)
    kind = sc["rope_type"]
    att = 1.0
    if kind == "default":
        pass
    elif kind == "linear":
        f = f / _num(sc, "factor")
    elif kind == "dynamic":
        factor, mp = _num(sc, "factor"), float(cfg.max_pos)
        if T > mp:
            b = base * ((factor * T / mp) - (factor - 1)) ** (hd / (hd - 2))
            f = 1.0 / (b ** exps)
    elif kind == "yarn":
        orig = _num(sc, "original_max_position_embeddings", cfg.max_pos)
        factor = sc.get("factor") or cfg.max_pos / orig
        factor = _num({"factor": factor}, "factor")
        mscale = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
        if sc.get("attention_factor") is not None:
            att = _num(sc, "attention_factor")
        elif sc.get("mscale") and sc.get("mscale_all_dim"):
            att = mscale(factor, _num(sc, "mscale")) / mscale(factor, _num(sc, "mscale_all_dim"))
        else:
            att = mscale(factor)
        # transformers: ``beta_fast or 32``, ``beta_slow or 1`` (an unset or zero value takes the default)
        fast = _num({"beta_fast": sc.get("beta_fast") or 32.0}, "beta_fast")
        slow = _num({"beta_slow": sc.get("beta_slow") or 1.0}, "beta_slow")
        dim_of = lambda rot: hd * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
        lo, hi = dim_of(fast), dim_of(slow)
        if sc.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, hd - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(hd // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        extra = 1 - ramp  # 1: keep the original frequency, 0: interpolate
        f = (f / factor) * (1 - extra) + f * extra
    elif kind == "llama3":
        factor = _num(sc, "factor")
        lo, hi = _num(sc, "low_freq_factor", 1.0), _num(sc, "high_freq_factor", 4.0)
        orig = _num(sc, "original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / f
        smooth = (orig / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > orig / lo, f / factor, f)
        mid = (wavelen <= orig / lo) & (wavelen >= orig / hi)
        f = torch.where(mid, (1 - smooth) * f / factor + smooth * f, scaled)
    elif kind == "longrope":
        orig = _num(sc, "original_max_position_embeddings", cfg.max_pos)
        factor = _num({"factor": sc.get("factor") or cfg.max_pos / orig}, "factor")
        if sc.get("attention_factor") is not None:
            att = _num(sc, "attention_factor")
        else:
            att = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = sc.get("long_factor" if T > orig else "short_factor")
        if not isinstance(ext, (list, tuple)) or len(ext) != hd // 2 or \
                not all(isinstance(x, (int, float)) and x > 0 for x in ext):
            raise InputError("rope_scaling", f"longrope factors must be {hd // 2} positive numbers")
        f = f / torch.tensor(ext, dtype=torch.float64)
    else:
        raise InputError("rope_scaling", f"rope type {kind!r} is not implemented by the reference runtime "
                                         "(default, linear, dynamic, yarn, llama3, longrope are)")
    if cfg.rope_freq_factors is not None:
        ff = torch.tensor(cfg.rope_freq_factors, dtype=torch.float64)
        if ff.shape != f.shape or not bool((ff > 0).all()):
            raise InputError("rope_freqs.weight", f"{len(cfg.rope_freq_factors)} frequency factors for head_dim "
                                                  f"{hd} (expected {hd // 2} positive values)")
        f = f / ff
    return f, att


class Angles:
    """Angles [T, hd/2] with the attention factor that multiplies cos and sin (1 except YaRN/longrope)."""

    def __init__(self, cfg: ModelConfig, T: int):
        f, self.factor = rope_frequencies(cfg, T)
        self.ang = torch.outer(torch.arange(T, dtype=torch.float64), f)

    def cos(self):
        return self.ang.cos() * self.factor

    def sin(self):
        return self.ang.sin() * self.factor


def rope_half(x: torch.Tensor, ang) -> torch.Tensor:
    """HF rotate_half: element i pairs with i + hd/2. x: [B, T, heads, hd]; ``ang`` angles or ``Angles``."""
    c, s_ = ang.cos(), ang.sin()
    cos = torch.cat([c, c], -1).to(x.device, x.dtype)[None, :, None, :]
    sin = torch.cat([s_, s_], -1).to(x.device, x.dtype)[None, :, None, :]
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def rope_interleaved(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
    """Meta / Megatron-LLM: pairs (2i, 2i+1) as complex numbers times exp(i*pos*theta_i)."""
    c, s_ = ang.cos().float(), ang.sin().float()
    c, s_ = c.to(x.device)[None, :, None, :], s_.to(x.device)[None, :, None, :]
    xr = x.float().reshape(*x.shape[:-1], -1, 2)
    re, im = xr[..., 0], xr[..., 1]
    out = torch.stack([re * c - im * s_, re * s_ + im * c], -1)
    return out.reshape(x.shape).to(x.dtype)


def layer_window(cfg: ModelConfig, i: int) -> Optional[int]:
    """Layer i's sliding window (keys at distance < window), or None for full attention: every layer when
    ``sliding_layers`` is None (Mistral), else only the layers it lists (Qwen2 ``max_window_layers``, HF
    ``layer_types``, Megatron-Core ``window_attn_skip_freq``)."""
    if not cfg.sliding_window or not sliding_layer(cfg, i):  # the family's layer_types (GPT-OSS, Qwen2)
        return None
    return cfg.sliding_window if cfg.sliding_layers is None or i in cfg.sliding_layers else None


def attention(q, k, v, cfg: ModelConfig, window: Optional[int] = None, sinks=None, scale: float = 1.0
              ) -> torch.Tensor:
    """q [B,T,H,hd], k [B,T,K,hd], v [B,T,K,hv]; query head h uses KV head h // (H/K). Causal; scores scaled
    by ``scale``/sqrt(hd). ``sinks`` [H]: one more logit per head in the softmax, whose probability goes nowhere."""
    B, T, H, hd = q.shape
    r = H // k.shape[2]
    k = k.repeat_interleave(r, dim=2)
    v = v.repeat_interleave(r, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale / math.sqrt(hd))
    i = torch.arange(T, device=q.device)
    mask = i[None, :] <= i[:, None]
    if window:
        mask &= (i[:, None] - i[None, :]) < window
    s = s.masked_fill(~mask, float("-inf")).float()
    if sinks is None:
        p = torch.softmax(s, -1)
    else:
        sink = sinks.float()[None, :, None, None].expand(B, H, T, 1)
        p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
    return torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), v).reshape(B, T, -1)


def _linear(h, w, b=None):
    y = h @ w.T
    return y if b is None else y + b


def self_attention(h, wq, wk, wv, wo, rope, ang, cfg: ModelConfig, window=None, bias=(None, None, None),
                   qk_norm=None, o_bias=None, sinks=None):
    """Attention over separate q/k/v projections (biases added before rotary), with the layout's own
    rotary. ``qk_norm`` (wq_norm, wk_norm): RMSNorm over each q and k head before rotary (Qwen3). Returns
    the attention output projected by ``wo`` (+ ``o_bias``); the caller adds the residual."""
    B, T, _ = h.shape
    bq, bk, bv = bias
    q = _linear(h, wq, bq).view(B, T, cfg.heads, cfg.head_dim)
    k = _linear(h, wk, bk).view(B, T, cfg.kv_heads, cfg.head_dim)
    if qk_norm is not None:
        q, k = rms_norm(q, qk_norm[0], cfg.norm_eps), rms_norm(k, qk_norm[1], cfg.norm_eps)
    v = _linear(h, wv, bv).view(B, T, cfg.kv_heads, cfg.head_dim)
    return _linear(attention(rope(q, ang), rope(k, ang), v, cfg, window, sinks), wo, o_bias)


def mla_attention(h, w: Callable, has: Callable, rope, ang, cfg: ModelConfig, norm: Callable) -> torch.Tensor:
    """DeepSeek multi-head latent attention. q: q_b(norm(q_a(h))) (or one q projection), per head
    [nope | rope] columns; kv_a(h) = [latent (kv_lora_rank) | k_rope (one head, shared by all heads)];
    kv_b(norm(latent)) per head [k_nope | v]. Only the rope parts rotate (``rope``: the layout's row order
    for them); scores are scaled by 1/sqrt(nope + rope) times ``mla_score_scale``."""
    x = cfg.extra
    B, T, _ = h.shape
    H, dr, dn, dv, r = cfg.heads, cfg.head_dim, x["qk_nope_head_dim"], x["v_head_dim"], x["kv_lora_rank"]
    q = (norm(h @ w("q_down").T, w("q_down_norm")) @ w("q_up").T) if has("q_down") else h @ w("mla_q").T
    q_nope, q_rot = q.view(B, T, H, dn + dr).split([dn, dr], -1)
    latent, k_rot = (h @ w("kv_down").T).split([r, dr], -1)
    k_nope, v = (norm(latent, w("kv_down_norm")) @ w("kv_up").T).view(B, T, H, dn + dv).split([dn, dv], -1)
    k_rot = rope(k_rot.view(B, T, 1, dr), ang).expand(B, T, H, dr)
    q = torch.cat([q_nope, rope(q_rot, ang)], -1)
    k = torch.cat([k_nope, k_rot], -1)
    return attention(q, k, v, cfg, scale=mla_score_scale(cfg)) @ w("o").T


def mla_score_scale(cfg: ModelConfig) -> float:
    """DeepSeek's extra softmax scale under rope scaling: mscale(factor, mscale_all_dim)^2, where mscale(s, m) is
    0.1 m ln(s) + 1 for s > 1, else 1. It applies to every score (the nope part too), on top of the cos/sin
    attention factor of the rotary part, for any rope type but default when ``mscale_all_dim`` is set and
    non-zero (transformers ``modeling_rope_utils.yarn_apply_mscale``, v5, in its DeepSeek-V2 and V3 attention)."""
    sc = _scaling(cfg)
    m = sc.get("mscale_all_dim")
    if sc["rope_type"] == "default" or m is None:
        return 1.0
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not (0 <= m < float("inf")):
        raise InputError("rope_scaling", f"rope_scaling 'mscale_all_dim' = {m!r}: expected a number >= 0")
    if m == 0:
        return 1.0
    factor = sc.get("factor")
    if factor is None and sc["rope_type"] == "yarn":  # YaRN's own default (rope_frequencies)
        factor = cfg.max_pos / _num(sc, "original_max_position_embeddings", cfg.max_pos)
    factor = _num({"factor": factor}, "factor")
    ms = 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    return ms * ms


def grouped_attention(h, wqkv, wo, rope, ang, cfg: ModelConfig, window=None, bias=None) -> torch.Tensor:
    """Attention over a fused QKV in group order: K groups of [q x H/K, k, v] heads (Megatron-LLM,
    HF Falcon 40B; Falcon 7B is the K = 1 case [q_0 .. q_{H-1}, k, v]). A fused bias has the same row
    order and is added before rotary."""
    B, T, _ = h.shape
    K, r, hd = cfg.kv_heads, cfg.heads // cfg.kv_heads, cfg.head_dim
    qkv = _linear(h, wqkv, bias).view(B, T, K, r + 2, hd)
    q = rope(qkv[:, :, :, :r].reshape(B, T, cfg.heads, hd), ang)
    k = rope(qkv[:, :, :, r], ang)
    return attention(q, k, qkv[:, :, :, r + 1], cfg, window) @ wo.T


def rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def gemma_norm(x, w, eps):
    """Gemma RMSNorm: scales by (1 + w), in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)


def route(x, router, cfg: ModelConfig, kind: Router = Router.SOFTMAX_TOPK, bias=None, e_bias=None):
    """(weights [N, k], expert ids [N, k]) of an MoE router over tokens ``x`` [N, D], as the family routes."""
    k, extra = cfg.experts_per_tok, cfg.extra or {}
    if kind is Router.TOPK_SOFTMAX:  # GPT-OSS: top k of the biased logits, softmax over those
        top, idx = _linear(x, router, bias).topk(k, -1)
        return torch.softmax(top.float(), -1).to(x.dtype), idx
    if kind is Router.SIGMOID_GROUPED:  # DeepSeek-V3: the router runs in float32
        scores = _linear(x.float(), router.float(), None if bias is None else bias.float()).sigmoid()
        choice = scores if e_bias is None else scores + e_bias.float()
        G, E = extra["n_group"], cfg.experts
        groups = choice.view(-1, G, E // G).topk(2, -1)[0].sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(extra["topk_group"], -1)[1], 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(E // G, 1), float("-inf"))
        idx = choice.topk(k, -1)[1]
        top = scores.gather(1, idx)
        if extra.get("norm_topk_prob", True):
            top = top / (top.sum(-1, keepdim=True) + 1e-20)
        return (top * extra["routed_scaling_factor"]).to(x.dtype), idx
    top, idx = torch.softmax(_linear(x, router, bias).float(), -1).topk(k, -1)  # Mixtral, Qwen3-MoE
    if extra.get("norm_topk_prob", True):
        top = top / top.sum(-1, keepdim=True)
    return top.to(x.dtype), idx


def moe(h, weights_ids, expert: Callable, cfg: ModelConfig):
    """Sparse MLP: ``expert(e, x)`` over the tokens routed to expert e, summed with their router weights."""
    B, T, D = h.shape
    x = h.reshape(-1, D)
    out = torch.zeros_like(x)
    if x.is_meta:  # the shape check: the router and every expert's weights against every token
        weights_ids(x)
        for e in range(cfg.experts):
            out = out + expert(e, x)
        return out.reshape(B, T, D)
    top, idx = weights_ids(x)
    for e in range(cfg.experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if len(tok):
            out.index_add_(0, tok, expert(e, x[tok]) * top[tok, slot, None])
    return out.reshape(B, T, D)


def glu(x, gate, up, down, act: Callable = Fn.silu):
    return (act(x @ gate.T) * (x @ up.T)) @ down.T


def swiglu_clamp(x, gate_up, down, gate_up_b, down_b, alpha: float, limit: float):
    """GPT-OSS expert: x @ gate_up [D, 2F] (+ bias), gate and up interleaved by column; gate clamped above,
    up clamped both ways at ``limit``; (up + 1) * gate * sigmoid(alpha * gate) @ down [F, D] (+ bias)."""
    gu = x @ gate_up + gate_up_b
    gate, up = gu[..., ::2].clamp(max=limit), gu[..., 1::2].clamp(-limit, limit)
    return ((up + 1) * gate * torch.sigmoid(gate * alpha)) @ down + down_b


def layer_norm(x, w, b, eps):
    return Fn.layer_norm(x, (x.shape[-1],), w, b, eps)


def logical_tensors(ck: Checkpoint) -> dict:
    """The checkpoint's tensors as the model computes with them: every encoding dequantized, never raw codes.

    The one place the runtime meets encodings: FP8 weights with block scales (``<name>_scale_inv``) become
    ``Fp8Block`` views, JetStream int8/int4 codes with ``_scaler`` become dequantizing views of their float
    shape (formats/jetstream_quant.py), GGUF block quants already read dequantized (formats/gguf.py GgufQuant); the scale tensors
    themselves are folded in and not exposed."""
    from ckdiff.formats.fp8 import Fp8Block, _block, fp8_pairs
    from ckdiff.formats.jetstream_quant import SCALER, dequantize_tensors, is_quantized
    t = dict(ck.tensors)
    pairs = fp8_pairs(t)
    if pairs:
        blk = _block(ck)
        for w, sc in pairs.items():
            t[w] = Fp8Block(w, t[w], t.pop(sc), blk)
    if is_quantized(t):
        t = dequantize_tensors(t)
    return {k: v for k, v in t.items() if not k.endswith(SCALER)}


class Weights:
    """Reads tensors by name from the checkpoint's logical (dequantized) view, cast to the compute dtype,
    with a clear error for a missing one. With ``meta``, only shapes: every read is an empty meta tensor
    (the shape check before a forward pass)."""

    def __init__(self, ck: Checkpoint, dtype: torch.dtype, progress=None, meta: bool = False, device=None):
        self.ck, self.dtype, self.meta = ck, dtype, meta
        self.device = torch.device("cpu") if device is None else torch.device(device)  # read on the host, copied
        self.t = logical_tensors(ck)
        self.progress = progress  # told the bytes of each tensor (or chunk) read
        self.read: list = []  # names read, in order (the shape check names the culprit from them)

    def has(self, k):
        return k in self.t

    def _get(self, k: str):
        if k not in self.t:
            raise InputError(self.ck.path, f"reference runtime needs tensor {k!r}, which is missing")
        self.read.append(k)
        return self.t[k]

    def __call__(self, k: str) -> torch.Tensor:
        lt = self._get(k)
        if self.meta:
            return torch.empty(lt.shape, dtype=self.dtype, device="meta")
        self._tell(lt.nbytes)
        if len(lt.shape) > 1 and lt.dtype != self.dtype:
            # cast a row block at a time: a tensor derived through a table (a TP merge) is never whole
            # in its stored dtype beside its cast copy (1 GiB HF vs Megatron TP=2 logits: the fused MLP
            # weight was both, bf16 and float32, at the peak)
            out = torch.empty(lt.shape, dtype=self.dtype)
            for lo, hi in lt.row_chunks():
                out[lo:hi] = lt.rows(lo, hi)
            return out.to(self.device)
        return lt.load().to(self.device, self.dtype)

    def _tell(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)

    def gather(self, k: str, ids: torch.Tensor) -> torch.Tensor:
        """``W(k)[ids]``, reading only the rows the ids name."""
        lt = self._get(k)
        if self.meta:
            return torch.empty(tuple(ids.shape) + tuple(lt.shape[1:]), dtype=self.dtype, device="meta")
        uniq, inv = torch.unique(ids, return_inverse=True)
        rows = torch.stack([lt.rows(int(i), int(i) + 1)[0] for i in uniq]).to(self.device, self.dtype)
        self._tell(lt.nbytes)
        return rows[inv]

    def matmul_t(self, k: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ W(k).T``, reading the weight a row chunk at a time (the output head)."""
        if self.meta:
            return x @ self(k).T
        lt = self._get(k)
        out = []
        for lo, hi in lt.row_chunks():
            out.append(x @ lt.rows(lo, hi).to(self.device, self.dtype).T)
            self._tell(lt.nbytes * (hi - lo) // max(1, lt.nrows))
        return torch.cat(out, -1)


def _decoder(ids, cfg: ModelConfig, embed: Callable, layer: Callable, final: Callable):
    """Layer by layer: yields the residual stream after each layer, returns the float logits.

    ``embed(ids)`` gives the input rows, ``layer(i, x)`` reads layer i's weights, runs it and drops
    them, ``final(x)`` gives the logits; so one layer's weights are held at a time."""
    x = embed(ids)
    for i in range(cfg.layers):
        x = layer(i, x)
        yield x
    return final(x).float()


# ---------------------------------------------------------------- the block, from the family's declaration
ROPE = {Rotary.HALF: rope_half, Rotary.INTERLEAVED: rope_interleaved}
ACT = {Act.SILU: Fn.silu, Act.GELU: Fn.gelu, Act.GELU_TANH: lambda z: Fn.gelu(z, approximate="tanh"),
       Act.SWIGLU_CLAMP: Fn.silu}  # GPT-OSS: the clamped SwiGLU is its experts' own (swiglu_clamp)


def norm_fn(block: Block, eps: float) -> Callable:
    """``norm(x, w, b)`` for the block's norm kind (``b`` only for LayerNorm)."""
    if block.norm is Norm.RMS:
        return lambda x, w, b=None: rms_norm(x, w, eps)
    if block.norm is Norm.RMS_PLUS_ONE:
        return lambda x, w, b=None: gemma_norm(x, w, eps)
    return lambda x, w, b=None: layer_norm(x, w, b, eps)


# ---------------------------------------------------------------- how each layout stores a decoder
@dataclass(frozen=True)
class Layout:
    """How one layout stores a decoder, for the generic runtime.

    ``names`` maps slots to key templates (``{i}`` layer; ``expert``: ``{e}`` expert and ``{n}`` = 1 gate,
    2 down, 3 up; ``experts``: ``{n}`` only, stacked over experts). Slots the decoder reads: embed, head,
    norm, attn_norm, mlp_norm (each norm with ``_b`` for LayerNorm), q/k/v (+ ``_b``) or qkv (+ ``qkv_b``,
    grouped K x [q x H/K, k, v]), o, gate/up/down or glu (rows [up; gate]) + down, router + expert(s).
    A missing ``head`` means the embedding is the head; a parallel block without ``mlp_norm`` shares the
    attention norm."""
    name: str
    names: dict
    rotary: Rotary                 # q/k row order as stored: which rotary formula reads them
    head_if_stored: bool = False   # read ``head`` when the checkpoint holds it (else the config's tie decides)

    def key(self, slot: str, where: str, **ix) -> str:
        if slot not in self.names:
            raise InputError(where, f"the {self.name} layout stores no {slot!r} tensor for this model")
        return self.names[slot].format(**ix)


def _bias_key(names: dict, slot: str) -> dict:
    """``slot_b`` for a layout table that names only the weight: the same key with ``.bias``."""
    w = names.get(slot)
    return {slot + "_b": w[:-len("weight")] + "bias"} if w and w.endswith(".weight") else {}


def hf_layout(ck: Checkpoint, cfg: ModelConfig, fam: Family) -> Layout:
    """HF: the family's declared names; rotate_half rows; one tensor per expert."""
    n = dict(fam.hf_names)
    if cfg.two_norms:  # Falcon 40B: attention and MLP norms of their own (ln_attn, ln_mlp)
        for role, slot in (("attn_norm", "ln_attn"), ("mlp_norm", "ln_mlp")):
            for suffix in ("", "_b"):
                if slot + suffix in n:
                    n[role + suffix] = n[slot + suffix]
    if cfg.tied:
        n.pop("head", None)
    return Layout("hf", n, Rotary.HALF)


def meta_layout(ck: Checkpoint, cfg: ModelConfig, fam: Family) -> Layout:
    """Meta / JetStream: interleaved rows, experts stacked on a leading axis, quantized weights with scales.
    JetStream's Gemma model code has names of its own (``embedder``) and reads half-split rows."""
    if GEMMA_JS["embed"] in ck.tensors:
        return Layout(ck.format, dict(GEMMA_JS), Rotary.HALF)
    n = dict(META, router=MOE_JS["router"], experts=MOE_JS["w"].format(n="{n}"))
    return Layout(ck.format, n, Rotary.INTERLEAVED, head_if_stored=True)


def megatron_layout(ck: Checkpoint, cfg: ModelConfig, fam: Family) -> Layout:
    """Megatron-LLM: grouped fused QKV (and bias), GLU as rows [up; gate]; interleaved rows since
    2023-08 (``rotary_rows="rotate_half"`` for older checkpoints)."""
    M, block = MEGATRON, fam.block
    n = {s: M[s] for s in ("embed", "head", "norm", "norm_b", "attn_norm", "attn_norm_b", "qkv", "o")}
    n.update({"qkv_b": M["qkv_b"]} if "qkv_b" in M else _bias_key(M, "qkv"))
    if block.parallel:  # parallel blocks: the MLP's own LayerNorm, when the model has one
        n.update(mlp_norm=M["mlp_ln"], mlp_norm_b=M["mlp_ln_b"])
    else:
        n["mlp_norm"] = M["mlp_norm"]
    n["glu" if block.mlp is Mlp.GLU else "up"] = M["h4h"]
    n["down"] = M["4hh"]
    rows = Rotary.HALF if cfg.rotary_rows == "rotate_half" else Rotary.INTERLEAVED
    return Layout("megatron", n, rows, head_if_stored=True)


# checkpoint format -> adapter(ck, cfg, family) -> Layout: a new layout is one function and one entry here
LAYOUT_ADAPTERS: dict = {"hf": hf_layout, "meta": meta_layout, "jetstream": meta_layout,
                         "megatron": megatron_layout}


# ---------------------------------------------------------------- the generic decoder
def decoder(layout: Layout, ck: Checkpoint, cfg: ModelConfig, block: Block, ids, dtype, progress=None):
    """The family's block over the layout's weights, layer by layer (see ``_decoder``)."""
    meta = ids.device.type == "meta"
    W = Weights(ck, dtype, progress=progress, meta=meta, device=None if meta else ids.device)
    ang = Angles(cfg, ids.shape[1])
    rope = ROPE[layout.rotary]
    act = ACT[block.act]
    nrm = norm_fn(block, cfg.norm_eps)
    where = ck.path
    has = layout.names.__contains__
    layer_norm_bias = block.norm is Norm.LAYER

    def norm(slot, x, i=None):
        ix = {} if i is None else {"i": i}
        b = W(layout.key(slot + "_b", where, **ix)) if layer_norm_bias else None
        return nrm(x, W(layout.key(slot, where, **ix)), b)

    def attn(i, h):
        f = lambda s: W(layout.key(s, where, i=i))  # noqa: E731
        window = layer_window(cfg, i)
        if block.attn is Attn.MLA:  # the decoupled rotary part's own row order (DeepSeek: interleaved pairs)
            mla_rope = ROPE[Rotary.INTERLEAVED if cfg.extra.get("rope_interleave", True) else layout.rotary]
            return mla_attention(h, f, lambda s: W.has(layout.key(s, where, i=i)), mla_rope, ang, cfg,
                                 lambda x, w: rms_norm(x, w, cfg.norm_eps))
        if has("qkv"):
            b = f("qkv_b") if block.qkv_bias else None
            return grouped_attention(h, f("qkv"), f("o"), rope, ang, cfg, window, b)
        b = (f("q_b"), f("k_b"), f("v_b")) if block.qkv_bias else (None, None, None)
        return self_attention(h, f("q"), f("k"), f("v"), f("o"), rope, ang, cfg, window, b,
                              (f("q_norm"), f("k_norm")) if block.qk_norm else None,
                              f("o_b") if block.o_bias else None, f("sinks") if block.sinks else None)

    def experts(i) -> Callable:
        """``expert(e, x)`` over layer i's experts as the layout stores them."""
        if has("experts"):  # stacked [E, ...] per w1/w2/w3
            w1, w2, w3 = (W(layout.key("experts", where, i=i, n=n)) for n in (1, 2, 3))
            return lambda e, x: glu(x, w1[e], w3[e], w2[e], act)
        if has("experts_gate_up"):  # GPT-OSS: fused [E, D, 2F] gate/up, [E, F, D] down, with biases
            gu, gub, dn, dnb = (W(layout.key(s, where, i=i)) for s in
                                ("experts_gate_up", "experts_gate_up_b", "experts_down", "experts_down_b"))
            a, lim = cfg.extra.get("swiglu_alpha", 1.702), cfg.extra.get("swiglu_limit", 7.0)
            return lambda e, x: swiglu_clamp(x, gu[e], dn[e], gub[e], dnb[e], a, lim)
        if has("expert_gate"):  # one gate/up/down tensor per expert
            return lambda e, x: glu(x, *(W(layout.key("expert_" + p, where, i=i, e=e)) for p in ("gate", "up", "down")),
                                    act)
        return lambda e, x: glu(x, *(W(layout.key("expert", where, i=i, e=e, n=n)) for n in (1, 3, 2)), act)

    def mlp(i, h):
        f = lambda s: W(layout.key(s, where, i=i))  # noqa: E731
        if block.mlp is Mlp.MOE and not dense_layer(cfg, i):
            rb = f("router_b") if has("router_b") else None
            eb = f("e_bias") if has("e_bias") else None
            router = f("router")
            out = moe(h, lambda x: route(x, router, cfg, block.router, rb, eb), experts(i), cfg)
            if block.shared_expert:
                out = out + glu(h, f("shared_gate"), f("shared_up"), f("shared_down"), act)
            return out
        if block.mlp is Mlp.PLAIN:
            return act(h @ f("up").T) @ f("down").T
        if has("glu"):
            u, g = (h @ f("glu").T).chunk(2, dim=-1)  # rows [up; gate]
            return (u * act(g)) @ f("down").T
        return glu(h, f("gate"), f("up"), f("down"), act)

    def layer(i, x):
        ha = norm("attn_norm", x, i)
        if block.parallel:  # attention and MLP read the same input (or norms of their own)
            hm = norm("mlp_norm", x, i) if has("mlp_norm") and cfg.two_norms else ha
            return x + attn(i, ha) + mlp(i, hm)
        x = x + attn(i, ha)
        return x + mlp(i, norm("mlp_norm", x, i))

    head = layout.names.get("head")
    if head is None or (layout.head_if_stored and not W.has(head)):
        head = layout.key("embed", where)

    def embed(ids):
        e = W.gather(layout.key("embed", where), ids)
        return e * torch.tensor(cfg.hidden ** 0.5, dtype=dtype) if block.embed_scale else e
    return _decoder(ids, cfg, embed, layer, lambda x: W.matmul_t(head, norm("norm", x)))


def runtime_for(ck: Checkpoint, cfg: ModelConfig) -> Callable:
    """The runtime for a checkpoint, as its format's declaration says (formats/registry.py): the
    generic decoder over its layout's adapter (NATIVE), or ``via_hf`` (VIA_HF)."""
    from ckdiff.formats.registry import Runtime, lookup
    fmt = lookup(ck.format)
    if fmt is None or fmt.runtime is Runtime.NONE:
        raise InputError(ck.path, f"no reference runtime for a {ck.format} checkpoint")
    if fmt.runtime is Runtime.VIA_HF:
        return via_hf
    adapter = LAYOUT_ADAPTERS.get(fmt.layout or fmt.name)
    if adapter is None:
        raise InputError(ck.path, f"no reference runtime for a {ck.format} checkpoint")
    fam = _family(ck, cfg)
    return lambda ck, cfg, ids, dtype, progress=None: decoder(adapter(ck, cfg, fam), ck, cfg, fam.block, ids,
                                                              dtype, progress)


def _family(ck: Checkpoint, cfg: ModelConfig) -> Family:
    try:
        return family(cfg.family)
    except KeyError:
        raise InputError(ck.path, f"no reference runtime for model family {cfg.family!r}") from None


def steps(ck: Checkpoint, cfg: ModelConfig, ids: torch.Tensor, dtype=torch.float32, progress=None):
    """A generator: the residual stream after each layer, then (as its return value) the logits.
    Run it under ``torch.no_grad()``. ``progress(n)`` is told the bytes of each weight read."""
    return runtime_for(ck, cfg)(ck, cfg, ids, dtype, progress)


def check_shapes(ck: Checkpoint, cfg: ModelConfig, side: str = "") -> None:
    """Run the forward pass on meta tensors (shapes only, nothing read): a tensor whose shape does not fit
    the config fails here, as one InputError naming the tensor and its side, before any real forward pass."""
    ids = torch.zeros((1, 2), dtype=torch.long, device="meta")
    gen = steps(ck, cfg, ids, torch.float32)
    W = _weights_of(gen)  # before the run: a generator that raised has no frame left
    try:
        drain(gen)
    except (RuntimeError, ValueError, IndexError) as e:
        raise InputError(ck.path, _shape_message(e, cfg, side, W)) from None


def _weights_of(gen):
    """The ``Weights`` a decoder generator reads through (held by its layer functions' closures)."""
    frame = getattr(gen, "gi_frame", None)
    for v in (frame.f_locals.values() if frame is not None else ()):
        for cell in getattr(v, "__closure__", None) or ():
            try:
                if isinstance(cell.cell_contents, Weights):
                    return cell.cell_contents
            except ValueError:  # an empty cell
                continue
    return None


def _shape_message(e: Exception, cfg: ModelConfig, side: str, W) -> str:
    """The tensor most likely at fault: the last one read whose dimensions are not among the config's sizes,
    else the last one read."""
    sizes = {cfg.hidden, cfg.q_rows, cfg.kv_rows, cfg.ffn, 2 * cfg.ffn, cfg.vocab, cfg.q_rows + 2 * cfg.kv_rows,
             cfg.experts or -1, cfg.true_vocab or -1}
    who = ""
    if W is not None and W.read:
        odd = [k for k in W.read if any(n not in sizes for n in W.t[k].shape)]
        k = (odd or W.read)[-1]
        who = f"tensor {k!r} {list(W.t[k].shape)} "
    pre = f"{side}: " if side else ""
    return (f"{pre}{who}does not fit the config (hidden {cfg.hidden}, heads {cfg.heads} x head_dim {cfg.head_dim}, "
            f"kv heads {cfg.kv_heads}, ffn {cfg.ffn}, vocab {cfg.vocab}): {str(e).splitlines()[0][:120]}")


def drain(gen, on_layer: Optional[Callable] = None) -> torch.Tensor:
    """Run a ``steps`` generator to the end; ``on_layer(x)`` sees each layer's output. Returns the logits."""
    while True:
        try:
            x = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_layer is not None:
            on_layer(x)


def via_hf(ck: Checkpoint, cfg: ModelConfig, ids, dtype=torch.float32, progress=None):
    """Megatron-Core and GGUF checkpoints run with the HF convention after their own layout table maps
    them to HF names lazily (so this runtime is not independent of that table: the tensor diff and the
    format mutations check the table; GGUF quantized tensors are dequantized on read)."""
    from ckdiff.formats.layouts import convert_formats as convert
    from ckdiff.formats.registry import get, lookup
    hf = Checkpoint(ck.path, "hf", convert(ck.tensors, lookup(ck.format), get("hf"), cfg, ck.path), ck.config, ck.meta)
    return runtime_for(hf, cfg)(hf, cfg, ids, dtype, progress)




def run(ck: Checkpoint, cfg: ModelConfig, ids: torch.Tensor, dtype=torch.float32) -> Forward:
    """Logits and every layer's hidden state (for tests; ``compare_logits`` keeps summaries only)."""
    hidden: list = []
    with torch.no_grad():
        logits = drain(steps(ck, cfg, ids, dtype), hidden.append)
    return Forward(logits, hidden)
