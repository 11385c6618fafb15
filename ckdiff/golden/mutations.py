"""Mutation self-test: inject known converter bugs and prove the suite catches each.

Every mutation patches the correct converters for the duration of one run (a
context manager), covering the classes of verification-lessons.md section 6.
``run_mutations`` applies each to its converter and tiny model and reports which
checks (round trip, golden diff, logits) turned red; the unmutated baseline of
the same runs must stay green, so a mutation score of 100% means something.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..converters import config as config_mod
from ..converters import formats, layouts, megatron
from ..converters.lazy import DerivedGroup
from ..converters.ops import Chain, Concat, FuseQKV, Identity, PermuteRope, Transpose, map_ops
from ..converters.table import Rule


@dataclass
class Mutation:
    name: str
    bug_class: str
    converter: str
    model: str
    patch: Callable  # () -> context manager
    dtype: str = "float32"
    options: dict = field(default_factory=dict)


@contextlib.contextmanager
def _patched(obj, attr, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def rules_mutation(transform: Callable[[list, object], list]):
    """Patch ``layouts.hf_to`` so every conversion table passes through ``transform(rules, cfg)``."""
    orig = layouts.hf_to

    def hf_to(layout, cfg):
        return transform(orig(layout, cfg), cfg)
    return lambda: _patched(layouts, "hf_to", hf_to)


def output_mutation(transform: Callable[[dict, object], dict]):
    """Patch ``layouts.convert`` so its lazy output passes through ``transform(tensors, cfg)``."""
    orig = layouts.convert

    def convert(tensors, src, dst, cfg, where="input", plan=None):
        return transform(orig(tensors, src, dst, cfg, where, plan), cfg)
    from ..converters import cli as conv_cli
    return lambda: _stack(_patched(layouts, "convert", convert), _patched(conv_cli, "convert", convert))


@contextlib.contextmanager
def _stack(*cms):
    with contextlib.ExitStack() as st:
        for cm in cms:
            st.enter_context(cm)
        yield


def _map(fn):
    return lambda rules, cfg: [Rule(r.src, r.dst, map_ops(r.op, lambda o: fn(o, cfg))) for r in rules]


def _rope(fn):
    return _map(lambda o, cfg: fn(o, cfg) if isinstance(o, PermuteRope) else o)


def _swap_gate_up(rules, cfg):
    out = []
    for r in rules:
        if len(r.src) == 2 and isinstance(r.op, Concat):  # Megatron [up; gate] -> [gate; up]
            out.append(Rule(r.src[::-1], r.dst, r.op))
        elif r.src == (layouts.HF["gate"],):
            out.append(Rule(r.src, (layouts.META["up"],), r.op))
        elif r.src == (layouts.HF["up"],):
            out.append(Rule(r.src, (layouts.META["gate"],), r.op))
        else:
            out.append(r)
    return out


def _swap_kv(rules, cfg):
    out = []
    for r in rules:
        if len(r.src) == 3:
            out.append(Rule((r.src[0], r.src[2], r.src[1]), r.dst, r.op))
        elif r.src == (layouts.HF["k"],):
            out.append(Rule(r.src, (layouts.META["v"],), r.op))
        elif r.src == (layouts.HF["v"],):
            out.append(Rule(r.src, (layouts.META["k"],), r.op))
        else:
            out.append(r)
    return out


def _transpose_o(rules, cfg):
    return [Rule(r.src, r.dst, Transpose()) if r.src == (layouts.HF["o"],) else r for r in rules]


def _swap_layers(tensors, cfg):
    out = {}
    for k, t in tensors.items():
        k2 = re.sub(r"layers\.([01])\.", lambda m: f"layers.{1 - int(m.group(1))}.", k)
        t.name = k2
        out[k2] = t
    return dict(sorted(out.items(), key=lambda kv: list(tensors).index(kv[0]) if kv[0] in tensors else 0))


def _scale_norm(tensors, cfg):
    out = dict(tensors)
    key = next(k for k in out if re.search(r"layers\.1\..*(ffn_norm|post_attention_layernorm)\.weight$", k))
    out[key] = DerivedGroup([out[key]], lambda xs: [xs[0] * 1.01]).tensors([key])[0]
    return out


def _upcast(tensors, cfg):
    return {k: DerivedGroup([t], lambda xs: [xs[0].to(torch.float32)]).tensors([k])[0] for k, t in tensors.items()}


def _drop(pattern):
    """A converter that silently leaves out the tensors matching ``pattern``."""
    return output_mutation(lambda tensors, cfg: {k: t for k, t in tensors.items() if not re.search(pattern, k)})


def _theta_default():
    orig = config_mod.ModelConfig.to_hf

    def to_hf(self):
        cfg = orig(self)
        cfg.pop("rope_theta", None)
        return cfg
    return _patched(config_mod.ModelConfig, "to_hf", to_hf)


def _lexicographic():
    def meta_shards(p):
        return sorted((f for f in Path(p).iterdir() if formats.META_SHARD.match(f.name)), key=lambda f: f.name.replace("consolidated.0", "consolidated."))
    return _patched(formats, "meta_shards", meta_shards)


def _embed_axis():
    orig = formats.meta_axis

    def meta_axis(key, shape, params, n):
        a = orig(key, shape, params, n)
        return (1 - a) if key == "tok_embeddings.weight" else a
    return _patched(formats, "meta_axis", meta_axis)


def _naive_glu_split():
    """Chunk the fused [up; gate] matrix contiguously across TP ranks instead of each half."""
    orig = megatron._tp_source

    def tp_source(name, t, rank, tp, glu):
        if tp > 1 and megatron.tp_axis(name) == "glu":
            n = t.shape[0] // tp
            return megatron.TensorSource.rows_of(t, [(rank * n, (rank + 1) * n)])
        return orig(name, t, rank, tp, glu)
    return _patched(megatron, "_tp_source", tp_source)


def _keep_padding():
    return _patched(megatron, "strip_vocab", lambda tensors, rows: dict(tensors))


def _no_stage_offset():
    return _patched(megatron, "global_layer_name", lambda key, stage, per_stage: key)


def _head_dim_from_hidden():
    orig = config_mod.ModelConfig.from_hf.__func__

    def from_hf(cls, cfg, tensors, where="config.json"):
        mc = orig(cls, cfg, tensors, where)
        mc.head_dim = mc.hidden // mc.heads
        return mc
    return _patched(config_mod.ModelConfig, "from_hf", classmethod(from_hf))


def _eps_default():
    orig = config_mod.ModelConfig.to_hf

    def to_hf(self):
        cfg = orig(self)
        cfg.pop("rms_norm_eps", None)
        return cfg
    return _patched(config_mod.ModelConfig, "to_hf", to_hf)


def _wrong_rope(o, cfg):
    return PermuteRope(o.heads, o.head_dim, not o.to_interleaved)


CATALOGUE = [
    Mutation("rotary permutation skipped", "Rotary permutation", "to-jetstream", "llama-gqa",
             rules_mutation(_rope(lambda o, cfg: Identity()))),
    Mutation("rotary permutation in the wrong direction", "Rotary permutation", "hf-to-megatron", "llama-gqa",
             rules_mutation(_rope(_wrong_rope))),
    Mutation("rotary permutation applied twice", "Rotary permutation", "to-jetstream", "llama-spec",
             rules_mutation(_rope(lambda o, cfg: Chain((o, o))))),
    Mutation("k permuted with the query head count", "GQA grouping", "to-jetstream", "llama-gqa",
             rules_mutation(_rope(lambda o, cfg: PermuteRope(cfg.heads, cfg.kv_rows // cfg.heads)
                                  if o.heads == cfg.kv_heads else o))),
    Mutation("q permuted with the KV head count", "GQA grouping", "hf-to-megatron", "llama-gqa",
             rules_mutation(_rope(lambda o, cfg: PermuteRope(cfg.kv_heads, cfg.q_rows // cfg.kv_heads)
                                  if o.heads == cfg.heads else o))),
    Mutation("gate/up swapped in the GLU", "Fused GLU order", "hf-to-megatron", "mistral-gqa",
             rules_mutation(_swap_gate_up)),
    Mutation("w1/w3 swapped", "Fused GLU order", "to-jetstream", "llama-gqa", rules_mutation(_swap_gate_up)),
    Mutation("k/v swapped in the fused QKV", "Fused QKV order", "hf-to-megatron", "llama-gqa",
             rules_mutation(_swap_kv)),
    Mutation("QKV fused as [Q; K; V] instead of group order", "Fused QKV order", "hf-to-megatron", "llama-gqa",
             rules_mutation(_map(lambda o, cfg: Concat((cfg.q_rows, cfg.kv_rows, cfg.kv_rows))
                                 if isinstance(o, FuseQKV) else o))),
    Mutation("square wo transposed", "Transposes", "to-jetstream", "llama-gqa", rules_mutation(_transpose_o)),
    Mutation("two layers swapped", "Layer index / stage offset", "hf-to-megatron", "llama-gqa",
             output_mutation(_swap_layers)),
    Mutation("norm weight x 1.01", "dtype casts / values", "to-jetstream", "llama-gqa", output_mutation(_scale_norm)),
    Mutation("lm_head dropped", "Tied embeddings", "to-jetstream", "llama-gqa", _drop(r"^output\.weight$")),
    Mutation("LayerNorm biases dropped", "Dropped biases", "hf-to-megatron", "falcon-40b", _drop(r"\.bias$")),
    Mutation("rope_theta defaulted on export", "rope_theta / scaling", "megatron-to-hf", "mistral-gqa",
             _theta_default),
    Mutation("silent fp32 upcast", "dtype casts", "to-jetstream", "llama-gqa", output_mutation(_upcast),
             dtype="bfloat16"),
    Mutation("Meta shards sorted lexicographically (12 shards)", "Shard merge order / axis", "to-jetstream",
             "llama-wide", _lexicographic),
    Mutation("Llama-2 embedding merged on the vocab axis", "Shard merge order / axis", "to-jetstream",
             "llama-gqa", _embed_axis),
    Mutation("fused [up; gate] chunked across TP ranks", "Fused GLU order / split", "hf-to-megatron",
             "llama-gqa", _naive_glu_split, options={"tp": 2}),
    Mutation("vocab padding rows exported as tokens", "Vocab padding", "hf-to-megatron", "llama-gqa",
             _keep_padding, options={"tp": 2, "pad": 128}),
    Mutation("pipeline-stage layer offset not applied", "Layer index / stage offset", "hf-to-megatron",
             "llama-gqa", _no_stage_offset, options={"pp": 2}),
    Mutation("head_dim assumed to be hidden / heads", "head_dim != hidden/heads", "to-jetstream",
             "llama-mqa-hd", _head_dim_from_hidden),
    Mutation("norm eps defaulted on export", "Config vs weights", "jetstream-to-hf", "gemma", _eps_default),
]


@dataclass
class MutationOutcome:
    mutation: str
    bug_class: str
    converter: str
    model: str
    caught: bool
    caught_by: list
    details: list


def run_mutations(work: Path, catalogue=None) -> tuple[list[MutationOutcome], list]:
    """(outcomes, baseline checks). Baseline: every (converter, model) used, unmutated."""
    from .suite import check_converter
    catalogue = catalogue or CATALOGUE
    baseline = []
    seen = set()
    for m in catalogue:
        key = (m.converter, m.model, m.dtype)
        if key not in seen:
            seen.add(key)
            baseline += check_converter(m.converter, m.model, work / "baseline" / "-".join(key), m.dtype, m.options)
    outcomes = []
    for i, m in enumerate(catalogue):
        with m.patch():
            checks = check_converter(m.converter, m.model, work / f"mut{i:02d}", m.dtype, m.options)
        red = [c for c in checks if not c.ok]
        outcomes.append(MutationOutcome(m.name, m.bug_class, m.converter, m.model, bool(red),
                                        [c.check for c in red], [f"{c.check}: {c.detail}" for c in red]))
    return outcomes, baseline


def score(outcomes) -> float:
    return sum(o.caught for o in outcomes) / max(1, len(outcomes))
