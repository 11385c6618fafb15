"""Gemma: RMSNorm applied as 1 + w, tanh GELU, embeddings scaled by sqrt(hidden), always tied."""
from __future__ import annotations

from ckdiff.models.family import Act, Block, Family, Norm, Rotary, register
from ckdiff.models.families.common import LLAMA_NAMES

# JetStream-pt's Gemma names (embedder tied; half-split rotary like HF, so q/k are not permuted)
GEMMA_JETSTREAM_NAMES = {
    "embed": "embedder.weight", "norm": "norm.weight",
    "attn_norm": "layers.{i}.input_layernorm.weight", "mlp_norm": "layers.{i}.post_attention_layernorm.weight",
    "q": "layers.{i}.self_attn.wq.weight", "k": "layers.{i}.self_attn.wk.weight",
    "v": "layers.{i}.self_attn.wv.weight", "o": "layers.{i}.self_attn.o_proj.weight",
    "gate": "layers.{i}.mlp.gate_proj.weight", "up": "layers.{i}.mlp.up_proj.weight",
    "down": "layers.{i}.mlp.down_proj.weight",
}

GEMMA = register(Family(
    "gemma", ("gemma",), "GemmaForCausalLM",
    Block(norm=Norm.RMS_PLUS_ONE, act=Act.GELU_TANH, embed_scale=True), LLAMA_NAMES,
    hf_defaults={"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
    block_keys={"act": ("hidden_act", "hidden_activation"), "qkv_bias": "attention_bias"},
    layouts=frozenset({"hf", "jetstream", "gguf"}), always_tied=True, default_eps=1e-6, jetstream_names=("gemma",),
    layout_names={"jetstream": GEMMA_JETSTREAM_NAMES},
    # llama.cpp's GemmaModel (conversion/gemma.py): arch "gemma", q/k unpermuted (NEOX rope), norms + 1
    layout_rotary={"jetstream": Rotary.HALF, "gguf": Rotary.HALF}, gguf_arch="gemma",
    jetstream_quant_refused={q: "Gemma linears are quantized int8 per channel only (the JetStream engine "
                                "refuses int4 for Gemma)" for q in ("int4", "blockwise")}))
