"""The canonical architecture description every layout reads into and writes from.

Values come from the checkpoint's own config (``config.json``, ``params.json``,
Megatron ``args``) and are cross-checked against tensor shapes; head_dim and the
FFN size are read from shapes when the config leaves them implicit.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np

from ckdiff.errors import InputError
from ckdiff.tensor.dtype_names import dtype_name
from ckdiff.models import families
from ckdiff.models.families import Mlp, Norm

_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def __getattr__(name: str):
    """``DTYPE_BY_NAME`` ({"float32": torch.float32, ...}), made on first use: reading a config needs no torch."""
    if name == "DTYPE_BY_NAME":
        import torch
        return {n: getattr(torch, n) for n in _DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# typed, range-checked config values: models/fields.py
from ckdiff.models.fields import (  # noqa: F401 (re-exported: readers import them from here)
    ConfigError,
    MAX_SIZE,
    MAX_COUNT,
    MAX_VOCAB,
    MAX_POSITIONS,
    MAX_THETA,
    MAX_TOKEN_ID,
    _show,
    _is_int,
    _is_num,
    valid_int,
    Fields,
)

_SIZE = ("int", dict(hi=MAX_SIZE))
_COUNT = ("int", {})
_VOCAB = ("int", dict(hi=MAX_VOCAB))
_POS = ("int", dict(hi=MAX_POSITIONS))
_WINDOW = ("int", dict(hi=MAX_POSITIONS, unset=(0,)))
_EPS = ("num", dict(hi=1.0))
_THETA = ("num", {})
_FLAG = ("flag", {})
_TEXT = ("text", {})
SCHEMA = {
    "hf": {
        "hidden_size": _SIZE, "num_attention_heads": _COUNT, "n_head": _COUNT, "num_key_value_heads": _COUNT,
        "num_kv_heads": _COUNT, "num_hidden_layers": _COUNT, "n_layer": _COUNT, "head_dim": _SIZE,
        "intermediate_size": _SIZE, "ffn_hidden_size": _SIZE, "vocab_size": _VOCAB, "rms_norm_eps": _EPS,
        "layer_norm_epsilon": _EPS, "rope_theta": _THETA, "rope_scaling": ("rope_scaling", {}),
        "rope_parameters": ("rope_scaling", {}), "tie_word_embeddings": _FLAG,
        "new_decoder_architecture": _FLAG, "multi_query": _FLAG, "parallel_attn": _FLAG,
        "use_sliding_window": _FLAG, "max_position_embeddings": _POS, "sliding_window": _WINDOW,
        "num_local_experts": _COUNT, "num_experts_per_tok": _COUNT, "model_type": _TEXT, "hidden_act": _TEXT,
        "hidden_activation": _TEXT, "torch_dtype": ("dtype", {}), "dtype": ("dtype", {}),
        "bos_token_id": ("token_ids", {}), "eos_token_id": ("token_ids", {}), "pad_token_id": ("token_ids", {}),
        "final_logit_softcapping": _THETA},
    "meta": {
        "dim": _SIZE, "n_heads": _COUNT, "n_kv_heads": _COUNT, "n_layers": _COUNT, "head_dim": _SIZE,
        "hidden_dim": _SIZE, "vocab_size": ("int", dict(hi=MAX_VOCAB, unset=(-1,))), "norm_eps": _EPS,
        "rope_theta": _THETA, "rope_scaling": ("rope_scaling", {}), "use_scaled_rope": _FLAG,
        "rope_scaling_factor": _THETA, "max_seq_len": _POS, "sliding_window": _WINDOW,
        "tie_word_embeddings": _FLAG, "num_experts": _COUNT, "num_experts_per_tok": _COUNT, "model_type": _TEXT,
        "multiple_of": _SIZE, "ffn_dim_multiplier": _THETA, "quantize_type": _TEXT,
        "bos_token_id": ("token_ids", {}), "eos_token_id": ("token_ids", {}), "pad_token_id": ("token_ids", {})},
    "megatron": {
        "num_layers": _COUNT, "hidden_size": _SIZE, "num_attention_heads": _COUNT,
        "num_attention_heads_kv": _COUNT, "kv_channels": _SIZE, "ffn_hidden_size": _SIZE,
        "padded_vocab_size": _VOCAB, "true_vocab_size": _VOCAB, "max_position_embeddings": _POS,
        "seq_length": _POS, "sliding_window_size": _WINDOW, "tensor_model_parallel_size": _COUNT,
        "pipeline_model_parallel_size": _COUNT, "layernorm_epsilon": _EPS, "rope_theta": _THETA,
        "use_rms_norm": _FLAG, "tie_embed_logits": _FLAG, "parallel_attn": _FLAG, "parallel_layernorm": _FLAG,
        "params_dtype": ("dtype", {}), "ckdiff_rotary": ("text", dict(choices=("interleaved", "rotate_half"))),
        "ckdiff_model": _TEXT, "glu_activation": _TEXT, "rope_scaling_factor": _THETA,
        "bos_token_id": ("token_ids", {}), "eos_token_id": ("token_ids", {}), "pad_token_id": ("token_ids", {})},
}
SCHEMA["jetstream"] = SCHEMA["meta"]


def parse_config(fmt: str, cfg, where) -> dict:
    """The one validation step: every value a parser uses, type- and range-checked. Returns the config
    with those values in their canonical types (floats as float, null keys dropped); other keys pass
    through unread. Raises ConfigError naming the file and the key."""
    fmt = (fmt or "").split("->")[0]
    schema = SCHEMA.get(fmt)
    if schema is None:
        return dict(cfg or {})
    f = Fields(cfg, where, "args key" if fmt == "megatron" else "key")
    out = {k: v for k, v in cfg.items() if v is not None}
    for key, (kind, kw) in schema.items():
        if key in out:
            v = getattr(f, kind)(key, **kw)
            if v is None:
                out.pop(key)
            else:
                out[key] = v
    return out


# the config key behind each canonical field, per layout (for the messages of check_tensors)
_KEYS = {"hf": dict(hidden="hidden_size", layers="num_hidden_layers", heads="num_attention_heads",
                    kv_heads="num_key_value_heads", head_dim="head_dim", ffn="intermediate_size", vocab="vocab_size"),
         "meta": dict(hidden="dim", layers="n_layers", heads="n_heads", kv_heads="n_kv_heads", head_dim="head_dim",
                      ffn="hidden_dim", vocab="vocab_size"),
         "megatron": dict(hidden="hidden_size", layers="num_layers", heads="num_attention_heads",
                          kv_heads="num_attention_heads_kv", head_dim="kv_channels", ffn="ffn_hidden_size",
                          vocab="padded_vocab_size", _label="args key")}
_KEYS["jetstream"] = _KEYS["meta"]


def _hf_get(fam, cfg: dict, fld: str):
    """The value of ModelConfig field ``fld`` in config.json: the first of the family's spellings present."""
    for k in fam.hf_keys(fld):
        if cfg.get(k) is not None:
            return cfg[k]
    return None


