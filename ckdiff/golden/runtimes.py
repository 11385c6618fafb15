"""Reference forward passes, each reading a checkpoint in its own layout and conventions.

Nothing here converts weights: the HF runtime applies rotate_half rotary to HF
q/k rows; the Meta/JetStream runtime applies interleaved complex rotary to Meta
rows and dequantizes int8/int4 weights with their scales; the Megatron runtime
splits the fused QKV into groups and the GLU into [up; gate] at run time, as
Megatron-LLM does. The blocks they share (attention given q/k/v, norms) are the
parts on which the layouts agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as Fn

from ..converters.config import ModelConfig
from ..converters.lazy import Checkpoint
from ..converters.layouts import FALCON, GEMMA_JS, HF, META, MEGATRON, MOE_HF, MOE_JS
from ..errors import InputError


@dataclass
class Forward:
    logits: torch.Tensor  # [B, T, V] (float)
    hidden: list  # residual stream after each layer, [B, T, D]


# ---------------------------------------------------------------- shared pieces
def inv_freq(cfg: ModelConfig) -> torch.Tensor:
    hd = cfg.head_dim
    f = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type", sc.get("type")) == "llama3":  # Llama-3.1 frequency scaling
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        orig = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / f
        smooth = (orig / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > orig / lo, f / factor, f)
        mid = (wavelen <= orig / lo) & (wavelen >= orig / hi)
        f = torch.where(mid, (1 - smooth) * f / factor + smooth * f, scaled)
    return f


def angles(cfg: ModelConfig, T: int) -> torch.Tensor:
    return torch.outer(torch.arange(T, dtype=torch.float64), inv_freq(cfg))  # [T, hd/2]


def rope_half(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
    """HF rotate_half: element i pairs with i + hd/2. x: [B, T, heads, hd]."""
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)[None, :, None, :]
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def rope_interleaved(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
    """Meta / Megatron-LLM: pairs (2i, 2i+1) as complex numbers times exp(i*pos*theta_i)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    fc = torch.polar(torch.ones_like(ang), ang).to(torch.complex64)[None, :, None, :]
    return torch.view_as_real(xc * fc).reshape(x.shape).to(x.dtype)


def attention(q, k, v, cfg: ModelConfig, window: Optional[int] = None) -> torch.Tensor:
    """q [B,T,H,hd], k/v [B,T,K,hd]; query head h uses KV head h // (H/K). Causal."""
    B, T, H, hd = q.shape
    r = H // k.shape[2]
    k = k.repeat_interleave(r, dim=2)
    v = v.repeat_interleave(r, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    i = torch.arange(T)
    mask = i[None, :] <= i[:, None]
    if window:
        mask &= (i[:, None] - i[None, :]) < window
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s.float(), -1).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, T, H * hd)


def self_attention(x, h, wq, wk, wv, wo, rope, ang, cfg: ModelConfig, window=None) -> torch.Tensor:
    """Residual + attention over separate q/k/v projections, with the layout's own rotary."""
    B, T, _ = h.shape
    q = rope((h @ wq.T).view(B, T, cfg.heads, cfg.head_dim), ang)
    k = rope((h @ wk.T).view(B, T, cfg.kv_heads, cfg.head_dim), ang)
    v = (h @ wv.T).view(B, T, cfg.kv_heads, cfg.head_dim)
    return x + attention(q, k, v, cfg, window) @ wo.T


def grouped_attention(h, wqkv, wo, rope, ang, cfg: ModelConfig, window=None) -> torch.Tensor:
    """Attention over a fused QKV in group order: K groups of [q x H/K, k, v] heads (Megatron-LLM,
    HF Falcon 40B; Falcon 7B is the K = 1 case [q_0 .. q_{H-1}, k, v])."""
    B, T, _ = h.shape
    K, r, hd = cfg.kv_heads, cfg.heads // cfg.kv_heads, cfg.head_dim
    qkv = (h @ wqkv.T).view(B, T, K, r + 2, hd)
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


