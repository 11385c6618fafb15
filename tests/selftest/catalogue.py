"""Mutation self-test: inject known converter bugs and prove the suite catches each.

Every mutation is a :class:`~ckdiff.convert.faults.Faults` value handed to the converter under test
(and its inverse) through the conversion API's explicit injection points: the checkpoint as read, the
config as parsed, each conversion table, the converted tensors, the config file written. No module is
patched, so the checks (golden emitter, comparator, reference runtimes) always run unmutated code.
The catalogue covers the bug classes converters ship (rotary, head counts, GLU order, shards, dropped
tensors, scales, config); ``run_mutations`` applies each
to its converter and tiny model and reports which checks (round trip, golden diff, logits) turned red.
The unmutated baseline of every (converter, model, dtype, options) used must stay green, so a mutation
score of 100% means something.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ckdiff.formats import layouts
from ckdiff.convert.faults import Faults
from ckdiff.tensor.lazy import Checkpoint, DerivedGroup, DerivedTensor
from ckdiff.tensor.ops import (
    Chain,
    Concat,
    FuseQKV,
    Identity,
    PermuteRope,
    Shard,
    ShardMerge,
    Transpose,
    map_ops,
)
from ckdiff.tensor.table import Rule
from ckdiff.compare.status import OK, Status
from ckdiff.errors import InputError


@dataclass
class Mutation:
    name: str
    bug_class: str
    converter: str
    model: str
    faults: Faults
    dtype: str = "float32"
    options: dict = field(default_factory=dict)
    names: str = ""  # regex the checks' findings must match for the cause to count as named


def rules_mutation(transform: Callable[[list, object], list]) -> Faults:
    """Every conversion table (both directions) passes through ``transform(rules, cfg)``."""
    return Faults(rules=lambda layout, cfg, rules: transform(rules, cfg))


def output_mutation(transform: Callable[[dict, object], dict]) -> Faults:
    """The converted lazy tensors pass through ``transform(tensors, cfg)``."""
    return Faults(output=lambda tensors, step: transform(tensors, step.cfg))


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
        out[k2] = DerivedGroup([t], lambda xs: [xs[0]]).tensors([k2])[0] if k2 != k else t
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


def _config_drops(key: str) -> Faults:
    """The HF config.json written without ``key`` (readers then assume the library default)."""
    return Faults(config=lambda config, step: {k: v for k, v in config.items() if k != key})


def _on_meta_merge(fn) -> Faults:
    """A Meta reader bug: ``fn(key, parts, how, file names)`` re-merges each tensor the reader merged
    from its shards (``parts`` in shard order, ``how`` the Shard cut the reader chose)."""
    def read(ck, step):
        if ck.format != "meta" or len(ck.meta.get("files", [])) < 2:
            return ck
        names = [Path(f).name for f in ck.meta["files"]]
        tensors = {}
        for k, t in ck.tensors.items():
            merged = isinstance(t, DerivedTensor) and isinstance(t.group.fn, ShardMerge)
            tensors[k] = fn(k, t.group.inputs, t.group.fn.how, names) if merged else t
        return Checkpoint(ck.path, ck.format, tensors, ck.config, ck.meta)
    return Faults(read=read)


def _merge(k, parts, how):
    return DerivedGroup(parts, ShardMerge(how, len(parts))).tensors([k])[0]


def _lexicographic(k, parts, how, names):
    """Shards concatenated in the order of their sorted file names (consolidated.10 before .2)."""
    order = sorted(range(len(names)), key=lambda i: names[i].replace("consolidated.0", "consolidated."))
    return _merge(k, [parts[i] for i in order], how)


def _embed_axis(k, parts, how, names):
    """The Llama-2 embedding (split on the hidden axis) merged on the vocab axis."""
    swap = {Shard.ROWS: Shard.COLS, Shard.COLS: Shard.ROWS}
    return _merge(k, parts, swap.get(how, how) if k == "tok_embeddings.weight" else how)


def _naive_glu_split(tensors, step):
    """The fused [up; gate] chunked contiguously across TP ranks instead of half by half: the rows are
    reordered so that the writer's per-half split puts rank t's contiguous chunk in rank t's file."""
    if step.tp == 1:
        return tensors
    out = dict(tensors)
    for k, t in tensors.items():
        if k.endswith("mlp.dense_h_to_4h.weight"):
            f, tp = t.shape[0] // 2, step.tp
            n, m = f // tp, 2 * (f // tp)
            idx = torch.tensor([r for part in (0, 1) for rank in range(tp)
                                for r in range(rank * m + part * n, rank * m + (part + 1) * n)])
            out[k] = DerivedGroup([t], lambda xs, idx=idx: [xs[0][idx]]).tensors([k])[0]
    return out


def _ignore_true_vocab(ck, step):
    """megatron-to-hf that ignores the recorded true vocab: padding rows are exported as tokens."""
    if ck.format != "megatron":
        return ck
    return Checkpoint(ck.path, ck.format, ck.tensors, {k: v for k, v in ck.config.items() if k != "true_vocab_size"},
                      ck.meta)


