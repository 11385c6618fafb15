"""Independent golden emitter: the same tiny weights laid out in every format.

Independent of the converters: target key names, split rules and rank layouts come from
golden/fixtures.py (written down from the specs), never from formats/layouts.py or
formats/megatron_llm.py; the Megatron and Meta shard files are written here with explicit index
loops and ``torch.save``, not with the converters' writers or TP slicing. The model itself (its HF
tensor names, block kind) comes from its family declaration (ckdiff/models/families/), so a family
declared there gets its golden layouts without an edit here. Formulas (specs' index form):
  Meta row ``h*hd + 2j + i`` = HF row ``h*hd + i*hd/2 + j`` (q with H heads, k with K; biases alike);
  Megatron QKV = for each KV group g: P(q_{g*r}) .. P(q_{g*r+r-1}), P(k_g), v_g (weights and biases);
  Megatron GLU = rows [up; gate], split per half across TP ranks; Falcon HF QKV is already grouped.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ckdiff.models import families
from ckdiff.models.config import ModelConfig
from ckdiff.golden import fixtures as FX
from ckdiff.golden.models import hf_state, lazy, tiny_config

__all__ = ["emit", "meta_state", "megatron_layout", "megatron_args", "write_megatron_golden", "hf_state",
           "tiny_config", "padded_rows"]


def _meta_rows(w: torch.Tensor, heads: int, hd: int) -> torch.Tensor:
    """HF (rotate_half) rows -> interleaved rows, head by head; works for weights and biases."""
    out = torch.empty_like(w)
    hh = hd // 2
    for h in range(heads):
        for j in range(hh):
            for i in range(2):
                out[h * hd + 2 * j + i] = w[h * hd + i * hh + j]
    return out


def _slots(cfg: ModelConfig, hf: dict, i: int) -> dict:
    """The family's per-layer slots present in ``hf`` for layer ``i`` (experts excluded)."""
    fam = families.family(cfg.family)
    return {s: hf[t.format(i=i)] for s, t in fam.hf_names.items()
            if "{i}" in t and "{e}" not in t and t.format(i=i) in hf}


def _global(cfg: ModelConfig, hf: dict, slot: str):
    t = families.family(cfg.family).hf_names.get(slot)
    return hf.get(t) if t else None


def meta_state(cfg: ModelConfig, hf: dict) -> dict:
    """Meta / JetStream layout (MJF sections 1, 7): renamed; q/k rows interleaved unless the family's
    JetStream rotary is half-split (Gemma); Mixtral experts stacked per layer; tied head = embedding."""
    fam = families.family(cfg.family)
    gemma = not FX.META_PERMUTED.get(cfg.family, True)
    names = FX.JETSTREAM_GEMMA_NAMES if gemma else FX.META_NAMES
    out = {names["embed"]: _global(cfg, hf, "embed")}
    for i in range(cfg.layers):
        have = _slots(cfg, hf, i)
        if fam.block.mlp.value == "moe":
            out[FX.JETSTREAM_MOE["router"].format(i=i)] = have.pop("router")
            for n in (1, 2, 3):
                experts = [hf[fam.hf_names["expert"].format(i=i, e=e, n=n)] for e in range(cfg.experts)]
                stacked = torch.empty((cfg.experts,) + tuple(experts[0].shape), dtype=experts[0].dtype)
                for e, w in enumerate(experts):
                    stacked[e] = w
                out[FX.JETSTREAM_MOE["expert"].format(i=i, n=n)] = stacked
        for slot, w in have.items():
            if slot not in names:
                raise ValueError(f"golden/fixtures.py has no Meta/JetStream name for {cfg.family} slot {slot!r}")
            if not gemma and slot == "q":
                w = _meta_rows(w, cfg.heads, cfg.head_dim)
            elif not gemma and slot == "k":
                w = _meta_rows(w, cfg.kv_heads, cfg.head_dim)
            out[names[slot].format(i=i)] = w
    out[names["norm"]] = _global(cfg, hf, "norm")
    if "head" in names:
        out[names["head"]] = out[names["embed"]] if cfg.tied else _global(cfg, hf, "head")
    return out


