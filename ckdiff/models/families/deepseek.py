"""DeepSeek-V3: multi-head latent attention, MoE with shared experts and group-limited routing, dense
first layers, the MTP layer."""
from __future__ import annotations

from typing import Optional

from ckdiff.models.family import Attn, Block, Extra, Family, Mlp, Router, register
from ckdiff.models.families.common import LLAMA_NAMES, _EXPERTS, _GB, _GGUF_BASE, _GGUF_EXPERTS, _HF_ONLY, _L, _SA

_DS_MLA = {"q_down": _SA + "q_a_proj.weight", "q_down_norm": _SA + "q_a_layernorm.weight",
           "q_up": _SA + "q_b_proj.weight",
           "mla_q": _SA + "q_proj.weight",  # instead of q_a/q_b when q_lora_rank is null (V2-Lite style)
           "kv_down": _SA + "kv_a_proj_with_mqa.weight", "kv_down_norm": _SA + "kv_a_layernorm.weight",
           "kv_up": _SA + "kv_b_proj.weight"}
_DS_MOE = {**_EXPERTS, "e_bias": _L + "mlp.gate.e_score_correction_bias",
           "shared_gate": _L + "mlp.shared_experts.gate_proj.weight",
           "shared_up": _L + "mlp.shared_experts.up_proj.weight",
           "shared_down": _L + "mlp.shared_experts.down_proj.weight"}
# DeepSeek-V3's multi-token-prediction layer, stored as layer num_hidden_layers (+ j) beside a full decoder
# layer's tensors (DeepSeek-V3 README_WEIGHTS.md); transformers neither builds nor saves it
MTP_NAMES = ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
             "shared_head.head.weight")


def _deepseek_read(cfg: dict, where: str, strict: bool) -> dict:
    from ckdiff.errors import InputError
    E, g = cfg.get("n_routed_experts"), cfg.get("n_group", 8)
    if strict and isinstance(E, int) and isinstance(g, int) and (g < 1 or E % g):
        raise InputError(where, f"key 'n_group': {E} routed experts do not split into {g} groups")
    tg = cfg.get("topk_group", 4)
    if strict and isinstance(g, int) and isinstance(tg, int) and tg > g:
        raise InputError(where, f"key 'topk_group': {tg} groups chosen out of n_group {g}")
    if strict and cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise InputError(where, f"key 'scoring_func': {cfg['scoring_func']!r} is not supported (sigmoid only)")
    H = cfg.get("num_attention_heads")
    return {"kv_heads": H} if isinstance(H, int) else {}  # MLA: every head has its own k and v


def _deepseek_diagnose(slot: str, a, b, cfg) -> Optional[str]:
    """MLA's parts in the wrong place. kv_a_proj_with_mqa rows are [latent | k_rope], each q head's rows
    [nope | rope], each kv_b_proj head's rows [k_nope | v]: a converter that splits them the other way round
    moves rotary rows into the latent (or nope) part, or swaps k and v. Also: the rotary rows in the other
    pair order (DeepSeek's rope_interleave layout permuted as if it were rotate_half's)."""
    import torch
    from ckdiff.tensor.ops import rope_to_interleaved
    x, dr, H = cfg.extra or {}, cfg.head_dim, cfg.heads
    if a.dim() != 2 or a.shape != b.shape:
        return None
    dn = x.get("qk_nope_head_dim", 0)
    split = {"kv_down": (1, a.shape[0] - dr, "kv_a_proj_with_mqa", "latent"), "q_up": (H, dn, "q_b_proj", "nope"),
             "mla_q": (H, dn, "q_proj", "nope"), "kv_up": (H, dn, "kv_b_proj", "k_nope")}.get(slot)
    if split is None or a.shape[0] % split[0]:
        return None
    n, first, what, part = split
    heads = a.reshape(n, -1, a.shape[1])
    if torch.equal(torch.cat([heads[:, first:], heads[:, :first]], 1).reshape(a.shape), b):
        if slot == "kv_up":
            return (f"MLA k_nope and v swapped in kv_b_proj: each of its {H} heads holds [v | k_nope] instead of "
                    f"[k_nope ({dn} rows) | v]")
        return (f"MLA rotary part mixed into the latent part: {what} holds its {dr} rotary rows (qk_rope_head_dim) "
                f"before the {first} {part} rows{' of each head' if n > 1 else ''} instead of after them")
    if slot == "kv_up":
        return None

    def pairs(t):  # the rotary rows of every head to the other pair order
        h = t.reshape(n, -1, t.shape[1])
        rot = rope_to_interleaved(h[:, first:].reshape(n * dr, -1), n, dr).reshape(n, dr, -1)
        return torch.cat([h[:, :first], rot], 1).reshape(t.shape)
    if torch.equal(pairs(a), b) or torch.equal(pairs(b), a):
        return (f"MLA rotary rows of {what} in the other pair order (interleaved vs half-split): the rope_interleave "
                "layout was permuted like a q/k projection")
    return None


