"""How a model family is declared: ``Family``, its ``Block``, and the registry the lookups read.

A family is a :class:`Family` value in :data:`FAMILIES`: its canonical HF tensor names (slots,
optional biases included), how its HF ``config.json`` maps onto :class:`ModelConfig` fields, and
a :class:`Block` description (norm, activation, MLP kind, biases, parallel residual, embedding
scale) from which the reference runtime is composed. Layout tables, tiny golden models and the
runtimes derive what they need from here; nothing else branches on a family's name.

Adding a family = one ``register(Family(...))`` call (one module in ``models/families/``, or any module the
user imports). It must declare: a name, its config.json model types and architecture, a Block, its HF
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
    gguf_write: Optional[Callable] = None  # (cfg: ModelConfig) -> {metadata key after "{gguf_arch}.": value} a
    #                                          writer adds or overrides, as llama.cpp's converter writes them
    gguf_read: Optional[Callable] = None  # (fields: models.fields.Fields over the GGUF metadata, arch) -> the
    #                                          ModelConfig values (kv_heads, head_dim, ffn, sliding_window, extra)
    #                                          llama.cpp spells in keys of the arch's own (MLA's key lengths)
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
