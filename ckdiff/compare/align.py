"""Line up two checkpoints of different layouts before comparing them.

When A and B are model directories of different layouts (HF, Meta/JetStream,
Megatron), one side is mapped lazily into the other's layout through the same
reversible conversion tables the converters use, and the result records the
mapping. The float side is mapped into an encoded side's layout (its tensors are
block-scaled views, tensor/blockscaled.py), so encoded tensors keep their own
scales and are judged in units of them. Nothing is mapped when
the layouts agree, or when the user passes ``--no-map``.
"""
from __future__ import annotations


from ckdiff.errors import InputError
from ckdiff.formats import registry
from ckdiff.formats.layouts import convert_formats
from ckdiff.models.config import ConfigError
from ckdiff.tensor.lazy import Checkpoint
from ckdiff.tensor.blockscaled import BlockScaled, through_table
from ckdiff.text import printable


def _config(ck: Checkpoint):
    from ckdiff.compare.logits import config_of
    return config_of(ck)


def _without_buffers(a: Checkpoint, b: Checkpoint) -> tuple[Checkpoint, Checkpoint, list]:
    """Leave out tensors that carry no weights in their layout (``rope.freqs``, ``inv_freq``; the converters
    drop them) when the other side has no tensor of that name. Applied to both sides alike, so which side
    is A never changes the verdict."""
    dropped = []

    def strip(x: Checkpoint, other: Checkpoint) -> Checkpoint:
        pats = registry.drop_patterns(x.format)
        gone = [n for n in x.tensors if n not in other.tensors and any(p.search(n) for p in pats)]
        if not gone:
            return x
        dropped.extend(gone)
        return Checkpoint(x.path, x.format, {n: t for n, t in x.tensors.items() if n not in gone}, x.config, x.meta)
    a2, b2 = strip(a, b), strip(b, a)
    notes = [f"left out {', '.join(sorted(dropped))}: not a weight (derived from the config, and checked "
             "against it where stored); the other side does not store it"] if dropped else []
    return a2, b2, notes


def align(a: Checkpoint, b: Checkpoint) -> tuple[Checkpoint, Checkpoint, list, list]:
    """(a', b', mapping rows, notes). Leaves both untouched when no mapping applies."""
    a, b, rows, notes = _align(a, b)
    a, b, more = _without_buffers(a, b)  # same layout too: one converter keeps rope.freqs, another derives it
    return a, b, rows, notes + more


def _align(a: Checkpoint, b: Checkpoint) -> tuple[Checkpoint, Checkpoint, list, list]:
    from ckdiff.tensor.table import Plan
    fa, fb = registry.lookup(a.format), registry.lookup(b.format)
    la, lb = (f.layout if f is not None and "->" not in x.format else None for f, x in ((fa, a), (fb, b)))
    if (la is None) != (lb is None) and a.format != b.format:
        plain = "A" if la is None else "B"
        return a, b, [], [f"{plain} is a plain set of tensors ({(a if la is None else b).format}, no model config): "
                          "compared by name; mapping another layout onto it needs a model directory "
                          "(config.json, params.json or Megatron args)"]
    if la is None or lb is None or fa.key_names == fb.key_names:
        return a, b, [], []
    quant = lambda x: any(isinstance(t, BlockScaled) for t in x.tensors.values())  # noqa: E731
    # the float side moves, so quantized tensors keep their own scales; so does the side whose layout is
    # not a target (the verdict must not depend on which side is A)
    target = lambda x, f: quant(x) or f.mapped_into  # noqa: E731
    move_a = target(b, fb) and not target(a, fa)
    (src, fsrc), fdst = ((a, fa), fb) if move_a else ((b, fb), fa)
    dst_layout = fdst.layout
    try:
        cfg = _config(src)
        plan = Plan()
        cover: list = []
        absent: dict = {}  # a target whose source this side lacks -> the missing source tensors
        mapped = convert_formats(src.tensors, fsrc, fdst, cfg, src.path, plan, cover, absent=absent)
    except ConfigError:
        raise  # mapping across layouts needs a sound config: fatal, one line naming the file and key
    except Exception as e:  # noqa: BLE001 - unmappable: compare as is and say why
        # one line; the side's own path is left out (the side is named and its path heads the report)
        own = isinstance(e, InputError) and e.path == str(src.path)
        why = (printable(e.problem) if own else str(e)).splitlines() or [type(e).__name__]
        return a, b, [], [f"layouts differ ({a.format} vs {b.format}) and {'A' if move_a else 'B'} could not be "
                          f"mapped: {why[0][:300]}"]
    mapped = through_table(mapped)  # an encoded side that moves keeps its own scales
    side = "A" if move_a else "B"
    notes = [f"{side} ({src.format}) was mapped into the {dst_layout} layout of "
             f"{'B' if move_a else 'A'} through ckdiff's conversion table before comparing"]
    mapped, pad_note = _strip_config_padding(mapped, src, fsrc.true_vocab, dst_layout, side)
    notes += pad_note
    moved = Checkpoint(src.path, f"{src.format}->{dst_layout}", mapped, src.config,
                       {**src.meta, "cover": cover, "source_tensors": list(src.tensors), "absent": absent})
    return (moved, b, plan.rows, notes) if move_a else (a, moved, plan.rows, notes)


