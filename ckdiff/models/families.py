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
(``megatron_models``, ``jetstream_names``). ``tests/test_family_declarations.py`` builds a toy family
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
    SWIGLU_CLAMP = "swiglu_clamp"  # GPT-OSS experts: gate, up clamped; (up + 1) * gate * sigmoid(alpha * gate)


class Mlp(str, Enum):
    GLU = "glu"      # act(x @ gate.T) * (x @ up.T) @ down.T
    PLAIN = "plain"  # act(x @ up.T) @ down.T  (Falcon's dense_h_to_4h / dense_4h_to_h)
    MOE = "moe"      # router + experts, each a GLU (Mixtral)


class Attn(str, Enum):
    GQA = "gqa"  # q/k/v projections (K KV heads shared by groups of query heads), rotary on the whole head
    MLA = "mla"  # DeepSeek multi-head latent attention: low-rank q and kv, a decoupled rotary part


class Router(str, Enum):
    """How an MoE block picks its experts and weighs them."""
    SOFTMAX_TOPK = "softmax_topk"  # softmax over all experts, top k, renormalised when norm_topk_prob (Mixtral,
    #                                Qwen3-MoE)
    TOPK_SOFTMAX = "topk_softmax"  # top k of the (biased) logits, softmax over those k (GPT-OSS)
    SIGMOID_GROUPED = "sigmoid_grouped"  # sigmoid scores; e_score_correction_bias steers the choice only;
    #                                      top groups first, then top k inside them; scaled (DeepSeek-V3)


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
    attn: Attn = Attn.GQA
    qk_norm: bool = False         # RMSNorm over each q and k head before rotary (Qwen3)
    o_bias: bool = False          # the output projection carries a bias (GPT-OSS)
    sinks: bool = False           # one learned logit per head joins the softmax and takes no value (GPT-OSS)
    router: Router = Router.SOFTMAX_TOPK
    shared_expert: bool = False   # an always-on MLP beside the routed experts (DeepSeek-V3)


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
# (GPT-OSS's clamped SwiGLU is spelled "silu" in its config.json; the clamp is the family's, not a key's)
HF_ACT = {Act.SILU: "silu", Act.GELU: "gelu", Act.GELU_TANH: "gelu_pytorch_tanh", Act.SWIGLU_CLAMP: "silu"}
CANONICAL_ACT = {Act.SILU: "silu", Act.GELU: "gelu", Act.GELU_TANH: "gelu_tanh", Act.SWIGLU_CLAMP: "silu"}


