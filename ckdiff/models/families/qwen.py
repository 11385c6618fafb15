"""Qwen2 (q/k/v biases, sliding window from max_window_layers), Qwen3 (per-head q/k RMSNorm) and Qwen3-MoE."""
from __future__ import annotations

from ckdiff.models.family import Block, DENSE_MLP_SLOTS, Extra, Family, Mlp, Rotary, register
from ckdiff.models.families.common import LLAMA_NAMES, _EXPERTS, _GGUF_BASE, _GGUF_EXPERTS, _GGUF_QKV_BIAS, _GGUF_QK_NORM, _HF_ONLY, _LAYER_TYPES, _QKV_BIAS, _QK_NORM, _layer_types

# Qwen2/Qwen3: the window applies to layers >= max_window_layers, and only with use_sliding_window
_QWEN_WINDOW = {"use_sliding_window": Extra("use_sliding_window", "flag", False),
                "max_window_layers": Extra("max_window_layers", "int", 28, lo=0),
                "layer_types": Extra("layer_types", "texts")}




def _qwen_read(cfg: dict, where: str, strict: bool) -> dict:
    """The window counts only with use_sliding_window (Qwen configs ship a window they do not use), and
    then only from layer max_window_layers on (as transformers' Qwen2Config derives layer_types)."""
    use = bool(cfg.get("use_sliding_window", False))
    sw = cfg.get("sliding_window") if use else None
    lo = cfg.get("max_window_layers", 28)
    kinds = _layer_types(cfg, where, strict, cfg.get("num_hidden_layers"),
                         lambda i: _LAYER_TYPES[bool(sw) and i >= lo])
    return {"sliding_window": sw, "extra": {"layer_types": kinds}}


def _qwen_moe_read(cfg: dict, where: str, strict: bool) -> dict:
    return {"sliding_window": cfg.get("sliding_window") if cfg.get("use_sliding_window") else None}


def _qwen_moe_dense(cfg, i: int) -> bool:
    """Qwen3-MoE: layers in mlp_only_layers, and those off the decoder_sparse_step grid, have a dense MLP."""
    x = cfg.extra or {}
    step = x.get("decoder_sparse_step", 1)
    return i in (x.get("mlp_only_layers") or ()) or (i + 1) % step != 0


QWEN2 = register(Family(
    "qwen2", ("qwen2",), "Qwen2ForCausalLM", Block(qkv_bias=True), {**LLAMA_NAMES, **_QKV_BIAS},
    block_keys={"act": "hidden_act"}, default_eps=1e-6, extra_keys=_QWEN_WINDOW,
    hf_read=_qwen_read, gguf_arch="qwen2", layout_names={"gguf": {**_GGUF_BASE, **_GGUF_QKV_BIAS}},
    layouts=frozenset({"hf", "gguf"}),
    layout_rotary={"gguf": Rotary.HALF},
    unsupported={**_HF_ONLY, "megatron": "Megatron-LLM has no Qwen2 model"}))
QWEN3 = register(Family(
    "qwen3", ("qwen3",), "Qwen3ForCausalLM", Block(qk_norm=True), {**LLAMA_NAMES, **_QK_NORM},
    default_eps=1e-6, extra_keys=_QWEN_WINDOW, hf_read=_qwen_read, gguf_arch="qwen3",
    layout_names={"gguf": {**_GGUF_BASE, **_GGUF_QK_NORM}}, layout_rotary={"gguf": Rotary.HALF},
    layouts=frozenset({"hf", "gguf"}),
    unsupported={**_HF_ONLY, "megatron": "Megatron-LLM has no Qwen3 model"}))
QWEN3_MOE = register(Family(
    "qwen3-moe", ("qwen3_moe",), "Qwen3MoeForCausalLM", Block(qk_norm=True, mlp=Mlp.MOE),
    {**LLAMA_NAMES, **_QK_NORM, **_EXPERTS},
    config_keys={"experts": ("num_local_experts", "num_experts")}, default_eps=1e-6,
    extra_keys={"use_sliding_window": Extra("use_sliding_window", "flag", False),
                "moe_ffn": Extra("moe_intermediate_size", "int", 768),
                "norm_topk_prob": Extra("norm_topk_prob", "flag", False),
                "decoder_sparse_step": Extra("decoder_sparse_step", "int", 1),
                "mlp_only_layers": Extra("mlp_only_layers", "ints", (), lo=0)},
    hf_read=_qwen_moe_read, dense_layer=_qwen_moe_dense, gguf_arch="qwen3moe",
    layouts=frozenset({"hf", "gguf"}),
    # llama.cpp's qwen3moe graph always renormalises the top-k weights (build_moe_ffn norm_w = true)
    gguf_extra={"moe_ffn": "expert_feed_forward_length", "norm_topk_prob": True},
    # (llama.cpp's qwen3moe has no dense FFN tensors: mlp_only_layers has no GGUF name)
    layout_names={"gguf": {**{k: v for k, v in _GGUF_BASE.items() if k not in DENSE_MLP_SLOTS}, **_GGUF_QK_NORM,
                           **_GGUF_EXPERTS}}, layout_rotary={"gguf": Rotary.HALF},
    unsupported={**_HF_ONLY, "megatron": "Megatron-LLM has no Qwen3-MoE model"}))