# ---------------------------------------------------------------- Megatron-LLM
def _fuse(q, k, v, cfg: ModelConfig) -> torch.Tensor:
    """q/k already in Megatron row order; rows grouped per KV head (MLF section 7)."""
    hd, r = cfg.head_dim, cfg.heads // cfg.kv_heads
    blocks = []
    for g in range(cfg.kv_heads):
        for j in range(r):
            h = g * r + j
            blocks.append(q[h * hd:(h + 1) * hd])
        blocks.append(k[g * hd:(g + 1) * hd])
        blocks.append(v[g * hd:(g + 1) * hd])
    return torch.cat(blocks)


def _regroup_falcon(qkv, cfg: ModelConfig, permute: bool) -> torch.Tensor:
    """HF Falcon's fused rows are already [q x r, k, v] per group: only q/k rows inside each head move."""
    hd, r = cfg.head_dim, cfg.heads // cfg.kv_heads
    blocks = []
    for g in range(cfg.kv_heads):
        base = g * (r + 2) * hd
        for j in range(r + 2):
            b = qkv[base + j * hd:base + (j + 1) * hd]
            blocks.append(_meta_rows(b, 1, hd) if permute and j <= r else b)
    return torch.cat(blocks)


def _tp_rule(local: str, glu: bool, bias: bool):
    """Split of one Megatron tensor from its name (fixtures.MEGATRON_TP)."""
    name = local.rsplit(".", 1)[0].split(".")[-1]
    rule = FX.MEGATRON_TP.get(f"{name}/glu" if glu and name == "dense_h_to_4h" else name, "missing")
    if rule == "missing":
        raise ValueError(f"golden/fixtures.py has no tensor-parallel rule for Megatron tensor {local!r}")
    return None if bias and rule == "cols" else rule


def megatron_layout(cfg: ModelConfig, hf: dict) -> tuple[dict, list]:
    """(global tensors, per-layer tensors) of the merged (TP=1) Megatron model.

    Global: name -> tensor for "embed", "head" (untied only), "norm", "norm_b". Per layer: local key
    template (``{attn}`` left in) -> (tensor, TP rule). Generic over the family's slots: fused QKV from
    q/k/v (or HF's fused qkv), biases ``X_b`` through the same row operation as ``X``."""
    fam = families.family(cfg.family)
    if fam.block.mlp.value == "moe":
        raise ValueError(f"{cfg.family}: Megatron-LLM has no MoE layout")
    glu = fam.block.mlp.value == "glu"
    permute = cfg.rotary_rows != "rotate_half"  # Megatron-LLM >= 2023-08 uses Meta's interleaved rows
    layers = []
    for i in range(cfg.layers):
        have = _slots(cfg, hf, i)
        out = {}
        for sfx in ("", "_b"):
            key = FX.MEGATRON_LAYER["qkv"] if not sfx else FX.MEGATRON_LAYER["qkv"][:-len("weight")] + "bias"
            if "qkv" + sfx in have:
                out[key] = (_regroup_falcon(have.pop("qkv" + sfx), cfg, permute), "rows")
            elif all(s + sfx in have for s in FX.MEGATRON_FUSED["qkv"]):
                q, k, v = (have.pop(s + sfx) for s in FX.MEGATRON_FUSED["qkv"])
                if permute:
                    q, k = _meta_rows(q, cfg.heads, cfg.head_dim), _meta_rows(k, cfg.kv_heads, cfg.head_dim)
                out[key] = (_fuse(q, k, v, cfg), "rows")
            if glu and all(s + sfx in have for s in FX.MEGATRON_FUSED["glu"]):
                gkey = FX.MEGATRON_LAYER["glu"] if not sfx else FX.MEGATRON_LAYER["glu"][:-len("weight")] + "bias"
                out[gkey] = (torch.cat([have.pop(s + sfx) for s in FX.MEGATRON_FUSED["glu"]]), "halves")
        for slot, w in have.items():
            bias = slot.endswith("_b")
            if slot in FX.MEGATRON_LAYER:
                key = FX.MEGATRON_LAYER[slot]
            elif bias and slot[:-2] in FX.MEGATRON_LAYER:
                key = FX.MEGATRON_LAYER[slot[:-2]][:-len("weight")] + "bias"
            else:
                raise ValueError(f"golden/fixtures.py has no Megatron-LLM key for {cfg.family} slot {slot!r}")
            if key in out:
                raise ValueError(f"{cfg.family}: slots {slot!r} and another both map to Megatron {key!r}")
            out[key] = (w, _tp_rule(key, glu, bias))
        layers.append(out)
    glob = {"embed": _global(cfg, hf, "embed"), "norm": _global(cfg, hf, "norm")}
    if _global(cfg, hf, "norm_b") is not None:
        glob["norm_b"] = _global(cfg, hf, "norm_b")
    if not cfg.tied:
        glob["head"] = _global(cfg, hf, "head")
    return glob, layers