# llama.cpp's expert gating function codes (gguf ``ExpertGatingFuncType``); a deepseek2 file without the key is
# run with softmax gating (llama.cpp ``llama-model.cpp``, for DeepSeek-V2 files written before the key existed)
_GATING = {1: "softmax", 2: "sigmoid"}


def _deepseek_gguf(F, arch: str) -> dict:
    """What llama.cpp's deepseek2 metadata says in keys of its own (llama.cpp ``conversion/deepseek.py``
    ``DeepseekV2Model.set_gguf_parameters``): MLA runs as MQA there (head_count_kv 1; every head has its own k and
    v here), ``rope.dimension_count`` is qk_rope_head_dim, ``attention.key_length_mla`` is nope + rope. A file
    without the two MLA lengths is one from before llama.cpp split kv_b_proj (one ``attn_kv_b``): llama.cpp runs it
    as MHA (``src/models/deepseek2.cpp``, ``llama-hparams.cpp`` ``is_mla``), so ``key_length`` is nope + rope,
    ``value_length`` is v_head_dim and ``head_count_kv`` the head count, as its converter wrote them. Keys the
    converter leaves out take llama.cpp's defaults: no gating function -> softmax, no expert_weights_norm ->
    false, no expert_weights_scale -> 1, no group counts -> one group; no nextn key -> no MTP layer."""
    from ckdiff.errors import InputError
    from ckdiff.models.fields import MAX_SIZE
    k = lambda s: f"{arch}.{s}"  # noqa: E731
    H = F.int(k("attention.head_count"))
    rope, kmla = F.int(k("rope.dimension_count"), hi=MAX_SIZE), F.int(k("attention.key_length_mla"), hi=MAX_SIZE)
    vmla, kv = F.int(k("attention.value_length_mla"), hi=MAX_SIZE), F.int(k("attention.kv_lora_rank"), hi=MAX_SIZE)
    if (kmla is None) != (vmla is None):  # llama.cpp reads the file as MLA only with both (is_mla)
        raise InputError(F.where, f"metadata has only one of {arch}.attention.key_length_mla and value_length_mla")
    if kmla is None:  # kv_b_proj unsplit: the MHA sizes
        kmla, vmla = F.int(k("attention.key_length"), hi=MAX_SIZE), F.int(k("attention.value_length"), hi=MAX_SIZE)
        kvh = F.int(k("attention.head_count_kv"), hi=1 << 16)
        if None not in (H, kvh) and kvh != H:
            F.fail(k("attention.head_count_kv"), f"the head count ({H}): without key_length_mla llama.cpp runs MLA "
                                                 "as MHA, every head with its own k and v", kvh)
        lengths = "attention.key_length, value_length"
    else:
        lengths = "attention.key_length_mla, value_length_mla"
    if None in (H, rope, kmla, vmla, kv):
        raise InputError(F.where, f"metadata lacks {arch}.rope.dimension_count, {lengths} or kv_lora_rank: not a "
                                  "DeepSeek MLA file as llama.cpp's converter writes it")
    if kmla <= rope:
        F.fail(k("attention.key_length_mla" if lengths.endswith("_mla") else "attention.key_length"),
               f"more than rope.dimension_count ({rope})", kmla)
    gating = F.int(k("expert_gating_func"), lo=0, hi=8)
    if gating not in (None, 0, *_GATING):
        F.fail(k("expert_gating_func"), "1 (softmax) or 2 (sigmoid)", gating)
    norm = F.flag(k("expert_weights_norm"))
    return {"kv_heads": H, "head_dim": rope, "extra": {
        "q_lora_rank": F.int(k("attention.q_lora_rank"), hi=MAX_SIZE), "kv_lora_rank": kv,
        "qk_nope_head_dim": kmla - rope, "v_head_dim": vmla,
        "n_shared_experts": F.int(k("expert_shared_count"), lo=0) or 0,
        "n_group": F.int(k("expert_group_count")) or 1, "topk_group": F.int(k("expert_group_used_count")) or 1,
        "routed_scaling_factor": F.num(k("expert_weights_scale")) or 1.0,
        "first_k_dense_replace": F.int(k("leading_dense_block_count"), lo=0) or 0,
        "norm_topk_prob": bool(norm), "mtp_layers": F.int(k("nextn_predict_layers"), lo=0) or 0,
        "scoring_func": _GATING[gating or 1]}}