@dataclass(frozen=True)
class Extra:
    """A config.json value of one family that ModelConfig has no field for; read (type- and range-checked)
    into ``ModelConfig.extra[name]``, written back by to_hf, compared as a function field."""
    key: object                  # config.json key, or a tuple of spellings (the first is written)
    kind: str                    # int | num | flag | text | ints | texts
    default: object = None       # transformers' default when config.json has no such key
    lo: int = 1                  # smallest int allowed (kind int / ints)
    nullable: bool = False       # an explicit null is a value of its own (DeepSeek's q_lora_rank: no q LoRA)

    @property
    def keys(self) -> tuple:
        return (self.key,) if isinstance(self.key, str) else tuple(self.key)


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
    # --- the config table and the converters' --model values
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
    gguf_extra: Mapping[str, object] = field(default_factory=dict)  # ModelConfig.extra name -> the GGUF
    #                                          metadata key it is read from (a str, after "{gguf_arch}."), or the
    #                                          value llama.cpp's graph fixes for the arch (any other value)
    extra_keys: Mapping[str, Extra] = field(default_factory=dict)  # ModelConfig.extra name -> config.json value
    # per-layer structure: whether layer i attends through the sliding window, and whether its MLP is the MoE
    # (None: every layer alike; the window from ``layer_types`` in extra when the family declares it)
    dense_layer: Optional[Callable] = None   # (cfg: ModelConfig, i) -> True where an MoE family has a dense MLP
    unsupported: Mapping[str, str] = field(default_factory=dict)  # layout -> why the family has none there
    # what a checkpoint loses when a converter drops a slot's tensors (the diff names the cause), and a
    # hook for the family's own tensor diagnoses: (slot, a, b, cfg: ModelConfig) -> finding text or None
    dropped: Mapping[str, str] = field(default_factory=dict)
    diagnose: Optional[Callable] = None

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
        Falcon's one or two norms, MLA's low-rank or plain q) only when ``have`` says so: tied=, two_norms=,
        q_lora=."""
        out = []
        for s in self.hf_names:
            if s == "head" and have.get("tied", self.always_tied):
                continue
            if self.block.attn is Attn.MLA and s in (("mla_q",) if have.get("q_lora", True)
                                                      else ("q_down", "q_down_norm", "q_up")):
                continue
            if self.block.fused_qkv and s in (("attn_norm", "attn_norm_b") if have.get("two_norms")
                                                 else ("ln_attn", "ln_attn_b", "ln_mlp", "ln_mlp_b")):
                continue
            out.append(s)
        return out

    def read_extras(self, cfg: dict, where: str, raw: Optional[dict] = None) -> dict:
        """The family's extra config.json values (declared defaults for absent keys), type- and range-checked.
        ``raw``: the config before nulls were dropped (a nullable extra's explicit null is kept)."""
        from ckdiff.models.fields import MAX_SIZE, Fields
        f, out = Fields(cfg, where), {}
        for name, ex in self.extra_keys.items():
            key = next((k for k in ex.keys if cfg.get(k) is not None), ex.keys[0])
            v = cfg.get(key)
            if v is None and ex.nullable and any(k in (raw or {}) for k in ex.keys):
                out[name] = None
            elif v is None:
                out[name] = list(ex.default) if isinstance(ex.default, tuple) else ex.default
            elif ex.kind in ("ints", "texts"):
                ok = isinstance(v, list) and all((isinstance(x, str) if ex.kind == "texts" else
                                                  isinstance(x, int) and not isinstance(x, bool) and x >= ex.lo)
                                                 for x in v)
                if not ok:
                    f.fail(key, "a list of " + ("strings" if ex.kind == "texts" else f"integers >= {ex.lo}"), v)
                out[name] = list(v)
            elif ex.kind == "int":
                out[name] = f.int(key, lo=ex.lo, hi=MAX_SIZE)
            else:
                out[name] = getattr(f, ex.kind)(key)
        return out

    def write_extras(self, extra: Mapping) -> dict:
        """config.json values of the family's extras (their first spelling), None left out."""
        out = {}
        for name, ex in self.extra_keys.items():
            v = (extra or {}).get(name, ex.default)
            if v is not None or ex.nullable:
                out[ex.keys[0]] = list(v) if isinstance(v, tuple) else v
        return out

    def no_layout(self, layout: str) -> str:
        """The one line that refuses ``layout`` for this family (with the declared reason)."""
        why = f": {self.unsupported[layout]}" if layout in self.unsupported else ""
        return f"{self.name} has no {layout} layout here{why} (its layouts: {', '.join(sorted(self.layouts))})"

    def slot_of(self, name: str) -> Optional[str]:
        """The slot whose HF template names tensor ``name`` (layer and expert numbers filled)."""
        import re
        for slot, t in self.hf_names.items():
            pat = re.escape(t).replace(r"\{i\}", r"\d+").replace(r"\{e\}", r"\d+").replace(r"\{n\}", r"\d+")
            if re.fullmatch(pat, name):
                return slot
        return None

    def layer_slots(self, cfg, i: int, slots) -> list:
        """The layer-i slots among ``slots`` for a model whose first layers have a dense MLP (DeepSeek-V3's
        first_k_dense_replace): the MoE slots only in MoE layers, the dense MLP's only in dense ones."""
        if self.block.mlp is not Mlp.MOE:
            return list(slots)
        dense = self.dense_layer is not None and self.dense_layer(cfg, i)
        return [s for s in slots if not (s in DENSE_MLP_SLOTS and not dense or is_moe_slot(s) and dense)]

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


DENSE_MLP_SLOTS = ("gate", "up", "down")


def is_moe_slot(slot: str) -> bool:
    """Router, its biases, routed and shared experts: the slots of an MoE layer's MLP."""
    return slot.startswith(("router", "expert", "shared_")) or slot == "e_bias"


def sliding_layer(cfg, i: int) -> bool:
    """Whether layer i attends through ``cfg.sliding_window``: per ``layer_types`` where the config lists
    them (GPT-OSS, Qwen2 with max_window_layers), else every layer when a window is set."""
    if not cfg.sliding_window:
        return False
    kinds = (cfg.extra or {}).get("layer_types")
    return kinds is None or kinds[i] == "sliding_attention"


def dense_layer(cfg, i: int) -> bool:
    """Whether layer i of an MoE family has a dense MLP instead (always False for a dense family)."""
    f = FAMILIES.get(cfg.family)
    return f is not None and f.block.mlp is Mlp.MOE and f.dense_layer is not None and f.dense_layer(cfg, i)


def extra_names() -> tuple:
    """Every registered family's extra config names (the canonical configs compare them)."""
    return tuple(dict.fromkeys(n for f in FAMILIES.values() for n in f.extra_keys))


def nullable_keys() -> tuple:
    """config.json keys whose explicit null is a value of its own (Extra.nullable), over every family."""
    return tuple(dict.fromkeys(k for f in FAMILIES.values() for ex in f.extra_keys.values() if ex.nullable
                               for k in ex.keys))


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
    from ckdiff.errors import InputError
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


# ------------------------------------------------------------------ Qwen2, Qwen3, Qwen3-MoE
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
# Qwen2/Qwen3: the window applies to layers >= max_window_layers, and only with use_sliding_window
_QWEN_WINDOW = {"use_sliding_window": Extra("use_sliding_window", "flag", False),
                "max_window_layers": Extra("max_window_layers", "int", 28, lo=0),
                "layer_types": Extra("layer_types", "texts")}
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


# ------------------------------------------------------------------ DeepSeek-V3
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
                "rope_interleave": Extra("rope_interleave", "flag", True)},
    dropped={"shared_gate": "shared expert", "shared_up": "shared expert", "shared_down": "shared expert",
             "e_bias": "e_score_correction_bias (expert choice falls back to the raw sigmoid scores)"},
    diagnose=_deepseek_diagnose, hf_read=_deepseek_read,
    dense_layer=lambda cfg, i: i < (cfg.extra or {}).get("first_k_dense_replace", 3),
    gguf_arch="deepseek2", layout_names={"gguf": {
        **{k: v for k, v in _GGUF_BASE.items() if k not in ("q", "k", "v")}, **_GGUF_EXPERTS,
        "q_down": _GB + "attn_q_a.weight", "q_down_norm": _GB + "attn_q_a_norm.weight", "q_up": _GB + "attn_q_b.weight",
        "mla_q": _GB + "attn_q.weight", "kv_down": _GB + "attn_kv_a_mqa.weight",
        "kv_down_norm": _GB + "attn_kv_a_norm.weight", "kv_up": _GB + "attn_kv_b.weight",
        "e_bias": _GB + "exp_probs_b.bias", "shared_gate": _GB + "ffn_gate_shexp.weight",
        "shared_up": _GB + "ffn_up_shexp.weight", "shared_down": _GB + "ffn_down_shexp.weight"}},
    unsupported={**_HF_ONLY, "megatron": "Megatron-LLM has no multi-head latent attention",
                 "gguf": "llama.cpp's deepseek2 converter splits kv_b_proj into attn_k_b (each head transposed) and "
                         "attn_v_b, which no GGUF table here writes yet"}))


