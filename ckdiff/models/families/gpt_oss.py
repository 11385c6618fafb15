"""GPT-OSS: attention sinks, q/k/v/o biases, alternating sliding/full attention, clamped SwiGLU experts."""
from __future__ import annotations

from typing import Optional

from ckdiff.models.family import Act, Block, DENSE_MLP_SLOTS, Extra, Family, Mlp, Rotary, Router, register
from ckdiff.models.families.common import _GB, _GGUF_BASE, _GGUF_QKV_BIAS, _HF_ONLY, _L, _LAYER_TYPES, _NO_MLP, _QKV_BIAS, _SA, _layer_types

_GPT_OSS_MOE = {"router": _L + "mlp.router.weight", "router_b": _L + "mlp.router.bias",
                "experts_gate_up": _L + "mlp.experts.gate_up_proj",    # [E, D, 2F], gate/up columns interleaved
                "experts_gate_up_b": _L + "mlp.experts.gate_up_proj_bias",
                "experts_down": _L + "mlp.experts.down_proj",          # [E, F, D]
                "experts_down_b": _L + "mlp.experts.down_proj_bias"}


def _gpt_oss_read(cfg: dict, where: str, strict: bool) -> dict:
    layers = cfg.get("num_hidden_layers")
    kinds = _layer_types(cfg, where, strict, layers, lambda i: _LAYER_TYPES[i % 2 == 0])
    return {"extra": {"layer_types": kinds}}


def _gpt_oss_write(cfg) -> dict:
    """transformers' GptOssConfig assumes YaRN when a config names no rope type: say "default" outright."""
    return {} if cfg.rope_scaling else {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}


def _gpt_oss_diagnose(slot: str, a, b, cfg) -> Optional[str]:
    """GPT-OSS's fused experts alternate gate and up by column (gate even, up odd); a converter that takes
    the halves instead (gate = first F, up = last F), or writes halves for the alternation, is named."""
    import torch
    if slot not in ("experts_gate_up", "experts_gate_up_b") or a.shape != b.shape or a.shape[-1] % 2:
        return None
    halves = lambda t: torch.cat([t[..., ::2], t[..., 1::2]], -1)  # noqa: E731
    if torch.equal(halves(a), b) or torch.equal(halves(b), a):
        return ("GPT-OSS gate/up de-interleaved: gate_up_proj holds gate and up as [gate | up] halves on one side "
                "and alternating columns (gate even, up odd) on the other")
    return None


def _gpt_oss_gguf(F, arch: str) -> dict:
    """llama.cpp's gpt-oss: the window from ``attention.sliding_window``, on the even layers (its swa pattern 2:
    sliding, full, sliding, ...; llama.cpp ``llama-model.cpp``), as transformers' GptOssConfig derives
    layer_types."""
    from ckdiff.models.fields import MAX_SIZE
    L = F.int(f"{arch}.block_count")
    kinds = [_LAYER_TYPES[i % 2 == 0] for i in range(L)] if L else None
    return {"sliding_window": F.int(f"{arch}.attention.sliding_window", hi=MAX_SIZE), "extra": {"layer_types": kinds}}


GPT_OSS = register(Family(
    "gpt-oss", ("gpt_oss",), "GptOssForCausalLM",
    Block(act=Act.SWIGLU_CLAMP, mlp=Mlp.MOE, qkv_bias=True, o_bias=True, sinks=True, router=Router.TOPK_SOFTMAX),
    {**_NO_MLP, **_QKV_BIAS, "o_b": _SA + "o_proj.bias", "sinks": _SA + "sinks", **_GPT_OSS_MOE},
    block_keys={"qkv_bias": "attention_bias"}, hf_defaults={"hidden_act": "silu"},
    extra_keys={"layer_types": Extra("layer_types", "texts"), "swiglu_limit": Extra("swiglu_limit", "num", 7.0),
                "swiglu_alpha": Extra("swiglu_alpha", "num", 1.702)},
    dropped={"sinks": "attention sinks (each head's softmax loses its sink logit)",
             "router_b": "router bias", "o_b": "o_proj bias"}, diagnose=_gpt_oss_diagnose,
    hf_read=_gpt_oss_read, hf_write=_gpt_oss_write, gguf_arch="gpt-oss", layouts=frozenset({"hf", "gguf"}),
    gguf_read=_gpt_oss_gguf,
    gguf_write=lambda cfg: {"attention.sliding_window": cfg.sliding_window, "expert_feed_forward_length": cfg.ffn},
    # llama.cpp's graph fixes the clamped SwiGLU's constants (llama-graph.cpp build_moe_ffn, LLM_FFN_SWIGLU_OAI_MOE)
    gguf_extra={"swiglu_limit": 7.0, "swiglu_alpha": 1.702},
    # llama.cpp splits the fused gate_up_proj (gate and up alternating) into ffn_gate_exps / ffn_up_exps, its
    # weights transposed to [E, F, D], and stores down_proj transposed to [E, D, F]
    layout_names={"gguf": {**{k: v for k, v in _GGUF_BASE.items() if k not in DENSE_MLP_SLOTS}, **_GGUF_QKV_BIAS,
                           "mlp_norm": _GB + "post_attention_norm.weight", "o_b": _GB + "attn_output.bias",
                           "sinks": _GB + "attn_sinks.weight", "router": _GB + "ffn_gate_inp.weight",
                           "router_b": _GB + "ffn_gate_inp.bias",
                           "experts_gate_up": (_GB + "ffn_gate_exps.weight", _GB + "ffn_up_exps.weight"),
                           "experts_gate_up_b": (_GB + "ffn_gate_exps.bias", _GB + "ffn_up_exps.bias"),
                           "experts_down": _GB + "ffn_down_exps.weight",
                           "experts_down_b": _GB + "ffn_down_exps.bias"}}, layout_rotary={"gguf": Rotary.HALF},
    unsupported={**_HF_ONLY,
                 "megatron": "Megatron-LLM has no GPT-OSS model (attention sinks, clamped SwiGLU experts)"}))
