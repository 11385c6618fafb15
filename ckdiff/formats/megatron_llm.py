"""Megatron-LLM checkpoints: reader (any TP/PP, legacy and native names) and writer.

The reader presents a merged, TP=1/PP=1 view under native names with global
layer indices (``layouts.MEGATRON``); the writer splits that view into
``mp_rank_XX[_YYY]/model_optim_rng.pt`` files. Rules as epfLLM/Megatron-LLM writes and reads them
(``weights_conversion/hf_to_megatron.py``, ``megatron/checkpointing.py``, ``tools/checkpoint_util.py``
at 806a833).
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch

from ckdiff.errors import InputError, UsageError
from ckdiff.models.config import ModelConfig, valid_int
from ckdiff.tensor.lazy import Checkpoint, DerivedGroup, EagerTensor, LazyTensor
from ckdiff.tensor.ops import PadRows, Shard, ShardRow, ShardTable
from ckdiff.tensor.table import LayerOffset, R, Rename, apply_present, invert, rename
from ckdiff.io.inputs import read_input
from ckdiff.io.pickles import checked_state, load_pickle
from ckdiff.io.torch_zip import TensorSource, iter_leaves, write_torch_zip

TRACKER = "latest_checkpointed_iteration.txt"
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")

# How each tensor is cut over TP ranks (Megatron-LLM's column- and row-parallel layers, as
# tools/checkpoint_saver_megatron.py splits them). The writer splits with
# this table, the reader merges with its reverse. Keys not listed have no rule (an error at TP > 1).
TP_TABLE = ShardTable([
    ShardRow(r"word_embeddings\.weight$", Shard.ROWS),            # vocab-parallel embedding
    ShardRow(r"word_embeddings_for_head\.weight$", Shard.ROWS),
    ShardRow(r"lm_head$", Shard.ROWS),
    ShardRow(r"query_key_value\.(weight|bias)$", Shard.ROWS),     # column-parallel, whole groups per rank
    ShardRow(r"self_attention\.dense\.weight$", Shard.COLS),      # row-parallel
    ShardRow(r"dense_h_to_4h\.weight$", {True: Shard.GLU, False: Shard.ROWS}),  # GLU halves / plain (Falcon)
    ShardRow(r"dense_4h_to_h\.weight$", Shard.COLS),
    ShardRow(r"(layernorm|final_layernorm)\.(weight|bias)$", Shard.REPLICATED),
])


def tp_axis(key: str, glu: bool = True) -> "Shard | None":
    """How ``key`` is cut over TP ranks (None: no rule). ``glu``: the MLP input holds [up; gate]."""
    return TP_TABLE.cut(key, glu)


# Legacy hf_to_megatron key names (written by the writer, as the original tool does) from the
# native names of the canonical view; the reader renames with the inverse of this table.
LEGACY_NAMES = [
    Rename("language_model.encoder.", "language_model.transformer."),
    Rename("layers.{i}.self_attention.", "layers.{i}.attention."),
]


def native_name(key: str) -> str:
    """Legacy hf_to_megatron names -> native Megatron names."""
    return rename(key, invert(LEGACY_NAMES))


def legacy_name(key: str) -> str:
    """Native Megatron names -> the legacy names hf_to_megatron writes."""
    return rename(key, LEGACY_NAMES)


def read_tracker(tracker: Path) -> str:
    """The tracker's text: 'release' or an iteration number. Errors never quote the file's contents."""
    raw = read_input(tracker, limit=64)
    text = raw.decode("ascii", "replace").strip()
    if text == "release" or (text.isascii() and text.isdigit() and len(text) <= 12 and int(text) > 0):
        return text
    raise InputError(tracker, f"does not hold 'release' or an iteration number > 0 ({len(raw)} bytes)")


def _iteration_dir(root: Path) -> tuple[Path, str]:
    tracker = root / TRACKER
    text = read_tracker(tracker)
    d = root / "release" if text == "release" else root / f"iter_{int(text):07d}"
    if not d.is_dir():
        raise InputError(tracker, f"points to {d.name}, which does not exist")
    return d, text


def _rank_files(d: Path) -> dict[tuple[int, int], Path]:
    ranks: dict[tuple[int, int], Path] = {}
    styles: dict[bool, str] = {}  # with a PP suffix or not -> one directory of that naming
    for sub in sorted(d.iterdir()):
        m = RANK_DIR.match(sub.name)
        if not m or not sub.is_dir():
            continue
        styles.setdefault(m.group(2) is not None, sub.name)
        if len(styles) > 1:  # mp_rank_00 (TP only) beside mp_rank_00_000 (TP+PP): which set is the model?
            raise InputError(d, f"holds rank directories of both namings ({styles[False]}/ and {styles[True]}/): "
                                "the TP-only and TP+PP sets are two checkpoints in one place; keep one")
        tp, pp = int(m.group(1)), int(m.group(2) or 0)
        for fname in ("model_optim_rng.pt", "model_rng.pt"):
            if (sub / fname).is_file():
                ranks[(tp, pp)] = sub / fname
                break
        else:
            raise InputError(sub, "has neither model_optim_rng.pt nor model_rng.pt")
    if not ranks:
        raise InputError(d, "no mp_rank_XX directories")
    tps = 1 + max(t for t, _ in ranks)
    pps = 1 + max(p for _, p in ranks)
    for t in range(tps):
        for p in range(pps):
            if (t, p) not in ranks:
                name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pps > 1 else "")
                raise InputError(d, f"missing rank {name}: TP={tps}, PP={pps} needs every rank")
    return ranks


def _args_dict(obj, path) -> dict:
    args = obj.get("args")
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, dict):
        return dict(args)
    raise InputError(path, f"'args' is a {type(args).__name__}, expected a Namespace")


def read_megatron(root: Path, trust_pickle: bool = False, **_) -> Checkpoint:
    root = Path(root)
    d, iteration = _iteration_dir(root)
    ranks = _rank_files(d)
    TP = 1 + max(t for t, _ in ranks)
    PP = 1 + max(p for _, p in ranks)
    args: dict = {}
    stages: dict[int, dict[int, dict[str, LazyTensor]]] = {}
    for (t, p), f in sorted(ranks.items()):
        obj = load_pickle(f, trust_pickle)
        if not isinstance(obj, dict):
            raise InputError(f, f"expected a dict, found {type(obj).__name__}")
        if "model" not in obj:
            if any(k.startswith("model") and k[5:].isdigit() for k in obj):
                raise InputError(f, "virtual (interleaved) pipeline checkpoint (model0, model1, ...): not supported")
            raise InputError(f, "no 'model' entry: not a Megatron checkpoint")
        if not args:
            args = _args_dict(obj, f)
        flat = {native_name(k): v for k, v in checked_state(f, obj["model"]).items()}
        stages.setdefault(p, {})[t] = {k: EagerTensor(k, v, str(f)) for k, v in flat.items()}
    L = valid_int(args.get("num_layers"))  # a bad value is named by config_from_args; here it is unused
    glu = bool(args.get("glu_activation"))
    tensors: dict[str, LazyTensor] = {}
    incomplete: dict = {}  # a tensor some TP ranks of its stage lack -> [file lacking it, problem]
    for p in range(PP):
        per_tp = stages[p]
        keys = list(dict.fromkeys(k for t in range(TP) for k in per_tp[t]))  # rank 0's order first
        local_layers = {int(m.group(1)) for k in keys for m in [re.search(r"layers\.(\d+)\.", k)] if m}
        per_stage = (L // PP) if L else len(local_layers)
        for k in keys:
            name = global_layer_name(k, p, per_stage)
            lacking = [t for t in range(TP) if k not in per_tp[t]]
            if lacking:  # no merge without every shard: left out, named (a comparison reports it missing,
                # ``ckdiff check`` as a finding; the converters refuse it, convert/api.py read_source)
                held = [t for t in range(TP) if t not in lacking]
                incomplete[name] = [str(ranks[(lacking[0], p)]), f"lacks {name} (TP rank{'s' if len(held) > 1 else ''} "
                                    f"{', '.join(map(str, held))} of its stage hold{'' if len(held) > 1 else 's'} "
                                    "a shard): the tensor-parallel set is incomplete"]
                continue
            parts = [per_tp[t][k] for t in range(TP)]
            if name in tensors:
                raise InputError(ranks[(0, p)], f"{name!r} appears in two pipeline stages")
            tensors[name] = _merge_tp(name, parts, glu, ranks, p)
    if args.get("num_layers") is None:
        L = len({m.group(1) for k in tensors for m in [re.search(r"layers\.(\d+)\.", k)] if m})
        args["num_layers"] = L
    meta = {"tp": TP, "pp": PP, "iteration": iteration, "files": [str(f) for f in ranks.values()]}
    if incomplete:
        meta["incomplete"] = incomplete
        meta["skipped"] = {k: f"{Path(f).parent.name} {why}" for k, (f, why) in incomplete.items()}
        meta["notes"] = [f"{Path(f).parent.name}/{Path(f).name} {why}; left out of the merged view"
                         for f, why in incomplete.values()]
    head, emb = "word_embeddings_for_head.weight", "language_model.embedding.word_embeddings.weight"
    if head in tensors and emb in tensors:
        # tied model with PP > 1: the last stage keeps a copy of the embedding. Verify the tie,
        # then present the model once (a copy that differs stays visible to the comparator).
        if tensors[head].shape == tensors[emb].shape and _equal_rows(tensors[head], tensors[emb]):
            del tensors[head]
            meta["tie_verified"] = True
        else:
            meta["tie_verified"] = False
    return Checkpoint(str(root), "megatron", tensors, config=args, meta=meta)


def _equal_rows(a: LazyTensor, b: LazyTensor) -> bool:
    """Bitwise equality, read a row chunk at a time."""
    return all(torch.equal(a.rows(lo, hi), b.rows(lo, hi)) for lo, hi in a.row_chunks())


def stage_names(stage: int, per_stage: int) -> list:
    """Rename rows from the global view's names to a pipeline stage's file names (layers numbered from
    the stage's first, legacy names); the reader applies their inverse."""
    return [LayerOffset(-stage * per_stage)] + LEGACY_NAMES


def global_layer_name(key: str, stage: int, per_stage: int) -> str:
    """Stage-local layer index -> global: ``global = stage * (L / PP) + local``."""
    return rename(key, invert([LayerOffset(-stage * per_stage)]))


def _merge_tp(name, parts: list[LazyTensor], glu: bool, ranks, p) -> LazyTensor:
    TP = len(parts)
    shape0 = parts[0].shape
    for t, q in enumerate(parts[1:], 1):
        if q.shape != shape0:
            raise InputError(ranks[(t, p)], f"TP shards disagree in shape for {name}: "
                                            f"{list(q.shape)} vs {list(shape0)} on rank 0")
        if q.dtype != parts[0].dtype:
            dt = [str(x.dtype).replace("torch.", "") for x in (q, parts[0])]
            raise InputError(ranks[(t, p)], f"TP shards disagree in dtype for {name}: {dt[0]} here, "
                                            f"{dt[1]} in {ranks[(0, p)]}")
    if TP == 1:
        return parts[0]
    op = TP_TABLE.merge(name, TP, glu)
    if op is None:
        raise InputError(ranks[(0, p)], f"no tensor-parallel merge rule for {name!r}")
    try:
        return DerivedGroup(parts, op).tensors([name])[0]
    except (ValueError, RuntimeError) as e:
        raise InputError(ranks[(0, p)], f"{name}: {e}") from None


def is_megatron_dir(p: Path) -> bool:
    return p.is_dir() and os.path.lexists(p / TRACKER)  # a broken tracker link is named, not skipped


# ---------------------------------------------------------------- config
def family_of_args(args: dict, tensors: dict):
    """The family a Megatron-LLM checkpoint holds: the one its args' declared model (``ckdiff_model``,
    written by ckdiff's converter) belongs to; otherwise (the original tool's args say no model) the
    Megatron-capable family whose block fits the args and tensors best: GLU (``glu_activation``),
    RMSNorm (``use_rms_norm``), a fused QKV bias tensor. Ties go to the first registered."""
    from ckdiff.models import families
    from ckdiff.models.families import Mlp, Norm
    declared = args.get("ckdiff_model")
    if isinstance(declared, str):
        f = families.for_megatron_model(declared)
        if f is not None:
            return f
    glu, rms = bool(args.get("glu_activation")), bool(args.get("use_rms_norm", False))
    bias = any(k.endswith("query_key_value.bias") for k in tensors)
    best, score = families.default(), -1
    for f in families.FAMILIES.values():
        if "megatron" not in f.layouts:
            continue
        s = ((f.block.mlp is Mlp.GLU) == glu) + ((f.block.norm is Norm.RMS) == rms) + (f.block.qkv_bias == bias)
        if s > score:
            best, score = f, s
    return best


def config_from_args(args: dict, tensors: dict, where="args") -> ModelConfig:
    from ckdiff.models.families import Norm
    from ckdiff.models.config import _KEYS, ConfigError, check_tensors, megatron_rope_scaling, parse_config
    from ckdiff.formats.layouts import MEGATRON
    raw = parse_config("megatron", args, where)
    args = raw
    try:
        L, D, H = args["num_layers"], args["hidden_size"], args["num_attention_heads"]
    except KeyError as e:
        raise InputError(where, f"Megatron args lack {e.args[0]!r}") from None
    K = args.get("num_attention_heads_kv") or H
    fam = family_of_args(args, tensors)
    glu = bool(args.get("glu_activation"))
    h4h = tensors.get(MEGATRON["h4h"].format(i=0))
    F = args.get("ffn_hidden_size") or (h4h.shape[0] // (2 if glu else 1) if h4h is not None else 4 * D)
    if h4h is not None and len(h4h.shape) == 2 and h4h.shape[0] != F * (2 if glu else 1):
        raise ConfigError(where, f"args key 'ffn_hidden_size': {F}{' (x 2 for the GLU)' if glu else ''}, but "
                                 f"{MEGATRON['h4h'].format(i=0)} has {h4h.shape[0]} rows")
    if MEGATRON["embed"] not in tensors:
        raise InputError(where, f"no {MEGATRON['embed']} tensor")
    emb = tensors[MEGATRON["embed"]]
    hd = args.get("kv_channels") or D // H
    tied = args.get("tie_embed_logits", fam.always_tied)
    if MEGATRON["head"] in tensors:
        tied = False
    model = args.get("ckdiff_model") or fam.megatron_model_names()[0]
    mm = fam.megatron_model(model)
    cfg = ModelConfig(
        family=fam.name, hidden=D, layers=L, heads=H, kv_heads=K, head_dim=hd, ffn=F,
        vocab=emb.shape[0], norm_eps=args.get("layernorm_epsilon") or 1e-5,
        rope_theta=float(args.get("rope_theta") or 10000.0), tied=bool(tied),
        max_pos=args.get("max_position_embeddings") or args.get("seq_length") or 2048,
        sliding_window=args.get("sliding_window_size"), parallel_attn=bool(args.get("parallel_attn")),
        two_norms=bool(args.get("parallel_layernorm")), norm_bias=fam.block.norm is Norm.LAYER,
        dtype=str(emb.dtype).replace("torch.", ""),
        hf_model_type=mm.hf_model_type or fam.hf_model_types[0],
        true_vocab=args.get("true_vocab_size"), megatron_model=model,
        rotary_rows=args.get("ckdiff_rotary", "interleaved"),
        rope_scaling=megatron_rope_scaling(args.get("rope_scaling_factor")),
        bos_token_id=args.get("bos_token_id"), eos_token_id=args.get("eos_token_id"),
        pad_token_id=args.get("pad_token_id"))
    cfg.check(where, _KEYS["megatron"])
    return check_tensors(cfg, "megatron", tensors, where, raw)


def make_args(cfg: ModelConfig, model: str, tp: int, pp: int, padded_vocab: int, true_vocab: int,
              divisible_by: int) -> argparse.Namespace:
    """The ``args`` Namespace as hf_to_megatron writes it (spec section 5), plus what it forgot; the
    family-dependent fields come from the family's block and declaration."""
    from ckdiff.models import families
    from ckdiff.models.families import Act, Mlp, Norm
    fam = families.family(cfg.family)
    block = fam.block
    a = dict(num_layers=cfg.layers, hidden_size=cfg.hidden, num_attention_heads=cfg.heads,
             max_position_embeddings=cfg.max_pos, seq_length=cfg.max_pos, iteration="release",
             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, bias_gelu_fusion=False,
             bias_droput_fusion=False, position_embedding_type="rotary", padded_vocab_size=padded_vocab,
             true_vocab_size=true_vocab, kv_channels=cfg.head_dim, rope_theta=cfg.rope_theta,
             params_dtype=cfg.dtype, ckdiff_model=model, ckdiff_rotary=cfg.rotary_rows or "interleaved")
    a.update(fam.megatron_args)
    a.update(ffn_hidden_size=cfg.ffn, parallel_attn=block.parallel, tie_embed_logits=fam.always_tied or cfg.tied,
             tokenizer_type=fam.megatron_model(model).tokenizer_type, layernorm_epsilon=cfg.norm_eps)
    if fam.megatron_pads_vocab:
        a["make_vocab_size_divisible_by"] = divisible_by
    if block.mlp is Mlp.GLU:
        a["glu_activation"] = "swiglu" if block.act is Act.SILU else "geglu"
    if block.norm is Norm.RMS:
        a["use_rms_norm"] = True
    if cfg.kv_heads != cfg.heads:
        a["num_attention_heads_kv"] = cfg.kv_heads
    if cfg.sliding_window:
        a["sliding_window_size"] = cfg.sliding_window
    if cfg.two_norms:
        a["parallel_layernorm"] = True
    factor = megatron_rope_factor(cfg.rope_scaling)
    if factor is not None:
        a["rope_scaling_factor"] = factor
    a.update(cfg.token_ids())  # not Megatron-LLM args: recorded so that megatron-to-hf writes them back
    return argparse.Namespace(**a)


def megatron_rope_factor(scaling: dict | None) -> float | None:
    """Megatron-LLM's ``rope_scaling_factor`` for an HF rope scaling: linear scaling only (positions are
    divided by the factor); any other kind has no Megatron-LLM equivalent and is refused in one line."""
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default" and not {k for k in scaling if k not in ("rope_type", "type", "rope_theta")}:
        return None
    if kind != "linear" or not isinstance(scaling.get("factor"), (int, float)):
        raise UsageError(f"rope scaling {kind!r} has no Megatron-LLM equivalent (only linear scaling, as "
                         "rope_scaling_factor): refusing to drop it")
    return float(scaling["factor"])


# ---------------------------------------------------------------- writer
def padded_vocab(rows: int, tp: int, divisible_by: int | None) -> int:
    """Rows after padding: only when asked, or when TP does not divide the rows."""
    if divisible_by is None and rows % tp == 0:
        return rows
    m = (divisible_by or 128) * tp
    return -(-rows // m) * m


def check_parallel(cfg: ModelConfig, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise UsageError("--tp and --pp must be >= 1")
    problems = []
    if cfg.kv_heads % tp:
        problems.append(f"TP={tp} does not divide the {cfg.kv_heads} KV heads")
    elif cfg.heads % tp:
        problems.append(f"TP={tp} does not divide the {cfg.heads} query heads")
    elif cfg.ffn % tp:
        problems.append(f"TP={tp} does not divide the FFN size {cfg.ffn}")
    if cfg.layers % pp:
        problems.append(f"PP={pp} does not divide the {cfg.layers} layers")
    if problems:
        raise UsageError("; ".join(problems))


def _tp_source(name: str, t: LazyTensor, rank: int, tp: int, glu: bool) -> TensorSource:
    """Rank ``rank``'s shard of ``t`` (cut as ``TP_TABLE`` says), read row chunk by row chunk when written."""
    if tp == 1:
        return TensorSource.rows_of(t)
    op = TP_TABLE.split(name, tp, glu)
    if op is None:
        raise UsageError(f"no tensor-parallel split rule for {name!r}")
    if op.how is Shard.REPLICATED:
        return TensorSource.rows_of(t)
    return TensorSource.rows_of(DerivedGroup([t], op).tensors([name] * tp)[rank])


def write_megatron(out: Path, tensors: dict[str, LazyTensor], cfg: ModelConfig, tp: int, pp: int,
                   args: argparse.Namespace, progress_factory=None, files=None) -> list[str]:
    """Write rank files (legacy names, as hf_to_megatron) and the tracker last.

    Each rank file is streamed (``torch_zip.write_torch_zip``): one row chunk of one tensor is in
    memory at a time. ``progress_factory(total_bytes)`` returns a callable told the bytes of each
    chunk as it is written (like the comparator's).
    """
    from ckdiff.formats.layouts import MEGATRON
    L = cfg.layers
    per = L // pp
    from ckdiff.models import families
    glu = families.family(cfg.family).block.mlp is families.Mlp.GLU  # dense_h_to_4h holds [up; gate]
    embed = tensors[MEGATRON["embed"]]
    ranks = []
    for p in range(pp):
        for t in range(tp):
            enc: dict[str, TensorSource] = {}
            lm: dict = {}
            model: dict = {"language_model": lm}
            if p == 0:
                lm["embedding"] = {"word_embeddings.weight": _tp_source(MEGATRON["embed"], embed, t, tp, glu)}
            for name, lt in tensors.items():
                m = re.match(r"language_model\.encoder\.layers\.(\d+)\.(.*)$", name)
                if m:
                    i = int(m.group(1))
                    if p * per <= i < (p + 1) * per:
                        local = rename(name, stage_names(p, per))
                        enc[local[len("language_model.transformer."):]] = _tp_source(name, lt, t, tp, glu)
                elif name.startswith("language_model.encoder.") and p == pp - 1:
                    enc[legacy_name(name)[len("language_model.transformer."):]] = TensorSource.rows_of(lt)
            lm["transformer"] = enc
            if p == pp - 1:
                if MEGATRON["head"] in tensors:
                    lm["lm_head"] = _tp_source(MEGATRON["head"], tensors[MEGATRON["head"]], t, tp, glu)
                elif pp > 1:
                    model["word_embeddings_for_head"] = {"weight": _tp_source(MEGATRON["embed"], embed, t, tp, glu)}
            rank = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            ranks.append((out / "release" / rank / "model_optim_rng.pt",
                          {"iteration": "release", "checkpoint_version": 3.0, "args": args, "model": model}))
    from ckdiff.io.writers import FileJobs
    files = files or FileJobs()  # ranks of a sharded conversion each write their own rank files
    progress = None
    if progress_factory is not None:
        progress = progress_factory(sum(s.nbytes for _, obj in ranks for s in iter_leaves(obj)))

    def write(path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_torch_zip(path, obj, progress)
    for path, obj in ranks:
        files.add(str(path), sum(s.nbytes for s in iter_leaves(obj)), lambda path=path, obj=obj: write(path, obj))
    if files.is_main:
        for path, _ in ranks:  # directories exist even for ranks written elsewhere
            path.parent.mkdir(parents=True, exist_ok=True)
        (out / TRACKER).write_text("release")
    if progress is not None and hasattr(progress, "stop"):
        progress.stop()
    return [str(path) for path, _ in ranks]


def vocab_rules(tensors: dict[str, LazyTensor], rows: int, padded: int | None = None) -> list:
    """The vocab rows of the Megatron view: embedding and output layer padded from ``rows`` (default:
    the rows they have) to ``padded`` with copies of the last row. The writer applies these rows; the
    reader applies their inverse, which strips the padding."""
    from ckdiff.formats.layouts import MEGATRON
    out = []
    for k in (MEGATRON["embed"], MEGATRON["head"]):
        if k in tensors:
            have = tensors[k].shape[0]
            lo, hi = (have, rows) if padded is None else (rows, padded)
            if lo < hi:
                out.append(R(k, k, PadRows(lo, hi)))
    return out


def pad_vocab_tensors(tensors: dict[str, LazyTensor], rows: int) -> dict[str, LazyTensor]:
    """Pad embedding / lm_head to ``rows`` with copies of the last row."""
    return apply_present(tensors, vocab_rules(tensors, rows))


def strip_vocab(tensors: dict[str, LazyTensor], rows: int) -> dict[str, LazyTensor]:
    """Drop the rows past ``rows``: the inverse of the rows that would pad ``rows`` to the rows found."""
    from ckdiff.formats.layouts import MEGATRON
    found = {k: t for k, t in tensors.items() if k in (MEGATRON["embed"], MEGATRON["head"]) and t.shape[0] > rows}
    return apply_present(tensors, invert([r for k, t in found.items()
                                          for r in vocab_rules({k: t}, rows, t.shape[0])]))


# ---------------------------------------------------------------- declaration (formats/registry.py)
def _declare() -> None:
    from ckdiff.models.config import _canonical_megatron
    from ckdiff.formats.layouts import DROP
    from ckdiff.formats.registry import Format, Runtime, register
    register(Format("megatron", "Megatron-LLM directory: latest_checkpointed_iteration.txt + "
                                "{release,iter_NNNNNNN}/mp_rank_XX[_YYY]/model_optim_rng.pt",
                    is_megatron_dir, read_megatron, priority=30, layout="megatron", config=config_from_args,
                    canonical=_canonical_megatron, drop=tuple(DROP["megatron"]),
                    true_vocab=lambda args: args.get("true_vocab_size"), runtime=Runtime.NATIVE,
                    layer=r"(?:^|\.)layers\.(\d+)\."))


_declare()