def _hf_check_keys(fam) -> dict:
    """The config.json key behind each checked field, for messages (the family's first spelling)."""
    return {f: (fam.hf_keys(f) or (k,))[0] for f, k in _KEYS["hf"].items()}


def _hf_check_names(fam) -> dict:
    """Layer-0 HF names of the tensors check_tensors looks at, from the family's slots."""
    at = lambda s: (fam.hf_names[s].format(i=0),) if s in fam.hf_names else ()  # noqa: E731
    return dict(embed=at("embed"), head=at("head"), q=at("q"), k=at("k"), qkv=at("qkv"))


def _meta_family(model_type):
    """The family of a params.json model_type: a registered family with a Meta layout, else the default."""
    f = families.for_model_type(model_type or "")
    return f if f is not None and f.layouts & {"meta", "jetstream"} else families.default()


_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def check_tensors(cfg: "ModelConfig", fmt: str, tensors: dict, where, raw: Optional[dict] = None) -> "ModelConfig":
    """The config against the tensors' shapes, before any work: embedding width = hidden size, layer count,
    attention rows = heads x head_dim (query, KV, fused QKV), FFN rows, vocab within the embedding rows.
    Raises ConfigError naming the key."""
    fam = families.get(cfg.family)
    keys = _hf_check_keys(fam) if fmt == "hf" and fam else dict(_KEYS.get(fmt, _KEYS["hf"]))
    names = _hf_check_names(fam) if fmt == "hf" and fam else names_of(fmt)
    raw = raw or {}

    label = keys.get("_label", "key")

    def bad(field_, msg, also=None):
        both = f" and {keys[also]!r}" if also and raw.get(keys[also]) is not None else ""
        raise ConfigError(where, f"{label} {keys[field_]!r}{both}: {msg}")
    emb = _first(tensors, names.get("embed", ()))
    if emb is not None and len(emb[1].shape) == 2 and emb[1].dtype.is_floating_point \
            and emb[1].shape[1] != cfg.hidden:
        rows, cols = emb[1].shape
        hint = (f" (the rows and columns of {cfg.hidden // cols} shards merged on the wrong axis?)"
                if cols < cfg.hidden and cfg.hidden % cols == 0 and rows % (cfg.hidden // cols) == 0 else "")
        bad("hidden", f"{cfg.hidden} does not match the {cols} columns of {emb[0]}{hint}")
    found = {int(m.group(1)) for n in tensors for m in [_LAYER.search(n)] if m}
    mtp = (cfg.extra or {}).get("mtp_layers") or 0  # DeepSeek-V3's MTP layers follow the decoder's layers
    found -= set(range(cfg.layers, cfg.layers + mtp))
    if found and len(found) != cfg.layers:
        bad("layers", f"{cfg.layers} layers, but the tensors hold {len(found)}")
    H, K, hd = cfg.heads, cfg.kv_heads, cfg.head_dim
    q, k, qkv = (_first(tensors, names.get(x, ())) for x in ("q", "k", "qkv"))
    if q is not None and len(q[1].shape) in (2, 3) and _rows(q[1]) != H * hd:
        bad("heads", f"{H} heads x head_dim {hd} = {H * hd} rows, but {q[0]} has {_rows(q[1])}", "head_dim")
    if k is not None and len(k[1].shape) in (2, 3) and _rows(k[1]) != K * hd:
        bad("kv_heads", f"{K} KV heads x head_dim {hd} = {K * hd} rows, but {k[0]} has {_rows(k[1])}", "head_dim")
    if qkv is not None and len(qkv[1].shape) == 2 and qkv[1].shape[0] != (H + 2 * K) * hd:
        bad("heads", f"({H} heads + 2 x {K} KV heads) x head_dim {hd} = {(H + 2 * K) * hd} rows, but "
                     f"{qkv[0]} has {qkv[1].shape[0]}", "head_dim")
    want_ffn = raw.get(keys["ffn"])
    if _is_int(want_ffn) and want_ffn != cfg.ffn:
        bad("ffn", f"{want_ffn}, but the FFN weights have {cfg.ffn} rows")
    V = raw.get("true_vocab_size") if fmt == "megatron" else raw.get(keys["vocab"])
    if _is_int(V) and V > 0 and emb is not None and V > emb[1].shape[0]:
        raise ConfigError(where, f"{label} {'true_vocab_size' if fmt == 'megatron' else keys['vocab']!r}: vocab "
                                 f"size {V} exceeds the {emb[1].shape[0]} rows of {emb[0]}")
    return cfg


@dataclass
class ModelConfig:
    family: str  # llama (llama, llama2, codellama, mistral, llama-3) | falcon | gemma | mixtral
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tied: bool = False
    max_pos: int = 2048
    sliding_window: Optional[int] = None
    rope_scaling: Optional[dict] = None
    sliding_layers: Optional[tuple] = None    # layers with the sliding window (None: all, when one is set)
    rope_freq_factors: Optional[tuple] = None  # GGUF rope_freqs.weight: per-dimension frequency divisors
    # falcon
    parallel_attn: bool = False
    two_norms: bool = False  # falcon 40B style: ln_attn + ln_mlp
    norm_bias: bool = False
    # mixtral
    experts: int = 0
    experts_per_tok: int = 0
    dtype: str = "float32"
    # set once when a config is parsed (or by a converter's explicit option), never edited afterwards
    hf_model_type: str = ""                  # config.json model_type as written (llama | mistral | ...)
    rotary_rows: Optional[str] = None        # q/k row order of a Megatron/mcore layout: "interleaved" |
    #                                          "rotate_half" (Megatron-LLM before 2023-08); None = the layout's default
    megatron_model: Optional[str] = None     # Megatron-LLM --model (llama2, mistral, codellama, falcon)
    true_vocab: Optional[int] = None         # Megatron true_vocab_size (rows above it are padding)
    separate_attn_norm: bool = False         # Megatron-Core: input_layernorm as its own tensor
    separate_mlp_norm: bool = False          # Megatron-Core: pre_mlp_layernorm as its own tensor
    # special token ids as the source config gives them (an int, or a list: Llama-3's several EOS ids);
    # None: the source does not say (writers fall back to the family's defaults)
    bos_token_id: object = None
    eos_token_id: object = None
    pad_token_id: object = None

    def token_ids(self) -> dict:
        """The special token ids the config carries, by their config key (the ones it does not say left out)."""
        return {k: v for k, v in (("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id),
                                  ("pad_token_id", self.pad_token_id)) if v is not None}
    extra: dict = field(default_factory=dict)  # the family's own config values (Family.extra_keys): MLA ranks,
    #                                            routing, layer_types, ...

    @property
    def q_rows(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self, where: str = "config", keys: Optional[dict] = None) -> "ModelConfig":
        key = lambda f: f"{(keys or {}).get('_label', 'key')} {(keys or {}).get(f, f)!r}: "  # noqa: E731
        if self.heads % self.kv_heads:
            raise ConfigError(where, f"{key('kv_heads')}{self.heads} query heads are not a multiple of "
                                     f"{self.kv_heads} KV heads")
        if self.head_dim < 1 or self.head_dim % 2:
            raise ConfigError(where, f"{key('head_dim')}head_dim {self.head_dim} is not a positive even number "
                                     "(rotary needs pairs)")
        if self.ffn is None or self.ffn < 1:
            raise ConfigError(where, f"{key('ffn')}no FFN size: neither the config nor the weights give one")
        return self

    # ------------------------------------------------------------ HF config.json
    # Both directions are read off the family's declaration (ckdiff/models/families/): its config keys,
    # defaults, block flags and, for what a table cannot say, its hf_read / hf_write hooks.
    @classmethod
    def from_hf(cls, cfg: dict, tensors: dict, where: str = "config.json") -> "ModelConfig":
        raw, cfg = cfg, parse_config("hf", cfg, where)
        arch = (cfg.get("model_type") or "").lower()
        fam = families.for_model_type(arch) or families.default()
        get = lambda f: _hf_get(fam, cfg, f)  # noqa: E731
        names = fam.hf_names
        layer0 = lambda slot: tensors.get(names[slot].format(i=0)) if slot in names else None  # noqa: E731
        H, L, D = get("heads"), get("layers"), get("hidden")
        for f, v in (("heads", H), ("layers", L), ("hidden", D)):
            if v is None:
                raise ConfigError(where, f"missing {(fam.hf_keys(f) or (f,))[0]!r}")
        hook = dict(fam.hf_read(cfg, where, True)) if fam.hf_read else {}
        extra = fam.read_extras(cfg, where, raw)
        extra.update({k: v for k, v in hook.pop("extra", {}).items() if v is not None})
        K = get("kv_heads") or H
        q = layer0("q")
        hd = get("head_dim") or (q.shape[0] // H if q is not None else D // H)
        up = layer0("up")
        if up is None and "expert" in names:
            up = tensors.get(names["expert"].format(i=0, e=0, n=3))  # w3 = up
        F = up.shape[0] if up is not None else get("ffn")
        emb = layer0("embed")
        V = emb.shape[0] if emb is not None else get("vocab")
        if V is None:
            raise InputError(where, f"no {names['embed']} tensor and no vocab size")
        tied = get("tied")
        tied = (fam.always_tied if tied is None else tied) or "head" not in names \
            or names["head"] not in tensors
        rope = cfg.get("rope_parameters") or {}  # transformers v5 keeps theta and scaling here
        # every family reads rope scaling (a family without a declared key reads HF's own spelling)
        scaling = (get("rope_scaling") if fam.hf_keys("rope_scaling") else cfg.get("rope_scaling")) or (
            {k: v for k, v in rope.items() if k != "rope_theta"} if rope.get("rope_type", "default") != "default"
            else None)
        moe = fam.block.mlp is Mlp.MOE
        out = cls(family=fam.name, hidden=D, layers=L, heads=H, kv_heads=K, head_dim=hd, ffn=F, vocab=V,
                  norm_eps=get("norm_eps") or fam.eps_default_hf,
                  rope_theta=float(get("rope_theta") or rope.get("rope_theta") or 10000.0),
                  tied=bool(tied), max_pos=get("max_pos") or 2048, sliding_window=get("sliding_window"),
                  rope_scaling=scaling, experts=(get("experts") or 0) if moe else 0,
                  experts_per_tok=(get("experts_per_tok") or 0) if moe else 0,
                  parallel_attn=fam.block.parallel, norm_bias=fam.block.norm is Norm.LAYER,
                  dtype=_dtype_of(tensors, names["embed"], cfg),
                  hf_model_type=arch if arch in fam.hf_type_defaults or (arch and families.for_model_type(arch) is None)
                  else fam.hf_model_types[0],
                  bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
                  pad_token_id=cfg.get("pad_token_id"), extra=extra)
        out = replace(out, sliding_layers=_hf_sliding_layers(cfg, L, out.sliding_window, where), **hook)
        out = out.check(where, _hf_check_keys(fam))
        return check_tensors(out, "hf", tensors, where, cfg)

    def to_hf(self) -> dict:
        fam = families.family(self.family)
        mt = self.hf_model_type if self.hf_model_type in fam.hf_type_defaults else fam.hf_model_types[0]
        cfg = {"architectures": [fam.hf_architecture], "model_type": mt}
        cfg.update(fam.hf_defaults)
        cfg.update(fam.hf_type_defaults.get(mt, {}))
        cfg.update(fam.hf_block_keys())
        values = dict(hidden=self.hidden, ffn=self.ffn, heads=self.heads, kv_heads=self.kv_heads, layers=self.layers,
                      head_dim=self.head_dim, vocab=self.vocab, norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                      max_pos=self.max_pos, tied=True if fam.always_tied else self.tied,
                      rope_scaling=self.rope_scaling or None, sliding_window=self.sliding_window)
        if fam.block.mlp is Mlp.MOE:
            values.update(experts=self.experts, experts_per_tok=self.experts_per_tok)
        for f, v in values.items():
            keys = fam.hf_keys(f)
            if keys and v is not None:
                cfg[keys[0]] = v
        if self.rope_scaling and not fam.hf_keys("rope_scaling"):
            cfg["rope_scaling"] = self.rope_scaling  # HF's own key where the family declares none
        cfg.update(fam.write_extras(self.extra))
        if fam.hf_write:
            cfg.update(fam.hf_write(self))
        cfg.update(self.token_ids())  # the ids read from the source win over the family's defaults
        cfg["torch_dtype"] = self.dtype
        return cfg

    # ------------------------------------------------------------ Meta params.json
    @classmethod
    def from_meta(cls, params: dict, tensors: dict, where: str = "params.json") -> "ModelConfig":
        params = parse_config("meta", params, where)
        try:
            D, H, L = params["dim"], params["n_heads"], params["n_layers"]
        except KeyError as e:
            raise InputError(where, f"missing {e.args[0]!r}") from None
        K = params.get("n_kv_heads") or H
        # blockwise-quantized codes are [nb, 128, out]: the output rows are the last axis
        rows = lambda t: t.shape[2] if len(t.shape) == 3 and t.shape[1] == 128 else t.shape[0]  # noqa: E731
        fam = _meta_family(params.get("model_type"))
        wq = tensors.get("layers.0.attention.wq.weight") or tensors.get("layers.0.self_attn.wq.weight")
        hd = params.get("head_dim") or (rows(wq) // H if wq is not None else D // H)
        w1 = tensors.get("layers.0.feed_forward.w1.weight") or tensors.get("layers.0.mlp.gate_proj.weight")
        moe = tensors.get("layers.0.block_sparse_moe.cond_ffn.w1")
        F = rows(w1) if w1 is not None else (moe.shape[1] if moe is not None else params.get("hidden_dim"))
        emb = tensors.get("tok_embeddings.weight") or tensors.get("embedder.weight")
        if emb is None:
            raise InputError(where, "no tok_embeddings.weight (or embedder.weight) tensor")
        V = emb.shape[0]
        tied = bool(params.get("tie_word_embeddings")) or "output.weight" not in tensors
        out = cls(family=fam.name, experts=params.get("num_experts", moe.shape[0] if moe is not None else 0),
                  experts_per_tok=params.get("num_experts_per_tok", 2 if moe is not None else 0), hidden=D, layers=L,
                  heads=H, kv_heads=K, head_dim=hd, ffn=F, vocab=V,
                  norm_eps=params.get("norm_eps", fam.default_eps), rope_theta=float(params.get("rope_theta", 10000.0)),
                   tied=tied, max_pos=params.get("max_seq_len", 2048),
                   sliding_window=params.get("sliding_window"), rope_scaling=params.get("rope_scaling"),
                   dtype=str(emb.dtype).replace("torch.", "") if emb.dtype.is_floating_point else "float32",
                   hf_model_type=params.get("model_type", "llama"), bos_token_id=params.get("bos_token_id"),
                   eos_token_id=params.get("eos_token_id"),
                   pad_token_id=params.get("pad_token_id")).check(where, _KEYS["meta"])
        return check_tensors(out, "meta", tensors, where, params)

    def to_meta(self) -> dict:
        p = {"dim": self.hidden, "n_layers": self.layers, "n_heads": self.heads, "n_kv_heads": self.kv_heads,
             "vocab_size": self.vocab, "norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
             "head_dim": self.head_dim, "hidden_dim": self.ffn, "max_seq_len": self.max_pos}
        if self.rope_scaling:
            p["rope_scaling"] = self.rope_scaling
            p["use_scaled_rope"] = True
        if self.sliding_window:
            p["sliding_window"] = self.sliding_window
        if self.tied:
            p["tie_word_embeddings"] = True
        fam = families.family(self.family)
        # params.json without model_type reads as the default family's first model type
        mt = self.hf_model_type
        if not mt or families.for_model_type(mt) not in (fam, None):
            mt = fam.hf_model_types[0]
        if mt != families.default().hf_model_types[0]:
            p["model_type"] = mt
        if fam.block.mlp is Mlp.MOE:
            p.update(num_experts=self.experts, num_experts_per_tok=self.experts_per_tok)
        p.update(self.token_ids())  # params.json has no such keys in Meta's releases: ckdiff records them
        return p


def config_where(ck) -> str:
    """The file a checkpoint's config comes from, for messages (Megatron: the first rank file's args)."""
    where = (ck.meta or {}).get("config_where")
    if where:  # said by the torch-free comparison (compare/lane.py), which never loads the format registry
        return where
    from ckdiff.formats.registry import lookup
    f = lookup(ck.format)
    if f is not None:
        return f.where(ck)
    files = (ck.meta or {}).get("files") or [ck.path]
    return str(sorted(files)[0])


def model_config(ck) -> ModelConfig:
    """The canonical config of a checkpoint, from its own config file (HF, Meta/JetStream, Megatron args),
    validated (parse_config) and checked against the tensors (check_tensors): a ConfigError otherwise.
    Each format declares its config reader (formats/registry.py)."""
    from ckdiff.formats.registry import model_config as from_registry
    return from_registry(ck)


def _dtype_of(tensors, key, cfg) -> str:
    t = tensors.get(key)
    if t is not None:
        return str(t.dtype).replace("torch.", "")
    return cfg.get("torch_dtype", "float32")


# ---------------------------------------------------------------- canonical config for comparison
# Fields that change the function a checkpoint computes. Everything else a config file may hold
# (use_cache, dtype/torch_dtype, attention_dropout at inference, initializer_range, architectures,
# transformers_version, ...) is irrelevant by construction: it never enters the canonical dict.
FUNCTION_FIELDS = ("family", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab", "norm_eps",
                   "rope_theta", "rope_scaling", "rotary", "tied", "sliding_window", "activation", "parallel_attn",
                   "two_norms", "experts", "experts_per_tok", "logit_softcap", "bos_token_id", "eos_token_id",
                   "pad_token_id")
# Fields that differ between correct checkpoints of the same model without changing any output
# within the shorter context: reported as notes.
NOTE_FIELDS = ("max_pos",)
_ACT = {"silu": "silu", "swish": "silu", "swiglu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "geglu": "gelu", "relu": "relu"}


def _hf_sliding_layers(cfg: dict, layers: int, window, where: str) -> Optional[tuple]:
    """The layers that use ``sliding_window``: those ``layer_types`` names "sliding_attention", else with
    ``max_window_layers`` (Qwen2) the layers from that index on; None means every layer."""
    if not window:
        return None
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers or not all(isinstance(t, str) for t in types):
            raise ConfigError(where, f"key 'layer_types': expected {layers} strings, one per layer")
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    mwl = cfg.get("max_window_layers")
    if mwl is not None and (cfg.get("model_type") or "").startswith("qwen2"):
        if isinstance(mwl, bool) or not isinstance(mwl, int) or mwl < 0:
            raise ConfigError(where, f"key 'max_window_layers': {mwl!r} is not a layer count")
        return tuple(range(min(mwl, layers), layers))
    return None


def _rope_scaling(d) -> Optional[dict]:
    """One spelling of rope scaling: rope_type (v4 "type"), float values, "default" meaning none."""
    if not isinstance(d, dict) or not d:
        return None
    out = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
           for k, v in d.items() if k not in ("type", "rope_type", "rope_theta")}
    kind = d.get("rope_type") or d.get("type") or "default"
    if kind == "default" and not out:
        return None
    if kind == "yarn" and out.get("truncate") is True:  # transformers' default: the same as leaving it out
        del out["truncate"]
    # YaRN's mscale / mscale_all_dim (DeepSeek): 0 is unset (transformers tests them for truth), and mscale
    # without mscale_all_dim is never read (the cos/sin factor takes both or neither)
    for k in ("mscale", "mscale_all_dim"):
        if out.get(k) == 0:
            del out[k]
    if "mscale_all_dim" not in out:
        out.pop("mscale", None)
    out["rope_type"] = kind
    return dict(sorted(out.items()))


def _ids_of(cfg: dict) -> dict:
    """The special token ids a layout's config records (Meta params.json and Megatron args only when a
    converter wrote them): absent keys stay absent, so they are never compared with a default."""
    return {k: _ids(cfg[k]) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}


def megatron_rope_scaling(factor) -> Optional[dict]:
    """Megatron-LLM's ``rope_scaling_factor`` (positions divided by it: linear scaling) as HF rope scaling."""
    return {"rope_type": "linear", "factor": float(factor)} if factor and float(factor) != 1.0 else None


def _ids(v):
    if isinstance(v, list):
        return sorted(v) if len(v) > 1 else (v[0] if v else None)
    return v


def _rows(t) -> int:
    # blockwise-quantized codes are [nb, 128, out]: the output rows are the last axis
    return t.shape[2] if len(t.shape) == 3 and t.shape[1] == 128 else t.shape[0]


def canonical_config(fmt: str, cfg: dict, tensors: dict, where: str = "config") -> Optional[dict]:
    """The function-defining fields of a checkpoint's own config, one spelling for every layout.

    HF ``config.json`` (transformers v4 and v5 spellings, per-model defaults made explicit), Meta/JetStream
    ``params.json`` and Megatron ``args`` all read into the same keys. Values the config leaves
    implicit come from the tensor shapes (FFN size, head_dim, Meta's ``vocab_size: -1``). None when
    the format has no config."""
    fmt = (fmt or "").split("->")[0]
    cfg = cfg or {}
    if cfg and fmt in SCHEMA:
        # an explicit null that is a value of its own (a family's nullable extra) survives the parse
        kept = {k: None for k in families.nullable_keys() if k in cfg and cfg[k] is None}
        cfg = {**parse_config(fmt, cfg, where), **kept}
    if not cfg:
        return None
    canonical = _canonical_reader(fmt)
    if canonical is not None:
        from ckdiff.errors import InputError
        try:
            return canonical(cfg, tensors)
        except InputError as e:  # a format's reader names its config generically ("gguf", "args"): name the file
            if e.path in ("gguf", "args", "config"):
                raise InputError(where, e.problem) from None
            raise
    return None


def _canonical_reader(fmt: str):
    """The canonical config reader a format declares (formats/registry.py). HF's is this module's own
    ``_canonical_hf``: while the registry is not loaded (the torch-free comparison, compare/lane.py, never
    loads every format's module) it is taken directly."""
    from ckdiff.formats import registry
    if fmt == "hf" and not registry.loaded():
        return _canonical_hf
    f = registry.lookup(fmt)
    return f.canonical if f is not None else None


def _canonical_hf(cfg: dict, tensors: dict) -> dict:
    mt = (cfg.get("model_type") or "llama").lower()
    known = families.for_model_type(mt)
    fam = known or families.default()  # an unknown model type reads with the default family's keys
    get = lambda f: _hf_get(fam, cfg, f)  # noqa: E731
    rope = cfg.get("rope_parameters") or {}  # transformers v5
    H, D = get("heads"), get("hidden")
    hook = fam.hf_read(cfg, "config.json", False) if fam.hf_read else {}
    K = hook.get("kv_heads") or get("kv_heads") or H
    hd = get("head_dim") or (D // H if D and H else None)
    up = tensors.get(fam.hf_names["up"].format(i=0)) if "up" in fam.hf_names else None
    ffn = get("ffn") or (up.shape[0] if up is not None else None)
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or fam.activation
    sw = cfg.get("sliding_window") if (mt in ("mistral", "mixtral") or cfg.get("use_sliding_window", True)) else None
    tied = get("tied")
    out = dict(family=known.name if known else mt,
               hidden=D, layers=get("layers"), heads=H, kv_heads=K, head_dim=hd,
               ffn=ffn, vocab=get("vocab"), norm_eps=float(get("norm_eps") or fam.eps_default_hf),
               rope_theta=float(get("rope_theta") or rope.get("rope_theta") or 10000.0),
               rope_scaling=_rope_scaling(cfg.get("rope_scaling") or rope),
               tied=bool(fam.always_tied if tied is None else tied), sliding_window=sw or None,
               activation=_ACT.get(str(act), str(act)), max_pos=get("max_pos"),
               bos_token_id=_ids(cfg.get("bos_token_id")), eos_token_id=_ids(cfg.get("eos_token_id")),
               pad_token_id=_ids(cfg.get("pad_token_id")))
    if "parallel_attn" in hook or "two_norms" in hook:
        out.update(parallel_attn=hook.get("parallel_attn", False), two_norms=hook.get("two_norms", False))
    if "sliding_window" in hook:  # the family says when its window applies (Qwen: use_sliding_window)
        out["sliding_window"] = hook["sliding_window"] or None
    if known is not None and known.extra_keys:
        out.update(known.read_extras(cfg, "config.json", cfg))
        out.update({k: v for k, v in hook.get("extra", {}).items() if v is not None})
    if fam.block.mlp is Mlp.MOE:
        out.update(experts=get("experts"), experts_per_tok=get("experts_per_tok"))
    if cfg.get("final_logit_softcapping"):
        out["logit_softcap"] = float(cfg["final_logit_softcapping"])
    return out


def _canonical_meta(p: dict, tensors: dict) -> dict:
    fam = _meta_family(p.get("model_type"))
    D, H = p.get("dim"), p.get("n_heads")
    emb = tensors.get("tok_embeddings.weight") or tensors.get("embedder.weight")
    w1 = tensors.get("layers.0.feed_forward.w1.weight") or tensors.get("layers.0.mlp.gate_proj.weight")
    moe = tensors.get("layers.0.block_sparse_moe.cond_ffn.w1")
    ffn = p.get("hidden_dim") or (_rows(w1) if w1 is not None else (moe.shape[1] if moe is not None else None))
    vocab = p.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        vocab = emb.shape[0] if emb is not None else None
    scaling = _rope_scaling(p.get("rope_scaling"))
    if scaling is None and p.get("use_scaled_rope"):
        scaling = _rope_scaling({"rope_type": "llama3", "factor": p.get("rope_scaling_factor", 8.0),
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})
    out = dict(family=fam.name, hidden=D, layers=p.get("n_layers"), heads=H, kv_heads=p.get("n_kv_heads") or H,
               head_dim=p.get("head_dim") or (D // H if D and H else None), ffn=ffn, vocab=vocab,
               norm_eps=float(p.get("norm_eps", fam.default_eps)),
               rope_theta=float(p.get("rope_theta", 10000.0)), rope_scaling=scaling,
               tied=fam.always_tied or bool(p.get("tie_word_embeddings")) or "output.weight" not in tensors,
               sliding_window=p.get("sliding_window") or None,
               activation=fam.activation, max_pos=p.get("max_seq_len"), **_ids_of(p))
    if fam.block.mlp is Mlp.MOE:
        out.update(experts=p.get("num_experts", moe.shape[0] if moe is not None else None),
                   experts_per_tok=p.get("num_experts_per_tok", 2))
    return out


def _canonical_megatron(a: dict, tensors: dict) -> dict:
    from ckdiff.formats.megatron_llm import family_of_args
    fam = family_of_args(a, tensors)
    glu = bool(a.get("glu_activation"))
    H, D = a.get("num_attention_heads"), a.get("hidden_size")
    out = dict(family=fam.name, hidden=D, layers=a.get("num_layers"), heads=H,
               kv_heads=a.get("num_attention_heads_kv") or H, head_dim=a.get("kv_channels") or (D // H if D and H else None),
               # Megatron's default FFN size is 4 x hidden (the original tool writes none for Falcon)
               ffn=a.get("ffn_hidden_size") or (4 * D if D else None),
               vocab=a.get("true_vocab_size") or a.get("padded_vocab_size"),
               norm_eps=float(a.get("layernorm_epsilon") or 1e-5), rope_theta=float(a.get("rope_theta") or 10000.0),
               rope_scaling=_rope_scaling(megatron_rope_scaling(a.get("rope_scaling_factor"))),
               rotary=a.get("ckdiff_rotary", "interleaved"),
               tied=bool(a.get("tie_embed_logits", fam.always_tied)), sliding_window=a.get("sliding_window_size") or None,
               activation="silu" if glu else "gelu", max_pos=a.get("max_position_embeddings") or a.get("seq_length"),
               **_ids_of(a))
    if fam.block.parallel:
        out.update(parallel_attn=bool(a.get("parallel_attn")), two_norms=bool(a.get("parallel_layernorm")))
    return out


def compare_configs(ca: Optional[dict], cb: Optional[dict]) -> tuple[list, list]:
    """(function-changing differences as [field, a, b], notes) between two canonical configs.

    Fields present on one side only are not differences (a layout that cannot say, e.g. Meta's
    special token ids, is not a disagreement); ``rotary`` is compared only when both sides record it."""
    if not ca or not cb:
        return [], []
    diffs, notes = [], []
    for k in FUNCTION_FIELDS + families.extra_names():
        if k not in ca or k not in cb:
            continue
        va, vb = ca[k], cb[k]
        if k in ("bos_token_id", "eos_token_id", "pad_token_id") and (va is None or vb is None):
            continue
        if isinstance(va, float) and isinstance(vb, float) and va == vb:
            continue
        if k == "rope_scaling" and _same_at_float32(va, vb):
            continue
        if va != vb:
            diffs.append([k, va, vb])
    for k in NOTE_FIELDS:
        if ca.get(k) is not None and cb.get(k) is not None and ca[k] != cb[k]:
            notes.append(f"config {k} differs ({ca[k]} vs {cb[k]}); it does not change the outputs within "
                         "the shorter context")
    return diffs, notes


def _same_at_float32(a, b) -> bool:
    """Two rope scalings with the same keys whose numbers agree to float32 precision (GGUF stores them in
    float32; deepseek2's mscale comes back as a float32 multiplier / 0.1: within 2 ulps)."""
    if not isinstance(a, dict) or not isinstance(b, dict) or a.keys() != b.keys():
        return False
    for k, va in a.items():
        vb = b[k]
        if isinstance(va, float) and isinstance(vb, float):
            if not math.isclose(va, vb, rel_tol=2 ** -22):
                return False
        elif va != vb:
            return False
    return True


# names of the tensors the config-vs-tensors checks look at, per layout
_NAMES = {
    "meta": dict(embed=("tok_embeddings.weight", "embedder.weight"), head=("output.weight",),
                 q=("layers.0.attention.wq.weight", "layers.0.self_attn.wq.weight"),
                 k=("layers.0.attention.wk.weight", "layers.0.self_attn.wk.weight"), qkv=()),
    "megatron": dict(embed=("language_model.embedding.word_embeddings.weight",), head=("language_model.lm_head",),
                     q=(), k=(), qkv=("language_model.encoder.layers.0.self_attention.query_key_value.weight",)),
}
_NAMES["jetstream"] = _NAMES["meta"]


def names_of(fmt: str) -> Optional[dict]:
    """Names per layout; HF's are every registered family's (the config does not say which before parsing)."""
    if fmt != "hf":
        return _NAMES.get(fmt)
    out: dict = {}
    for fam in families.FAMILIES.values():
        for k, v in _hf_check_names(fam).items():
            out[k] = out.get(k, ()) + tuple(n for n in v if n not in out.get(k, ()))
    return out


SAMPLE_ROWS = 4


def _first(tensors: dict, names) -> Optional[tuple]:
    for n in names:
        if n in tensors:
            return n, tensors[n]
    return None


def _rows_equal(x, y) -> bool:
    """Whether two lazy tensors of one shape are equal, judged on a few rows spread over the tensor
    first (a difference shows there almost always) and on the whole tensor only when those agree and
    the tensor is small."""
    if tuple(x.shape) != tuple(y.shape) or x.dtype != y.dtype:
        return False
    n = x.shape[0]
    for i in sorted({0, n // 3, (2 * n) // 3, n - 1})[:SAMPLE_ROWS]:
        if not _equal(x.rows(i, i + 1), y.rows(i, i + 1)):
            return False
    return x.numel > (1 << 24) or _equal(x.load(), y.load())


def _equal(u, v) -> bool:
    """Equal values (NaN never equal, -0 == 0), for torch tensors or the numpy arrays of the torch-free
    comparison (compare/lane.py, whose tensors load as numpy)."""
    if isinstance(u, np.ndarray):
        return u.shape == v.shape and bool(np.array_equal(u, v))
    import torch
    return torch.equal(u, v)


# stored rotary frequency buffers (derived from rope_theta, head_dim and rope scaling, never trained): Meta's
# ``rope.freqs`` and HF's per-layer ``rotary_emb.inv_freq``; GGUF's rope_freqs.weight holds scaling factors
ROTARY_BUFFERS = re.compile(r"(?:^rope\.freqs|rotary_emb\.inv_freq)$")


def rotary_buffer_findings(tensors: dict, canon: dict) -> list:
    """A stored rotary buffer against the frequencies its config implies (within the buffer dtype's
    rounding): a stale buffer (another theta, scaling dropped) is what a runtime that loads it uses."""
    hd, theta = canon.get("head_dim"), canon.get("rope_theta")
    names = [n for n in tensors if ROTARY_BUFFERS.search(n)]
    if not names or not (isinstance(hd, int) and hd > 0 and hd % 2 == 0 and isinstance(theta, float)):
        return []
    from types import SimpleNamespace

    from ckdiff.runtime.forward import rope_frequencies  # torch: only where a buffer is stored
    mp = canon.get("max_pos") if isinstance(canon.get("max_pos"), int) else 2048
    want = rope_frequencies(SimpleNamespace(head_dim=hd, rope_theta=theta, rope_scaling=canon.get("rope_scaling"),
                                            max_pos=mp, rope_freq_factors=None), 0)[0]
    bad = []
    for n in names:
        t = tensors[n]
        if tuple(t.shape) != (hd // 2,) or not t.dtype.is_floating_point:
            bad.append(f"{n} has shape {list(t.shape)}, not [{hd // 2}] (head_dim / 2)")
            continue
        have = t.load().double()
        rtol = {"bfloat16": 1.6e-2, "float16": 1e-3}.get(dtype_name(t.dtype), 1e-6)
        worst = float(((have - want).abs() / want.abs()).max())
        if worst > rtol:
            bad.append(f"{n} differs from the frequencies its config implies (rope_theta {theta:g}, head_dim "
                       f"{hd}{', rope scaling ' + str(canon['rope_scaling'].get('rope_type')) if canon.get('rope_scaling') else ''}"
                       f"): max relative error {worst:.3g}")
    return [Finding(f"{x}: a runtime that loads the stored buffer rotates with other frequencies",
                    ("rotary-buffer", x.split(" ")[0])) for x in bad]


_FP8 = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}  # by dtype name


def fp8_format_findings(cfg: dict, tensors: dict) -> list:
    """FP8 weights stored in the other FP8 format than ``quantization_config.fmt`` says (e4m3 / e5m2):
    a loader that trusts the config reads every code with the wrong exponent width."""
    q = (cfg or {}).get("quantization_config")
    fmt = q.get("fmt") if isinstance(q, dict) else None
    if fmt not in _FP8:
        return []
    other = next((d for f, d in _FP8.items() if f != fmt), None)
    wrong = [n for n, t in tensors.items() if dtype_name(t.dtype) == other]
    if not wrong:
        return []
    more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
    return [Finding(f"quantization_config.fmt says {fmt} but {wrong[0]}{more} is stored as "
                    f"{other}: read as {fmt}, every code decodes to another value",
                    ("fp8-format", fmt))]


class Finding(str):
    """One config-vs-tensors finding: its text, and ``kind``, what it is about in layout-free terms (the
    same problem in two checkpoints of different layouts has the same kind). A finding that holds on
    both sides of a comparison is a warning about both checkpoints, not a difference between them."""

    kind: tuple

    def __new__(cls, text: str, kind: tuple) -> "Finding":
        f = super().__new__(cls, text)
        f.kind = kind
        return f


def config_findings(fmt: str, cfg: dict, tensors: dict, canon: Optional[dict]) -> list[Finding]:
    """Places where a checkpoint's own config disagrees with its tensors, each with its cause.

    - the tie flag against the presence (and equality) of the output head;
    - the vocab size against the embedding rows (padding rows a Megatron config accounts for aside);
    - head counts and head_dim against the attention projections' rows."""
    fmt = (fmt or "").split("->")[0]
    known = families.get((canon or {}).get("family"))
    names = _hf_check_names(known) if fmt == "hf" and known else names_of(fmt)  # the family's own names
    if not canon or not names:
        return []
    out = []
    emb, head = _first(tensors, names["embed"]), _first(tensors, names["head"])
    tied = canon.get("tied")
    if tied is not None and emb is not None:
        fam = families.get(canon.get("family"))
        if not tied and head is None and (fam is None or ("head" in fam.hf_names and not fam.always_tied)):
            out.append(Finding(f"config says the output head is untied but there is no {names['head'][0]} tensor: "
                               "a loader leaves the head at its random initialisation (or ties it silently)",
                               ("untied-without-head",)))
        if tied and head is not None and fmt in ("hf", "megatron") and emb[1].shape == head[1].shape \
                and not _rows_equal(emb[1], head[1]):
            out.append(Finding(f"config says the output head is tied to the embedding but {head[0]} differs from "
                               f"{emb[0]}: a loader that ties them ignores the trained head", ("tied-head-differs",)))
    V = canon.get("vocab")
    if isinstance(V, int) and emb is not None:
        rows = emb[1].shape[0]
        if rows < V:
            out.append(Finding(f"config vocab size {V} exceeds the {rows} rows of {emb[0]}: token ids >= {rows} "
                               "have no embedding", ("vocab-over-rows", V, rows)))
        elif rows > V and fmt != "megatron":
            out.append(Finding(f"{emb[0]} has {rows} rows but the config's vocab size is {V}: {rows - V} rows are "
                               "unaccounted for (padding exported as tokens, or a vocab size left at its default)",
                               ("rows-over-vocab", V, rows)))
    out += rotary_buffer_findings(tensors, canon)
    out += fp8_format_findings(cfg, tensors)
    out += _mtp_findings(fmt, tensors, canon)
    H, K, hd = canon.get("heads"), canon.get("kv_heads"), canon.get("head_dim")
    if all(isinstance(v, int) and v > 0 for v in (H, K, hd)):
        q, k, qkv = _first(tensors, names["q"]), _first(tensors, names["k"]), _first(tensors, names["qkv"])
        if q is not None and len(q[1].shape) in (2, 3) and _rows(q[1]) != H * hd:
            out.append(Finding(f"{q[0]} has {_rows(q[1])} rows, not heads x head_dim = {H} x {hd} = {H * hd}: "
                               "the config's head count or head_dim does not fit the weights",
                               ("q-rows", _rows(q[1]), H, hd)))
        if k is not None and len(k[1].shape) in (2, 3) and _rows(k[1]) != K * hd:
            out.append(Finding(f"{k[0]} has {_rows(k[1])} rows, not kv_heads x head_dim = {K} x {hd} = {K * hd}: "
                               "the config's KV head count or head_dim does not fit the weights",
                               ("kv-rows", _rows(k[1]), K, hd)))
        if qkv is not None and qkv[1].shape[0] != (H + 2 * K) * hd and fmt in ("megatron", "hf"):
            out.append(Finding(f"{qkv[0]} has {qkv[1].shape[0]} rows, not (heads + 2 kv_heads) x head_dim = "
                               f"({H} + 2 x {K}) x {hd}: the config's head counts or head_dim do not fit the weights",
                               ("qkv-rows", qkv[1].shape[0], H, K, hd)))
    return out


def _mtp_findings(fmt: str, tensors: dict, canon: dict) -> list:
    """DeepSeek-V3's config counts multi-token-prediction layers (num_nextn_predict_layers), stored after
    the decoder's layers: each one the config counts must be there (transformers drops them when it saves,
    so a checkpoint that went through it has none)."""
    n, L = canon.get("mtp_layers"), canon.get("layers")
    fam = families.get(canon.get("family"))
    if fmt != "hf" or fam is None or not (isinstance(n, int) and n > 0 and isinstance(L, int)):
        return []
    layer = fam.hf_names["attn_norm"].split("{i}")[0] + "{i}."  # the family's layer prefix
    missing = [L + j for j in range(n) if not any(k.startswith(layer.format(i=L + j)) for k in tensors)]
    if not missing:
        return []
    return [Finding(f"config says num_nextn_predict_layers={n} but there is no tensor of layer "
                    f"{', '.join(map(str, missing))} (the MTP layer): the multi-token-prediction weights were "
                    "dropped (as transformers does when it saves), so speculative decoding with this checkpoint "
                    "has no draft layer", ("mtp-missing", n, tuple(missing)))]