def moe(h, router, experts: Callable, cfg: ModelConfig):
    """Mixtral sparse MLP: softmax router, top-k experts, weights renormalised over the top k."""
    B, T, D = h.shape
    x = h.reshape(-1, D)
    probs = torch.softmax((x @ router.T).float(), -1)
    top, idx = probs.topk(cfg.experts_per_tok, -1)
    top = (top / top.sum(-1, keepdim=True)).to(h.dtype)
    out = torch.zeros_like(x)
    for e in range(cfg.experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if len(tok):
            w1, w2, w3 = experts(e)
            y = (Fn.silu(x[tok] @ w1.T) * (x[tok] @ w3.T)) @ w2.T
            out.index_add_(0, tok, y * top[tok, slot, None])
    return out.reshape(B, T, D)


def layer_norm(x, w, b, eps):
    return Fn.layer_norm(x, (x.shape[-1],), w, b, eps)


class Weights:
    """Reads tensors by name, cast to the compute dtype, with a clear error for a missing one."""

    def __init__(self, ck: Checkpoint, dtype: torch.dtype, dequant: bool = False, progress=None):
        self.ck, self.dtype, self.dequant = ck, dtype, dequant
        self.progress = progress  # told the bytes of each tensor (or chunk) read

    def has(self, k):
        return k in self.ck.tensors

    def __call__(self, k: str) -> torch.Tensor:
        if k not in self.ck.tensors:
            raise InputError(self.ck.path, f"reference runtime needs tensor {k!r}, which is missing")
        t = self.ck.tensors[k].load()
        self._tell(self.ck.tensors[k].nbytes)
        if self.dequant and k + "_scaler" in self.ck.tensors:
            from ..converters.quant import EMBED, dequantize, float_shape
            q = self.ck.tensors[k]
            t = dequantize(t, self.ck.tensors[k + "_scaler"].load(), float_shape(q), bool(EMBED.search(k)))
        return t.to(self.dtype)

    def _tell(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)

    def _plain(self, k: str) -> bool:
        return k in self.ck.tensors and not (self.dequant and k + "_scaler" in self.ck.tensors)

    def gather(self, k: str, ids: torch.Tensor) -> torch.Tensor:
        """``W(k)[ids]``, reading only the rows the ids name."""
        if not self._plain(k):
            return self(k)[ids]
        lt = self.ck.tensors[k]
        uniq, inv = torch.unique(ids, return_inverse=True)
        rows = torch.stack([lt.rows(int(i), int(i) + 1)[0] for i in uniq]).to(self.dtype)
        self._tell(lt.nbytes)
        return rows[inv]

    def matmul_t(self, k: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ W(k).T``, reading the weight a row chunk at a time (the output head)."""
        if not self._plain(k):
            return x @ self(k).T
        lt = self.ck.tensors[k]
        out = []
        for lo, hi in lt.row_chunks():
            out.append(x @ lt.rows(lo, hi).to(self.dtype).T)
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


# ---------------------------------------------------------------- HF llama / mistral
def hf_llama(ck: Checkpoint, cfg: ModelConfig, ids, dtype, progress=None):
    """HF Llama, Mistral, Mixtral and Gemma (they share names; Gemma scales embeddings by sqrt(D),
    normalises with (1 + w) and uses a tanh-GELU gate)."""
    W = Weights(ck, dtype, progress=progress)
    ang = angles(cfg, ids.shape[1])
    gemma = cfg.family == "gemma"
    norm = (lambda x, w: gemma_norm(x, w, cfg.norm_eps)) if gemma else (lambda x, w: rms_norm(x, w, cfg.norm_eps))

    def layer(i, x):
        f = lambda s: W(HF[s].format(i=i))  # noqa: E731
        x = self_attention(x, norm(x, f("attn_norm")), f("q"), f("k"), f("v"), f("o"), rope_half, ang, cfg,
                           cfg.sliding_window)
        h = norm(x, f("mlp_norm"))
        if cfg.family == "mixtral":
            ex = lambda e: [W(MOE_HF["w"].format(e=e, n=n).format(i=i)) for n in (1, 2, 3)]  # noqa: E731
            return x + moe(h, W(MOE_HF["router"].format(i=i)), ex, cfg)
        act = (lambda z: Fn.gelu(z, approximate="tanh")) if gemma else Fn.silu
        return x + (act(h @ f("gate").T) * (h @ f("up").T)) @ f("down").T

    head = HF["embed"] if cfg.tied else HF["head"]

    def embed(ids):
        e = W.gather(HF["embed"], ids)
        return e * torch.tensor(cfg.hidden ** 0.5, dtype=dtype) if gemma else e
    return _decoder(ids, cfg, embed, layer, lambda x: W.matmul_t(head, norm(x, W(HF["norm"]))))


# ---------------------------------------------------------------- HF falcon
def hf_falcon(ck: Checkpoint, cfg: ModelConfig, ids, dtype, progress=None):
    W = Weights(ck, dtype, progress=progress)
    ang = angles(cfg, ids.shape[1])

    def layer(i, x):
        f = lambda s: W(FALCON[s].format(i=i))  # noqa: E731
        if cfg.two_norms:
            ha = layer_norm(x, f("ln_attn"), f("ln_attn_b"), cfg.norm_eps)
            hm = layer_norm(x, f("ln_mlp"), f("ln_mlp_b"), cfg.norm_eps)
        else:
            ha = hm = layer_norm(x, f("ln"), f("ln_b"), cfg.norm_eps)
        attn = grouped_attention(ha, f("qkv"), f("o"), rope_half, ang, cfg)
        return x + attn + Fn.gelu(hm @ f("h4h").T) @ f("4hh").T

    return _decoder(ids, cfg, lambda ids: W.gather(FALCON["embed"], ids), layer,
                    lambda x: W.matmul_t(FALCON["embed"],
                                         layer_norm(x, W(FALCON["norm"]), W(FALCON["norm_b"]), cfg.norm_eps)))


# ---------------------------------------------------------------- Meta / JetStream
def meta_llama(ck: Checkpoint, cfg: ModelConfig, ids, dtype, progress=None):
    if cfg.family == "gemma":
        return jetstream_gemma(ck, cfg, ids, dtype, progress)
    W = Weights(ck, dtype, dequant=True, progress=progress)
    ang = angles(cfg, ids.shape[1])

    def layer(i, x):
        f = lambda s: W(META[s].format(i=i))  # noqa: E731
        x = self_attention(x, rms_norm(x, f("attn_norm"), cfg.norm_eps), f("q"), f("k"), f("v"), f("o"),
                           rope_interleaved, ang, cfg, cfg.sliding_window)
        h = rms_norm(x, f("mlp_norm"), cfg.norm_eps)
        if cfg.family == "mixtral":
            stacked = [W(MOE_JS["w"].format(n=n).format(i=i)) for n in (1, 2, 3)]  # [E, F, D], [E, D, F], [E, F, D]
            return x + moe(h, W(MOE_JS["router"].format(i=i)), lambda e: [w[e] for w in stacked], cfg)
        return x + (Fn.silu(h @ f("gate").T) * (h @ f("up").T)) @ f("down").T

    head = META["head"] if W.has(META["head"]) else META["embed"]
    return _decoder(ids, cfg, lambda ids: W.gather(META["embed"], ids), layer,
                    lambda x: W.matmul_t(head, rms_norm(x, W(META["norm"]), cfg.norm_eps)))


def jetstream_gemma(ck: Checkpoint, cfg: ModelConfig, ids, dtype, progress=None):
    """JetStream Gemma: HF-style half-split rotary on its own names, tied ``embedder``."""
    W = Weights(ck, dtype, dequant=True, progress=progress)
    ang = angles(cfg, ids.shape[1])

    def layer(i, x):
        f = lambda s: W(GEMMA_JS[s].format(i=i))  # noqa: E731
        x = self_attention(x, gemma_norm(x, f("attn_norm"), cfg.norm_eps), f("q"), f("k"), f("v"), f("o"),
                           rope_half, ang, cfg)
        h = gemma_norm(x, f("mlp_norm"), cfg.norm_eps)
        return x + (Fn.gelu(h @ f("gate").T, approximate="tanh") * (h @ f("up").T)) @ f("down").T

    return _decoder(ids, cfg, lambda ids: W.gather(GEMMA_JS["embed"], ids) * torch.tensor(cfg.hidden ** 0.5, dtype=dtype),
                    layer, lambda x: W.matmul_t(GEMMA_JS["embed"], gemma_norm(x, W(GEMMA_JS["norm"]), cfg.norm_eps)))


# ---------------------------------------------------------------- Megatron-LLM
def megatron(ck: Checkpoint, cfg: ModelConfig, ids, dtype, progress=None):
    W = Weights(ck, dtype, progress=progress)
    ang = angles(cfg, ids.shape[1])
    falcon = cfg.family == "falcon"
    rope = rope_half if cfg.rotary_rows == "rotate_half" else rope_interleaved  # pre-2023-08 era

    def layer(i, x):
        f = lambda s: W(MEGATRON[s].format(i=i))  # noqa: E731
        if falcon:
            ha = layer_norm(x, f("attn_norm"), f("attn_norm_b"), cfg.norm_eps)
            hm = layer_norm(x, f("mlp_ln"), f("mlp_ln_b"), cfg.norm_eps) if cfg.two_norms else ha
        else:
            ha = rms_norm(x, f("attn_norm"), cfg.norm_eps)
        # Megatron views the fused projection as [s, b, n_kv, r + 2, d]
        attn = grouped_attention(ha, f("qkv"), f("o"), rope, ang, cfg, cfg.sliding_window)
        if falcon:
            return x + attn + Fn.gelu(hm @ f("h4h").T) @ f("4hh").T
        x = x + attn
        h = rms_norm(x, f("mlp_norm"), cfg.norm_eps)
        a, b = (h @ f("h4h").T).chunk(2, dim=-1)  # GLU: first half up, second half gate
        return x + (a * Fn.silu(b)) @ f("4hh").T

    head = MEGATRON["head"] if W.has(MEGATRON["head"]) else MEGATRON["embed"]

    def final(x):
        if falcon:
            x = layer_norm(x, W(MEGATRON["norm"]), W(MEGATRON["norm_b"]), cfg.norm_eps)
        else:
            x = rms_norm(x, W(MEGATRON["norm"]), cfg.norm_eps)
        return W.matmul_t(head, x)
    return _decoder(ids, cfg, lambda ids: W.gather(MEGATRON["embed"], ids), layer, final)


def runtime_for(ck: Checkpoint, cfg: ModelConfig) -> Callable:
    if ck.format == "hf":
        return hf_falcon if cfg.family == "falcon" else hf_llama
    if ck.format in ("meta", "jetstream"):
        return meta_llama
    if ck.format == "megatron":
        return megatron
    if ck.format in ("mcore", "gguf"):
        return via_hf
    raise InputError(ck.path, f"no reference runtime for a {ck.format} checkpoint")


def steps(ck: Checkpoint, cfg: ModelConfig, ids: torch.Tensor, dtype=torch.float32, progress=None):
    """A generator: the residual stream after each layer, then (as its return value) the logits.
    Run it under ``torch.no_grad()``. ``progress(n)`` is told the bytes of each weight read."""
    return runtime_for(ck, cfg)(ck, cfg, ids, dtype, progress)


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
    from ..converters.layouts import convert
    hf = Checkpoint(ck.path, "hf", convert(ck.tensors, ck.format, "hf", cfg, ck.path), ck.config, ck.meta)
    return (hf_falcon if cfg.family == "falcon" else hf_llama)(hf, cfg, ids, dtype, progress)


def run(ck: Checkpoint, cfg: ModelConfig, ids: torch.Tensor, dtype=torch.float32) -> Forward:
    """Logits and every layer's hidden state (for tests; ``compare_logits`` keeps summaries only)."""
    hidden: list = []
    with torch.no_grad():
        logits = drain(steps(ck, cfg, ids, dtype), hidden.append)
    return Forward(logits, hidden)
