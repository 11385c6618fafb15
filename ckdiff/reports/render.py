"""Renderers: terminal (rich) and versioned JSON. They only render result objects.

JSON schema ``ckdiff.result/1``::

  {"schema": "ckdiff.result/1", "kind": "compare" | "logits" | "roundtrip" | "golden",
   "ckdiff_version": str, "torch_version": str, "command": str, "verdict": str,
   "result": {...kind specific, see README "JSON schema"...}}
"""
from __future__ import annotations

import json
import re
import shlex
import sys

import torch

from .. import __version__
from ..converters.writers import atomic_file

SCHEMA = "ckdiff.result/1"


def envelope(kind: str, result: dict, verdict: str) -> dict:
    return {"schema": SCHEMA, "kind": kind, "ckdiff_version": __version__, "torch_version": torch.__version__,
            "command": "ckdiff " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "verdict": verdict,
            "result": result}


def _clean(o):
    if isinstance(o, float):
        if o != o:
            return "nan"
        if o in (float("inf"), float("-inf")):
            return "inf" if o > 0 else "-inf"
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json_report(path, kind: str, result: dict, verdict: str) -> None:
    doc = _clean(envelope(kind, result, verdict))
    atomic_file(path, lambda tmp: open(tmp, "w").write(json.dumps(doc, indent=1) + "\n"))


def fmt(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if x != x:
            return "nan"
        return f"{x:.{nd}g}" if abs(x) >= 1e-3 and abs(x) < 1e4 else f"{x:.{nd}e}"
    return str(x)


def print_compare(res, console, limit: int = 40) -> None:
    from rich.markup import escape as _markup
    from rich.table import Table

    from ..text import printable

    def escape(s):  # markup and terminal control characters both escaped
        return _markup(printable(s))
    counts = res.counts()
    ok = res.equivalent
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    style = "bold green" if ok else "bold red"
    console.print(f"[{style}]{'EQUIVALENT' if ok else 'DIFFER'}[/{style}]: {len(res.tensors)} tensors ({summary})",
                  highlight=False)
    console.print(f"A: {escape(res.a)} \\[{res.format_a}]\nB: {escape(res.b)} \\[{res.format_b}]", highlight=False)
    bad = [t for t in res.worst_first() if not t.ok]
    if bad:
        table = Table(title="mismatching tensors, worst first", show_lines=False)
        for col in ("status", "tensor", "shape A / B", "dtype A / B", "max abs @ index", "mean abs",
                    "cosine", "over tol", "diagnosis"):
            table.add_column(col, overflow="fold")
        for t in bad[:limit]:
            shape = str(t.shape_a or "-") if t.shape_a == t.shape_b else f"{t.shape_a or '-'} / {t.shape_b or '-'}"
            dtype = t.dtype_a or t.dtype_b or "-" if t.dtype_a == t.dtype_b or None in (t.dtype_a, t.dtype_b) \
                else f"{t.dtype_a} / {t.dtype_b}"
            where = f"{fmt(t.max_abs)} @ {t.max_abs_index}" if t.max_abs_index is not None else "-"
            nan = f" nan {t.nan_a}/{t.nan_b}" if t.nan_a or t.nan_b else ""
            table.add_row(t.status, escape(t.name), shape, dtype, where + nan, fmt(t.mean_abs) if t.status == "differ" else "-",
                          fmt(t.cosine, 6) if t.cosine is not None and t.status == "differ" else "-",
                          str(t.n_over_tol) if t.status == "differ" else "-", escape("; ".join(t.diagnosis)) or "-")
        console.print(table)
        if len(bad) > limit:
            console.print(f"... {len(bad) - limit} more mismatches (use --limit or --json for all)")
    rest = {k: v for k, v in counts.items() if k in ("equal", "close", "cast")}
    if rest:
        console.print("matching: " + ", ".join(f"{v} {k}" for k, v in rest.items()), highlight=False)
    for k, va, vb in res.config_diff:
        console.print(escape(f"config {k}: A={va!r} B={vb!r}"), highlight=False)
    for n in res.notes:
        console.print(escape(f"note: {n}"), highlight=False)


LAYER_RE = re.compile(r"(?<=\.)\d+(?=\.)")


def collapse_layers(rows):
    """[(name, shape, dtype)] -> rows with repeated layers folded into ``{0..N}``."""
    groups: dict = {}
    order = []
    for name, shape, dtype in rows:
        m = list(LAYER_RE.finditer(name))
        if not m:
            key, idx = (name, tuple(shape), dtype), None
        else:
            last = m[0]
            key = (name[:last.start()] + "{}" + name[last.end():], tuple(shape), dtype)
            idx = int(last.group())
        if key not in groups:
            groups[key] = []
            order.append(key)
        if idx is not None:
            groups[key].append(idx)
    out = []
    for key in order:
        pat, shape, dtype = key
        idx = sorted(groups[key])
        if not idx:
            out.append((pat, list(shape), dtype, 1))
            continue
        if idx == list(range(idx[0], idx[-1] + 1)):
            label = f"{{{idx[0]}..{idx[-1]}}}" if len(idx) > 1 else str(idx[0])
        else:
            label = "{" + ",".join(map(str, idx)) + "}"
        out.append((pat.replace("{}", label), list(shape), dtype, len(idx)))
    return out
