"""Key tables for each layout, written against the canonical HF layout.

``hf_to(layout, cfg)`` returns the rows that turn canonical HF tensors into the
layout; the way back is ``invert`` of the same rows. A conversion A -> B is
``apply(invert(hf_to(A)))`` followed by ``apply(hf_to(B))``, lazily.
"""
from __future__ import annotations

from typing import Mapping, Optional

from ckdiff.models import families
from ckdiff.errors import InputError
from ckdiff.formats import registry
from ckdiff.models.families import (
    FALCON as FALCON_FAMILY,
    GEMMA_JETSTREAM_NAMES,
    LLAMA_NAMES,
    MIXTRAL,
    Mlp,
    Rotary,
)
from ckdiff.models.config import ModelConfig
from ckdiff.tensor.lazy import LazyTensor
from ckdiff.tensor.ops import Chain, Concat, Each, FuseQKV, Identity, PermuteRope, SplitQKV, Stack
from ckdiff.tensor.table import Plan, R, Tie, UnmappedError, apply, invert

# ------------------------------------------------------------------ names
# HF names are the families' own (ckdiff/models/families/); the dicts below are aliases kept for the
# modules that index them by their older keys.
HF = LLAMA_NAMES
META = {
    "embed": "tok_embeddings.weight", "norm": "norm.weight", "head": "output.weight",
    "attn_norm": "layers.{i}.attention_norm.weight",
    "q": "layers.{i}.attention.wq.weight", "k": "layers.{i}.attention.wk.weight",
    "v": "layers.{i}.attention.wv.weight", "o": "layers.{i}.attention.wo.weight",
    "mlp_norm": "layers.{i}.ffn_norm.weight",
    "gate": "layers.{i}.feed_forward.w1.weight", "up": "layers.{i}.feed_forward.w3.weight",
    "down": "layers.{i}.feed_forward.w2.weight",
}
GEMMA_JS = GEMMA_JETSTREAM_NAMES  # alias
# Mixtral: HF experts one by one (MOE_HF["w"] keeps "{i}" for a second format), JetStream stacked over
# experts (no .weight suffix)
MOE_HF = {"router": MIXTRAL.hf_names["router"], "w": MIXTRAL.hf_names["expert"].replace("{i}", "{{i}}")}
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
    "qkv_b": _ML + "self_attention.query_key_value.bias",
}
# Falcon's HF names under their older keys (ln = attn_norm, h4h = up, 4hh = down)
_FALCON_OLD = {"ln": "attn_norm", "ln_b": "attn_norm_b", "h4h": "up", "4hh": "down"}
FALCON = {**FALCON_FAMILY.hf_names, **{old: FALCON_FAMILY.hf_names[new] for old, new in _FALCON_OLD.items()}}

# tensors that carry no weights and are dropped on read, per layout
DROP = {
    "hf": [r"rotary_emb\.inv_freq$", r"\.masked_bias$", r"attn\.bias$"],
    "meta": [r"^rope\.freqs$", r"freqs_cis$"],
    "jetstream": [r"^rope\.freqs$", r"freqs_cis$"],
    "megatron": [r"word_embeddings_for_head\.weight$"],
    "mcore": [r"\._extra_state(/.*)?$"],
    "gguf": [r"^rope_freqs\.weight$"],
}


def _rope(cfg: ModelConfig):
    """Per-projection rotary ops with their own head counts: q uses H, k uses K."""
    return PermuteRope(cfg.heads, cfg.head_dim), PermuteRope(cfg.kv_heads, cfg.head_dim)


def family_for(cfg: ModelConfig, layout: str):
    """The declaration of ``cfg``'s family, refusing a layout the family does not declare (one line)."""
    fam = families.get(cfg.family)
    if fam is None:
        raise InputError("config", f"unknown model family {cfg.family!r} (known: {', '.join(families.FAMILIES)})")
    if layout not in fam.layouts:
        raise InputError("config", fam.no_layout(layout))
    return fam


def moe_rules(cfg: ModelConfig) -> list:
    """Router renamed; experts' w1/w2/w3 stacked on a new leading axis."""
    E = cfg.experts
    names = families.family(cfg.family).hf_names
    w = names["expert"].replace("{i}", "{{i}}")
    return [R(names["router"], MOE_JS["router"])] + [
        R([w.format(e=e, n=n) for e in range(E)], MOE_JS["w"].format(n=n), Stack(E)) for n in (1, 2, 3)]


