"""Model families, each declared once.

A family is a :class:`Family` value in :data:`FAMILIES`: its canonical HF tensor names (slots,
optional biases included), how its HF ``config.json`` maps onto :class:`ModelConfig` fields, and
a :class:`Block` description (norm, activation, MLP kind, biases, parallel residual, embedding
scale) from which the reference runtime is composed. Layout tables, tiny golden models and the
runtimes derive what they need from here; nothing else branches on a family's name.

Adding a family = one ``register(Family(...))`` call (in this module or in any module the user
imports). ``tests/test_family_decl.py`` builds a toy family this way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Optional


class Norm(str, Enum):
    RMS = "rms"              # x * rsqrt(mean(x^2) + eps) * w
    RMS_PLUS_ONE = "rms+1"   # Gemma: ... * (1 + w), computed in float32
    LAYER = "layer"          # LayerNorm with weight and bias


class Act(str, Enum):
    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"


class Mlp(str, Enum):
    GLU = "glu"      # act(x @ gate.T) * (x @ up.T) @ down.T
    PLAIN = "plain"  # act(x @ up.T) @ down.T  (Falcon's dense_h_to_4h / dense_4h_to_h)
    MOE = "moe"      # router + experts, each a GLU (Mixtral)


class Rotary(str, Enum):
    """Row order of q/k inside each head, i.e. which rotary formula the rows are laid out for."""
    HALF = "half"                # HF: rotate_half, pairs (j, j + d/2)
    INTERLEAVED = "interleaved"  # Meta / Megatron-LLM >= 2023-08: pairs (2j, 2j + 1)


@dataclass(frozen=True)
class Block:
    """What one decoder layer computes; the runtime is composed from this."""
    norm: Norm = Norm.RMS
    act: Act = Act.SILU
    mlp: Mlp = Mlp.GLU
    qkv_bias: bool = False        # q/k/v projections carry biases
    parallel: bool = False        # attention and MLP read the same input (Falcon)
    embed_scale: bool = False     # embeddings multiplied by sqrt(hidden) (Gemma)
    fused_qkv: bool = False       # HF stores one grouped query_key_value tensor (Falcon)


@dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple            # config.json "model_type" values that select this family
    hf_architecture: str             # written to config.json "architectures"
    block: Block
    hf_names: Mapping[str, str]      # slot -> HF key template ("{i}" = layer)
    config_keys: Mapping[str, str] = field(default_factory=dict)  # ModelConfig field -> config.json key
    hf_defaults: Mapping[str, object] = field(default_factory=dict)  # config.json values written as is
    layouts: frozenset = frozenset({"hf"})  # layouts the converters support for this family
    always_tied: bool = False
    default_eps: float = 1e-5


FAMILIES: dict = {}
_BY_MODEL_TYPE: dict = {}


def register(f: Family) -> Family:
    """Add a family. Registering a name or model type twice is an error, not an override."""
    if f.name in FAMILIES:
        raise ValueError(f"family {f.name!r} is already registered")
    for mt in f.hf_model_types:
        if mt in _BY_MODEL_TYPE:
            raise ValueError(f"model_type {mt!r} already selects family {_BY_MODEL_TYPE[mt].name!r}")
    FAMILIES[f.name] = f
    for mt in f.hf_model_types:
        _BY_MODEL_TYPE[mt] = f
    return f


def family(name: str) -> Family:
    return FAMILIES[name]


def for_model_type(model_type: str) -> Optional[Family]:
    return _BY_MODEL_TYPE.get((model_type or "").lower())


# ------------------------------------------------------------------ declarations
_L = "model.layers.{i}."
LLAMA_NAMES = {
    "embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight",
    "attn_norm": _L + "input_layernorm.weight",
    "q": _L + "self_attn.q_proj.weight", "k": _L + "self_attn.k_proj.weight",
    "v": _L + "self_attn.v_proj.weight", "o": _L + "self_attn.o_proj.weight",
    "mlp_norm": _L + "post_attention_layernorm.weight",
    "gate": _L + "mlp.gate_proj.weight", "up": _L + "mlp.up_proj.weight", "down": _L + "mlp.down_proj.weight",
}
_MOE = {"router": _L + "block_sparse_moe.gate.weight",
        "expert": _L + "block_sparse_moe.experts.{e}.w{n}.weight"}  # n: 1 gate, 2 down, 3 up
_FH = "transformer.h.{i}."
FALCON_NAMES = {
    "embed": "transformer.word_embeddings.weight", "norm": "transformer.ln_f.weight",
    "norm_b": "transformer.ln_f.bias",
    "qkv": _FH + "self_attention.query_key_value.weight", "o": _FH + "self_attention.dense.weight",
    "up": _FH + "mlp.dense_h_to_4h.weight", "down": _FH + "mlp.dense_4h_to_h.weight",
    "attn_norm": _FH + "input_layernorm.weight", "attn_norm_b": _FH + "input_layernorm.bias",
    "ln_attn": _FH + "ln_attn.weight", "ln_attn_b": _FH + "ln_attn.bias",
    "ln_mlp": _FH + "ln_mlp.weight", "ln_mlp_b": _FH + "ln_mlp.bias",
}

LLAMA = register(Family(
    "llama", ("llama", "mistral", "codellama"), "LlamaForCausalLM", Block(), LLAMA_NAMES,
    layouts=frozenset({"hf", "meta", "jetstream", "megatron", "mcore", "gguf"})))
GEMMA = register(Family(
    "gemma", ("gemma",), "GemmaForCausalLM",
    Block(norm=Norm.RMS_PLUS_ONE, act=Act.GELU_TANH, embed_scale=True), LLAMA_NAMES,
    layouts=frozenset({"hf", "jetstream"}), always_tied=True, default_eps=1e-6))
MIXTRAL = register(Family(
    "mixtral", ("mixtral",), "MixtralForCausalLM", Block(mlp=Mlp.MOE),
    {**{k: v for k, v in LLAMA_NAMES.items() if k not in ("gate", "up", "down")}, **_MOE},
    layouts=frozenset({"hf", "meta", "jetstream", "mcore", "gguf"})))
FALCON = register(Family(
    "falcon", ("falcon", "refinedweb", "refinedwebmodel", "rw"), "FalconForCausalLM",
    Block(norm=Norm.LAYER, act=Act.GELU, mlp=Mlp.PLAIN, parallel=True, fused_qkv=True), FALCON_NAMES,
    layouts=frozenset({"hf", "megatron"}), always_tied=True))
