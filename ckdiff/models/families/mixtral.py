"""Mixtral: Llama attention with a sparse MoE of SwiGLU experts."""
from __future__ import annotations

from ckdiff.models.family import Block, Family, Mlp, register
from ckdiff.models.families.common import LLAMA_NAMES, _L

_MOE = {"router": _L + "block_sparse_moe.gate.weight",
        "expert": _L + "block_sparse_moe.experts.{e}.w{n}.weight"}  # n: 1 gate, 2 down, 3 up

MIXTRAL = register(Family(
    "mixtral", ("mixtral",), "MixtralForCausalLM", Block(mlp=Mlp.MOE),
    {**{k: v for k, v in LLAMA_NAMES.items() if k not in ("gate", "up", "down")}, **_MOE},
    hf_defaults={"sliding_window": None, "router_jitter_noise": 0.0, "bos_token_id": 1, "eos_token_id": 2},
    block_keys={"act": "hidden_act"},
    layouts=frozenset({"hf", "meta", "jetstream", "mcore", "gguf"}), jetstream_names=("mixtral",),
    jetstream_quant_refused={"blockwise": "blockwise quantization of Mixtral experts is not defined by "
                                          "JetStream; use a per-channel type"}))
