"""Key tables for each layout, written against the canonical HF layout.

``hf_to(layout, cfg)`` returns the rows that turn canonical HF tensors into the
layout; the way back is ``invert`` of the same rows. A conversion A -> B is
``apply(invert(hf_to(A)))`` followed by ``apply(hf_to(B))``, lazily.
"""
from __future__ import annotations

from typing import Mapping

from ..errors import InputError
from .config import ModelConfig
from .lazy import LazyTensor
from .ops import Chain, Concat, Each, FuseQKV, Identity, PermuteRope, SplitQKV, Stack
from .table import Plan, R, Tie, apply, invert

# ------------------------------------------------------------------ names
HF = {
    "embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight", "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight", "o": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight", "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}
META = {
    "embed": "tok_embeddings.weight", "norm": "norm.weight", "head": "output.weight",
    "attn_norm": "layers.{i}.attention_norm.weight",
    "q": "layers.{i}.attention.wq.weight", "k": "layers.{i}.attention.wk.weight",
    "v": "layers.{i}.attention.wv.weight", "o": "layers.{i}.attention.wo.weight",
    "mlp_norm": "layers.{i}.ffn_norm.weight",
    "gate": "layers.{i}.feed_forward.w1.weight", "up": "layers.{i}.feed_forward.w3.weight",
    "down": "layers.{i}.feed_forward.w2.weight",
}
# JetStream Gemma names (embedder tied; half-split rotary like HF, so q/k are not permuted)
GEMMA_JS = {
    "embed": "embedder.weight", "norm": "norm.weight",
    "attn_norm": "layers.{i}.input_layernorm.weight", "mlp_norm": "layers.{i}.post_attention_layernorm.weight",
    "q": "layers.{i}.self_attn.wq.weight", "k": "layers.{i}.self_attn.wk.weight",
    "v": "layers.{i}.self_attn.wv.weight", "o": "layers.{i}.self_attn.o_proj.weight",
    "gate": "layers.{i}.mlp.gate_proj.weight", "up": "layers.{i}.mlp.up_proj.weight",
    "down": "layers.{i}.mlp.down_proj.weight",
}
# Mixtral: HF experts one by one, JetStream stacked over experts (no .weight suffix)
MOE_HF = {"router": "model.layers.{i}.block_sparse_moe.gate.weight",
          "w": "model.layers.{{i}}.block_sparse_moe.experts.{e}.w{n}.weight"}
MOE_JS = {"router": "layers.{i}.block_sparse_moe.gate.weight", "w": "layers.{{i}}.block_sparse_moe.cond_ffn.w{n}"}
_ML = "language_model.encoder.layers.{i}."
MEGATRON = {
    "embed": "language_model.embedding.word_embeddings.weight",
    "norm": "language_model.encoder.final_layernorm.weight",
    "norm_b": "language_model.encoder.final_layernorm.bias",
    "head": "language_model.lm_head",
    "attn_norm": _ML + "input_layernorm.weight", "attn_norm_b": _ML + "input_layernorm.bias",
    "qkv": _ML + "self_attention.query_key_value.weight", "o": _ML + "self_attention.dense.weight",
    "mlp_norm": _ML + "post_attention_layernorm.weight",
    "mlp_ln": _ML + "mlp_layernorm.weight", "mlp_ln_b": _ML + "mlp_layernorm.bias",
    "h4h": _ML + "mlp.dense_h_to_4h.weight", "4hh": _ML + "mlp.dense_4h_to_h.weight",
}
_FH = "transformer.h.{i}."
FALCON = {
    "embed": "transformer.word_embeddings.weight", "norm": "transformer.ln_f.weight",
    "norm_b": "transformer.ln_f.bias",
    "qkv": _FH + "self_attention.query_key_value.weight", "o": _FH + "self_attention.dense.weight",
    "h4h": _FH + "mlp.dense_h_to_4h.weight", "4hh": _FH + "mlp.dense_4h_to_h.weight",
    "ln": _FH + "input_layernorm.weight", "ln_b": _FH + "input_layernorm.bias",
    "ln_attn": _FH + "ln_attn.weight", "ln_attn_b": _FH + "ln_attn.bias",
    "ln_mlp": _FH + "ln_mlp.weight", "ln_mlp_b": _FH + "ln_mlp.bias",
}