def _strip_config_padding(tensors: dict, src: Checkpoint, true_vocab, layout: str, side: str) -> tuple[dict, list]:
    """Vocab padding the source's own config declares (its format's ``true_vocab``, e.g. Megatron
    ``true_vocab_size`` below the embedding rows) is dropped from the mapped tensors and reported as a
    note, never as a mismatch."""
    from ckdiff.models.config import names_of
    from ckdiff.tensor.lazy import RowSlice
    true = true_vocab(src.config or {}) if true_vocab is not None else None
    names = names_of(layout)
    if not isinstance(true, int) or not names:
        return tensors, []
    out, cut = dict(tensors), []
    for k in names["embed"] + names["head"]:
        t = out.get(k)
        if t is not None and len(t.shape) == 2 and t.shape[0] > true:
            out[k] = RowSlice(k, t, 0, true)
            cut.append((k, t.shape[0]))
    if not cut:
        return tensors, []
    return out, [f"{side}: vocab padding from its config stripped before comparing: " + ", ".join(
        f"{k} rows {true}..{n - 1} (true_vocab_size {true})" for k, n in cut)]


def _embed_head_pairs() -> list:
    """(embedding, output head) names of every layout: a tied head is its embedding under the head's name."""
    from ckdiff.models.config import _NAMES, _hf_check_names
    from ckdiff.models import families
    pairs = []
    for fam in families.FAMILIES.values():
        n = _hf_check_names(fam)
        pairs += [(e, h) for e in n["embed"] for h in n["head"]]
    for names in _NAMES.values():
        pairs += [(e, h) for e in names["embed"] for h in names["head"]]
    from ckdiff.formats.gguf import GGUF
    from ckdiff.formats.mcore import MCORE
    pairs += [(GGUF["embed"], GGUF["head"]), (MCORE["embed"], MCORE["head"])]
    return list(dict.fromkeys(pairs))


def tied_head_views(a: Checkpoint, b: Checkpoint, tied: dict) -> tuple[Checkpoint, Checkpoint, dict]:
    """A side whose config ties the output head (``tied[side]``) and stores none, against a side that stores
    one: the tied side's embedding is compared under the head's name (a tied head *is* the embedding).
    Returns both sides and {side: (embedding name, head name)} of the views made."""
    from ckdiff.tensor.table import Renamed
    made: dict = {}
    out = {"A": a, "B": b}
    for side, x, other in (("A", a, b), ("B", b, a)):
        if not tied.get(side):
            continue
        for e, h in _embed_head_pairs():
            if h in other.tensors and h not in x.tensors and e in x.tensors \
                    and tuple(x.tensors[e].shape) == tuple(other.tensors[h].shape):
                out[side] = Checkpoint(x.path, x.format, {**x.tensors, h: Renamed(h, x.tensors[e])}, x.config, x.meta)
                made[side] = (e, h)
                break
    return out["A"], out["B"], made


__all__ = ["align", "tied_head_views"]