def _no_stage_offset(ck, step):
    """A Megatron reader that keeps stage-local layer numbers: the stages' layers collide."""
    if ck.format != "megatron" or ck.meta.get("pp", 1) == 1:
        return ck
    layers = {int(m.group(1)) for k in ck.tensors for m in [re.search(r"layers\.(\d+)\.", k)] if m}
    per = len(layers) // ck.meta["pp"]
    seen = set()
    for k in ck.tensors:
        local = re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) % per}.", k)
        if local in seen:
            raise InputError(ck.path, f"{local!r} appears in two pipeline stages")
        seen.add(local)
    return ck


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
             _config_drops("rope_theta")),
    Mutation("silent fp32 upcast", "dtype casts", "to-jetstream", "llama-gqa", output_mutation(_upcast),
             dtype="bfloat16"),
    Mutation("Meta shards sorted lexicographically (12 shards)", "Shard merge order / axis", "to-jetstream",
             "llama-wide", _on_meta_merge(_lexicographic)),
    Mutation("Llama-2 embedding merged on the vocab axis", "Shard merge order / axis", "to-jetstream",
             "llama-gqa", _on_meta_merge(_embed_axis)),
    Mutation("fused [up; gate] chunked across TP ranks", "Fused GLU order / split", "hf-to-megatron",
             "llama-gqa", Faults(output=_naive_glu_split), options={"tp": 2}),
    Mutation("vocab padding rows exported as tokens", "Vocab padding", "hf-to-megatron", "llama-gqa",
             Faults(read=_ignore_true_vocab), options={"tp": 2, "pad": 128}),
    Mutation("pipeline-stage layer offset not applied", "Layer index / stage offset", "hf-to-megatron",
             "llama-gqa", Faults(read=_no_stage_offset), options={"pp": 2}),
    Mutation("head_dim assumed to be hidden / heads", "head_dim != hidden/heads", "to-jetstream",
             "llama-mqa-hd", Faults(parsed=lambda cfg: replace(cfg, head_dim=cfg.hidden // cfg.heads))),
    Mutation("norm eps defaulted on export", "Config vs weights", "jetstream-to-hf", "llama-gqa",
             _config_drops("rms_norm_eps")),
]


NAMES = {
    "rotary permutation skipped": r"rotary permutation",
    "rotary permutation in the wrong direction": r"rotary permutation",
    "rotary permutation applied twice": r"rotary permutation",
    "k permuted with the query head count": r"rotary permutation",
    "q permuted with the KV head count": r"wrong head count",
    "gate/up swapped in the GLU": r"halves swapped",
    "w1/w3 swapped": r"another tensor: B\[layers\.\d\.feed_forward\.w[13]\.weight\] == A\[layers\.\d\.feed_forward\.w[31]",
    "k/v swapped in the fused QKV": r"k and v swapped",
    "QKV fused as [Q; K; V] instead of group order": r"\[Q; K; V\] instead of",
    "square wo transposed": r"B == A\^T",
    "two layers swapped": r"another layer",
    "norm weight x 1.01": r"scaled: B == 1\.0",
    "lm_head dropped": r"missing tensor 'output\.weight'|output\.weight: only-a|untied but there is no",
    "LayerNorm biases dropped": r"bias: only-a|missing tensor '[^']*bias'",
    "rope_theta defaulted on export": r"rope_theta",
    "silent fp32 upcast": r": dtype\b",
    "Meta shards sorted lexicographically (12 shards)": r"blocks reordered|shard",
    "Llama-2 embedding merged on the vocab axis": r"wrong axis",
    "fused [up; gate] chunked across TP ranks": r"TP shards|blocks reordered",
    "vocab padding rows exported as tokens": r"padding",
    "pipeline-stage layer offset not applied": r"two pipeline stages|another layer",
    "head_dim assumed to be hidden / heads": r"head_dim|not \d+ heads x \d+",
    "norm eps defaulted on export": r"norm_eps",
}
for _m in CATALOGUE:
    _m.names = NAMES[_m.name]


@dataclass
class MutationOutcome:
    mutation: str
    bug_class: str
    converter: str
    model: str
    caught: bool
    caught_by: list
    details: list
    named: bool = False
    negative: bool = False  # a correct or functionally equivalent rewrite: must not be caught
    kinds: list = field(default_factory=list)  # typed finding kinds of the diff's mismatching tensors


def baseline_key(m: Mutation) -> tuple:
    """What makes two mutations share an unmutated baseline: converter, model, dtype and options."""
    return (m.converter, m.model, m.dtype, tuple(sorted(m.options.items())))


def run_mutations(work: Path, catalogue=None, baseline: bool = True) -> tuple[list[MutationOutcome], list]:
    """(outcomes, baseline checks). Baseline: every distinct (converter, model, dtype, options), unmutated
    (none when ``baseline`` is false: ``run_baseline`` checks one key alone)."""
    from ckdiff.golden.suite import check_converter
    catalogue = catalogue or CATALOGUE
    base = []
    for key in dict.fromkeys(baseline_key(m) for m in catalogue) if baseline else ():
        base += run_baseline(work, key)
    outcomes = []
    for i, m in enumerate(catalogue):
        checks = check_converter(m.converter, m.model, work / f"mut{i:02d}", m.dtype, m.options, faults=m.faults)
        red = [c for c in checks if not c.ok]
        outcomes.append(MutationOutcome(m.name, m.bug_class, m.converter, m.model, bool(red),
                                        [c.check for c in red], [f"{c.check}: {c.detail}" for c in red],
                                        named=bool(re.search(m.names, _findings(red)))))
    return outcomes, base


def run_baseline(work: Path, key: tuple) -> list:
    """The checks of one unmutated (converter, model, dtype, options) baseline: all must pass."""
    from ckdiff.golden.suite import check_converter
    conv, model, dtype, opts = key
    tag = "-".join([conv, model, dtype] + [f"{k}{v}" for k, v in opts])
    return check_converter(conv, model, work / "baseline" / tag, dtype, dict(opts))


# statuses with nothing to report about a mutation; a reordering passes a compare but is evidence here
SHOWN_AS_PASSING = {str(x.value) for x in OK - {Status.REORDERED}}


def _findings(checks) -> str:
    """Everything a reviewer reads about red checks: details, diagnoses, config differences, notes."""
    parts = []
    for c in checks:
        parts.append(c.detail)
        res = c.result or {}
        for t in res.get("tensors", []):
            if t.get("status") not in SHOWN_AS_PASSING:
                parts.append(f"{t['name']}: {t['status']}")
                parts += list(t.get("diagnosis") or [])
        parts += [f"{k}: {a} -> {b}" for k, a, b in res.get("config_diff", [])]
        parts += list(res.get("config_findings", [])) + list(res.get("notes", []))
    return "\n".join(parts)


def score(outcomes) -> float:
    pos = [o for o in outcomes if not o.negative]
    return sum(o.caught for o in pos) / max(1, len(pos))


def named_rate(outcomes) -> float:
    pos = [o for o in outcomes if not o.negative]
    return sum(o.caught and o.named for o in pos) / max(1, len(pos))


def false_positives(outcomes) -> list:
    return [o for o in outcomes if o.negative and o.caught]


# ---------------------------------------------------------------- checkpoint-level mutations
# Bugs (and correct rewrites) injected directly into a tiny model's HF tensors and config.json, for
# classes that no converter here can be patched to produce: each is judged by the diff and the logit
# check of the golden against the mutated copy, the way a reviewer would run ``ckdiff`` and
# ``ckdiff logits``.
@dataclass
class StateMutation:
    name: str
    bug_class: str
    model: str
    edit: Callable  # (state: dict[str, Tensor], config: dict, cfg: ModelConfig) -> None, in place
    names: str = ""  # regex the findings must match (for a negative: what its report must say)
    dtype: str = "float32"
    negative: bool = False
    target: Callable | None = None  # (golden hf dir, work dir) -> path: B built by a converter instead; or (A, B)
    kinds: tuple = ()  # typed finding kinds (compare/findings.py) the diff must report


def _L(i, k):
    return layouts.HF[k].format(i=i)


def _rope_v(st, c, cfg):
    from ckdiff.tensor.ops import rope_to_interleaved
    for i in range(cfg.layers):
        st[_L(i, "v")] = rope_to_interleaved(st[_L(i, "v")], cfg.kv_heads, cfg.head_dim)


def _rope_wo(st, c, cfg):
    from ckdiff.tensor.ops import rope_to_interleaved
    for i in range(cfg.layers):
        st[_L(i, "o")] = rope_to_interleaved(st[_L(i, "o")].T, cfg.heads, cfg.head_dim).T.contiguous()


def _rope_one_layer(st, c, cfg):
    from ckdiff.tensor.ops import rope_to_interleaved
    st[_L(0, "q")] = rope_to_interleaved(st[_L(0, "q")], cfg.heads, cfg.head_dim)
    st[_L(0, "k")] = rope_to_interleaved(st[_L(0, "k")], cfg.kv_heads, cfg.head_dim)


def _rope_granularity(st, c, cfg):
    from ckdiff.tensor.ops import rope_to_interleaved
    for i in range(cfg.layers):  # the whole projection treated as one head (halves of all rows paired)
        st[_L(i, "q")] = rope_to_interleaved(st[_L(i, "q")], 1, cfg.q_rows)


def _shard_perm(st, c, cfg):
    for i in range(cfg.layers):
        w = st[_L(i, "gate")]
        st[_L(i, "gate")] = torch.cat([p.flip(0) for p in w.chunk(2, 0)])


def _shard_transpose(st, c, cfg):
    for i in range(cfg.layers):
        w = st[_L(i, "o")]
        st[_L(i, "o")] = torch.cat([p.T.contiguous().reshape(p.shape) for p in w.chunk(2, 1)], 1)


def _shard_axis(st, c, cfg):
    for i in range(cfg.layers):
        w = st[_L(i, "down")]
        st[_L(i, "down")] = torch.cat(w.chunk(2, 1), 0).reshape(w.shape).contiguous()


def _shard_reverse(st, c, cfg):
    for i in range(cfg.layers):
        w = st[_L(i, "up")]
        st[_L(i, "up")] = torch.cat(list(reversed(w.chunk(4, 0))))


def _swap_norms(st, c, cfg):
    a, b = _L(1, "attn_norm"), _L(1, "mlp_norm")
    st[a], st[b] = st[b], st[a]


def _head_zeroed(st, c, cfg):
    w = st[_L(0, "q")].clone()
    w[3 * cfg.head_dim:4 * cfg.head_dim] = 0
    st[_L(0, "q")] = w


def _head_replaced(st, c, cfg):
    w = st[_L(1, "q")].clone()
    w[5 * cfg.head_dim:6 * cfg.head_dim] = w[2 * cfg.head_dim:3 * cfg.head_dim]
    st[_L(1, "q")] = w


def _one_element(st, c, cfg):
    w = st[_L(0, "o")].clone()
    w[3, 7] += 0.5
    st[_L(0, "o")] = w


def _overflow(st, c, cfg):
    w = st[layouts.HF["embed"]].clone()
    w[7, 3], w[42, 0], w[42, 1] = float("inf"), float("-inf"), float("inf")
    st[layouts.HF["embed"]] = w


def _each_layer(key, fn):
    def edit(st, c, cfg):
        for i in range(cfg.layers):
            st[_L(i, key)] = fn(st[_L(i, key)])
    return edit


def _mlp_units(st, c, cfg):
    perm = torch.randperm(cfg.ffn, generator=torch.Generator().manual_seed(5))
    for i in range(cfg.layers):
        st[_L(i, "gate")], st[_L(i, "up")] = st[_L(i, "gate")][perm], st[_L(i, "up")][perm]
        st[_L(i, "down")] = st[_L(i, "down")][:, perm].contiguous()


def _heads_reordered(st, c, cfg):
    r, hd = cfg.heads // cfg.kv_heads, cfg.head_dim
    kv = list(reversed(range(cfg.kv_heads)))  # KV heads reversed; each keeps its own query group
    qh = [g * r + j for g in kv for j in reversed(range(r))]  # and the heads inside each group reversed
    rows = lambda heads: torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])  # noqa: E731
    for i in range(cfg.layers):
        st[_L(i, "q")] = st[_L(i, "q")][rows(qh)]
        st[_L(i, "k")], st[_L(i, "v")] = st[_L(i, "k")][rows(kv)], st[_L(i, "v")][rows(kv)]
        st[_L(i, "o")] = st[_L(i, "o")][:, rows(qh)].contiguous()


