"""Model families, each declared once.

A family is a :class:`Family` value in :data:`FAMILIES`: its canonical HF tensor names (slots,
optional biases included), how its HF ``config.json`` maps onto :class:`ModelConfig` fields, and
a :class:`Block` description (norm, activation, MLP kind, biases, parallel residual, embedding
scale) from which the reference runtime is composed. Layout tables, tiny golden models and the
runtimes derive what they need from here; nothing else branches on a family's name.

Adding a family = one ``register(Family(...))`` call (in this module or in any module the user
imports). It must declare: a name, its config.json model types and architecture, a Block, its HF
names per slot (biases as ``X_b``) and the layouts it supports; and, only where they differ from
llama's, ``config_keys`` (HF key per ModelConfig field, alternates as a tuple, None = absent),
``hf_defaults``/``block_keys`` (what to_hf writes), ``always_tied``/``default_eps``/``hf_default_eps``,
``hf_read``/``hf_write`` hooks for what a table cannot say, ``layout_names``/``layout_rotary`` where a
layout names or orders the family's tensors differently, and the converters' --model values
(``megatron_models``, ``jetstream_names``). ``tests/test_fam_declarations.py`` builds a toy family
this way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Mapping, Optional


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


# The HF config.json key behind each ModelConfig field, as most families spell it; a family's
# ``config_keys`` overrides entries (a tuple lists alternate spellings, the first is written;
# None = the family's config has no such key). Experts only matter for an MoE block.
HF_CONFIG_KEYS = {
    "hidden": "hidden_size", "ffn": "intermediate_size", "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads", "layers": "num_hidden_layers", "head_dim": "head_dim",
    "vocab": "vocab_size", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
    "max_pos": "max_position_embeddings", "tied": "tie_word_embeddings", "sliding_window": "sliding_window",
    "rope_scaling": "rope_scaling", "experts": "num_local_experts", "experts_per_tok": "num_experts_per_tok",
}
# Block attribute -> config.json key(s) written from the block (``Family.block_keys`` overrides)
HF_BLOCK_KEYS = {"qkv_bias": "attention_bias", "act": "hidden_act"}
# how transformers spells each activation in config.json, and the canonical name ckdiff compares
HF_ACT = {Act.SILU: "silu", Act.GELU: "gelu", Act.GELU_TANH: "gelu_pytorch_tanh"}
CANONICAL_ACT = {Act.SILU: "silu", Act.GELU: "gelu", Act.GELU_TANH: "gelu_tanh"}


@dataclass(frozen=True)
class MegatronModel:
    """One Megatron-LLM ``--model`` value (the original hf_to_megatron's choices)."""
    name: str
    sizes: Mapping[int, tuple] = field(default_factory=dict)  # --size (B) -> (layers, hidden, heads, kv heads)
    source: Optional[str] = None          # hub id the original read without --model-path ("{size}" filled)
    tokenizer: Optional[str] = None       # hub id of its default SentencePiece tokenizer
    meta_source: bool = False             # the original accepts Meta weights for this model
    hf_model_type: Optional[str] = None   # config.json model_type written for it (None: the family's first)
    tokenizer_type: str = "SentencePieceTokenizer"


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
    # --- added for issue 15 (config table, converters' --model values)
    hf_default_eps: Optional[float] = None   # transformers' default when config.json has no eps (None: default_eps)
    block_keys: Optional[Mapping[str, object]] = None  # Block attribute -> config.json key(s); None: HF_BLOCK_KEYS
    # hooks for what a table cannot say: config.json -> extra ModelConfig values (strict: refuse what the
    # family cannot hold, with an InputError naming ``where``), and ModelConfig -> extra config.json values
    hf_read: Optional[Callable] = None    # (cfg: dict, where: str, strict: bool) -> dict
    hf_write: Optional[Callable] = None   # (cfg: ModelConfig) -> dict
    megatron_models: tuple = ()           # MegatronModel values (Megatron-LLM --model)
    megatron_args: Mapping[str, object] = field(default_factory=dict)  # extra Megatron args written as is
    jetstream_names: tuple = ()           # JetStream-pt --model_name values
    megatron_default: str = ""            # the --model used for a checkpoint of this family when none is named
    jetstream_quant_refused: Mapping[str, str] = field(default_factory=dict)  # "int4" | "blockwise" -> why
    jetstream_from_meta: bool = False     # JetStream's converter accepts Meta weights for this family
    hf_type_defaults: Mapping[str, Mapping] = field(default_factory=dict)  # model types other than the
    #     first that to_hf writes as themselves -> config.json values written for them (architectures, ...)
    megatron_pads_vocab: bool = True      # the original writes make_vocab_size_divisible_by in args
    layout_names: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # layout -> slot -> name, where
    #                                          the family's names differ from the layout's table (Gemma JetStream)
    layout_rotary: Mapping[str, Rotary] = field(default_factory=dict)  # layout -> q/k row order where it is
    #                                          not the layout's default (Gemma JetStream keeps HF's half split)
    gguf_arch: str = "llama"              # GGUF general.architecture llama.cpp's converter writes for this
    #                                          family (used where "gguf" is in layouts); its GGUF table derives
    #                                          from the declaration: layout_rotary["gguf"] (HALF: q/k not
    #                                          permuted), Norm.RMS_PLUS_ONE (norms stored as 1 + w), qkv_bias

    # ------------------------------------------------------------ derived
    def hf_keys(self, fld: str) -> tuple:
        """The config.json spellings of ModelConfig field ``fld`` (first = written); () when none."""
        k = self.config_keys[fld] if fld in self.config_keys else HF_CONFIG_KEYS.get(fld)
        if k is None:
            return ()
        return (k,) if isinstance(k, str) else tuple(k)

    def hf_block_keys(self) -> dict:
        """config.json key -> value written from the block (attention_bias, hidden_act, ...)."""
        out = {}
        for attr, keys in (HF_BLOCK_KEYS if self.block_keys is None else self.block_keys).items():
            v = getattr(self.block, attr)
            v = HF_ACT[v] if isinstance(v, Act) else v
            for k in ((keys,) if isinstance(keys, str) else keys):
                out[k] = v
        return out

    @property
    def eps_default_hf(self) -> float:
        return self.default_eps if self.hf_default_eps is None else self.hf_default_eps

    @property
    def activation(self) -> str:
        """The canonical activation name (what canonical configs compare)."""
        return CANONICAL_ACT[self.block.act]

    def slots(self, **have) -> list:
        """The family's slots present in a model: optional slots (biases ``X_b``, the untied head,
        Falcon's one or two norms) only when ``have`` says so: tied=, two_norms=."""
        out = []
        for s in self.hf_names:
            if s == "head" and have.get("tied", self.always_tied):
                continue
            if self.block.fused_qkv and s in (("attn_norm", "attn_norm_b") if have.get("two_norms")
                                                 else ("ln_attn", "ln_attn_b", "ln_mlp", "ln_mlp_b")):
                continue
            out.append(s)
        return out

    def megatron_model_names(self) -> tuple:
        """Megatron-LLM --model values of the family: declared, or its own name when it has the layout."""
        if self.megatron_models:
            return tuple(m.name for m in self.megatron_models)
        return (self.name,) if "megatron" in self.layouts else ()

    def default_megatron_model(self, hf_model_type: str = "") -> str:
        """The --model for a checkpoint of this family: the one declared for its config model_type, else
        ``megatron_default``, else the first declared (or the family's own name)."""
        for m in self.megatron_models:
            if m.hf_model_type and m.hf_model_type == hf_model_type:
                return m.name
        names = self.megatron_model_names()
        return self.megatron_default or (names[0] if names else self.name)

    def megatron_model(self, name: str) -> MegatronModel:
        for m in self.megatron_models:
            if m.name == name:
                return m
        return MegatronModel(name)


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


def unregister(name: str) -> None:
    """Remove a family (tests register a toy family and take it away again)."""
    f = FAMILIES.pop(name)
    for mt in f.hf_model_types:
        if _BY_MODEL_TYPE.get(mt) is f:
            del _BY_MODEL_TYPE[mt]


def family(name: str) -> Family:
    return FAMILIES[name]


def get(name: str) -> Optional[Family]:
    return FAMILIES.get(name)


def for_model_type(model_type: str) -> Optional[Family]:
    return _BY_MODEL_TYPE.get((model_type or "").lower())


def for_megatron_model(name: str) -> Optional[Family]:
    """The family a Megatron-LLM --model value belongs to."""
    for f in FAMILIES.values():
        if name in f.megatron_model_names():
            return f
    return None


def megatron_models() -> tuple:
    """Every Megatron-LLM --model value, in registration order."""
    return tuple(m for f in FAMILIES.values() for m in f.megatron_model_names())


def for_jetstream_name(name: str) -> Optional[Family]:
    for f in FAMILIES.values():
        if name in f.jetstream_names:
            return f
    return None


def for_block(layout: str, **block) -> Family:
    """The first registered family with ``layout`` whose block has the given attributes (mlp=Mlp.MOE, ...):
    how a layout whose config names no family (Megatron-Core args, GGUF metadata) is read. The default
    family when none fits."""
    for f in FAMILIES.values():
        if layout in f.layouts and all(getattr(f.block, k) == v for k, v in block.items()):
            return f
    return default()


def for_gguf(arch: str, moe: bool) -> Optional[Family]:
    """The family whose GGUF architecture is ``arch`` (an MoE block when ``moe``); None when none is declared."""
    fits = [f for f in FAMILIES.values() if "gguf" in f.layouts and f.gguf_arch == arch]
    return next((f for f in fits if (f.block.mlp is Mlp.MOE) == moe), None)


def gguf_archs() -> list:
    return sorted({f.gguf_arch for f in FAMILIES.values() if "gguf" in f.layouts})


def default() -> Family:
    """The family a config with an unknown (or no) model type is read as."""
    return FAMILIES["llama"]


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
FALCON_NAMES = {  # per-layer slots in the order the tiny golden models draw their random weights
    "embed": "transformer.word_embeddings.weight", "norm": "transformer.ln_f.weight",
    "norm_b": "transformer.ln_f.bias",
    "attn_norm": _FH + "input_layernorm.weight", "attn_norm_b": _FH + "input_layernorm.bias",
    "ln_attn": _FH + "ln_attn.weight", "ln_attn_b": _FH + "ln_attn.bias",
    "ln_mlp": _FH + "ln_mlp.weight", "ln_mlp_b": _FH + "ln_mlp.bias",
    "qkv": _FH + "self_attention.query_key_value.weight", "o": _FH + "self_attention.dense.weight",
    "up": _FH + "mlp.dense_h_to_4h.weight", "down": _FH + "mlp.dense_4h_to_h.weight",
}



def _falcon_read(cfg: dict, where: str, strict: bool) -> dict:
    """Falcon's KV head count is spelled by two flags; two architectures are refused when strict."""
    from .errors import InputError
    new = bool(cfg.get("new_decoder_architecture", False))
    H = cfg.get("num_attention_heads", cfg.get("n_head"))
    K = (cfg.get("num_kv_heads") or H) if new else (1 if cfg.get("multi_query", True) else H)
    parallel = bool(cfg.get("parallel_attn", True))
    if strict and not parallel:
        raise InputError(where, "falcon with parallel_attn=false is not supported")
    if strict and not new and K != 1:
        raise InputError(where, "falcon with the per-head [n, 3, d] QKV layout is not supported")
    return dict(kv_heads=K, two_norms=new, parallel_attn=parallel)


def _falcon_write(cfg) -> dict:
    return {"new_decoder_architecture": cfg.two_norms, "multi_query": cfg.kv_heads == 1}


# JetStream-pt's Gemma names (embedder tied; half-split rotary like HF, so q/k are not permuted)
GEMMA_JETSTREAM_NAMES = {
    "embed": "embedder.weight", "norm": "norm.weight",
    "attn_norm": "layers.{i}.input_layernorm.weight", "mlp_norm": "layers.{i}.post_attention_layernorm.weight",
    "q": "layers.{i}.self_attn.wq.weight", "k": "layers.{i}.self_attn.wk.weight",
    "v": "layers.{i}.self_attn.wv.weight", "o": "layers.{i}.self_attn.o_proj.weight",
    "gate": "layers.{i}.mlp.gate_proj.weight", "up": "layers.{i}.mlp.up_proj.weight",
    "down": "layers.{i}.mlp.down_proj.weight",
}
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
MIXTRAL = register(Family(
    "mixtral", ("mixtral",), "MixtralForCausalLM", Block(mlp=Mlp.MOE),
    {**{k: v for k, v in LLAMA_NAMES.items() if k not in ("gate", "up", "down")}, **_MOE},
    hf_defaults={"sliding_window": None, "router_jitter_noise": 0.0, "bos_token_id": 1, "eos_token_id": 2},
    block_keys={"act": "hidden_act"},
    layouts=frozenset({"hf", "meta", "jetstream", "mcore", "gguf"}), jetstream_names=("mixtral",),
    jetstream_quant_refused={"blockwise": "blockwise quantization of Mixtral experts is not defined by "
                                          "JetStream; use a per-channel type"}))
FALCON = register(Family(
    "falcon", ("falcon", "refinedweb", "refinedwebmodel", "rw"), "FalconForCausalLM",
    Block(norm=Norm.LAYER, act=Act.GELU, mlp=Mlp.PLAIN, parallel=True, fused_qkv=True), FALCON_NAMES,
    config_keys={"heads": ("num_attention_heads", "n_head"), "layers": ("num_hidden_layers", "n_layer"),
                 "kv_heads": "num_kv_heads", "head_dim": None, "ffn": "ffn_hidden_size",
                 "norm_eps": "layer_norm_epsilon", "sliding_window": None, "rope_scaling": None},
    hf_defaults={"bias": False, "alibi": False, "bos_token_id": 11, "eos_token_id": 11},  # FalconConfig's
    block_keys={"parallel": "parallel_attn"}, hf_read=_falcon_read, hf_write=_falcon_write,
    layouts=frozenset({"hf", "megatron"}), always_tied=True,
    megatron_models=(MegatronModel("falcon", {7: (32, 4544, 71, 1), 40: (60, 8192, 128, 8)}, "tiiuae/falcon-{size}b",
                                   tokenizer_type="FalconTokenizer"),),
    megatron_args={"use_flash_attn": True, "hidden_dropout": 0.0}, megatron_pads_vocab=False))
