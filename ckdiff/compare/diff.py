"""Comparison of two checkpoints: line their layouts up, compare tensor by tensor (compare/tensor.py), prove
coverage, weigh the configs, diagnose. The policy per tensor is in compare/tensor.py."""
from __future__ import annotations


from typing import Optional


from ckdiff.models.config import (
    ConfigError,
    Finding,
    canonical_config,
    compare_configs,
    config_findings,
    config_where,
)
from ckdiff.tensor.dtype_names import dtype_name
from ckdiff.tensor.lazy import Checkpoint
from ckdiff.compare.status import Status
from ckdiff.compare.result import (  # noqa: F401 (the result types are re-exported: callers import them from here)
    DTYPE_TOL,
    PRECISION_ORDER,
    CompareResult,
    Options,
    TensorResult,
    Tolerance,
    counts_text,
    default_tolerance,
    reasons,
)
from ckdiff.compare.tensor import compare_tensor  # noqa: F401


def compare_checkpoints(a: Checkpoint, b: Checkpoint, opts: Optional[Options] = None,
                        progress_factory=None, diagnose_fn=None, map_layouts: bool = True,
                        shard=None) -> Optional[CompareResult]:
    """Compare every tensor of the union of keys; never stop at the first mismatch.

    Checkpoints of different layouts are lined up first (compare/align.py) unless ``map_layouts``
    is false; the mapping used is part of the result. With ``shard`` (ckdiff.distributed.Shard)
    the tensors are spread over its ranks and the result exists on rank 0 only (None elsewhere),
    identical to the one a single process computes."""
    opts = opts or Options()
    notes: list[str] = []
    mapping: list = []
    cdiff, cfindings, cnotes, cwarnings = compare_config_semantics(a, b)
    a0, b0 = a, b
    if map_layouts:
        from ckdiff.compare.align import align
        a, b, mapping, notes = align(a, b)
    notes += [f"{side}: {n}" for side, ck in (("A", a0), ("B", b0)) for n in (ck.meta or {}).get("notes", [])]
    notes += cnotes
    from ckdiff.compare.align import tied_head_views
    a, b, tie_views = tied_head_views(a, b, {"A": _tied(a0), "B": _tied(b0)})
    consumed: set = set()
    names_a = [n for n in a.tensors if opts.selected(n)]
    names_b = [n for n in b.tensors if opts.selected(n)]
    set_b = set(names_b)
    common = [n for n in names_a if n in set_b]
    one_sided: list[TensorResult] = []
    for n in names_a:
        if n not in set_b:
            t = a.tensors[n]
            one_sided.append(TensorResult(n, Status.ONLY_A, shape_a=t.shape, dtype_a=dtype_name(t.dtype), numel=t.numel))
    for n in names_b:
        if n not in a.tensors:
            t = b.tensors[n]
            one_sided.append(TensorResult(n, Status.ONLY_B, shape_b=t.shape, dtype_b=dtype_name(t.dtype), numel=t.numel))
    jobs = [(n, a.tensors[n].nbytes + b.tensors[n].nbytes,
             lambda n=n, progress=None: compare_tensor(n, a.tensors[n], b.tensors[n], opts, progress))
            for n in common]
    if shard is not None:
        done = shard.map(jobs)
        if done is None:
            return None
    else:
        total = sum(nb for _, nb, _ in jobs)
        progress = progress_factory(total) if progress_factory else None
        done = [fn(progress=progress) for _, _, fn in jobs]
        if progress is not None and hasattr(progress, "stop"):
            progress.stop()
    if mapping:
        notes += _name_missing(one_sided, a, b)
    results = one_sided + done
    res = CompareResult(a.path, b.path, a.format, b.format, results,
                        config_diff=cdiff, config_findings=cfindings, warnings=cwarnings, strict=opts.strict,
                        options={"atol": opts.atol, "rtol": opts.rtol, "only": opts.only, "ignore": opts.ignore,
                                 "patterns": [list(p) for p in opts.patterns]}, notes=notes, mapping=mapping)
    _tied_equivalence(res, tie_views)
    from ckdiff.compare.coverage import coverage, unaccounted_note
    res.coverage = coverage(a0, b0, a, b, results, consumed, opts.selected)
    res.notes += unaccounted_note(res.coverage)
    if opts.diagnose:
        from ckdiff.compare.diagnose import diagnose_result
        (diagnose_fn or diagnose_result)(res, a, b)
    return res