def _cfg(**kv):
    def edit(st, c, cfg):
        for k, v in kv.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
    return edit


def _v5_spelling(st, c, cfg):
    c["rope_parameters"] = {"rope_type": "default", "rope_theta": c.pop("rope_theta")}
    c["dtype"] = c.pop("torch_dtype")
    c.update(use_cache=True, attention_dropout=0.0, initializer_range=0.02, pretraining_tp=1,
             transformers_version="5.0.0", num_key_value_heads=c["num_key_value_heads"])


def _cast_bf16(st, c, cfg):
    for k in st:
        st[k] = st[k].to(torch.bfloat16)
    c["torch_dtype"] = "bfloat16"


def _megatron_padded(gold, work):
    from ckdiff.golden.suite import convert
    return convert("hf-to-megatron", gold, work / "megatron-pad128", {"pad": 128, "tp": 2})


def _quantized(qtype: str, edit: Callable):
    """B: the golden HF model converted to quantized JetStream, then ``edit(tensors, hf_state)`` applied."""
    def target(gold, work):
        from ckdiff.formats.readers import open_checkpoint
        from ckdiff.io.safetensors import write_safetensors
        from ckdiff.golden.models import lazy
        from ckdiff.golden.suite import convert
        out = convert("to-jetstream", gold, work, {"quantize": qtype})
        ck = open_checkpoint(str(out), stored=True)
        st = {k: t.load().clone() for k, t in ck.tensors.items()}
        hf = {k: t.load() for k, t in open_checkpoint(str(gold)).tensors.items()}
        edit(st, hf)
        f = out / "model.safetensors"
        tmp = out / "model.safetensors.tmp"
        write_safetensors(tmp, lazy({k: v.contiguous() for k, v in st.items()}).values())
        tmp.replace(f)
        return out
    return target


def _q_shift(st, hf):
    k = "layers.0.feed_forward.w1.weight_scaler"
    st[k] = torch.roll(st[k], 1, 0)


def _q_swap(st, hf):
    a, b = "layers.1.feed_forward.w1.weight_scaler", "layers.1.feed_forward.w3.weight_scaler"
    st[a], st[b] = st[b], st[a]


def _q_unsigned(st, hf):
    k = "layers.0.feed_forward.w2.weight"
    st[k] = (st[k].to(torch.int16) & 15).to(torch.int8)


def _q_block_axis(st, hf):
    from ckdiff.formats.jetstream_quant import quantize
    q, s = quantize(hf[_L(1, "o")].float().T.contiguous(), 4, True)  # blocks over the output axis
    st["layers.1.attention.wo.weight"], st["layers.1.attention.wo.weight_scaler"] = q, s


def _gguf_edit(layout: str, tensor: str, edit: Callable):
    """B: the golden model written as GGUF ``layout`` by the gguf package, then the stored blocks of
    ``tensor`` edited in place the way a broken writer would leave them: ``edit(blocks)`` gets the
    tensor's bytes as [rows, blocks, bytes per block] (uint8, writable)."""
    def target(gold, work):
        import gguf
        import numpy as np

        from ckdiff.golden.emit import emit
        out = emit(work, "llama-gqa", layout)
        rt = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == tensor)
        bs = {"Q8_0": 34, "Q4_0": 18}[rt.tensor_type.name]
        data = np.memmap(out, dtype=np.uint8, mode="r+", offset=int(rt.data_offset), shape=(int(rt.n_bytes),))
        rows = int(rt.shape[-1])
        edit(data.reshape(rows, -1, bs))
        data.flush()
        del data
        return out
    return target


def _d(blocks):
    """The fp16 block scales ``d`` of [rows, blocks, bytes] Q8_0/Q4_0 bytes, as a writable float16 view."""
    import numpy as np
    return blocks[:, :, :2].copy().view(np.float16)


def _set_d(blocks, d):
    import numpy as np
    blocks[:, :, :2] = np.ascontiguousarray(d).view(np.uint8).reshape(blocks.shape[0], blocks.shape[1], 2)


def _zero_block_scale(blocks):
    d = _d(blocks)
    d[3, 1] = 0
    _set_d(blocks, d)


def _double_block_scales(blocks):
    d = _d(blocks)
    d[2:6] *= 2
    _set_d(blocks, d)