def padded_rows(vocab: int, tp: int, divisor) -> int:
    """MLF section 11: smallest multiple of divisor * TP >= vocab; unpadded when not asked and TP divides."""
    if not divisor and vocab % tp == 0:
        return vocab
    m = (divisor or FX.DEFAULT_DIVISOR) * tp
    return -(-vocab // m) * m


def _pad(w: torch.Tensor, rows: int) -> torch.Tensor:
    """Vocab padding rows are copies of the last real row (MLF section 11)."""
    out = torch.empty((rows,) + tuple(w.shape[1:]), dtype=w.dtype)
    out[:w.shape[0]] = w
    for r in range(w.shape[0], rows):
        out[r] = w[-1]
    return out


def _shard(w: torch.Tensor, rule, t: int, tp: int) -> torch.Tensor:
    """TP rank ``t``'s part of ``w`` (MLF section 10), as a fresh tensor (never a view of the whole)."""
    if tp == 1 or rule is None:
        return w.clone()
    if rule == "rows":
        n = w.shape[0] // tp
        return w[t * n:(t + 1) * n].clone()
    if rule == "cols":
        n = w.shape[1] // tp
        return w[:, t * n:(t + 1) * n].clone()
    if rule == "halves":  # [up; gate]: rank t holds [up rows of t; gate rows of t]
        f = w.shape[0] // 2
        n = f // tp
        return torch.cat([w[t * n:(t + 1) * n], w[f + t * n:f + (t + 1) * n]])
    raise ValueError(f"unknown split {rule!r}")


def megatron_args(cfg: ModelConfig, tp: int, pp: int, padded: int, divisor: int = FX.DEFAULT_DIVISOR,
                  model: str | None = None) -> argparse.Namespace:
    """The args Namespace (MLF section 5) plus what ckdiff records beyond the original."""
    fam = families.family(cfg.family)
    a = dict(FX.MEGATRON_ARGS_ALL, num_layers=cfg.layers, hidden_size=cfg.hidden, num_attention_heads=cfg.heads,
             max_position_embeddings=cfg.max_pos, seq_length=cfg.max_pos, tensor_model_parallel_size=tp,
             pipeline_model_parallel_size=pp, padded_vocab_size=padded, ffn_hidden_size=cfg.ffn)
    a.update(true_vocab_size=cfg.vocab, kv_channels=cfg.head_dim, rope_theta=cfg.rope_theta,
             layernorm_epsilon=cfg.norm_eps, params_dtype=cfg.dtype, ckdiff_model=model or families.family(cfg.family).default_megatron_model(cfg.hf_model_type),
             ckdiff_rotary=cfg.rotary_rows or "interleaved")
    assert set(FX.MEGATRON_ARGS_CKDIFF) <= set(a)
    if fam.block.norm.value == "layer":  # Falcon: LayerNorm, GELU, parallel attention, tied
        a.update(FX.MEGATRON_ARGS_FALCON, num_attention_heads_kv=cfg.kv_heads)
        if cfg.two_norms:
            a["parallel_layernorm"] = True
    else:
        a.update(FX.MEGATRON_ARGS_LLAMA, make_vocab_size_divisible_by=divisor, tie_embed_logits=cfg.tied)
        if cfg.kv_heads != cfg.heads:
            a["num_attention_heads_kv"] = cfg.kv_heads
        if cfg.sliding_window:
            a["sliding_window_size"] = cfg.sliding_window
    if fam.name not in ("llama", "falcon"):  # families beyond the original's: named, with their biases
        a["ckdiff_family"] = fam.name
        if fam.block.qkv_bias:
            a["add_qkv_bias"] = True
    return argparse.Namespace(**a)


def write_megatron_golden(out: Path, cfg: ModelConfig, hf: dict, tp: int = 1, pp: int = 1, vocab_rows: int = 0,
                          form: str = "legacy", iteration: str = "release", divisor: int = FX.DEFAULT_DIVISOR) -> list:
    """Rank files ``{release|iter_N}/mp_rank_TT[_PPP]/model_optim_rng.pt`` and the tracker (MLF sections 3-5,
    10-12), written rank by rank with ``torch.save``: stage-local layer numbers, TP splits from the
    fixtures, vocab padded to ``vocab_rows`` (copies of the last row), ``form`` "legacy" (hf_to_megatron's
    names) or "native" (Megatron's own). Returns the rank files written."""
    names = FX.MEGATRON_FORMS[form]
    glob, layers = megatron_layout(cfg, hf)
    if cfg.layers % pp or cfg.kv_heads % tp:
        raise ValueError(f"TP={tp} / PP={pp} do not divide {cfg.kv_heads} KV heads / {cfg.layers} layers")
    rows = max(vocab_rows, cfg.vocab)
    for k in ("embed", "head"):
        if k in glob:
            glob[k] = _pad(glob[k], rows)
    args = megatron_args(cfg, tp, pp, rows, divisor)
    per = cfg.layers // pp
    it_dir = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    written = []
    for p in range(pp):
        for t in range(tp):
            lm: dict = {}
            model: dict = {"language_model": lm}
            if p == 0:
                emb = _shard(glob["embed"], FX.MEGATRON_TP["word_embeddings"], t, tp)
                lm["embedding"] = ({"word_embeddings.weight": emb} if form == "legacy"
                                   else {"word_embeddings": {"weight": emb}})
            container: dict = {}
            for local_i in range(per):
                for key, (w, rule) in layers[p * per + local_i].items():
                    container[f"layers.{local_i}." + key.format(attn=names["attn"])] = _shard(w, rule, t, tp)
            if p == pp - 1:
                for slot, key in FX.MEGATRON_FINAL.items():
                    if slot in glob:
                        container[key] = glob[slot].clone()
            lm[names["layers"]] = container
            if p == pp - 1:
                if "head" in glob:
                    lm["lm_head"] = _shard(glob["head"], FX.MEGATRON_TP["lm_head"], t, tp)
                elif pp > 1:  # tied, last stage: a copy of the embedding (MLF section 4)
                    model["word_embeddings_for_head"] = {
                        "weight": _shard(glob["embed"], FX.MEGATRON_TP["word_embeddings_for_head"], t, tp)}
            rank = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            f = Path(out) / it_dir / rank / FX.MEGATRON_RANK_FILE
            f.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"iteration": iteration if iteration == "release" else int(iteration),
                        "checkpoint_version": FX.CHECKPOINT_VERSION, "args": args, "model": model}, f)
            written.append(f)
    (Path(out) / FX.MEGATRON_TRACKER).write_text(iteration)
    return written


