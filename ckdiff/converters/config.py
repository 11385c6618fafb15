"""The canonical architecture description every layout reads into and writes from.

Values come from the checkpoint's own config (``config.json``, ``params.json``,
Megatron ``args``) and are cross-checked against tensor shapes; head_dim and the
FFN size are read from shapes when the config leaves them implicit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ..errors import InputError

DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


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
    extra: dict = field(default_factory=dict)

    @property
    def q_rows(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self, where: str = "config") -> "ModelConfig":
        if self.heads % self.kv_heads:
            raise InputError(where, f"{self.heads} query heads are not a multiple of {self.kv_heads} KV heads")
        if self.head_dim % 2:
            raise InputError(where, f"head_dim {self.head_dim} is odd: rotary needs pairs")
        return self

    # ------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, cfg: dict, tensors: dict, where: str = "config.json") -> "ModelConfig":
        arch = (cfg.get("model_type") or "").lower()
        if arch in ("falcon", "refinedweb", "refinedwebmodel", "rw"):
            return cls._falcon_from_hf(cfg, tensors, where)
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
        return cls(family=family, hidden=D, layers=L, heads=H, kv_heads=K, head_dim=hd, ffn=F, vocab=V,
                   norm_eps=cfg.get("rms_norm_eps", 1e-5),
                   rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                   tied=bool(tied), max_pos=cfg.get("max_position_embeddings", 2048),
                   sliding_window=cfg.get("sliding_window"), rope_scaling=scaling,
                   experts=cfg.get("num_local_experts", 0) if family == "mixtral" else 0,
                   experts_per_tok=cfg.get("num_experts_per_tok", 0) if family == "mixtral" else 0,
                   dtype=_dtype_of(tensors, "model.embed_tokens.weight", cfg),
                   extra={"model_type": arch or "llama"}).check(where)

    @classmethod
    def _falcon_from_hf(cls, cfg, tensors, where):
        D, H, L = cfg["hidden_size"], cfg.get("num_attention_heads", cfg.get("n_head")), cfg.get(
            "num_hidden_layers", cfg.get("n_layer"))
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
                   extra={"model_type": "falcon"}).check(where)

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
            mt = self.extra.get("model_type", "llama")
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
        return cls(family=family, experts=params.get("num_experts", moe.shape[0] if moe is not None else 0),
                   experts_per_tok=params.get("num_experts_per_tok", 2 if moe is not None else 0), hidden=D, layers=L, heads=H, kv_heads=K, head_dim=hd, ffn=F, vocab=V,
                   norm_eps=params.get("norm_eps", 1e-5), rope_theta=float(params.get("rope_theta", 10000.0)),
                   tied=tied, max_pos=params.get("max_seq_len", 2048),
                   sliding_window=params.get("sliding_window"), rope_scaling=params.get("rope_scaling"),
                   dtype=str(emb.dtype).replace("torch.", "") if emb.dtype.is_floating_point else "float32",
                   extra={"model_type": params.get("model_type", "llama")}).check(where)

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
        elif self.extra.get("model_type") not in (None, "llama"):
            p["model_type"] = self.extra["model_type"]
        if self.family == "mixtral":
            p.update(num_experts=self.experts, num_experts_per_tok=self.experts_per_tok)
        return p


def model_config(ck) -> ModelConfig:
    """The canonical config of a checkpoint, from its own config file (HF, Meta/JetStream, Megatron args)."""
    from pathlib import Path
    if ck.format == "hf":
        return ModelConfig.from_hf(ck.config, ck.tensors, str(Path(ck.path) / "config.json"))
    if ck.format in ("meta", "jetstream"):
        return ModelConfig.from_meta(ck.config, ck.tensors, str(Path(ck.path) / "params.json"))
    if ck.format == "megatron":
        from .megatron import config_from_args
        return config_from_args(ck.config, ck.tensors, ck.path)
    raise InputError(ck.path, f"a {ck.format} input has no architecture config; use a model directory")


def _dtype_of(tensors, key, cfg) -> str:
    t = tensors.get(key)
    if t is not None:
        return str(t.dtype).replace("torch.", "")
    return cfg.get("torch_dtype", "float32")
