"""Line up two checkpoints of different layouts before comparing them.

When A and B are model directories of different layouts (HF, Meta/JetStream,
Megatron), one side is mapped lazily into the other's layout through the same
reversible conversion tables the converters use, and the result records the
mapping. The float side is mapped into a quantized side's layout, so quantized
tensors are still judged in units of their own scales. Nothing is mapped when
the layouts agree, or when the user passes ``--no-map``.
"""
from __future__ import annotations


from ..converters.lazy import Checkpoint
from ..converters.quant import is_quantized

LAYOUT = {"hf": "hf", "meta": "meta", "jetstream": "jetstream", "megatron": "megatron"}
SAME_NAMES = {("meta", "jetstream"), ("jetstream", "meta")}


def _config(ck: Checkpoint):
    from ..compare.logits import config_of
    return config_of(ck)


def align(a: Checkpoint, b: Checkpoint) -> tuple[Checkpoint, Checkpoint, list, list]:
    """(a', b', mapping rows, notes). Leaves both untouched when no mapping applies."""
    from ..converters.layouts import convert
    from ..converters.table import Plan
    la, lb = LAYOUT.get(a.format), LAYOUT.get(b.format)
    if la is None or lb is None or la == lb or (la, lb) in SAME_NAMES:
        return a, b, [], []
    move_a = is_quantized(b.tensors) and not is_quantized(a.tensors)
    src, dst_layout = (a, lb) if move_a else (b, la)
    try:
        cfg = _config(src)
        plan = Plan()
        mapped = convert(src.tensors, src.format, dst_layout, cfg, src.path, plan)
    except Exception as e:  # noqa: BLE001 - unmappable: compare as is and say why
        return a, b, [], [f"layouts differ ({a.format} vs {b.format}) and B could not be mapped: "
                          f"{str(e).splitlines()[0][:200]}"]
    side = "A" if move_a else "B"
    notes = [f"{side} ({src.format}) was mapped into the {dst_layout} layout of "
             f"{'B' if move_a else 'A'} through ckdiff's conversion table before comparing"]
    mapped, pad_note = _strip_config_padding(mapped, src, dst_layout, side)
    notes += pad_note
    moved = Checkpoint(src.path, f"{src.format}->{dst_layout}", mapped, src.config, src.meta)
    return (moved, b, plan.rows, notes) if move_a else (a, moved, plan.rows, notes)


def _strip_config_padding(tensors: dict, src: Checkpoint, layout: str, side: str) -> tuple[dict, list]:
    """Vocab padding the source's own config declares (Megatron ``true_vocab_size`` below the embedding
    rows) is dropped from the mapped tensors and reported as a note, never as a mismatch."""
    from ..converters.config import _NAMES
    from ..converters.lazy import RowSlice
    true = (src.config or {}).get("true_vocab_size") if src.format == "megatron" else None
    names = _NAMES.get(layout)
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


__all__ = ["align"]
