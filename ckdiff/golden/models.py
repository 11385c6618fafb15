"""Deterministic tiny golden models, generated (never downloaded).

Chosen to expose the blind spots of verification-lessons.md: random weights
everywhere (norms too), GQA with 1 < K < H and H/K != K, odd vocab, tied and
untied, head_dim != hidden/heads, biases where the family has them. The same
weights can be emitted in every layout through the converters.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..converters.config import DTYPE_BY_NAME, ModelConfig
from ..converters.lazy import EagerTensor
from ..converters.layouts import FALCON, HF, MOE_HF

# name -> config. "llama-gqa" is the main fixture: H=8, K=2 (r=4 != K), V=100.
TINY = {
    "llama-gqa": ModelConfig("llama", hidden=64, layers=2, heads=8, kv_heads=2, head_dim=8, ffn=96, vocab=100,
                             rope_theta=10000.0, norm_eps=1e-5, max_pos=256),
    "llama-spec": ModelConfig("llama", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=192, vocab=256,
                              max_pos=256),
    "llama-mha-tied": ModelConfig("llama", hidden=64, layers=2, heads=4, kv_heads=4, head_dim=16, ffn=128,
                                  vocab=250, tied=True, rope_theta=500000.0, max_pos=256),
    "llama-mqa-hd": ModelConfig("llama", hidden=64, layers=3, heads=4, kv_heads=1, head_dim=24, ffn=112,
                                vocab=100, max_pos=256),
    "llama-blockwise": ModelConfig("llama", hidden=256, layers=2, heads=8, kv_heads=2, head_dim=32, ffn=768,
                                   vocab=256, max_pos=256),
    # 12 KV heads so the Meta source can be cut into 12 shards (catches lexicographic shard sorting)
    "llama-wide": ModelConfig("llama", hidden=96, layers=1, heads=12, kv_heads=12, head_dim=8, ffn=96, vocab=120,
                              max_pos=256),
    "mistral-gqa": ModelConfig("llama", hidden=64, layers=2, heads=6, kv_heads=3, head_dim=16, ffn=168,
                               vocab=120, sliding_window=16, rope_theta=1000000.0, max_pos=256,
                               hf_model_type="mistral"),
    "gemma": ModelConfig("gemma", hidden=64, layers=2, heads=4, kv_heads=1, head_dim=32, ffn=96, vocab=100,
                         tied=True, norm_eps=1e-6, max_pos=256),
    "mixtral": ModelConfig("mixtral", hidden=64, layers=2, heads=8, kv_heads=2, head_dim=8, ffn=48, vocab=100,
                           experts=4, experts_per_tok=2, rope_theta=1000000.0, max_pos=256),
    "falcon-7b": ModelConfig("falcon", hidden=64, layers=2, heads=4, kv_heads=1, head_dim=16, ffn=256,
                             vocab=100, parallel_attn=True, two_norms=False, norm_bias=True, tied=True,
                             max_pos=256),
    "falcon-40b": ModelConfig("falcon", hidden=64, layers=2, heads=8, kv_heads=2, head_dim=8, ffn=256,
                              vocab=100, parallel_attn=True, two_norms=True, norm_bias=True, tied=True,
                              max_pos=256),
}


def tiny_config(name: str, dtype: str = "float32") -> ModelConfig:
    if name not in TINY:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(TINY)}")
    return replace(TINY[name], dtype=dtype)


def _rand(g: torch.Generator, *shape, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def hf_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random HF-layout tensors for ``cfg`` (norms random around 1, never constant)."""
    g = torch.Generator().manual_seed(seed)
    D, F, V = cfg.hidden, cfg.ffn, cfg.vocab
    t: dict[str, torch.Tensor] = {}
    norm = lambda: 1.0 + _rand(g, D, scale=0.1)  # noqa: E731
    if cfg.family == "falcon":
        t[FALCON["embed"]] = _rand(g, V, D)
        qkv_rows = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
        for i in range(cfg.layers):
            f = lambda k: FALCON[k].format(i=i)  # noqa: E731
            if cfg.two_norms:
                t[f("ln_attn")], t[f("ln_attn_b")] = norm(), _rand(g, D, scale=0.05)
                t[f("ln_mlp")], t[f("ln_mlp_b")] = norm(), _rand(g, D, scale=0.05)
            else:
                t[f("ln")], t[f("ln_b")] = norm(), _rand(g, D, scale=0.05)
            t[f("qkv")] = _rand(g, qkv_rows, D)
            t[f("o")] = _rand(g, D, cfg.heads * cfg.head_dim)
            t[f("h4h")] = _rand(g, F, D)
            t[f("4hh")] = _rand(g, D, F)
        t[FALCON["norm"]], t[FALCON["norm_b"]] = norm(), _rand(g, D, scale=0.05)
    else:
        t[HF["embed"]] = _rand(g, V, D)
        for i in range(cfg.layers):
            f = lambda k: HF[k].format(i=i)  # noqa: E731
            t[f("attn_norm")] = norm()
            t[f("q")] = _rand(g, cfg.q_rows, D)
            t[f("k")] = _rand(g, cfg.kv_rows, D)
            t[f("v")] = _rand(g, cfg.kv_rows, D)
            t[f("o")] = _rand(g, D, cfg.q_rows)
            t[f("mlp_norm")] = norm()
            if cfg.family == "mixtral":
                t[MOE_HF["router"].format(i=i)] = _rand(g, cfg.experts, D, scale=1.0)
                for e in range(cfg.experts):
                    for n, shape in ((1, (F, D)), (2, (D, F)), (3, (F, D))):
                        t[MOE_HF["w"].format(e=e, n=n).format(i=i)] = _rand(g, *shape)
                continue
            t[f("gate")] = _rand(g, F, D)
            t[f("up")] = _rand(g, F, D)
            t[f("down")] = _rand(g, D, F)
        t[HF["norm"]] = norm()
        if not cfg.tied:
            t[HF["head"]] = _rand(g, V, D)
    dt = DTYPE_BY_NAME[cfg.dtype]
    return {k: v.to(dt) for k, v in t.items()}


def lazy(state: dict[str, torch.Tensor]) -> dict[str, EagerTensor]:
    return {k: EagerTensor(k, v, "<generated>") for k, v in state.items()}


def write_tiny_hf(out: Path, name: str = "llama-gqa", dtype: str = "float32", seed: int = 0,
                  num_shards: int = 1, overwrite: bool = True) -> Path:
    """A tiny random HF checkpoint directory (safetensors + config.json)."""
    from ..converters.writers import atomic_dir, write_hf
    cfg = tiny_config(name, dtype)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_hf(tmp, lazy(hf_state(cfg, seed)), cfg.to_hf(), num_shards)
    return Path(out)
