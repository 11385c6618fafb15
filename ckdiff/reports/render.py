"""The versioned JSON rendering and shared formatting helpers (terminal output: terminal.py).

JSON schema ``ckdiff.result/1``::

  {"schema": "ckdiff.result/1", "kind": "compare" | "logits" | "roundtrip" | "golden",
   "ckdiff_version": str, "torch_version": str, "command": str, "verdict": str,
   "result": {...kind specific, see docs/ci.md...},
   "provenance": {...the verification record, ckdiff/provenance.py; written by the commands...}}
"""
from __future__ import annotations

import json
import re

from ckdiff import __version__
from ckdiff.compare.status import rank

SCHEMA = "ckdiff.result/1"


SETTINGS = ("options", "threshold", "threshold_reason", "profile", "dtype", "batch", "length", "seed", "topk",
            "skip_first")


def torch_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


def envelope(kind: str, result: dict, verdict: str, command: str = "", provenance: dict | None = None) -> dict:
    """The versioned wrapper; ``command`` is the command line that reproduces the result (given by the
    command layer, never read from sys.argv here). ``provenance`` (ckdiff/provenance.py's record) is
    completed with the result's thresholds and settings."""
    doc = {"schema": SCHEMA, "kind": kind, "ckdiff_version": __version__, "torch_version": torch_version(),
           "command": command or "", "verdict": verdict, "result": result}
    if provenance is not None:
        doc["provenance"] = {**provenance, "settings": {k: result[k] for k in SETTINGS if k in result}}
    return doc


def worst_first_key(t: dict):
    """Sort key of a tensor row (a to_dict() entry), the same order as CompareResult.worst_first()
    (the status order of compare/status.py)."""
    m = float(t.get("max_abs") or 0.0)  # "nan"/"inf" strings in a cleaned dict
    return (rank(t["status"]), -(t.get("n_over_tol") or 0), -(m if m == m else float("inf")), t["name"])


# Rows a page-sized report (HTML, Markdown, JUnit) lists: the worst first, every mismatching tensor up to
# this many, then matching ones while room is left; --json alone has every row. A report of 10^6 rows
# would be a browser tab of gigabytes and a JUnit file CI systems choke on.
REPORT_ROWS = 20_000


def bounded_result(res) -> dict:
    """``res.to_dict()`` with its tensor rows bounded to ``REPORT_ROWS`` (streamed from ``tensor_dicts``:
    memory flat in the row count): the mismatching rows worst first, then matching ones, and
    ``tensors_omitted`` {"mismatching": n, "matching": n} for the rows left out. Results without
    per-tensor rows are returned whole."""
    if not hasattr(res, "tensor_dicts"):
        return res.to_dict()
    import heapq
    from ckdiff.compare.status import is_ok
    d = res.to_dict(tensors=False)
    good, n_bad, n_good = [], 0, 0

    def mismatching():  # the rows streamed once: matching ones kept while room is left, both counted
        nonlocal n_bad, n_good
        for i, t in enumerate(res.tensor_dicts()):
            if is_ok(t["status"]):
                n_good += 1
                if len(good) < REPORT_ROWS:
                    good.append(t)
            else:
                n_bad += 1
                yield i, t
    bad = [t for _, t in heapq.nsmallest(REPORT_ROWS, mismatching(), key=lambda it: (worst_first_key(it[1]), it[0]))]
    rows = bad + good[:max(0, REPORT_ROWS - len(bad))]
    d["tensors"] = rows
    if n_bad + n_good > len(rows):
        d["tensors_omitted"] = {"mismatching": n_bad - len(bad), "matching": n_good - (len(rows) - len(bad))}
    return d


def omitted_text(d: dict) -> str:
    """One line for the rows a bounded report leaves out, or ''."""
    o = d.get("tensors_omitted")
    if not o:
        return ""
    parts = [f"{n} {w}" for w, n in (("mismatching", o["mismatching"]), ("matching", o["matching"])) if n]
    return (f"{' and '.join(parts)} tensor{'s' if sum(o.values()) != 1 else ''} not listed here (the "
            f"{REPORT_ROWS} worst are); the --json report has every row")


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


def render_json(kind: str, result: dict, verdict: str, command: str = "", provenance: dict | None = None) -> str:
    return json.dumps(_clean(envelope(kind, result, verdict, command, provenance)), indent=1) + "\n"


_MARK = "\x00ckdiff-tensors\x00"


def iter_json(kind: str, result: dict, tensors, verdict: str, command: str = "", provenance: dict | None = None):
    """``render_json``'s text, piece by piece, with ``result["tensors"]`` taken from the iterable ``tensors``
    one row at a time (the same bytes as rendering the whole list at once; memory flat in the row count)."""
    doc = _clean(envelope(kind, {**result, "tensors": _MARK}, verdict, command, provenance))
    head, tail = json.dumps(doc, indent=1).split(json.dumps(_MARK), 1)
    yield head
    first = True
    for t in tensors:  # rows sit at depth 3 (envelope, result, tensors): each line indented 3 more
        yield ("[\n   " if first else ",\n   ") + json.dumps(_clean(t), indent=1).replace("\n", "\n   ")
        first = False
    yield ("[]" if first else "\n  ]") + tail + "\n"


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
