"""The canonical architecture description every layout reads into and writes from.

Values come from the checkpoint's own config (``config.json``, ``params.json``,
Megatron ``args``) and are cross-checked against tensor shapes; head_dim and the
FFN size are read from shapes when the config leaves them implicit.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ..errors import InputError

DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


# ---------------------------------------------------------------- typed, range-checked config values
class ConfigError(InputError):
    """A value of config.json, params.json or Megatron args that is malformed, out of range, or
    contradicts the tensors."""


MAX_SIZE = 1 << 20       # hidden, FFN, head_dim, sliding window
MAX_COUNT = 1 << 16      # heads, layers, experts, parallel sizes
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 32
MAX_THETA = 1e12
MAX_TOKEN_ID = (1 << 31) - 1


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int in Python


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def valid_int(v, lo: int = 1, hi: int = MAX_COUNT) -> Optional[int]:
    """``v`` when it is an int in [lo, hi], else None (readers that only use a value when it is sound)."""
    return v if _is_int(v) and lo <= v <= hi else None


class Fields:
    """Reads one config file's values with their types and ranges checked; every parser uses it.

    JSON ``null`` is an absent key. A wrong type or range is a ``ConfigError`` naming the file and the
    key: ``config.json: key 'rms_norm_eps': expected a positive finite number, got 'abc'``."""

    def __init__(self, src, where, label: str = "key"):
        if not isinstance(src, dict):
            raise ConfigError(where, f"expected a JSON object of keys and values, got {type(src).__name__}")
        self.src, self.where, self.label = src, where, label

    def fail(self, key, want, v):
        raise ConfigError(self.where, f"{self.label} {key!r}: expected {want}, got {_show(v)}")

    def int(self, key, lo: int = 1, hi: int = MAX_COUNT, unset=()) -> Optional[int]:
        v = self.src.get(key)
        if v is None or (_is_int(v) and v in unset):
            return None
        if not _is_int(v) or not lo <= v <= hi:
            want = "a positive integer" if lo == 1 else f"an integer >= {lo}"
            self.fail(key, f"{want} (at most {hi})" if _is_int(v) and v > hi else want, v)
        return v

    def num(self, key, hi: float = MAX_THETA) -> Optional[float]:
        v = self.src.get(key)
        if v is None:
            return None
        if not _is_num(v) or not math.isfinite(v) or v <= 0:
            self.fail(key, "a positive finite number", v)
        if v > hi:
            self.fail(key, f"a positive finite number (at most {hi:g})", v)
        return float(v)

    def flag(self, key) -> Optional[bool]:
        v = self.src.get(key)
        if v is None:
            return None
        if not isinstance(v, bool):
            self.fail(key, "true or false", v)
        return v

    def text(self, key, choices=None) -> Optional[str]:
        v = self.src.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or (choices is not None and v not in choices):
            self.fail(key, "one of " + ", ".join(choices) if choices else "a string", v)
        return v

    def dtype(self, key) -> Optional[str]:
        v = self.src.get(key)
        if v is None or isinstance(v, torch.dtype):
            return None if v is None else str(v).replace("torch.", "")
        name = v.replace("torch.", "") if isinstance(v, str) else None
        if name != "auto" and not (name and isinstance(getattr(torch, name, None), torch.dtype)):
            self.fail(key, "a dtype name (float32, bfloat16, ...)", v)
        return name

    def token_ids(self, key):
        v = self.src.get(key)
        if v is None or (_is_int(v) and v == -1):  # -1: "no such token" in older configs (pad_token_id)
            return None
        ok = lambda t: _is_int(t) and 0 <= t <= MAX_TOKEN_ID  # noqa: E731
        if not (ok(v) or (isinstance(v, list) and all(ok(t) for t in v))):
            self.fail(key, "a token id (a non-negative integer) or a list of them", v)
        return v

    def rope_scaling(self, key) -> Optional[dict]:
        v = self.src.get(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            self.fail(key, "an object (rope_type, factor, ...)", v)
        sub = Fields(v, self.where, f"{self.label} {key!r} field")
        for k in ("factor", "low_freq_factor", "high_freq_factor", "rope_theta"):
            sub.num(k)
        sub.int("original_max_position_embeddings", hi=MAX_POSITIONS)
        sub.text("rope_type")
        sub.text("type")
        return v


# per layout: key -> kind; every value a parser uses is listed here
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
        "multiple_of": _SIZE, "ffn_dim_multiplier": _THETA, "quantize_type": _TEXT},
    "megatron": {
        "num_layers": _COUNT, "hidden_size": _SIZE, "num_attention_heads": _COUNT,
        "num_attention_heads_kv": _COUNT, "kv_channels": _SIZE, "ffn_hidden_size": _SIZE,
        "padded_vocab_size": _VOCAB, "true_vocab_size": _VOCAB, "max_position_embeddings": _POS,
        "seq_length": _POS, "sliding_window_size": _WINDOW, "tensor_model_parallel_size": _COUNT,
        "pipeline_model_parallel_size": _COUNT, "layernorm_epsilon": _EPS, "rope_theta": _THETA,
        "use_rms_norm": _FLAG, "tie_embed_logits": _FLAG, "parallel_attn": _FLAG, "parallel_layernorm": _FLAG,
        "params_dtype": ("dtype", {}), "ckdiff_rotary": ("text", dict(choices=("interleaved", "rotate_half"))),
        "ckdiff_model": _TEXT, "glu_activation": _TEXT},
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
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def check_tensors(cfg: "ModelConfig", fmt: str, tensors: dict, where, raw: Optional[dict] = None) -> "ModelConfig":
    """The config against the tensors' shapes, before any work: embedding width = hidden size, layer count,
    attention rows = heads x head_dim (query, KV, fused QKV), FFN rows, vocab within the embedding rows.
    Raises ConfigError naming the key."""
    keys = dict(_KEYS.get(fmt, _KEYS["hf"]))
    if cfg.family == "falcon" and fmt == "hf":
        keys["kv_heads"] = "num_kv_heads"
    names = _NAMES.get(fmt, {})
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
    if _is_int(want_ffn) and want_ffn != cfg.ffn and cfg.family != "falcon":
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
    @classmethod
    def from_hf(cls, cfg: dict, tensors: dict, where: str = "config.json") -> "ModelConfig":
        cfg = parse_config("hf", cfg, where)
        arch = (cfg.get("model_type") or "").lower()
        if arch in ("falcon", "refinedweb", "refinedwebmodel", "rw"):
            return check_tensors(cls._falcon_from_hf(cfg, tensors, where), "hf", tensors, where, cfg)
        rope = cfg.get("rope_parameters") or {}  # transformers v5 keeps theta and scaling here
        try:
            H, L, D = cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["hidden_size"]
        except KeyError as e:
            raise InputError(where, f"missing {e.args[0]!r}") from None
        K = cfg.get("num_key_value_heads") or H
        hd = cfg.get("head_dim")
        q = tensors.get("model.layers.0.self_attn.q_proj.weight")
        if hd is None:
            hd = q.shape[0] // H if q is not None else D // H
        up = tensors.get("model.layers.0.mlp.up_proj.weight") or \
            tensors.get("model.layers.0.block_sparse_moe.experts.0.w3.weight")
        F = up.shape[0] if up is not None else cfg.get("intermediate_size")
        emb = tensors.get("model.embed_tokens.weight")
        V = emb.shape[0] if emb is not None else cfg["vocab_size"]
        tied = cfg.get("tie_word_embeddings", arch == "gemma") or "lm_head.weight" not in tensors
        scaling = cfg.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"}
                                              if rope.get("rope_type", "default") != "default" else None)
        family = arch if arch in ("gemma", "mixtral") else "llama"
        out = cls(family=family, hidden=D, layers=L, heads=H, kv_heads=K, head_dim=hd, ffn=F, vocab=V,
                   norm_eps=cfg.get("rms_norm_eps") or HF_DEFAULTS.get(arch, HF_DEFAULTS["llama"])["rms_norm_eps"],
                   rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                   tied=bool(tied), max_pos=cfg.get("max_position_embeddings", 2048),
                   sliding_window=cfg.get("sliding_window"), rope_scaling=scaling,
                   experts=cfg.get("num_local_experts", 0) if family == "mixtral" else 0,
                   experts_per_tok=cfg.get("num_experts_per_tok", 0) if family == "mixtral" else 0,
                   dtype=_dtype_of(tensors, "model.embed_tokens.weight", cfg),
                   hf_model_type=arch or "llama").check(where, _KEYS["hf"])
        return check_tensors(out, "hf", tensors, where, cfg)

    @classmethod
    def _falcon_from_hf(cls, cfg, tensors, where):
        D, H, L = cfg.get("hidden_size"), cfg.get("num_attention_heads", cfg.get("n_head")), cfg.get(
            "num_hidden_layers", cfg.get("n_layer"))
        for k, v in (("hidden_size", D), ("num_attention_heads", H), ("num_hidden_layers", L)):
            if v is None:
                raise ConfigError(where, f"missing {k!r}")
        for k in ("transformer.word_embeddings.weight", "transformer.h.0.mlp.dense_h_to_4h.weight"):
            if k not in tensors:
                raise InputError(where, f"no {k} tensor for this falcon config")
        new = bool(cfg.get("new_decoder_architecture", False))
        if new:
            K = cfg.get("num_kv_heads") or H
        else:
            K = 1 if cfg.get("multi_query", True) else H
        hd = D // H
        V = tensors["transformer.word_embeddings.weight"].shape[0]
        F = tensors["transformer.h.0.mlp.dense_h_to_4h.weight"].shape[0]
        if not cfg.get("parallel_attn", True):
            raise InputError(where, "falcon with parallel_attn=false is not supported")
        if not new and K not in (1,):
            raise InputError(where, "falcon with the per-head [n, 3, d] QKV layout is not supported")
        return cls(family="falcon", hidden=D, layers=L, heads=H, kv_heads=K, head_dim=hd, ffn=F, vocab=V,
                   norm_eps=cfg.get("layer_norm_epsilon", 1e-5), rope_theta=float(cfg.get("rope_theta", 10000.0)),
                   tied=True, max_pos=cfg.get("max_position_embeddings", 2048), parallel_attn=True,
                   two_norms=new, norm_bias=True,
                   dtype=_dtype_of(tensors, "transformer.word_embeddings.weight", cfg),
                   hf_model_type="falcon").check(where, dict(_KEYS["hf"], kv_heads="num_kv_heads"))

    def to_hf(self) -> dict:
        if self.family == "falcon":
            cfg = {"architectures": ["FalconForCausalLM"], "model_type": "falcon", "hidden_size": self.hidden,
                   "num_attention_heads": self.heads, "num_hidden_layers": self.layers,
                   "vocab_size": self.vocab, "layer_norm_epsilon": self.norm_eps, "parallel_attn": True,
                   "bias": False, "alibi": False, "new_decoder_architecture": self.two_norms,
                   "multi_query": self.kv_heads == 1, "num_kv_heads": self.kv_heads,
                   "rope_theta": self.rope_theta, "max_position_embeddings": self.max_pos,
                   "tie_word_embeddings": True, "ffn_hidden_size": self.ffn,
                   "bos_token_id": 1, "eos_token_id": 2}
        elif self.family == "gemma":
            cfg = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": self.hidden,
                   "intermediate_size": self.ffn, "num_attention_heads": self.heads,
                   "num_key_value_heads": self.kv_heads, "num_hidden_layers": self.layers, "head_dim": self.head_dim,
                   "vocab_size": self.vocab, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                   "max_position_embeddings": self.max_pos, "tie_word_embeddings": True,
                   "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
                   "attention_bias": False, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
        elif self.family == "mixtral":
            cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": self.hidden,
                   "intermediate_size": self.ffn, "num_attention_heads": self.heads,
                   "num_key_value_heads": self.kv_heads, "num_hidden_layers": self.layers, "head_dim": self.head_dim,
                   "vocab_size": self.vocab, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                   "max_position_embeddings": self.max_pos, "tie_word_embeddings": self.tied,
                   "num_local_experts": self.experts, "num_experts_per_tok": self.experts_per_tok,
                   "hidden_act": "silu", "sliding_window": self.sliding_window, "router_jitter_noise": 0.0,
                   "bos_token_id": 1, "eos_token_id": 2}
        else:
            mt = self.hf_model_type or "llama"
            mt = mt if mt in ("llama", "mistral") else "llama"
            cfg = {"architectures": ["MistralForCausalLM" if mt == "mistral" else "LlamaForCausalLM"],
                   "model_type": mt, "hidden_size": self.hidden, "intermediate_size": self.ffn,
                   "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                   "num_hidden_layers": self.layers, "head_dim": self.head_dim, "vocab_size": self.vocab,
                   "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                   "max_position_embeddings": self.max_pos, "tie_word_embeddings": self.tied,
                   "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                   "bos_token_id": 1, "eos_token_id": 2}
            if self.rope_scaling:
                cfg["rope_scaling"] = self.rope_scaling
            if mt == "mistral" or self.sliding_window:
                cfg["sliding_window"] = self.sliding_window
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
        family = params.get("model_type") if params.get("model_type") in ("gemma", "mixtral") else "llama"
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
        out = cls(family=family, experts=params.get("num_experts", moe.shape[0] if moe is not None else 0),
                   experts_per_tok=params.get("num_experts_per_tok", 2 if moe is not None else 0), hidden=D, layers=L, heads=H, kv_heads=K, head_dim=hd, ffn=F, vocab=V,
                   norm_eps=params.get("norm_eps", 1e-5), rope_theta=float(params.get("rope_theta", 10000.0)),
                   tied=tied, max_pos=params.get("max_seq_len", 2048),
                   sliding_window=params.get("sliding_window"), rope_scaling=params.get("rope_scaling"),
                   dtype=str(emb.dtype).replace("torch.", "") if emb.dtype.is_floating_point else "float32",
                   hf_model_type=params.get("model_type", "llama")).check(where, _KEYS["meta"])
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
        if self.family in ("gemma", "mixtral"):
            p["model_type"] = self.family
        elif self.hf_model_type not in ("", "llama"):
            p["model_type"] = self.hf_model_type
        if self.family == "mixtral":
            p.update(num_experts=self.experts, num_experts_per_tok=self.experts_per_tok)
        return p


def config_where(ck) -> str:
    """The file a checkpoint's config comes from, for messages (Megatron: the first rank file's args)."""
    from .registry import lookup
    f = lookup(ck.format)
    if f is not None:
        return f.where(ck)
    files = (ck.meta or {}).get("files") or [ck.path]
    return str(sorted(files)[0])


def model_config(ck) -> ModelConfig:
    """The canonical config of a checkpoint, from its own config file (HF, Meta/JetStream, Megatron args),
    validated (parse_config) and checked against the tensors (check_tensors): a ConfigError otherwise.
    Each format declares its config reader (converters/registry.py)."""
    from .registry import model_config as from_registry
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
# transformers' per-model defaults (what a loader assumes when the key is absent)
HF_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, tie=False, act="silu"), "mistral": dict(rms_norm_eps=1e-6, tie=False, act="silu"),
    "mixtral": dict(rms_norm_eps=1e-5, tie=False, act="silu"), "gemma": dict(rms_norm_eps=1e-6, tie=True, act="gelu_tanh"),
    "qwen2": dict(rms_norm_eps=1e-6, tie=False, act="silu"), "falcon": dict(rms_norm_eps=1e-5, tie=True, act="gelu"),
}
_ACT = {"silu": "silu", "swish": "silu", "swiglu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "geglu": "gelu", "relu": "relu"}


def _rope_scaling(d) -> Optional[dict]:
    """One spelling of rope scaling: rope_type (v4 "type"), float values, "default" meaning none."""
    if not isinstance(d, dict) or not d:
        return None
    out = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
           for k, v in d.items() if k not in ("type", "rope_type", "rope_theta")}
    kind = d.get("rope_type") or d.get("type") or "default"
    if kind == "default" and not out:
        return None
    out["rope_type"] = kind
    return dict(sorted(out.items()))


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
        cfg = parse_config(fmt, cfg, where)
    from .registry import lookup
    f = lookup(fmt)  # each format declares its canonical reader (converters/registry.py)
    if cfg and f is not None and f.canonical is not None:
        return f.canonical(cfg, tensors)
    return None


def _canonical_hf(cfg: dict, tensors: dict) -> dict:
    mt = (cfg.get("model_type") or "llama").lower()
    falcon = mt in ("falcon", "refinedweb", "refinedwebmodel", "rw")
    dflt = HF_DEFAULTS.get("falcon" if falcon else mt, HF_DEFAULTS["llama"])
    rope = cfg.get("rope_parameters") or {}  # transformers v5
    H = cfg.get("num_attention_heads", cfg.get("n_head"))
    D = cfg.get("hidden_size")
    if falcon:
        new = bool(cfg.get("new_decoder_architecture", False))
        K = (cfg.get("num_kv_heads") or H) if new else (1 if cfg.get("multi_query", True) else H)
    else:
        K = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or (D // H if D and H else None)
    up = tensors.get("model.layers.0.mlp.up_proj.weight") or tensors.get("transformer.h.0.mlp.dense_h_to_4h.weight")
    ffn = cfg.get("intermediate_size") or cfg.get("ffn_hidden_size") or (up.shape[0] if up is not None else None)
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or dflt["act"]
    sw = cfg.get("sliding_window") if (mt in ("mistral", "mixtral", "qwen2") or cfg.get("use_sliding_window", True)) else None
    out = dict(family="falcon" if falcon else ("llama" if mt in ("llama", "mistral") else mt),
               hidden=D, layers=cfg.get("num_hidden_layers", cfg.get("n_layer")), heads=H, kv_heads=K, head_dim=hd,
               ffn=ffn, vocab=cfg.get("vocab_size"),
               norm_eps=float(cfg.get("layer_norm_epsilon" if falcon else "rms_norm_eps") or dflt["rms_norm_eps"]),
               rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
               rope_scaling=_rope_scaling(cfg.get("rope_scaling") or rope),
               tied=bool(cfg.get("tie_word_embeddings", dflt["tie"])), sliding_window=sw or None,
               activation=_ACT.get(str(act), str(act)), max_pos=cfg.get("max_position_embeddings"),
               bos_token_id=_ids(cfg.get("bos_token_id")), eos_token_id=_ids(cfg.get("eos_token_id")),
               pad_token_id=_ids(cfg.get("pad_token_id")))
    if falcon:
        out.update(parallel_attn=bool(cfg.get("parallel_attn", True)),
                   two_norms=bool(cfg.get("new_decoder_architecture", False)))
    if mt == "mixtral":
        out.update(experts=cfg.get("num_local_experts"), experts_per_tok=cfg.get("num_experts_per_tok"))
    if cfg.get("final_logit_softcapping"):
        out["logit_softcap"] = float(cfg["final_logit_softcapping"])
    return out


def _canonical_meta(p: dict, tensors: dict) -> dict:
    fam = p.get("model_type") if p.get("model_type") in ("gemma", "mixtral") else "llama"
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
    out = dict(family=fam, hidden=D, layers=p.get("n_layers"), heads=H, kv_heads=p.get("n_kv_heads") or H,
               head_dim=p.get("head_dim") or (D // H if D and H else None), ffn=ffn, vocab=vocab,
               norm_eps=float(p.get("norm_eps", 1e-5 if fam != "gemma" else 1e-6)),
               rope_theta=float(p.get("rope_theta", 10000.0)), rope_scaling=scaling,
               tied=fam == "gemma" or bool(p.get("tie_word_embeddings")) or "output.weight" not in tensors,
               sliding_window=p.get("sliding_window") or None,
               activation="gelu_tanh" if fam == "gemma" else "silu", max_pos=p.get("max_seq_len"))
    if fam == "mixtral":
        out.update(experts=p.get("num_experts", moe.shape[0] if moe is not None else None),
                   experts_per_tok=p.get("num_experts_per_tok", 2))
    return out


def _canonical_megatron(a: dict, tensors: dict) -> dict:
    glu = bool(a.get("glu_activation"))
    falcon = not glu and not a.get("use_rms_norm", False)
    H, D = a.get("num_attention_heads"), a.get("hidden_size")
    out = dict(family="falcon" if falcon else "llama", hidden=D, layers=a.get("num_layers"), heads=H,
               kv_heads=a.get("num_attention_heads_kv") or H, head_dim=a.get("kv_channels") or (D // H if D and H else None),
               ffn=a.get("ffn_hidden_size"), vocab=a.get("true_vocab_size") or a.get("padded_vocab_size"),
               norm_eps=float(a.get("layernorm_epsilon") or 1e-5), rope_theta=float(a.get("rope_theta") or 10000.0),
               rope_scaling=None, rotary=a.get("ckdiff_rotary", "interleaved"),
               tied=bool(a.get("tie_embed_logits", falcon)), sliding_window=a.get("sliding_window_size") or None,
               activation="silu" if glu else "gelu", max_pos=a.get("max_position_embeddings") or a.get("seq_length"))
    if falcon:
        out.update(parallel_attn=bool(a.get("parallel_attn")), two_norms=bool(a.get("parallel_layernorm")))
    return out


def compare_configs(ca: Optional[dict], cb: Optional[dict]) -> tuple[list, list]:
    """(function-changing differences as [field, a, b], notes) between two canonical configs.

    Fields present on one side only are not differences (a layout that cannot say, e.g. Meta's
    special token ids, is not a disagreement); ``rotary`` is compared only when both sides record it."""
    if not ca or not cb:
        return [], []
    diffs, notes = [], []
    for k in FUNCTION_FIELDS:
        if k not in ca or k not in cb:
            continue
        va, vb = ca[k], cb[k]
        if k in ("bos_token_id", "eos_token_id", "pad_token_id") and (va is None or vb is None):
            continue
        if isinstance(va, float) and isinstance(vb, float) and va == vb:
            continue
        if va != vb:
            diffs.append([k, va, vb])
    for k in NOTE_FIELDS:
        if ca.get(k) is not None and cb.get(k) is not None and ca[k] != cb[k]:
            notes.append(f"config {k} differs ({ca[k]} vs {cb[k]}); it does not change the outputs within "
                         "the shorter context")
    return diffs, notes


# names of the tensors the config-vs-tensors checks look at, per layout
_NAMES = {
    "hf": dict(embed=("model.embed_tokens.weight", "transformer.word_embeddings.weight"), head=("lm_head.weight",),
               q=("model.layers.0.self_attn.q_proj.weight",), k=("model.layers.0.self_attn.k_proj.weight",),
               qkv=("transformer.h.0.self_attention.query_key_value.weight",)),
    "meta": dict(embed=("tok_embeddings.weight", "embedder.weight"), head=("output.weight",),
                 q=("layers.0.attention.wq.weight", "layers.0.self_attn.wq.weight"),
                 k=("layers.0.attention.wk.weight", "layers.0.self_attn.wk.weight"), qkv=()),
    "megatron": dict(embed=("language_model.embedding.word_embeddings.weight",), head=("language_model.lm_head",),
                     q=(), k=(), qkv=("language_model.encoder.layers.0.self_attention.query_key_value.weight",)),
}
_NAMES["jetstream"] = _NAMES["meta"]
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
        if not torch.equal(x.rows(i, i + 1), y.rows(i, i + 1)):
            return False
    return x.numel > (1 << 24) or torch.equal(x.load(), y.load())


def config_findings(fmt: str, cfg: dict, tensors: dict, canon: Optional[dict]) -> list[str]:
    """Places where a checkpoint's own config disagrees with its tensors, each with its cause.

    - the tie flag against the presence (and equality) of the output head;
    - the vocab size against the embedding rows (padding rows a Megatron config accounts for aside);
    - head counts and head_dim against the attention projections' rows."""
    fmt = (fmt or "").split("->")[0]
    names = _NAMES.get(fmt)
    if not canon or not names:
        return []
    out = []
    emb, head = _first(tensors, names["embed"]), _first(tensors, names["head"])
    tied = canon.get("tied")
    if tied is not None and emb is not None:
        if not tied and head is None and canon.get("family") not in ("falcon", "gemma"):
            out.append(f"config says the output head is untied but there is no {names['head'][0]} tensor: "
                       "a loader leaves the head at its random initialisation (or ties it silently)")
        if tied and head is not None and fmt in ("hf", "megatron") and emb[1].shape == head[1].shape \
                and not _rows_equal(emb[1], head[1]):
            out.append(f"config says the output head is tied to the embedding but {head[0]} differs from "
                       f"{emb[0]}: a loader that ties them ignores the trained head")
    V = canon.get("vocab")
    if isinstance(V, int) and emb is not None:
        rows = emb[1].shape[0]
        if rows < V:
            out.append(f"config vocab size {V} exceeds the {rows} rows of {emb[0]}: token ids >= {rows} have no "
                       "embedding")
        elif rows > V and fmt != "megatron":
            out.append(f"{emb[0]} has {rows} rows but the config's vocab size is {V}: {rows - V} rows are "
                       "unaccounted for (padding exported as tokens, or a vocab size left at its default)")
    H, K, hd = canon.get("heads"), canon.get("kv_heads"), canon.get("head_dim")
    if all(isinstance(v, int) and v > 0 for v in (H, K, hd)):
        q, k, qkv = _first(tensors, names["q"]), _first(tensors, names["k"]), _first(tensors, names["qkv"])
        if q is not None and len(q[1].shape) in (2, 3) and _rows(q[1]) != H * hd:
            out.append(f"{q[0]} has {_rows(q[1])} rows, not heads x head_dim = {H} x {hd} = {H * hd}: "
                       "the config's head count or head_dim does not fit the weights")
        if k is not None and len(k[1].shape) in (2, 3) and _rows(k[1]) != K * hd:
            out.append(f"{k[0]} has {_rows(k[1])} rows, not kv_heads x head_dim = {K} x {hd} = {K * hd}: "
                       "the config's KV head count or head_dim does not fit the weights")
        if qkv is not None and qkv[1].shape[0] != (H + 2 * K) * hd and fmt in ("megatron", "hf"):
            out.append(f"{qkv[0]} has {qkv[1].shape[0]} rows, not (heads + 2 kv_heads) x head_dim = "
                       f"({H} + 2 x {K}) x {hd}: the config's head counts or head_dim do not fit the weights")
    return out