def write_meta_golden(out: Path, state: dict, params: dict, shards: int = 1, llama_version: int = 2) -> list:
    """``consolidated.NN.pth`` shards (MJF section 4 axes) + params.json, with ``torch.save``."""
    written = []
    for s in range(shards):
        part = {}
        for k, w in state.items():
            if k == FX.META_NAMES["embed"]:
                axis = FX.META_EMBED_AXIS[llama_version]
            else:
                suffix = next((x for x in FX.META_SHARD_AXIS if k == x or k.endswith("." + x)), None)
                if suffix is None and shards > 1:
                    raise ValueError(f"golden/fixtures.py has no Meta shard axis for {k!r}")
                axis = FX.META_SHARD_AXIS.get(suffix)
            if axis is None or shards == 1:
                part[k] = w.clone()
            else:
                n = w.shape[axis] // shards
                if n * shards != w.shape[axis]:
                    raise ValueError(f"{k}: {w.shape[axis]} rows on axis {axis} do not split into {shards} shards")
                part[k] = (w[s * n:(s + 1) * n] if axis == 0 else w[:, s * n:(s + 1) * n]).clone()
        f = Path(out) / f"consolidated.{s:02d}.pth"
        torch.save(part, f)
        written.append(f)
    (Path(out) / "params.json").write_text(json.dumps(params, indent=2))
    return written