def hf_to_meta(cfg: ModelConfig, layout: str = "meta") -> list:
    """Meta / JetStream: renames, the rotary permutation of q and k (unless the family declares the
    layout half-split), the tie as a checked copy, MoE experts stacked."""
    fam = family_for(cfg, layout)
    hf, names = fam.hf_names, fam.layout_names.get(layout) or META
    rope = fam.layout_rotary.get(layout, Rotary.INTERLEAVED) is Rotary.INTERLEAVED
    pq, pk = _rope(cfg) if rope else (Identity(), Identity())
    tie = cfg.tied and "head" in names
    rules = [R(hf["embed"], [names["embed"], names["head"]], Tie()) if tie else R(hf["embed"], names["embed"])]
    rules += [R(hf["q"], names["q"], pq), R(hf["k"], names["k"], pk)]
    mlp = ("gate", "up", "down") if fam.block.mlp is Mlp.GLU else ()
    for slot in ("attn_norm", "v", "o", "mlp_norm") + mlp:
        rules.append(R(hf[slot], names[slot]))
    if fam.block.mlp is Mlp.MOE:
        rules += moe_rules(cfg)
    rules.append(R(hf["norm"], names["norm"]))
    if not cfg.tied and "head" in names:
        rules.append(R(hf["head"], names["head"]))
    return rules


# Megatron-LLM name of each HF slot renamed as is; q/k/v (+ biases), the GLU halves and Falcon's
# fused QKV are built in hf_to_megatron. Rules come out in this slot order.
_MEGATRON_SLOT = {"embed": "embed", "attn_norm": "attn_norm", "attn_norm_b": "attn_norm_b",
                  "ln_attn": "attn_norm", "ln_attn_b": "attn_norm_b", "ln_mlp": "mlp_ln", "ln_mlp_b": "mlp_ln_b",
                  "q": "qkv", "qkv": "qkv", "q_b": "qkv_b", "o": "o", "mlp_norm": "mlp_norm", "up": "h4h",
                  "down": "4hh", "norm": "norm", "norm_b": "norm_b", "head": "head"}
_FUSED_AWAY = ("k", "v", "k_b", "v_b", "gate")  # consumed by the rule of q, q_b, up


def hf_to_megatron(cfg: ModelConfig) -> list:
    """Megatron-LLM, written over the family's slots: QKV = fuse(P(q), P(k), v) in KV-group order (the
    same fuse for the q/k/v biases when the block has them), a GLU as rows [up; gate], a fused HF QKV
    (Falcon) regrouped in place; every other slot renamed."""
    fam = family_for(cfg, "megatron")
    pq, pk = _rope(cfg)
    if cfg.rotary_rows == "rotate_half":
        # Megatron-LLM before 2023-08-01 applied rotate_half rotary: q/k rows stay in HF order
        pq, pk = Identity(), Identity()
    H, K, d, F = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ffn
    M, hf = MEGATRON, fam.hf_names
    fuse = Chain((Each((pq, pk, Identity())), FuseQKV(H, K, d)))
    slots = [s for s in fam.slots(tied=cfg.tied, two_norms=cfg.two_norms) if s not in _FUSED_AWAY]
    unknown = [s for s in slots if s not in _MEGATRON_SLOT]
    if unknown:
        raise InputError("config", f"{fam.name}: slot {unknown[0]!r} has no Megatron-LLM name")
    rules = []
    for s in sorted(slots, key=list(_MEGATRON_SLOT).index):
        dst = M[_MEGATRON_SLOT[s]]
        if s in ("q", "q_b"):
            b = s[1:]  # "" or "_b": the biases go through the same fuse as the weights
            rules.append(R([hf["q" + b], hf["k" + b], hf["v" + b]], dst, fuse))
        elif s == "qkv":  # HF already group ordered; only the q/k rows inside each head move
            rules.append(R(hf[s], dst, Chain((SplitQKV(H, K, d), Each((pq, pk, Identity())), FuseQKV(H, K, d)))))
        elif s == "up" and fam.block.mlp is Mlp.GLU:
            rules.append(R([hf["up"], hf["gate"]], dst, Concat((F, F), 0)))  # Megatron GLU is [up; gate]
        else:
            rules.append(R(hf[s], dst))
    return rules


# layouts whose tables live in their own format module (mcore, gguf): ``register_table`` on import
TABLES: dict = {}


def register_table(layout: str, rows) -> None:
    """``rows(cfg) -> rows from canonical HF`` for ``layout``, kept by the module of the format that has it."""
    TABLES[layout] = rows


def hf_to(layout: str, cfg: ModelConfig) -> list:
    if layout == "hf":
        return []
    family_for(cfg, layout)
    if layout in ("meta", "jetstream"):
        return hf_to_meta(cfg, layout)
    if layout == "megatron":
        return hf_to_megatron(cfg)
    if layout not in TABLES:
        registry.formats()  # importing the built-in formats registers the tables they keep
    if layout in TABLES:
        return TABLES[layout](cfg)
    raise InputError(layout, "unknown layout")