# tensors that carry no weights and are dropped on read, per layout
DROP = {
    "hf": [r"rotary_emb\.inv_freq$", r"\.masked_bias$", r"attn\.bias$"],
    "meta": [r"^rope\.freqs$", r"freqs_cis$"],
    "jetstream": [r"^rope\.freqs$", r"freqs_cis$"],
    "megatron": [r"word_embeddings_for_head\.weight$"],
    "mcore": [r"\._extra_state(/.*)?$"],
    "gguf": [r"^rope_freqs\.weight$"],
}
LAYOUTS = ("hf", "meta", "jetstream", "megatron")


def _rope(cfg: ModelConfig):
    """Per-projection rotary ops with their own head counts: q uses H, k uses K."""
    return PermuteRope(cfg.heads, cfg.head_dim), PermuteRope(cfg.kv_heads, cfg.head_dim)


def hf_to_gemma(cfg: ModelConfig) -> list:
    """Gemma: renames only; JetStream's Gemma rotary is half-split like HF's. Always tied."""
    return ([R(HF["embed"], GEMMA_JS["embed"])]
            + [R(HF[s], GEMMA_JS[s]) for s in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")]
            + [R(HF["norm"], GEMMA_JS["norm"])])


def moe_rules(cfg: ModelConfig) -> list:
    """Router renamed; experts' w1/w2/w3 stacked on a new leading axis."""
    E = cfg.experts
    return [R(MOE_HF["router"], MOE_JS["router"])] + [
        R([MOE_HF["w"].format(e=e, n=n) for e in range(E)], MOE_JS["w"].format(n=n), Stack(E)) for n in (1, 2, 3)]


def hf_to_meta(cfg: ModelConfig) -> list:
    if cfg.family == "gemma":
        return hf_to_gemma(cfg)
    if cfg.family not in ("llama", "mixtral"):
        raise InputError("config", f"{cfg.family} has no Meta/JetStream layout here")
    pq, pk = _rope(cfg)
    rules = [R(HF["embed"], [META["embed"], META["head"]], Tie()) if cfg.tied else R(HF["embed"], META["embed"])]
    mlp = ("gate", "up", "down") if cfg.family == "llama" else ()
    for slot in ("attn_norm", "v", "o", "mlp_norm") + mlp:
        rules.append(R(HF[slot], META[slot]))
    if cfg.family == "mixtral":
        rules += moe_rules(cfg)
    rules[1:1] = [R(HF["q"], META["q"], pq), R(HF["k"], META["k"], pk)]
    rules.append(R(HF["norm"], META["norm"]))
    if not cfg.tied:
        rules.append(R(HF["head"], META["head"]))
    return rules


def hf_to_megatron(cfg: ModelConfig) -> list:
    if cfg.family not in ("llama", "falcon"):
        raise InputError("config", f"{cfg.family} has no Megatron-LLM layout (llama, mistral, falcon only)")
    pq, pk = _rope(cfg)
    if cfg.rotary_rows == "rotate_half":
        # Megatron-LLM before 2023-08-01 applied rotate_half rotary: q/k rows stay in HF order
        pq, pk = Identity(), Identity()
    H, K, d, F = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ffn
    M = MEGATRON
    if cfg.family == "falcon":
        # HF Falcon is already group ordered; only the q/k rows inside each head move.
        qkv = Chain((SplitQKV(H, K, d), Each((pq, pk, Identity())), FuseQKV(H, K, d)))
        rules = [R(FALCON["embed"], M["embed"]),
                 R(FALCON["qkv"], M["qkv"], qkv), R(FALCON["o"], M["o"]),
                 R(FALCON["h4h"], M["h4h"]), R(FALCON["4hh"], M["4hh"])]
        if cfg.two_norms:
            rules += [R([FALCON["ln_attn"], FALCON["ln_attn_b"]], [M["attn_norm"], M["attn_norm_b"]]),
                      R([FALCON["ln_mlp"], FALCON["ln_mlp_b"]], [M["mlp_ln"], M["mlp_ln_b"]])]
        else:
            rules += [R([FALCON["ln"], FALCON["ln_b"]], [M["attn_norm"], M["attn_norm_b"]])]
        rules += [R([FALCON["norm"], FALCON["norm_b"]], [M["norm"], M["norm_b"]])]
        return rules
    qkv = Chain((Each((pq, pk, Identity())), FuseQKV(H, K, d)))
    rules = [R(HF["embed"], M["embed"]),
             R(HF["attn_norm"], M["attn_norm"]),
             R([HF["q"], HF["k"], HF["v"]], M["qkv"], qkv),
             R(HF["o"], M["o"]),
             R(HF["mlp_norm"], M["mlp_norm"]),
             R([HF["up"], HF["gate"]], M["h4h"], Concat((F, F), 0)),  # Megatron GLU is [up; gate]
             R(HF["down"], M["4hh"]),
             R(HF["norm"], M["norm"])]
    if not cfg.tied:
        rules.append(R(HF["head"], M["head"]))
    return rules


def hf_to(layout: str, cfg: ModelConfig) -> list:
    if layout == "hf":
        return []
    if layout in ("meta", "jetstream"):
        return hf_to_meta(cfg)
    if layout == "megatron":
        return hf_to_megatron(cfg)
    if layout == "mcore":  # formats of issue 16 keep their tables in their own modules
        from .mcore import hf_to_mcore
        return hf_to_mcore(cfg)
    if layout == "gguf":
        from .gguf_io import hf_to_gguf
        return hf_to_gguf(cfg)
    raise InputError(layout, "unknown layout")


def hf_drop(cfg: ModelConfig) -> list:
    drop = list(DROP["hf"])
    if cfg.tied:
        drop.append(r"^lm_head\.weight$")  # tied: HF sometimes stores the duplicate
    return drop


def convert(tensors: Mapping[str, LazyTensor], src: str, dst: str, cfg: ModelConfig,
            where: str = "input", plan: Plan | None = None, cover: list | None = None,
            faults=None) -> dict[str, LazyTensor]:
    """Lazy tensors of layout ``dst`` from tensors of layout ``src`` (through canonical HF).
    ``cover`` collects what each pass consumed and dropped (see table.apply); ``faults`` (tests only)
    sees every table on its way (converters/faults.py)."""
    table = hf_to if faults is None else (lambda layout, cfg: faults.on_rules(layout, cfg, hf_to(layout, cfg)))
    canon = dict(tensors)
    if src != "hf":
        canon = apply(tensors, invert(table(src, cfg)), cfg.layers, DROP.get(src, ()), where, plan, cover)
    else:
        canon = apply(tensors, [R(k, k) for k in _hf_keys(cfg)], cfg.layers, hf_drop(cfg), where, cover=cover)
    if dst == "hf":
        return canon
    return apply(canon, table(dst, cfg), cfg.layers, (), where, plan, cover)


def _hf_keys(cfg: ModelConfig) -> list:
    """Canonical HF keys of a model (with {i}), used to validate an HF source."""
    if cfg.family == "falcon":
        keys = [FALCON[s] for s in ("embed", "qkv", "o", "h4h", "4hh", "norm", "norm_b")]
        keys += [FALCON[s] for s in (("ln_attn", "ln_attn_b", "ln_mlp", "ln_mlp_b") if cfg.two_norms else ("ln", "ln_b"))]
        return keys
    mlp = ("gate", "up", "down") if cfg.family != "mixtral" else ()
    keys = [HF[s] for s in ("embed", "attn_norm", "q", "k", "v", "o", "mlp_norm") + mlp + ("norm",)]
    if cfg.family == "mixtral":
        keys += [MOE_HF["router"]] + [MOE_HF["w"].format(e=e, n=n) for e in range(cfg.experts) for n in (1, 2, 3)]
    if not cfg.tied:
        keys.append(HF["head"])
    return keys