# ------------------------------------------------------------------ GPT-OSS (dequantized: experts as float)
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


GPT_OSS = register(Family(
    "gpt-oss", ("gpt_oss",), "GptOssForCausalLM",
    Block(act=Act.SWIGLU_CLAMP, mlp=Mlp.MOE, qkv_bias=True, o_bias=True, sinks=True, router=Router.TOPK_SOFTMAX),
    {**_NO_MLP, **_QKV_BIAS, "o_b": _SA + "o_proj.bias", "sinks": _SA + "sinks", **_GPT_OSS_MOE},
    block_keys={"qkv_bias": "attention_bias"}, hf_defaults={"hidden_act": "silu"},
    extra_keys={"layer_types": Extra("layer_types", "texts"), "swiglu_limit": Extra("swiglu_limit", "num", 7.0),
                "swiglu_alpha": Extra("swiglu_alpha", "num", 1.702)},
    dropped={"sinks": "attention sinks (each head's softmax loses its sink logit)",
             "router_b": "router bias", "o_b": "o_proj bias"}, diagnose=_gpt_oss_diagnose,
    hf_read=_gpt_oss_read, hf_write=_gpt_oss_write, gguf_arch="gpt-oss",
    # (llama.cpp splits the fused gate_up_proj into ffn_gate_exps / ffn_up_exps: no one-to-one name for it)
    layout_names={"gguf": {**{k: v for k, v in _GGUF_BASE.items() if k not in DENSE_MLP_SLOTS}, **_GGUF_QKV_BIAS,
                           "mlp_norm": _GB + "post_attention_norm.weight", "o_b": _GB + "attn_output.bias",
                           "sinks": _GB + "attn_sinks.weight", "router": _GB + "ffn_gate_inp.weight",
                           "router_b": _GB + "ffn_gate_inp.bias", "experts_down": _GB + "ffn_down_exps.weight",
                           "experts_down_b": _GB + "ffn_down_exps.bias"}}, layout_rotary={"gguf": Rotary.HALF},
    unsupported={**_HF_ONLY,
                 "megatron": "Megatron-LLM has no GPT-OSS model (attention sinks, clamped SwiGLU experts)",
                 "gguf": "llama.cpp's converter de-interleaves gate_up_proj into ffn_gate_exps / ffn_up_exps and "
                         "writes the experts as MXFP4, which no GGUF table here reads yet"}))
