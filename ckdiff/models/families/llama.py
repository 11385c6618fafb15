"""Llama (with Mistral and CodeLlama): the HF, Meta, JetStream, Megatron-LLM, Megatron-Core and GGUF layouts."""
from __future__ import annotations

from ckdiff.models.family import Block, Family, MegatronModel, register
from ckdiff.models.families.common import LLAMA_NAMES

_LLAMA_TOK = "meta-llama/Llama-2-7b-hf"
LLAMA = register(Family(
    "llama", ("llama", "mistral", "codellama"), "LlamaForCausalLM", Block(), LLAMA_NAMES,
    hf_defaults={"mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2},
    layouts=frozenset({"hf", "meta", "jetstream", "megatron", "mcore", "gguf"}), hf_default_eps=1e-6,
    hf_type_defaults={"mistral": {"architectures": ["MistralForCausalLM"], "sliding_window": None}},
    megatron_models=(
        MegatronModel("llama", {7: (32, 4096, 32, 32), 13: (40, 5120, 40, 40), 30: (60, 6656, 52, 52),
                                65: (80, 8192, 64, 64)}, "decapoda-research/llama-{size}b-hf", _LLAMA_TOK, True),
        MegatronModel("llama2", {7: (32, 4096, 32, 32), 13: (40, 5120, 40, 40), 70: (80, 8192, 64, 8)},
                      "meta-llama/Llama-2-{size}b-hf", _LLAMA_TOK, True),
        MegatronModel("codellama", {7: (32, 4096, 32, 32), 13: (40, 5120, 40, 40), 34: (48, 8192, 64, 8)},
                      "codellama/CodeLlama-{size}b-hf", "TheBloke/CodeLlama-13B-fp16", True),
        MegatronModel("mistral", {7: (32, 4096, 32, 8)}, "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1",
                      hf_model_type="mistral")),
    jetstream_names=("llama", "llama-2", "llama-3"), jetstream_from_meta=True, megatron_default="llama2"))