def _name_missing(rows: list, a: Checkpoint, b: Checkpoint, most: int = 8) -> list:
    """After a mapping, each one-sided row says which tensor the other side lacks: the missing source
    tensor in that side's own naming where the mapping left the target out for it (the side's ``absent``,
    compare/align.py), else the row's tensor itself. Either direction names the same missing tensor.
    Returns the notes, one per missing tensor (the first ``most``)."""
    by: dict = {}
    for r in rows:
        side, x = ("B", b) if r.status == Status.ONLY_A else ("A", a)
        origins = ((x.meta or {}).get("absent") or {}).get(r.name)
        r.note = f"missing in {side}: {', '.join(origins or [r.name])}"
        for o in origins or [r.name]:
            by.setdefault((side, o), []).append(r.name if origins else None)
    notes = [f"missing in {side}: {o}" + (f" (the mapping needs it for {', '.join(sorted(t for t in ts if t))}: reported "
                                          "one-sided)" if any(ts) else "")
             for (side, o), ts in list(by.items())[:most]]
    if len(by) > most:
        notes.append(f"and {len(by) - most} more tensors missing (each one-sided row names its own)")
    return notes


def _tied(ck: Checkpoint) -> bool:
    """Whether a checkpoint's own config ties the output head (False when it has none or cannot say)."""
    try:
        c = canonical_config(ck.format, ck.config, ck.tensors, config_where(ck))
    except (ConfigError, TypeError, ValueError, KeyError, ZeroDivisionError):
        return False
    return bool(c and c.get("tied"))


def _tied_equivalence(res: CompareResult, views: dict) -> None:
    """A named equivalence: one side ties its head, the other stores a head equal to its embedding. The
    tied side's embedding was compared under the head's name; when that head and the embeddings match,
    the configs' differing tie flag defines the same function and is no difference."""
    for side, (emb, head) in views.items():
        by = {t.name: t for t in res.tensors}
        h, e = by.get(head), by.get(emb)
        if h is None or e is None or not (h.ok and e.ok):
            continue
        other = "B" if side == "A" else "A"
        h.note = f"{side} ties its head: compared as {side}[{emb}]"
        res.config_diff = [d for d in res.config_diff if d[0] != "tied"]
        res.notes.append(f"named equivalence (tied head): {side} ties its output head to {emb}, {other} stores "
                         f"{head} equal to its embedding; the same function")


def compare_config_semantics(a: Checkpoint, b: Checkpoint) -> tuple[list, list, list, list]:
    """(function-changing config differences, config-vs-tensor findings, notes, warnings) of two checkpoints.

    Each side's own config (HF ``config.json`` v4/v5, Meta/JetStream ``params.json``, Megatron ``args``)
    is read into one canonical dict (models/config.py), so spellings, explicit defaults and fields
    that do not change the function never show; across layouts the same fields line up.

    A finding about one checkpoint is a difference only when the other side does not share it: one
    of the same kind on both sides (an untied config without a head in A and in B, the same bad
    value) says nothing about A vs B and is returned once, as a warning about both."""
    canon, found = {}, {}
    for side, ck in (("A", a), ("B", b)):
        try:  # a malformed value is a finding (verdict DIFFER), not a crash: same-layout tensors need no config
            canon[side] = canonical_config(ck.format, ck.config, ck.tensors, config_where(ck))
            found[side] = []
        except ConfigError as e:
            canon[side] = None
            found[side] = [Finding(f"invalid config, {e}", ("invalid", e.problem))]
        except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
            canon[side] = None
            found[side] = [Finding(f"config not read: {e}", ("unread", str(e)))]
    ca, cb = canon["A"], canon["B"]
    bad = any(c is None and f for c, f in ((ca, found["A"]), (cb, found["B"])))
    diffs, notes = compare_configs(ca, cb)
    for side, ck in (("A", a), ("B", b)):
        found[side] += config_findings(ck.format, ck.config, ck.tensors, canon[side])
    kinds = {side: {f.kind for f in fs} for side, fs in found.items()}
    both = kinds["A"] & kinds["B"]
    findings = [f"{side}: {f}" for side in ("A", "B") for f in found[side] if f.kind not in both]
    warnings = [f"A and B: {f}" for f in found["A"] if f.kind in both]
    notes += [f"config disagrees with its tensors, {f}" for f in findings]  # every report shows it
    if (ca is None) != (cb is None) and not bad:
        notes.append(f"{'A' if ca is None else 'B'} has no model config: configurations were not compared")
    return diffs, findings, notes, warnings