def _deepseek_gguf_write(cfg) -> dict:
    """The deepseek2 keys llama.cpp's converter writes (``DeepseekV2Model.set_gguf_parameters``)."""
    x = cfg.extra or {}
    kv, rope = x["kv_lora_rank"], cfg.head_dim
    out = {"attention.head_count_kv": 1, "attention.key_length": kv + rope, "attention.value_length": kv,
           "attention.kv_lora_rank": kv, "attention.key_length_mla": x["qk_nope_head_dim"] + rope,
           "attention.value_length_mla": x["v_head_dim"], "rope.dimension_count": rope,
           "leading_dense_block_count": x["first_k_dense_replace"], "expert_feed_forward_length": x["moe_ffn"],
           "expert_shared_count": x["n_shared_experts"], "expert_group_count": x["n_group"],
           "expert_group_used_count": x["topk_group"], "expert_weights_scale": float(x["routed_scaling_factor"]),
           "expert_gating_func": next(k for k, v in _GATING.items() if v == x.get("scoring_func", "sigmoid"))}
    if x.get("q_lora_rank") is not None:
        out["attention.q_lora_rank"] = x["q_lora_rank"]
    if x.get("norm_topk_prob"):
        out["expert_weights_norm"] = True
    return out


DEEPSEEK_V3 = register(Family(
    "deepseek-v3", ("deepseek_v3",), "DeepseekV3ForCausalLM",
    Block(attn=Attn.MLA, mlp=Mlp.MOE, router=Router.SIGMOID_GROUPED, shared_expert=True),
    {**{k: v for k, v in LLAMA_NAMES.items() if k not in ("q", "k", "v")}, **_DS_MLA, **_DS_MOE},
    config_keys={"experts": "n_routed_experts", "head_dim": "qk_rope_head_dim", "sliding_window": None},
    default_eps=1e-6,
    extra_keys={"q_lora_rank": Extra("q_lora_rank", "int", 1536, nullable=True),
                "kv_lora_rank": Extra("kv_lora_rank", "int", 512),
                "qk_nope_head_dim": Extra("qk_nope_head_dim", "int", 128),
                "v_head_dim": Extra("v_head_dim", "int", 128),
                "moe_ffn": Extra("moe_intermediate_size", "int", 2048),
                "n_shared_experts": Extra("n_shared_experts", "int", 1),
                "n_group": Extra("n_group", "int", 8), "topk_group": Extra("topk_group", "int", 4),
                "routed_scaling_factor": Extra("routed_scaling_factor", "num", 2.5),
                "first_k_dense_replace": Extra("first_k_dense_replace", "int", 3, lo=0),
                "norm_topk_prob": Extra("norm_topk_prob", "flag", True),
                "mtp_layers": Extra("num_nextn_predict_layers", "int", 1, lo=0),
                "rope_interleave": Extra("rope_interleave", "flag", True),
                "scoring_func": Extra("scoring_func", "text", "sigmoid")},
    dropped={"shared_gate": "shared expert", "shared_up": "shared expert", "shared_down": "shared expert",
             "e_bias": "e_score_correction_bias (expert choice falls back to the raw sigmoid scores)"},
    diagnose=_deepseek_diagnose, hf_read=_deepseek_read,
    dense_layer=lambda cfg, i: i < (cfg.extra or {}).get("first_k_dense_replace", 3),
    gguf_arch="deepseek2", layouts=frozenset({"hf", "gguf"}), gguf_read=_deepseek_gguf,
    gguf_write=_deepseek_gguf_write,
    # llama.cpp's deepseek2 graph ropes adjacent pairs (the rope_interleave layout, no permutation in the converter)
    gguf_extra={"moe_ffn": "expert_feed_forward_length", "rope_interleave": True},
    layout_names={"gguf": {
        **{k: v for k, v in _GGUF_BASE.items() if k not in ("q", "k", "v")}, **_GGUF_EXPERTS,
        "q_down": _GB + "attn_q_a.weight", "q_down_norm": _GB + "attn_q_a_norm.weight", "q_up": _GB + "attn_q_b.weight",
        "mla_q": _GB + "attn_q.weight", "kv_down": _GB + "attn_kv_a_mqa.weight",
        "kv_down_norm": _GB + "attn_kv_a_norm.weight",
        # kv_b_proj split per head into k_b (transposed) and v_b (llama.cpp keeps no attn_kv_b)
        "kv_up": (_GB + "attn_k_b.weight", _GB + "attn_v_b.weight"),
        "e_bias": _GB + "exp_probs_b.bias", "shared_gate": _GB + "ffn_gate_shexp.weight",
        "shared_up": _GB + "ffn_up_shexp.weight", "shared_down": _GB + "ffn_down_shexp.weight"}},
    unsupported={**_HF_ONLY, "megatron": "Megatron-LLM has no multi-head latent attention"}))