def emit(out: Path, name: str, layout: str, dtype: str = "float32", seed: int = 0, shards: int = 1,
         tp: int = 1, pp: int = 1, llama_version: int = 2, vocab_rows: int = 0, form: str = "legacy",
         cfg: ModelConfig | None = None, faults=None) -> Path:
    """Write tiny model ``name`` (or ``cfg``) in ``layout`` (hf, meta, jetstream, megatron, mcore, gguf[-QTYPE])
    to ``out`` (for gguf, ``out`` is a directory holding ``model.gguf``, whose path is returned).

    ``vocab_rows`` pads a Megatron embedding / lm_head to that many rows; ``form`` picks Megatron's
    legacy or native names. ``faults`` (format mutations only) reaches the mcore / GGUF writers, which
    are the formats' production writers (the golden for those formats is the HF checkpoint)."""
    from ckdiff.io.writers import atomic_dir, write_hf, write_meta_like
    cfg = cfg or tiny_config(name, dtype)
    hf = hf_state(cfg, seed)
    with atomic_dir(out, overwrite=True) as tmp:
        if layout == "hf":
            write_hf(tmp, lazy(hf), cfg.to_hf(), shards)
        elif layout == "meta":
            write_meta_golden(tmp, meta_state(cfg, hf), cfg.to_meta(), shards, llama_version)
        elif layout == "jetstream":
            write_meta_like(tmp, lazy(meta_state(cfg, hf)), cfg.to_meta())
        elif layout == "megatron":
            write_megatron_golden(tmp, cfg, hf, tp, pp, vocab_rows, form,
                                  iteration="release" if form == "legacy" else "1000")
        elif layout == "mcore":  # torch DCP in megatron-core's key layout (megatron-core itself needs CUDA)
            from ckdiff.formats.mcore import write_mcore
            write_mcore(tmp, hf, cfg, faults=faults)
        elif layout.startswith("gguf"):  # "gguf" (F16) or "gguf-Q8_0" etc.: the gguf package's writer
            from ckdiff.formats.gguf import write_gguf
            write_gguf(tmp / "model.gguf", hf, cfg, layout.partition("-")[2] or "F16", faults=faults)
        else:
            raise ValueError(f"unknown layout {layout!r}")
    return Path(out) / "model.gguf" if layout.startswith("gguf") else Path(out)