def hf_drop(cfg: ModelConfig, layout: str = "hf") -> list:
    drop = list(DROP["hf"])
    if cfg.tied:
        drop.append(r"^lm_head\.weight$")  # tied: HF sometimes stores the duplicate
    mtp = (cfg.extra or {}).get("mtp_layers") or 0
    if mtp and layout != "hf":  # DeepSeek's MTP layers follow the decoder's: no other layout here holds them (the
        # pattern's comment names why in the coverage record; the config's mtp_layers differs and says so)
        drop += [rf"^model\.layers\.{i}\.(?#an MTP layer, which the {layout} layout does not hold)"
                 for i in range(cfg.layers, cfg.layers + mtp)]
    return drop


def convert(tensors: Mapping[str, LazyTensor], src: str, dst: str, cfg: ModelConfig,
            where: str = "input", plan: Plan | None = None, cover: list | None = None,
            faults=None, absent: dict | None = None) -> dict[str, LazyTensor]:
    """Lazy tensors of layout ``dst`` from tensors of layout ``src`` (through canonical HF).
    ``cover`` collects what each pass consumed and dropped (see table.apply); ``faults`` (tests only)
    sees every table on its way (convert/faults.py). With ``absent`` (a dict, for comparisons) a missing
    source is no error: the targets it feeds are left out and ``absent`` maps each to the missing source
    tensors (table.apply)."""
    table = hf_to if faults is None else (lambda layout, cfg: faults.on_rules(layout, cfg, hf_to(layout, cfg)))
    rules = table(dst, cfg) if dst != "hf" else None  # a layout the family lacks is refused before any work
    canon = dict(tensors)
    try:
        if src != "hf":
            canon = apply(tensors, invert(table(src, cfg)), cfg.layers, DROP.get(src, ()), where, plan, cover,
                          absent=absent)
        else:
            canon = apply(tensors, [R(k, k) for k in _hf_keys(cfg)], cfg.layers, hf_drop(cfg, dst), where,
                          cover=cover, absent=absent)
    except (UnmappedError, InputError) as e:  # tensors left over or missing: an undeclared model type says so
        raise undeclared_family(cfg, src, where) or e from None
    if rules is None:
        return canon
    return apply(canon, rules, cfg.layers, (), where, plan, cover, absent=absent)


def undeclared_family(cfg: ModelConfig, layout: str, where) -> Optional[InputError]:
    """The error for tensors a table does not know when the config names a model type no family
    declares (read with the default family's names, so its own tensors are left over), else None."""
    mt = (cfg.hf_model_type or "").lower()
    if not mt or families.for_model_type(mt) is not None:
        return None
    return InputError(where, f"family {mt} is not declared for this layout ({layout}); declared families: "
                             f"{', '.join(families.FAMILIES)}")


def _hf_keys(cfg: ModelConfig) -> list:
    """Canonical HF keys of a model (with {i}), used to validate an HF source: the family's slots
    (optional ones as the config says), MoE experts expanded."""
    fam = families.get(cfg.family) or family_for(cfg, "hf")
    keys = []
    slots = fam.slots(tied=cfg.tied, two_norms=cfg.two_norms, q_lora=(cfg.extra or {}).get("q_lora_rank") is not None)
    per_layer = [set(fam.layer_slots(cfg, i, slots)) for i in range(cfg.layers)]
    for s in slots:
        t = fam.hf_names[s]
        if "{i}" in t and not all(s in have for have in per_layer):  # in some layers only (an MoE model's
            names = [t.replace("{i}", str(i)) for i, have in enumerate(per_layer) if s in have]  # dense MLP)
        else:
            names = [t]
        for t in names:
            if s == "expert":
                keys += [t.replace("{i}", "{{i}}").format(e=e, n=n) for e in range(cfg.experts) for n in (1, 2, 3)]
            elif "{e}" in t:  # one HF tensor per expert (Qwen3-MoE, DeepSeek-V3)
                keys += [t.replace("{i}", "{{i}}").format(e=e) for e in range(cfg.experts)]
            else:
                keys.append(t)
    return keys


def convert_formats(tensors, src: "registry.Format", dst: "registry.Format", cfg, where: str = "input", plan=None,
                    cover=None, absent: dict | None = None) -> dict:
    """Lazy tensors in ``dst``'s layout from tensors in ``src``'s, through canonical HF: the built-in
    layouts by ``convert``, a format's own ``table`` by the same ``apply``/``invert``. ``absent``: as
    for ``convert``."""
    if src.table is None and dst.table is None:
        return convert(tensors, src.layout, dst.layout, cfg, where, plan, cover, absent=absent)
    if src.table is not None:
        canon = apply(tensors, invert(src.table(cfg)), cfg.layers, src.drop, where, plan, cover, absent=absent)
    else:
        canon = convert(tensors, src.layout, "hf", cfg, where, plan, cover, absent=absent)
    if dst.table is not None:
        return apply(canon, dst.table(cfg), cfg.layers, (), where, plan, cover, absent=absent)
    return convert(canon, "hf", dst.layout, cfg, where, plan, cover, absent=absent)
