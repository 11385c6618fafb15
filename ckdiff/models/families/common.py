"""Slot names several families share: llama's HF names, the Qwen-style attention and expert names, llama.cpp's
GGUF names per slot, and the per-layer attention kinds of ``layer_types``."""
from __future__ import annotations

from typing import Optional

from ckdiff.models.family import DENSE_MLP_SLOTS

_L = "model.layers.{i}."
LLAMA_NAMES = {
    "embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight",
    "attn_norm": _L + "input_layernorm.weight",
    "q": _L + "self_attn.q_proj.weight", "k": _L + "self_attn.k_proj.weight",
    "v": _L + "self_attn.v_proj.weight", "o": _L + "self_attn.o_proj.weight",
    "mlp_norm": _L + "post_attention_layernorm.weight",
    "gate": _L + "mlp.gate_proj.weight", "up": _L + "mlp.up_proj.weight", "down": _L + "mlp.down_proj.weight",
}

# why the families below have only the HF layout here (Family.unsupported; the refusal says it in one line)
_HF_ONLY = {"meta": "Meta's consolidated layout exists for Llama-family models only",
            "jetstream": "JetStream-pt has no model for it",
            "mcore": "ckdiff's Megatron-Core table maps the llama and mixtral blocks only",
            "gguf": "no GGUF table reads it yet (its llama.cpp names are declared in layout_names)"}

_SA = _L + "self_attn."

_QKV_BIAS = {"q_b": _SA + "q_proj.bias", "k_b": _SA + "k_proj.bias", "v_b": _SA + "v_proj.bias"}

_QK_NORM = {"q_norm": _SA + "q_norm.weight", "k_norm": _SA + "k_norm.weight"}

_EXPERTS = {"router": _L + "mlp.gate.weight", "expert_gate": _L + "mlp.experts.{e}.gate_proj.weight",
            "expert_up": _L + "mlp.experts.{e}.up_proj.weight", "expert_down": _L + "mlp.experts.{e}.down_proj.weight"}

_NO_MLP = {k: v for k, v in LLAMA_NAMES.items() if k not in DENSE_MLP_SLOTS}

_LAYER_TYPES = ("full_attention", "sliding_attention")

def _layer_types(cfg: dict, where: str, strict: bool, layers, derive=None) -> Optional[list]:
    """config.json ``layer_types`` checked against the layer count, or ``derive(i)`` per layer when absent."""
    from ckdiff.errors import InputError
    kinds = cfg.get("layer_types")
    if kinds is None:
        return None if derive is None or not isinstance(layers, int) else [derive(i) for i in range(layers)]
    if strict and (not isinstance(kinds, list) or len(kinds) != layers or any(k not in _LAYER_TYPES for k in kinds)):
        raise InputError(where, f"key 'layer_types': expected {layers} of {', '.join(_LAYER_TYPES)}, got "
                                f"{str(kinds)[:60]}")
    return kinds

# llama.cpp's GGUF names per slot (gguf package's TensorNameMap, as convert_hf_to_gguf.py writes them; per-expert
# HF tensors become one tensor stacked over the experts, ``*_exps``). Declared for the GGUF tables to derive from;
# a family lists "gguf" in its layouts once a table reads it. tests/test_families_transformers_parity.py checks
# every name against the gguf package. llama.cpp permutes q/k rows for its llama arch only: Qwen2Model (and
# Qwen3, Qwen3-MoE after it) and GptOssModel write HF's half-split rows (layout_rotary "gguf": HALF).
_GB = "blk.{i}."

_GGUF_BASE = {"embed": "token_embd.weight", "norm": "output_norm.weight", "head": "output.weight",
              "attn_norm": _GB + "attn_norm.weight", "q": _GB + "attn_q.weight", "k": _GB + "attn_k.weight",
              "v": _GB + "attn_v.weight", "o": _GB + "attn_output.weight", "mlp_norm": _GB + "ffn_norm.weight",
              "gate": _GB + "ffn_gate.weight", "up": _GB + "ffn_up.weight", "down": _GB + "ffn_down.weight"}

_GGUF_QKV_BIAS = {"q_b": _GB + "attn_q.bias", "k_b": _GB + "attn_k.bias", "v_b": _GB + "attn_v.bias"}

_GGUF_QK_NORM = {"q_norm": _GB + "attn_q_norm.weight", "k_norm": _GB + "attn_k_norm.weight"}

_GGUF_EXPERTS = {"router": _GB + "ffn_gate_inp.weight", "expert_gate": _GB + "ffn_gate_exps.weight",
                 "expert_up": _GB + "ffn_up_exps.weight", "expert_down": _GB + "ffn_down_exps.weight"}