def _swap_nibbles(blocks):
    q = blocks[:, :, 2:].copy()
    blocks[:, :, 2:] = (q << 4) | (q >> 4)


def _fp8(edit: Callable, key: str = "down"):
    """B: the golden HF model with every linear weight written as FP8 with 128x128 block scales (DeepSeek-V3's
    ``weight_quant`` rule, ``formats/fp8.py`` ``fp8_quantize``; no CPU tool writes this layout), then
    ``edit(tensors, name)`` applied to one weight's codes and scales."""
    def target(gold, work):
        from ckdiff.formats.readers import open_checkpoint
        from ckdiff.formats.fp8 import fp8_quantize
        from ckdiff.io.writers import atomic_dir, write_hf
        import json
        from ckdiff.golden.models import lazy
        ck = open_checkpoint(str(gold))
        out = {}
        for k, t in ck.tensors.items():
            v = t.load()
            if v.dim() == 2 and "embed" not in k and "lm_head" not in k:
                out[k], out[k + "_scale_inv"] = fp8_quantize(v)
            else:
                out[k] = v
        edit(out, _L(1, key))
        config = json.loads((gold / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
        with atomic_dir(work, overwrite=True) as tmp:
            write_hf(tmp, lazy(out), config)
        return work
    return target


def _fp8_reciprocal(st, k):
    st[k + "_scale_inv"] = 1 / st[k + "_scale_inv"]


def _fp8_transposed(st, k):
    st[k + "_scale_inv"] = st[k + "_scale_inv"].T.contiguous()


def _fp8_stale(st, k):
    """Codes of the current weight stored with the scales of an earlier version of it (before an update)."""
    from ckdiff.formats.fp8 import fp8_quantize
    w = (st[k].float() * st[k + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)[
        :st[k].shape[0], :st[k].shape[1]])
    g = torch.Generator().manual_seed(7)
    _, old = fp8_quantize(w * (1 + 0.3 * torch.rand(w.shape, generator=g)))
    st[k + "_scale_inv"] = old


def _fp8_read_as(read: str):
    """(A, B): A the golden HF model written as FP8 (``_fp8``), B the float checkpoint a converter dequantizing
    A with its e4m3 codes decoded as ``read`` writes (weights times their block scales; NaN and inf where an
    e4m3 byte is not a finite e5m2 value)."""
    def target(gold, work):
        import json
        from ckdiff.formats.readers import open_checkpoint
        from ckdiff.golden.models import lazy
        from ckdiff.io.writers import atomic_dir, write_hf
        a = _fp8(lambda st, k: None)(gold, work / "fp8")
        st = {k: t.load() for k, t in open_checkpoint(str(a), stored=True).tensors.items()}
        out = {}
        for k, v in st.items():
            if k.endswith("_scale_inv"):
                continue
            if k + "_scale_inv" in st:
                s = st[k + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)[:v.shape[0], :v.shape[1]]
                v = v.view(getattr(torch, f"float8_{read}")).float() * s
            out[k] = v
        config = json.loads((gold / "config.json").read_text())
        with atomic_dir(work / "float", overwrite=True) as tmp:
            write_hf(tmp, lazy(out), config)
        return a, work / "float"
    return target


def _mxfp4_read_as(how: str):
    """(A, B): A the golden GPT-OSS model with its experts written as MXFP4 (the OCP quantizer of
    tests/test_encoding_mxfp4.py, whose layout that file checks against transformers' dequantizer), B the bf16
    checkpoint a converter reading A ``how`` writes (``_misread_float`` there: ``row64``, a 64-element block
    hard-coded; ``fp8``, each byte one e4m3 value)."""
    def target(gold, work):
        from ckdiff.formats.readers import open_checkpoint
        from test_encoding_mxfp4 import _misread_float, write_mxfp4
        state = {k: t.load() for k, t in open_checkpoint(str(gold)).tensors.items()}
        work.mkdir(parents=True, exist_ok=True)
        a = write_mxfp4(work / "mxfp4", gold, state)
        return a, _misread_float(work, a, how)
    return target


def _mlx_zero_points(gold, work):
    """(A, B): A mlx-lm's 4-bit groups of 32 of the golden model with one head of layer 0's q_proj pruned (its rows
    zero: groups whose zero point is 0), B the float checkpoint of a converter that keeps each group's zero point
    in 4 unsigned bits with GPTQ's ``z - 1`` offset, so 0 comes back as 15 (``_zero_point_float`` of
    tests/test_encoding_mlx.py)."""
    import shutil
    from mlx_lm import utils as mlx_lm_utils
    from safetensors.torch import load_file, save_file
    from test_encoding_mlx import _zero_point_float
    work.mkdir(parents=True, exist_ok=True)
    pruned = work / "pruned"
    shutil.copytree(gold, pruned, dirs_exist_ok=True)
    for f in pruned.glob("*.safetensors"):
        st = load_file(str(f))
        if _L(0, "q") in st:
            st[_L(0, "q")][16:32] = 0
            save_file(st, str(f), metadata={"format": "pt"})
    m, c = mlx_lm_utils.load_model(pruned)
    m, c = mlx_lm_utils.quantize_model(m, c, 32, 4)
    a = work / "mlx"
    a.mkdir(exist_ok=True)
    mlx_lm_utils.save_model(a, m)
    mlx_lm_utils.save_config(c, a / "config.json")
    return a, _zero_point_float(work, a, "offset")


def _converted_without(converter: str, options: dict, drop: Callable, both: bool = False):
    """B: the golden HF model converted by ``converter`` (ckdiff's, with ``options``), then one tensor taken
    out of what it wrote, the way a converter that skips one leaves it: ``drop(out)`` edits the files.
    With ``both``, (A, B) = (the conversion as written, the golden HF model with ``drop`` applied to it):
    the HF side is then the one mapped (into the converted layout) and the one lacking a tensor."""
    def target(gold, work):
        from ckdiff.golden.suite import convert
        out = convert(converter, gold, work / converter, options)
        if not both:
            drop(out)
            return out
        hf = work / "hf-dropped"
        shutil.copytree(gold, hf, dirs_exist_ok=True)
        drop(hf)
        return out, hf
    return target


def _safetensors_without(key: str):
    def drop(d):
        from safetensors.torch import load_file, save_file
        for f in d.glob("*.safetensors"):
            st = load_file(str(f))
            if key in st:
                del st[key]
                save_file(st, str(f), metadata={"format": "pt"})
    return drop


def _megatron_rank_without(key: str, ranks: str = "*"):
    """A Megatron-LLM rank file (``ranks``: a glob of rank directories) saved without ``key`` (legacy names,
    as the rank files hold them), by torch.save as Megatron-LLM saves them."""
    def drop(d):
        for f in sorted(d.glob(f"release/{ranks}/model_optim_rng.pt")):
            obj = torch.load(f, weights_only=False)
            del obj["model"]["language_model"]["transformer"][key]
            torch.save(obj, f)
    return drop


def _ct_read_as(scheme: str, how: str):
    """(A, B): A the golden model written by compressed-tensors itself (tests/producers/ct_save.py: its
    ``calculate_qparams`` and ``ModelCompressor``) in ``scheme``, B the float checkpoint a converter decoding A
    ``how`` writes (``_ct_float`` of tests/test_misreadings_ct_gguf.py, on compressed-tensors' own
    ``unpack_from_int32`` / ``dequantize``)."""
    def target(gold, work):
        from producers import HERE, launch
        from test_misreadings_ct_gguf import _ct_float
        work.mkdir(parents=True, exist_ok=True)
        launch(HERE / "ct_save.py", 1, gold, work, scheme)
        return work / scheme, _ct_float(work / scheme, work / how, how)[0]
    return target


def _gguf_read_as(qtype: str, how: str):
    """(A, B): A the golden model written as GGUF ``qtype`` by the gguf package (its quantizer and GGUFWriter), B
    the HF checkpoint a converter dequantizing A ``how`` writes (``_gguf_float`` of
    tests/test_misreadings_ct_gguf.py, on gguf-py's own ``quants.dequantize``)."""
    def target(gold, work):
        from ckdiff.golden.emit import emit
        from ckdiff.golden.models import tiny_config
        from test_misreadings_ct_gguf import _gguf_float
        a = emit(work / "gguf", "llama-gqa", f"gguf-{qtype}")
        return a, _gguf_float(a, gold, work / how, tiny_config("llama-gqa"), how)[0]
    return target


def _head_is_embedding(st, c, cfg):
    st[layouts.HF["head"]] = st[layouts.HF["embed"]].clone()


def _mixed_kinds(st, c, cfg):
    st[_L(1, "gate")] = st[_L(0, "up")].clone()


STATE_CATALOGUE = [
    StateMutation("input and post-attention norms swapped in a layer", "Tensor equals another", "llama-gqa",
                  _swap_norms, r"another tensor: B\[model\.layers\.1\.\w+_layernorm\.weight\] == A\[model\.layers\.1\."),
    StateMutation("untied head replaced by the embedding", "Tied embeddings", "llama-gqa", _head_is_embedding,
                  r"untied output head was replaced by the embedding"),
    StateMutation("a tensor replaced by another kind from another layer", "Tensor equals another", "llama-gqa",
                  _mixed_kinds, r"another tensor: B\[model\.layers\.1\.mlp\.gate_proj\.weight\] == A\[model\.layers\.0\.mlp\.up_proj"),
    StateMutation("norm stored as w - 1", "Norm convention", "llama-gqa", _each_layer("attn_norm", lambda w: w - 1),
                  r"offset: B == A - 1\b.*norm weight convention"),
    StateMutation("norm stored as 1 + w", "Norm convention", "llama-gqa", _each_layer("mlp_norm", lambda w: w + 1),
                  r"offset: B == A \+ 1\b"),
    StateMutation("norm weight x 1.001", "Constant scale", "llama-gqa", _each_layer("mlp_norm", lambda w: w * 1.001),
                  r"scaled: B == 1\.001 \* A"),
    StateMutation("one head's rows zeroed", "Head rows", "llama-gqa", _head_zeroed, r"head's rows zeroed: head 3 of 8"),
    StateMutation("one head's rows replaced by another head", "Head rows", "llama-gqa", _head_replaced,
                  r"head's rows replaced: head 5 of 8 .* holds A's head 2"),
    StateMutation("one element changed", "One element", "llama-gqa", _one_element,
                  r"one element changed at \[3, 7\].*isolated"),
    StateMutation("rows permuted inside each TP shard", "TP shard merge", "llama-gqa", _shard_perm,
                  r"permuted inside each of 2 equal blocks"),
    StateMutation("each TP shard transposed", "TP shard merge", "llama-gqa", _shard_transpose,
                  r"each TP shard transposed"),
    StateMutation("TP shards concatenated on the wrong axis and reshaped", "TP shard merge", "llama-gqa", _shard_axis,
                  r"concatenated on the wrong axis"),
    StateMutation("TP shard order reversed", "TP shard merge", "llama-gqa", _shard_reverse, r"shard order reversed"),
    StateMutation("rotary permutation applied to v", "Rotary permutation", "llama-gqa", _rope_v,
                  r"rotary permutation.*wrong tensor"),
    StateMutation("rotary permutation applied to wo columns", "Rotary permutation", "llama-gqa", _rope_wo,
                  r"columns: rotary permutation.*wrong tensor"),
    StateMutation("rotary permutation at the wrong granularity", "Rotary permutation", "llama-gqa", _rope_granularity,
                  r"rotary permutation.* 1 heads x 64"),
    StateMutation("rotary permutation in some layers only", "Rotary permutation", "llama-gqa", _rope_one_layer,
                  r"rotary permutation in some layers only"),
    StateMutation("overflow in a 16-bit staging cast", "Overflow", "llama-gqa", _overflow,
                  r"overflow: 3 element\(s\) are \+-Inf in B"),
    StateMutation("rope_theta changed", "Config only", "llama-gqa", _cfg(rope_theta=500000.0), r"rope_theta"),
    StateMutation("rope scaling added", "Config only", "llama-gqa",
                  _cfg(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"rope_scaling"),
    StateMutation("norm eps changed", "Config only", "llama-gqa", _cfg(rms_norm_eps=1e-6), r"norm_eps"),
    StateMutation("tie flag set on an untied model", "Config only", "llama-gqa", _cfg(tie_word_embeddings=True),
                  r"tied"),
    StateMutation("sliding window dropped", "Config only", "mistral-gqa", _cfg(sliding_window=None),
                  r"sliding_window"),
    StateMutation("activation changed", "Config only", "llama-gqa", _cfg(hidden_act="gelu"), r"activation"),
    StateMutation("KV head count wrong in the config", "Config only", "llama-gqa", _cfg(num_key_value_heads=4),
                  r"kv_heads|KV head count"),
    StateMutation("vocab size wrong in the config", "Config only", "llama-gqa", _cfg(vocab_size=128),
                  r"vocab"),
    StateMutation("BOS id changed", "Config only", "llama-gqa", _cfg(bos_token_id=0), r"bos_token_id"),
    StateMutation("int8 scales off by one row", "Quantization", "llama-gqa", None,
                  r"scales off by one row", target=_quantized("int8_per_channel", _q_shift), kinds=("scale-shifted",)),
    StateMutation("two tensors' scales swapped", "Quantization", "llama-gqa", None,
                  r"scales swapped: layers\.1\.feed_forward\.w[13]\.weight holds the int8 per channel scales of "
                  r"layers\.1\.feed_forward\.w[31]", target=_quantized("int8_per_channel", _q_swap),
                  kinds=("scale-swapped",)),
    StateMutation("int4 codes not sign-extended", "Quantization", "llama-blockwise", None,
                  r"int4 codes not sign-extended", target=_quantized("int4_blockwise", _q_unsigned),
                  kinds=("int4-unsigned",)),
    StateMutation("int4 blocks along the wrong axis", "Quantization", "llama-blockwise", None,
                  r"blocks along the wrong axis", target=_quantized("int4_blockwise", _q_block_axis),
                  kinds=("blocks-wrong-axis",)),
    StateMutation("GGUF Q8_0 block scale zeroed", "Quantization scales", "llama-gqa", None, r"block scale zeroed",
                  target=_gguf_edit("gguf-Q8_0", "blk.1.ffn_down.weight", _zero_block_scale),
                  kinds=("scale-zeroed",)),
    StateMutation("GGUF Q4_0 block scales doubled", "Quantization scales", "llama-gqa", None,
                  r"block scale multiplied by 2", target=_gguf_edit("gguf-Q4_0", "blk.1.ffn_down.weight",
                                                                    _double_block_scales),
                  kinds=("scale-multiplied",)),
    StateMutation("GGUF Q8_0 block scales doubled", "Quantization scales", "llama-gqa", None,
                  r"block scale multiplied by 2", target=_gguf_edit("gguf-Q8_0", "blk.0.ffn_up.weight",
                                                                    _double_block_scales),
                  kinds=("scale-multiplied",)),
    StateMutation("GGUF Q4_0 nibble order swapped", "Quantization codes", "llama-gqa", None, r"nibble order swapped",
                  target=_gguf_edit("gguf-Q4_0", "blk.1.ffn_down.weight", _swap_nibbles), kinds=("nibbles-swapped",)),
    StateMutation("GGUF Q4_0 block scale zeroed", "Quantization scales", "llama-gqa", None, r"block scale zeroed",
                  target=_gguf_edit("gguf-Q4_0", "blk.0.ffn_gate.weight", _zero_block_scale),
                  kinds=("scale-zeroed",)),
    StateMutation("FP8 scales stored as their reciprocal", "Quantization scales", "llama-blockwise", None,
                  r"reciprocal scales", target=_fp8(_fp8_reciprocal), kinds=("scale-reciprocal",)),
    StateMutation("FP8 scale grid transposed", "Quantization scales", "llama-blockwise", None,
                  r"scale grid transposed", target=_fp8(_fp8_transposed, "q"), kinds=("scale-transposed",)),
    StateMutation("FP8 stale scales (of the weight before an update)", "Quantization scales", "llama-blockwise",
                  None, r"stale scales", target=_fp8(_fp8_stale), kinds=("scale-stale",)),
    StateMutation("FP8 e4m3 codes dequantized as e5m2", "Quantization codes", "llama-blockwise", None,
                  r"codes decoded as another encoding: the float side reads the float8_e4m3fn block 128x128 codes "
                  r"\(FP8 e4m3\) as FP8 e5m2", target=_fp8_read_as("e5m2"), kinds=("codes-of-another-encoding",)),
    StateMutation("MXFP4 dequantized with 64-element blocks", "Quantization scales", "gpt-oss", None,
                  r"wrong block size: the float side applies each MXFP4 e2m1, e8m0 per 32 scale to 64 elements",
                  target=_mxfp4_read_as("row64"), kinds=("block-size-wrong",)),
    StateMutation("MXFP4 bytes dequantized as FP8 (one value per byte)", "Quantization codes", "gpt-oss", None,
                  r"codes decoded as another encoding: .* as FP8 e4m3, one per byte",
                  target=_mxfp4_read_as("fp8"), kinds=("codes-of-another-encoding",)),
    StateMutation("MLX zero point 0 wrapped to 15 (z - 1 packed in 4 bits)", "Quantization zero points", "llama-gqa",
                  None, r"zero point 0 read as 15", target=_mlx_zero_points, kinds=("zero-point-underflow",)),
    # a converter that dropped one tensor, compared across layouts: the mapping goes on without it and names it
    StateMutation("JetStream converter dropped one layer's wq", "Dropped tensor across layouts", "llama-gqa", None,
                  r"missing in B: layers\.1\.attention\.wq\.weight \(the mapping needs it for "
                  r"model\.layers\.1\.self_attn\.q_proj\.weight",
                  target=_converted_without("to-jetstream", {}, _safetensors_without("layers.1.attention.wq.weight"))),
    StateMutation("Megatron-LLM TP rank file lacks one tensor", "Dropped tensor across layouts", "llama-gqa", None,
                  r"mp_rank_01/model_optim_rng\.pt lacks language_model\.encoder\.layers\.1\.self_attention\."
                  r"query_key_value\.weight(.|\n)*missing in B: language_model\.encoder\.layers\.1\.self_attention\."
                  r"query_key_value\.weight \(the mapping needs it for model\.layers\.1\.self_attn\.k_proj",
                  target=_converted_without("hf-to-megatron", {"tp": 2}, _megatron_rank_without(
                      "layers.1.attention.query_key_value.weight", "mp_rank_01"))),
    StateMutation("Megatron-LLM converter dropped one tensor on every rank", "Dropped tensor across layouts",
                  "llama-gqa", None, r"missing in B: language_model\.encoder\.layers\.0\.mlp\.dense_4h_to_h\.weight "
                  r"\(the mapping needs it for model\.layers\.0\.mlp\.down_proj\.weight",
                  target=_converted_without("hf-to-megatron", {"tp": 2}, _megatron_rank_without(
                      "layers.0.mlp.dense_4h_to_h.weight"))),
    StateMutation("HF export dropped k_proj, against its Megatron-LLM source (fused QKV)",
                  "Dropped tensor across layouts", "llama-gqa", None,
                  r"missing in B: model\.layers\.0\.self_attn\.k_proj\.weight \(the mapping needs it for "
                  r"language_model\.encoder\.layers\.0\.self_attention\.query_key_value\.weight",
                  target=_converted_without("hf-to-megatron", {}, _safetensors_without(
                      "model.layers.0.self_attn.k_proj.weight"), both=True)),
    StateMutation("compressed-tensors int4 read without the +8 field offset", "Quantization codes", "llama-gqa",
                  None, r"code offset wrong: the float side reads the compressed-tensors int4 group 32 codes as "
                  r"their stored fields", target=_ct_read_as("int4-group", "offset-forgotten"),
                  kinds=("code-offset-wrong",)),
    StateMutation("compressed-tensors int4 zero point added instead of subtracted", "Quantization zero points",
                  "llama-gqa", None, r"offset with the wrong sign: the float side adds each group's zero point",
                  target=_ct_read_as("int4-group-zp", "zp-sign"), kinds=("offset-sign-wrong",)),
    StateMutation("GGUF Q4_0 nibbles read as interleaved pairs", "Quantization codes", "llama-gqa", None,
                  r"nibble order read as interleaved: the float side places the two Q4_0 codes",
                  target=_gguf_read_as("Q4_0", "interleaved"), kinds=("nibbles-interleaved",)),
    StateMutation("GGUF Q8_0 block scales decoded as bfloat16", "Quantization scales", "llama-gqa", None,
                  r"scales decoded as another format: the float side reads the Q8_0 block scales \(fp16 d\) as "
                  r"bfloat16", target=_gguf_read_as("Q8_0", "bf16"), kinds=("scale-of-another-encoding",)),
    # negatives: correct conversions and functionally equivalent rewrites
    StateMutation("compressed-tensors int4 dequantized right", "negative", "llama-gqa", None, negative=True,
                  target=_ct_read_as("int4-group-zp", "right")),
    StateMutation("GGUF Q4_0 dequantized right", "negative", "llama-gqa", None, negative=True,
                  target=_gguf_read_as("Q4_0", "right")),
    StateMutation("MXFP4 dequantized right", "negative", "gpt-oss", None, negative=True,
                  target=_mxfp4_read_as("right")),
    StateMutation("FP8 dequantized right (e4m3 codes times their block scales)", "negative", "llama-blockwise", None,
                  negative=True, target=_fp8_read_as("e4m3fn")),
    StateMutation("config in transformers v5 spelling with explicit defaults", "negative", "llama-gqa", _v5_spelling,
                  negative=True),
    StateMutation("plain fp32 -> bf16 cast", "negative", "llama-gqa", _cast_bf16, negative=True),
    StateMutation("MLP hidden units permuted consistently", "negative", "llama-gqa", _mlp_units,
                  r"equivalent reordering: MLP hidden units", negative=True),
    StateMutation("attention heads reordered consistently", "negative", "llama-gqa", _heads_reordered,
                  r"equivalent reordering: attention heads", negative=True),
    StateMutation("int4 blockwise quantization, unmutated", "negative", "llama-blockwise", None, negative=True,
                  target=_quantized("int4_blockwise", lambda st, hf: None)),
    StateMutation("hf-to-megatron --make-vocab-size-divisible-by 128 vs its HF source", "negative", "llama-gqa",
                  lambda st, c, cfg: None, r"vocab padding from its config stripped", negative=True,
                  target=_megatron_padded),
]


def run_state_mutations(work: Path, catalogue=None, first: int = 0) -> list[MutationOutcome]:
    """Each entry: golden HF model vs its mutated copy, through ``ckdiff`` (diff) and ``ckdiff logits``.
    Entry ``i`` is built in ``work/state{first + i}`` (the goldens in ``work`` are shared)."""
    import json

    from ckdiff.compare.diff import compare_checkpoints
    from ckdiff.compare.logits import compare_logits, cross_check_notes
    from ckdiff.golden.suite import logits_ok
    from ckdiff.formats.readers import open_checkpoint
    from ckdiff.io.writers import atomic_dir, write_hf
    from ckdiff.errors import CkdiffError
    from ckdiff.golden.emit import emit
    from ckdiff.golden.models import hf_state, lazy, tiny_config
    from ckdiff.golden.suite import CheckResult
    outcomes = []
    for i, m in enumerate(catalogue or STATE_CATALOGUE, start=first):
        gold = work / f"gold-{m.model}-{m.dtype}"
        if not gold.exists():
            emit(gold, m.model, "hf", m.dtype)
        if m.target:
            mut = m.target(gold, work / f"state{i:02d}")
        else:
            cfg = tiny_config(m.model, m.dtype)
            state = hf_state(cfg)
            config = json.loads((gold / "config.json").read_text())
            m.edit(state, config, cfg)
            mut = work / f"state{i:02d}"
            with atomic_dir(mut, overwrite=True) as tmp:
                write_hf(tmp, lazy({k: v.contiguous() for k, v in state.items()}), config)
        checks = []
        base = gold
        if isinstance(mut, tuple):  # (A, B): A built from the golden model too (an encoding of it)
            base, mut = mut
        a, b = open_checkpoint(str(base)), open_checkpoint(str(mut))
        res = compare_checkpoints(a, b)
        try:
            lr = compare_logits(a, b, batch=2, length=40)
        except (CkdiffError, ValueError, RuntimeError, KeyError, IndexError) as e:
            lr = None
            checks.append(CheckResult("ckdiff logits", m.model, "logits", False, f"error: {str(e)[:200]}"))
        cross_check_notes(res, lr)
        checks.append(CheckResult("ckdiff", m.model, "diff", res.equivalent, _diff_summary(res), res.to_dict()))
        if lr is not None:
            checks.append(CheckResult("ckdiff logits", m.model, "logits", logits_ok(lr), lr.summary(), lr.to_dict()))
        red = [c for c in checks if c.ok is False]  # an inconclusive logit check (None) catches nothing
        text = _findings(red if not m.negative else checks)
        kinds = sorted({f["kind"] for t in res.tensors if not t.ok for f in t.findings})
        named = bool(re.search(m.names, text)) if m.names else not red
        outcomes.append(MutationOutcome(m.name, m.bug_class, "ckdiff", m.model, bool(red), [c.check for c in red],
                                        [f"{c.check}: {c.detail}" for c in (red or checks)],
                                        named=named and set(m.kinds) <= set(kinds), negative=m.negative,
                                        kinds=kinds))
    return outcomes


def _diff_summary(res) -> str:
    bad = [t for t in res.worst_first() if not t.ok][:3]
    parts = [f"{t.name}: {t.status}" + (f" ({t.diagnosis[0]})" if t.diagnosis else "") for t in bad]
    parts += [f"config {k}: {a} -> {b}" for k, a, b in res.config_diff]
    parts += list(res.config_findings)
    return ", ".join(parts) or f"{len(res.tensors)} tensors, {res.counts_text()}"


# ---------------------------------------------------------------- format mutations (DCP, Megatron-Core, GGUF, FP8)
# Bugs injected into the writers of the formats people convert today (Megatron-Core torch_dist via
# torch DCP, GGUF via the gguf package): the tiny model is written with the bug, then compared with
# its HF golden the way a user runs ``ckdiff hf/ ckpt``. A bug counts as caught when the comparison
# is not equivalent or the reader refuses the checkpoint with one line.
@dataclass
class FormatMutation:
    name: str
    bug_class: str
    layout: str  # golden/emit.py layout: mcore, gguf-Q8_0, ...
    model: str
    faults: Faults  # handed to the format's writer (its ``faults`` parameter) while the checkpoint is written
    names: str = ""


def _table_fault(transform) -> Faults:
    """The writer's conversion table passes through ``transform(rules, cfg)``."""
    return Faults(rules=lambda layout, cfg, rules: transform(rules, cfg))


@dataclass(frozen=True)
class _LlamaCppPermute:
    """llama.cpp's reshape ``[n, 2, rows/n/2]`` with a given n (the bug: n = H for k)."""
    n: int
    rowwise = True

    def __call__(self, xs):
        w = xs[0]
        return [w.reshape(self.n, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)]

    def reverse(self):
        return self

    def describe(self):
        return f"llama.cpp permute n={self.n}"


def _k_with_h(rules, cfg):
    return [Rule(r.src, r.dst, _LlamaCppPermute(cfg.heads)) if r.dst == ("blk.{i}.attn_k.weight",) else r
            for r in rules]


def _fc1_up_gate(rules, cfg):
    return [Rule(r.src[::-1], r.dst, r.op) if len(r.src) == 2 and isinstance(r.op, Concat) else r for r in rules]


def _drop_last_expert(state, step):
    out = dict(state)
    k = "decoder.layers.mlp.experts.linear_fc2.weight"
    out[k] = out[k][:, :-1].clone()
    return out


FORMAT_CATALOGUE = [
    FormatMutation("GGUF k permuted with the query head count", "GQA grouping", "gguf-Q8_0", "llama-gqa",
                   _table_fault(_k_with_h), r"attn_k\.weight|k_proj"),
    FormatMutation("GGUF q/k not permuted", "Rotary permutation", "gguf-F16", "llama-gqa",
                   _table_fault(_rope(lambda o, cfg: Identity())),
                   r"attn_[qk]\.weight|self_attn\.[qk]_proj"),
    FormatMutation("mcore linear_fc1 written [up; gate]", "Fused GLU order", "mcore", "llama-gqa",
                   _table_fault(_fc1_up_gate), r"(gate|up)_proj"),
    FormatMutation("mcore QKV fused as [Q; K; V]", "Fused QKV order", "mcore", "llama-gqa",
                   _table_fault(_map(lambda o, cfg: Concat((cfg.q_rows, cfg.kv_rows, cfg.kv_rows))
                                                            if isinstance(o, FuseQKV) else o)), r"[qkv]_proj"),
    FormatMutation("mcore MoE expert dropped", "Dropped tensors (MoE experts)", "mcore", "mixtral",
                   Faults(output=_drop_last_expert), r"expert"),
]


def run_format_mutations(work: Path, catalogue=None) -> tuple[list[MutationOutcome], list]:
    """(outcomes, baseline outcomes): each mutation written and compared with its HF golden; the
    unmutated baseline of every (layout, model) must compare equivalent."""
    from ckdiff.compare.diff import compare_checkpoints
    from ckdiff.formats.readers import open_checkpoint
    from ckdiff.errors import CkdiffError
    from ckdiff.golden.emit import emit
    catalogue = catalogue or FORMAT_CATALOGUE

    def judge(model, path):
        gold = work / f"hf-{model}"
        if not gold.exists():
            emit(gold, model, "hf")
        try:
            res = compare_checkpoints(open_checkpoint(str(gold)), open_checkpoint(str(path)))
        except CkdiffError as e:
            return True, [f"refused: {e}"]
        d = res.to_dict()
        found = [f"{t['name']}: {t['status']}" for t in d["tensors"] if t["status"] not in SHOWN_AS_PASSING]
        return not res.equivalent, found + d["notes"] + [f"{k}: {a} -> {b}" for k, a, b in d["config_diff"]]
    baseline = []
    for layout, model in sorted({(m.layout, m.model) for m in catalogue}):
        red, found = judge(model, emit(work / f"base-{layout}-{model}", model, layout))
        baseline.append(MutationOutcome("baseline", "", layout, model, red, [], found, negative=True))
    outcomes = []
    for i, m in enumerate(catalogue):
        out = emit(work / f"fmut{i:02d}", m.model, m.layout, faults=m.faults)
        red, found = judge(m.model, out)
        outcomes.append(MutationOutcome(m.name, m.bug_class, m.layout, m.model, red, ["diff"] if red else [],
                                        found, named=bool(re.search(m.names, "\n".join(found)))))
    return outcomes, baseline


# ---------------------------------------------------------------- the families' own bug classes
# Each judged like the entries above (golden HF model vs its mutated copy, diff and logits); the cause
# must be named by a finding the family's declaration gives (ckdiff/models/families/: ``dropped`` roles, the
# family's ``diagnose`` hook, the MTP config finding) or by the generic diagnoses.
def _fam_key(cfg, slot: str, **ix) -> str:
    from ckdiff.models import families
    return families.family(cfg.family).hf_names[slot].format(**ix)


def _fam_drop(*slots):
    def edit(st, c, cfg):
        for k in [k for k in st if any(re.fullmatch(_slot_re(cfg, s), k) for s in slots)]:
            del st[k]
    return edit


def _slot_re(cfg, slot: str) -> str:
    from ckdiff.models import families
    t = families.family(cfg.family).hf_names[slot]
    return re.escape(t).replace(r"\{i\}", r"\d+").replace(r"\{e\}", r"\d+")


def _mla_rope_first(st, c, cfg):
    """kv_a_proj_with_mqa split as [k_rope | latent] instead of [latent | k_rope] (every MoE layer)."""
    for i in range(cfg.layers):
        k = _fam_key(cfg, "kv_down", i=i)
        w = st[k]
        st[k] = torch.cat([w[-cfg.head_dim:], w[:-cfg.head_dim]]).contiguous()


def _kv_up_v_first(st, c, cfg):
    """kv_b_proj split per head as [v | k_nope] (layer 0)."""
    x = cfg.extra
    k = _fam_key(cfg, "kv_up", i=0)
    h = st[k].reshape(cfg.heads, -1, st[k].shape[1])
    dn = x["qk_nope_head_dim"]
    st[k] = torch.cat([h[:, dn:], h[:, :dn]], 1).reshape(st[k].shape).contiguous()


def _gate_up_halves(st, c, cfg):
    """GPT-OSS gate_up_proj (and its bias) written as [gate | up] halves instead of alternating columns."""
    for s in ("experts_gate_up", "experts_gate_up_b"):
        k = _fam_key(cfg, s, i=1)
        st[k] = torch.cat([st[k][..., ::2], st[k][..., 1::2]], -1).contiguous()


def _qk_permuted_like_llama(st, c, cfg):
    """q and k rows permuted to interleaved pairs (llama's GGUF/Meta treatment) in a family whose rows stay
    half-split; the per-head q/k norms left as they were."""
    from ckdiff.tensor.ops import rope_to_interleaved
    for i in range(cfg.layers):
        for s, n in (("q", cfg.heads), ("k", cfg.kv_heads)):
            st[_fam_key(cfg, s, i=i)] = rope_to_interleaved(st[_fam_key(cfg, s, i=i)], n, cfg.head_dim)


def _qk_norm_swapped(st, c, cfg):
    a, b = _fam_key(cfg, "q_norm", i=1), _fam_key(cfg, "k_norm", i=1)
    st[a], st[b] = st[b], st[a]


FAMILY_CATALOGUE = [
    StateMutation("MLA rotary rows mixed into the latent part", "MLA rotary part", "deepseek-v3", _mla_rope_first,
                  r"MLA rotary part mixed into the latent part: kv_a_proj_with_mqa"),
    StateMutation("MLA k_nope and v swapped in kv_b_proj", "MLA parts", "deepseek-v3", _kv_up_v_first,
                  r"MLA k_nope and v swapped in kv_b_proj"),
    StateMutation("GPT-OSS gate/up de-interleaved", "GLU halves", "gpt-oss", _gate_up_halves,
                  r"GPT-OSS gate/up de-interleaved"),
    StateMutation("shared expert dropped", "Family tensor dropped", "deepseek-v3",
                  _fam_drop("shared_gate", "shared_up", "shared_down"), r"shared expert dropped"),
    StateMutation("e_score_correction_bias dropped", "Family tensor dropped", "deepseek-v3", _fam_drop("e_bias"),
                  r"e_score_correction_bias .*dropped"),
    StateMutation("MTP layer missing while the config says one", "MTP layer", "deepseek-v3",
                  _cfg(num_nextn_predict_layers=1), r"num_nextn_predict_layers=1 but there is no tensor of layer 2"),
    StateMutation("attention sinks dropped", "Family tensor dropped", "gpt-oss", _fam_drop("sinks"),
                  r"attention sinks .*dropped"),
    StateMutation("q/k norm applied to the wrong tensor", "Tensor equals another", "qwen3", _qk_norm_swapped,
                  r"another tensor: B\[model\.layers\.1\.self_attn\.[qk]_norm\.weight\] == A\[model\.layers\.1\."
                  r"self_attn\.[kq]_norm"),
    StateMutation("q/k permuted like llama's in a half-split family", "Rotary permutation", "qwen3",
                  _qk_permuted_like_llama, r"rotary permutation"),
    StateMutation("sliding window on every layer (max_window_layers dropped)", "Config only", "qwen2",
                  _cfg(max_window_layers=0, layer_types=None), r"layer_types|max_window_layers"),
    StateMutation("norm_topk_prob dropped", "Config only", "qwen3-moe", _cfg(norm_topk_prob=None),
                  r"norm_topk_prob"),
]
