"""Independent golden emitter: the same tiny weights laid out in every format.

Written from the specs' index formulas with explicit loops, deliberately not
with the converters' reshape-based ops, so a golden diff compares two
independent implementations:
  Meta row ``h*hd + 2j + i`` = HF row ``h*hd + i*hd/2 + j`` (q with H heads, k with K);
  Megatron QKV = for each KV group g: P(q_{g*r}) .. P(q_{g*r+r-1}), P(k_g), v_g;
  Megatron GLU = rows [up; gate]; Falcon HF QKV is already grouped.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..converters.config import ModelConfig
from ..converters.layouts import FALCON, GEMMA_JS, HF, META, MEGATRON, MOE_HF, MOE_JS
from .models import hf_state, lazy, tiny_config


def _meta_rows(w: torch.Tensor, heads: int, hd: int) -> torch.Tensor:
    out = torch.empty_like(w)
    hh = hd // 2
    for h in range(heads):
        for j in range(hh):
            for i in range(2):
                out[h * hd + 2 * j + i] = w[h * hd + i * hh + j]
    return out


def meta_state(cfg: ModelConfig, hf: dict) -> dict:
    """Meta / JetStream layout. Gemma: renamed, not permuted. Mixtral: experts stacked per layer."""
    if cfg.family == "gemma":
        out = {GEMMA_JS["embed"]: hf[HF["embed"]]}
        for i in range(cfg.layers):
            for slot in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"):
                out[GEMMA_JS[slot].format(i=i)] = hf[HF[slot].format(i=i)]
        out[GEMMA_JS["norm"]] = hf[HF["norm"]]
        return out
    out = {META["embed"]: hf[HF["embed"]]}
    for i in range(cfg.layers):
        if cfg.family == "mixtral":
            out[MOE_JS["router"].format(i=i)] = hf[MOE_HF["router"].format(i=i)]
            for n in (1, 2, 3):
                experts = [hf[MOE_HF["w"].format(e=e, n=n).format(i=i)] for e in range(cfg.experts)]
                stacked = torch.empty((cfg.experts,) + tuple(experts[0].shape), dtype=experts[0].dtype)
                for e, w in enumerate(experts):
                    stacked[e] = w
                out[MOE_JS["w"].format(n=n).format(i=i)] = stacked
        slots = ("attn_norm", "q", "k", "v", "o", "mlp_norm") + (("gate", "up", "down") if cfg.family == "llama" else ())
        for slot in slots:
            w = hf[HF[slot].format(i=i)]
            if slot == "q":
                w = _meta_rows(w, cfg.heads, cfg.head_dim)
            elif slot == "k":
                w = _meta_rows(w, cfg.kv_heads, cfg.head_dim)
            out[META[slot].format(i=i)] = w
    out[META["norm"]] = hf[HF["norm"]]
    out[META["head"]] = hf[HF["embed"]] if cfg.tied else hf[HF["head"]]
    return out


def _fuse(q, k, v, cfg: ModelConfig) -> torch.Tensor:
    """q/k already in Meta row order; rows grouped per KV head."""
    hd, r = cfg.head_dim, cfg.heads // cfg.kv_heads
    blocks = []
    for g in range(cfg.kv_heads):
        for j in range(r):
            h = g * r + j
            blocks.append(q[h * hd:(h + 1) * hd])
        blocks.append(k[g * hd:(g + 1) * hd])
        blocks.append(v[g * hd:(g + 1) * hd])
    return torch.cat(blocks)


def megatron_state(cfg: ModelConfig, hf: dict) -> dict:
    M = MEGATRON
    hd = cfg.head_dim
    if cfg.family == "falcon":
        out = {M["embed"]: hf[FALCON["embed"]]}
        r = cfg.heads // cfg.kv_heads
        for i in range(cfg.layers):
            f = lambda s: hf[FALCON[s].format(i=i)]  # noqa: E731
            qkv = f("qkv")
            q_rows, k_rows, v_rows = [], [], []
            for g in range(cfg.kv_heads):
                base = g * (r + 2) * hd
                q_rows.append(qkv[base:base + r * hd])
                k_rows.append(qkv[base + r * hd:base + (r + 1) * hd])
                v_rows.append(qkv[base + (r + 1) * hd:base + (r + 2) * hd])
            q = _meta_rows(torch.cat(q_rows), cfg.heads, hd)
            k = _meta_rows(torch.cat(k_rows), cfg.kv_heads, hd)
            m = lambda s: M[s].format(i=i)  # noqa: E731
            out[m("qkv")] = _fuse(q, k, torch.cat(v_rows), cfg)
            out[m("o")], out[m("h4h")], out[m("4hh")] = f("o"), f("h4h"), f("4hh")
            if cfg.two_norms:
                out[m("attn_norm")], out[m("attn_norm_b")] = f("ln_attn"), f("ln_attn_b")
                out[m("mlp_ln")], out[m("mlp_ln_b")] = f("ln_mlp"), f("ln_mlp_b")
            else:
                out[m("attn_norm")], out[m("attn_norm_b")] = f("ln"), f("ln_b")
        out[M["norm"]], out[M["norm_b"]] = hf[FALCON["norm"]], hf[FALCON["norm_b"]]
        return out
    meta = meta_state(cfg, hf)
    out = {M["embed"]: hf[HF["embed"]]}
    for i in range(cfg.layers):
        g = lambda s: meta[META[s].format(i=i)]  # noqa: E731
        m = lambda s: M[s].format(i=i)  # noqa: E731
        out[m("attn_norm")] = g("attn_norm")
        out[m("qkv")] = _fuse(g("q"), g("k"), g("v"), cfg)
        out[m("o")] = g("o")
        out[m("mlp_norm")] = g("mlp_norm")
        out[m("h4h")] = torch.cat([g("up"), g("gate")])
        out[m("4hh")] = g("down")
    out[M["norm"]] = hf[HF["norm"]]
    if not cfg.tied:
        out[M["head"]] = hf[HF["head"]]
    return out


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """Megatron vocab padding: extra rows are copies of the last real row."""
    extra = rows - w.shape[0]
    return torch.cat([w] + [w[-1:]] * extra) if extra > 0 else w


def emit(out: Path, name: str, layout: str, dtype: str = "float32", seed: int = 0, shards: int = 1,
         tp: int = 1, pp: int = 1, llama_version: int = 2, vocab_rows: int = 0) -> Path:
    """Write tiny model ``name`` in ``layout`` (hf, meta, jetstream, megatron, mcore, gguf[-QTYPE]) to ``out``
    (for gguf, ``out`` is a directory holding ``model.gguf``, whose path is returned).

    ``vocab_rows`` pads a Megatron embedding / lm_head to that many rows."""
    from ..converters.megatron import make_args, write_megatron
    from ..converters.writers import atomic_dir, write_hf, write_meta_like, write_meta_shards
    cfg = tiny_config(name, dtype)
    hf = hf_state(cfg, seed)
    with atomic_dir(out, overwrite=True) as tmp:
        if layout == "hf":
            write_hf(tmp, lazy(hf), cfg.to_hf(), shards)
        elif layout == "meta":
            write_meta_shards(tmp, lazy(meta_state(cfg, hf)), cfg.to_meta(), shards, llama_version)
        elif layout == "jetstream":
            write_meta_like(tmp, lazy(meta_state(cfg, hf)), cfg.to_meta())
        elif layout == "megatron":
            model = "falcon" if cfg.family == "falcon" else (
                "mistral" if cfg.hf_model_type == "mistral" else "llama2")
            state = megatron_state(cfg, hf)
            rows = max(vocab_rows, cfg.vocab)
            for k in (MEGATRON["embed"], MEGATRON["head"]):
                if k in state:
                    state[k] = _pad_rows(state[k], rows)
            args = make_args(cfg, model, tp, pp, rows, cfg.vocab, 128)
            write_megatron(tmp, lazy(state), cfg, tp, pp, args)
        elif layout == "mcore":  # torch DCP in megatron-core's key layout (megatron-core itself needs CUDA)
            from ..converters.mcore import write_mcore
            write_mcore(tmp, hf, cfg)
        elif layout.startswith("gguf"):  # "gguf" (F16) or "gguf-Q8_0" etc.: the gguf package's writer
            from ..converters.gguf_io import write_gguf
            write_gguf(tmp / "model.gguf", hf, cfg, layout.partition("-")[2] or "F16")
        else:
            raise ValueError(f"unknown layout {layout!r}")
    return Path(out) / "model.gguf" if layout.startswith("gguf") else Path(out)
