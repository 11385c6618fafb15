"""Coverage, proved: every tensor on both sides of a comparison is accounted for.

Each tensor a reader found is either consumed by exactly one rule of the layout table (when its
side was mapped), set aside (an input of a rule another of whose inputs is missing: the rule's
targets are reported one-sided, naming the missing tensor), dropped by a named rule (a layout's
non-weight pattern such as rotary caches, or a reader's skip such as Megatron-Core ``_extra_state``),
excluded by the user (``--only`` / ``--ignore``), or present in the results (compared, or reported as
one-sided). Anything else, and any tensor consumed by more than one rule, is *unaccounted*: the result
lists it and is not equivalent. This is the check that catches the "MoE experts silently dropped" class
of bug.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: rendering a result's coverage needs no torch
    from ckdiff.tensor.lazy import Checkpoint
from ckdiff.compare.status import Status


def _layout_drops(fmt: str) -> list:
    from ckdiff.formats.registry import drop_patterns
    return drop_patterns(fmt)


def account(x0: Checkpoint, x: Checkpoint, in_results: set, consumed: set, selected) -> dict:
    """Coverage of one side: ``x0`` as read, ``x`` as compared (mapped and/or with buffers left out)."""
    dropped: dict = {k: f"skipped by the {x0.format} reader: {why}" for k, why in (x0.meta or {}).get("skipped", {}).items()}
    folded = (x0.meta or {}).get("folded", {})  # stored scales read into their weight's block-scaled view
    dropped.update(folded)
    unaccounted: list = []
    n_consumed = 0
    passes = (x.meta or {}).get("cover") if x is not x0 else None
    if passes:
        for j, p in enumerate(passes):
            for k in p["sources"]:
                n = p["uses"].get(k, 0)
                if n == 1:
                    n_consumed += j == 0
                elif n > 1:
                    unaccounted.append(f"{k} (consumed by {n} rules)")
                elif k in p["dropped"]:
                    if j == 0:
                        dropped[k] = f"dropped by rule {p['dropped'][k]}"
                elif k in p.get("set_aside", {}):  # the other inputs of a target whose source is missing
                    # a later pass names the canonical view's tensor (the side's own when that pass read it)
                    dropped[k] = p["set_aside"][k] if j == 0 or k in x0.tensors else \
                        f"(canonical view) {p['set_aside'][k]}"
                else:
                    unaccounted.append(f"{k} (consumed by no rule)")
        targets = set((x.meta or {}).get("targets", x.tensors))
    else:
        targets = set(x0.tensors)
    pats = _layout_drops(x.format)
    compared = ignored = 0
    for k in targets:
        if k in consumed or k in in_results:
            compared += k in in_results
            continue
        if k not in x.tensors and any(p.search(k) for p in pats):
            dropped[k] = "not a weight in its layout (left out: the other side does not store it)"
        elif not selected(k):
            ignored += 1
        else:
            unaccounted.append(f"{k} (neither compared nor dropped)")
    return {"read": len(x0.tensors) + len((x0.meta or {}).get("skipped", {})) + len(folded), "consumed_by_rules": n_consumed,
            "targets": len(targets), "in_results": compared, "ignored": ignored,
            "dropped": dict(sorted(dropped.items())), "unaccounted": sorted(unaccounted)}


def coverage(a0: Checkpoint, b0: Checkpoint, a: Checkpoint, b: Checkpoint, results, consumed: set,
             selected) -> dict:
    names_a = {r.name for r in results if r.status != Status.ONLY_B}
    names_b = {r.name for r in results if r.status != Status.ONLY_A}
    return {"A": account(a0, a, names_a, consumed, selected), "B": account(b0, b, names_b, consumed, selected)}


def unaccounted_note(cov: dict) -> list:
    out = []
    for side, c in cov.items():
        if c["unaccounted"]:
            more = f" (and {len(c['unaccounted']) - 5} more)" if len(c["unaccounted"]) > 5 else ""
            out.append(f"coverage: {len(c['unaccounted'])} tensor(s) of {side} unaccounted: "
                       f"{', '.join(c['unaccounted'][:5])}{more}")
    return out
