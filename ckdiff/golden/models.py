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

from ckdiff.models import families
from ckdiff.models.config import DTYPE_BY_NAME, ModelConfig
from ckdiff.tensor.lazy import EagerTensor

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


def _from_hf(**config) -> ModelConfig:
    """A tiny config written as its family's config.json says it (so every extra value is the reader's)."""
    base = dict(hidden_size=64, num_hidden_layers=2, vocab_size=100, max_position_embeddings=256,
                rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32")
    return ModelConfig.from_hf({**base, **config}, {})


# families of 2025/26: GQA 1 < K < H where the family has it, head_dim != hidden / heads, windows that a
# 40-token prompt crosses, few experts
TINY.update({
    "qwen2": _from_hf(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=96, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": _from_hf(model_type="qwen3", num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                      intermediate_size=96),
    "qwen3-moe": _from_hf(model_type="qwen3_moe", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                          norm_topk_prob=True),
    "deepseek-v3": _from_hf(model_type="deepseek_v3", num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16,
                            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=96,
                            moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                            topk_group=1, n_shared_experts=1, first_k_dense_replace=1, num_nextn_predict_layers=0),
    # one q projection instead of q_a/q_b (q_lora_rank null, as DeepSeek-V2-Lite); all layers MoE
    "deepseek-v3-q": _from_hf(model_type="deepseek_v3", num_attention_heads=4, q_lora_rank=None, kv_lora_rank=16,
                              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=96,
                              moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                              topk_group=1, n_shared_experts=2, first_k_dense_replace=0, num_nextn_predict_layers=0,
                              norm_topk_prob=False, routed_scaling_factor=1.5),
    # a dense layer in an MoE model (mlp_only_layers)
    "qwen3-moe-dense0": _from_hf(model_type="qwen3_moe", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                 mlp_only_layers=[0]),
    "gpt-oss": _from_hf(model_type="gpt_oss", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-5),
})


def tiny_config(name: str, dtype: str = "float32") -> ModelConfig:
    if name not in TINY:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(TINY)}")
    return replace(TINY[name], dtype=dtype)


def _rand(g: torch.Generator, *shape, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


_NORMS = ("norm", "attn_norm", "mlp_norm", "ln_attn", "ln_mlp", "q_norm", "k_norm", "q_down_norm",
          "kv_down_norm")  # 1-D scales, drawn around 1


def _slot_shape(slot: str, cfg: ModelConfig) -> tuple:
    """The HF shape of one slot's tensor (a bias ``X_b`` has X's rows)."""
    D, F, V = cfg.hidden, cfg.ffn, cfg.vocab
    x = cfg.extra or {}
    E, H, hd, Fm = cfg.experts, cfg.heads, cfg.head_dim, x.get("moe_ffn") or F
    if slot in ("experts_gate_up_b", "experts_down_b"):  # GPT-OSS: one bias row per expert
        return (E, 2 * F if slot == "experts_gate_up_b" else D)
    if slot.endswith("_b"):
        return (_slot_shape(slot[:-2], cfg)[0],)
    nope, v, qr, kvr = x.get("qk_nope_head_dim"), x.get("v_head_dim"), x.get("q_lora_rank"), x.get("kv_lora_rank")
    Fs = Fm * (x.get("n_shared_experts") or 1)
    mla = {"q_down": (qr, D), "q_down_norm": (qr,), "q_up": (H * (nope + hd), qr), "mla_q": (H * (nope + hd), D),
           "kv_down": (kvr + hd, D), "kv_down_norm": (kvr,), "kv_up": (H * (nope + v), kvr), "o": (D, H * v)} \
        if nope is not None else {}
    family_slots = {"q_norm": (hd,), "k_norm": (hd,), "sinks": (H,), "e_bias": (E,),
                    "expert_gate": (Fm, D), "expert_up": (Fm, D), "expert_down": (D, Fm),
                    "shared_gate": (Fs, D), "shared_up": (Fs, D), "shared_down": (D, Fs),
                    "experts_gate_up": (E, D, 2 * F), "experts_down": (E, F, D), **mla}
    return family_slots.get(slot) or {"embed": (V, D), "head": (V, D), "q": (cfg.q_rows, D), "k": (cfg.kv_rows, D), "v": (cfg.kv_rows, D),
            "qkv": (cfg.q_rows + 2 * cfg.kv_rows, D), "o": (D, cfg.q_rows), "gate": (F, D), "up": (F, D),
            "down": (D, F), "router": (cfg.experts, D)}.get(slot, (D,))


# Weight scales by initialisation profile. "default" (0.2 everywhere; the hash-checked fixtures) gives
# nearly flat next-token distributions on the tiny models (mean top-1 probability 0.18 on llama-gqa);
# "peaked" scales the embedding/head to 0.8 and q/k to 0.4, so outputs are peaked (top-1 probability ~0.75,
# mean top-1 margin ~2.5 logits) and attention is sharp enough that a rotary or head-order bug moves the
# top-1 token instead of hiding in a flat distribution. The logit checks' bug-class property uses it.
# "flat" draws every projection with transformers' initializer_range 0.02: the nearly uniform outputs of
# an untrained model, where an absolute KL threshold cannot tell a bug from rounding.
INIT_SCALES = {"default": {}, "peaked": {"embed": 0.8, "head": 0.8, "q": 0.4, "k": 0.4}, "flat": {"*": 0.02}}


def hf_state(cfg: ModelConfig, seed: int = 0, init: str = "default") -> dict[str, torch.Tensor]:
    """Random HF-layout tensors for ``cfg`` from its family's slots (families.py), optional ones (biases,
    the untied head, Falcon's one or two norms) as the config has them; norms random around 1, never
    constant. Drawn in a fixed order: the embedding, each layer's slots in declaration order, the rest.
    ``init`` picks the weight scales (INIT_SCALES); the random draws are the same for every profile."""
    scales = INIT_SCALES[init]
    fam = families.family(cfg.family)
    g = torch.Generator().manual_seed(seed)
    F, D = cfg.ffn, cfg.hidden
    t: dict[str, torch.Tensor] = {}
    slots = fam.slots(tied=cfg.tied, two_norms=cfg.two_norms, q_lora=(cfg.extra or {}).get("q_lora_rank") is not None)
    layered = [s for s in slots if "{i}" in fam.hf_names[s]]
    rest = [s for s in slots if s not in layered]

    def draw(slot: str) -> torch.Tensor:
        shape = _slot_shape(slot, cfg)
        if slot in _NORMS:
            return 1.0 + _rand(g, *shape, scale=0.1)
        if slot[:-2] in _NORMS and slot.endswith("_b"):
            return _rand(g, *shape, scale=0.05)
        if slot.endswith("_b") or slot in ("sinks", "e_bias"):  # biases: large enough that a misplaced row
            return _rand(g, *shape, scale=0.5)                    # shows in the logits
        return _rand(g, *shape, scale=1.0 if slot == "router" else scales.get(slot, scales.get("*", 0.2)))

    t[fam.hf_names["embed"]] = draw("embed")
    for i in range(cfg.layers):
        for s in fam.layer_slots(cfg, i, layered):
            if s == "expert":  # w1 gate, w2 down, w3 up
                for e in range(cfg.experts):
                    for n, shape in ((1, (F, D)), (2, (D, F)), (3, (F, D))):
                        t[fam.hf_names[s].format(i=i, e=e, n=n)] = _rand(g, *shape)
            elif "{e}" in fam.hf_names[s]:  # one tensor per expert
                for e in range(cfg.experts):
                    t[fam.hf_names[s].format(i=i, e=e)] = draw(s)
            else:
                t[fam.hf_names[s].format(i=i)] = draw(s)
    for s in rest:
        if s != "embed":
            t[fam.hf_names[s]] = draw(s)
    dt = DTYPE_BY_NAME[cfg.dtype]
    return {k: v.to(dt) for k, v in t.items()}


def lazy(state: dict[str, torch.Tensor]) -> dict[str, EagerTensor]:
    return {k: EagerTensor(k, v, "<generated>") for k, v in state.items()}


def write_tiny_hf(out: Path, name: str = "llama-gqa", dtype: str = "float32", seed: int = 0,
                  num_shards: int = 1, overwrite: bool = True, init: str = "default") -> Path:
    """A tiny random HF checkpoint directory (safetensors + config.json)."""
    from ckdiff.io.writers import atomic_dir, write_hf
    cfg = tiny_config(name, dtype)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_hf(tmp, lazy(hf_state(cfg, seed, init)), cfg.to_hf(), num_shards)
    return Path(out)
