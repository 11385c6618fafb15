"""Self-contained HTML and Markdown reports rendered from one result object.

The HTML page embeds its data as JSON and draws the tensor table with a few
lines of inline JavaScript (sort by clicking a header, filter by name and
status), so a 70B-scale report with thousands of tensors stays small: each
tensor is one compact JSON row, not a block of markup. No remote assets.

The markup lives in jinja2 templates (``ckdiff/reports/templates/*.html.j2``) rendered with autoescape on;
this module turns a result into the plain values they print (no computation beyond layout: cell classes,
SVG geometry, formatted numbers). Markdown is written here, each value escaped with ``md_text``.
"""
from __future__ import annotations


import functools
import math
import re
import sys
from types import SimpleNamespace
from typing import Optional

from markupsafe import Markup

from ckdiff.compare.result import reasons
from ckdiff.compare.status import Status, is_ok, ok_text, tally
from ckdiff.text import html_text, md_cell, md_code, md_text, printable
from ckdiff.reports.render import _clean, bounded_result, envelope, fmt, omitted_text, worst_first_key


def _num(x) -> float:
    return float(x) if x is not None else 0.0  # "nan"/"inf" strings in a cleaned dict included


def cell_level(t: dict) -> float:
    """How far a tensor is from its tolerance, on one scale for every status:
    0 bit-exact; (0, 1] within tolerance (cast, close, quantized: judged against their own tolerance or
    scale unit); > 1 over tolerance, growing with the share of elements over it; inf missing or shape."""
    st = t["status"]
    if st == Status.EQUAL:
        return 0.0
    if is_ok(st):
        return 0.5
    if st in (Status.ONLY_A, Status.ONLY_B, Status.SHAPE):
        return float("inf")
    if st == Status.DTYPE:
        return 1.5
    share = (t.get("n_over_tol") or 0) / max(1, t.get("numel") or 1)
    return 2.0 + share  # differ: 2 (a few elements) .. 3 (every element)


def _layer_of(name: str, patterns) -> Optional[tuple[int, str]]:
    """(layer index, the rest of the name) by the first of the formats' layer patterns that matches."""
    for pat in patterns:
        m = pat.search(name)
        if m and m.end() < len(name):
            return int(m.group(1)), name[m.end():]
    return None


def heatmap(tensors: list[dict], formats=()) -> tuple[list[int], list[str], dict]:
    """(layers, kinds, {(layer, kind): (level, tensor)}) over tensors with a layer index; worst tensor per cell.
    A layer index is found by the layer pattern each format declares (``formats``: the result's format
    names; formats/registry.py), the generic one otherwise."""
    from ckdiff.formats.registry import layer_patterns
    patterns = layer_patterns(*formats)
    cells: dict = {}
    layers, kinds = set(), []
    for t in tensors:
        m = _layer_of(t["name"], patterns)
        if not m:
            continue
        i, kind = m
        layers.add(i)
        if kind not in kinds:
            kinds.append(kind)
        lv = cell_level(t)
        if (i, kind) not in cells or lv > cells[(i, kind)][0]:
            cells[(i, kind)] = (lv, t)
    return sorted(layers), kinds, cells


# (css class, label) of the legend, from passing to failing
LEGEND = [("h0", "bit-exact"), ("h1", "within tolerance (cast, close, quantized within its scale bound)"),
          ("h2", "cast refused (--strict-dtype)"), ("h3", "over tolerance: under 1% of elements"),
          ("h4", "over tolerance: 1% of elements or more"), ("h5", "missing or shape mismatch")]


def _heat_class(lv: float) -> str:
    if lv == 0:
        return "h0"
    if lv <= 1:
        return "h1"
    if lv < 2:
        return "h2"
    if lv == float("inf"):
        return "h5"
    return "h3" if lv < 2.01 else "h4"


def breakable(text) -> list[str]:
    """``text`` cut after every dot and underscore: the template puts a ``<wbr>`` between the pieces, so
    long tensor kinds may wrap in narrow headers while every piece is still escaped as text."""
    return re.split(r"(?<=[._])", str(text))


def _heat_view(tensors, formats=()) -> Optional[dict]:
    """What the heatmap template draws: header kinds, one row of cells per layer, the legend of the classes
    present and the failing cells named above the grid (so a failing grid never looks green)."""
    layers, kinds, cells = heatmap(tensors, formats)
    if not layers:
        return None
    rows, present = [], set()
    for i in layers:
        tds = []
        for k in kinds:
            c = cells.get((i, k))
            if c is None:
                tds.append(None)
                continue
            lv, t = c
            cls = _heat_class(lv)
            present.add(cls)
            tip = f"{t['name']}: {t['status']}, max abs {fmt(t.get('max_abs'))}"
            if t["status"] == Status.DIFFER:
                tip += f", {t.get('n_over_tol')} of {t.get('numel')} elements over tolerance"
            text = {"h5": "x", "h2": "dtype"}.get(cls, "")
            if cls in ("h3", "h4"):
                text = fmt(t.get("max_abs"), 2)
            tds.append({"cls": cls, "tip": tip, "text": text})
        rows.append({"layer": i, "cells": tds})
    bad = [(i, k.replace(".weight", "")) for i in layers for k in kinds if (i, k) in cells and cells[(i, k)][0] > 1]
    return {"kinds": [(k, k.replace(".weight", "")) for k in kinds], "rows": rows,
            "legend": [(c, label) for c, label in LEGEND if c in present],
            "failing": bad[:12], "more": max(0, len(bad) - 12)}


# the page's own style and script: static text of this module, the only values marked safe
CSS = Markup("""body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1600px}h1{font-size:20px}
h2{font-size:16px;margin:20px 0 6px}
.banner{padding:12px 16px;border-radius:6px;font-size:18px;font-weight:600;margin-bottom:12px}
.banner small{display:block;font-size:14px;font-weight:400}
.ok{background:#e6f4ea;color:#0b6b2b}.bad{background:#fde7e7;color:#9b1111}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;
vertical-align:top;white-space:nowrap}th{background:#f5f5f5}#tensors th{cursor:pointer}
code{background:#f3f3f3;padding:1px 4px;overflow-wrap:anywhere}
.scroll{overflow:auto;max-height:520px}
#tensors td.dg div{max-width:min(32em,38vw);overflow:hidden;text-overflow:ellipsis}
.heat td{min-width:40px;font-size:12px;text-align:center;font-variant-numeric:tabular-nums}
.heat tr:first-child th{white-space:normal;font-size:12px;max-width:7em;vertical-align:bottom;position:sticky;top:0;z-index:2}
.heat th:first-child{position:sticky;left:0;z-index:1}.heat tr:first-child th:first-child{z-index:3}
.failing{color:#9b1111;font-weight:600}.map{width:100%}.map td{white-space:normal;overflow-wrap:anywhere}
.h0{background:#d7efdc}.h1{background:#9fd8a9}.h2{background:#ffd27a}.h3{background:#f08c5a;color:#111}
.h4{background:#b3261e;color:#fff}.h5{background:#5c0a0a;color:#fff}
.legend{font-size:12px}.lg{margin-right:14px;white-space:nowrap}
.lg i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px;border:1px solid #bbb}
.na{background:#fafafa}#tensors td.s-differ,#tensors td.s-shape,#tensors td.s-only-a,#tensors td.s-only-b,
#checks td.s-NO{color:#9b1111;font-weight:600}small{color:#666}
#checks td.dt{white-space:normal;min-width:16em}#checks td.rp{white-space:normal;font-size:12px}
.kv th{cursor:default;font-weight:500}.kv td{white-space:normal}
svg text{font:11px system-ui,sans-serif;fill:#333}""")

JS = Markup("""const D=JSON.parse(document.getElementById('data').textContent),DIAG=D.diag;
for(const box of document.querySelectorAll('.scroll')){const c=box.querySelector('.heat .h2,.heat .h3,.heat .h4,.heat .h5');
if(c){const b=box.getBoundingClientRect(),r=c.getBoundingClientRect();
box.scrollTop+=r.top-b.top-(box.clientHeight-r.height)/2;box.scrollLeft+=r.left-b.left-(box.clientWidth-r.width)/2;}}
function render(){const rows=D.rows,q=document.getElementById('q').value.toLowerCase(),
st=document.getElementById('st').value,tb=document.querySelector('#tensors tbody');let h='',n=0;
for(const r of rows){if(q&&!r[0].toLowerCase().includes(q))continue;if(st&&r[1]!==st)continue;n++;
const esc=c=>c===null?'-':String(c).replace(/&/g,'&amp;').replace(/</g,'&lt;').replace(/"/g,'&quot;');
const last=DIAG;h+='<tr>'+r.map((c,i)=>'<td'+(i===1?' class="s-'+c+'"':'')+(i===last?' class=dg title="'+esc(c)+'"':'')+'>'+(i===last?'<div>'+esc(c)+'</div>':esc(c))+'</td>').join('')+'</tr>';}
tb.innerHTML=h;document.getElementById('count').textContent=n+' of '+rows.length+' tensors';}
let sortCol=-1,asc=true;document.querySelectorAll('#tensors th').forEach((th,i)=>th.onclick=()=>{
asc=(sortCol===i)?!asc:(i<2);sortCol=i;D.rows.sort((a,b)=>{const x=a[i],y=b[i];
if(x===y)return 0;if(x===null)return 1;if(y===null)return -1;return (x<y?-1:1)*(asc?1:-1);});render();});
document.getElementById('q').oninput=render;document.getElementById('st').onchange=render;render();""")

# the diagnosis third, beside the name and status, so a failing row's cause is in view at any width
COLUMNS = ["tensor", "status", "diagnosis", "shape A", "shape B", "dtype A", "dtype B", "max abs", "index",
           "mean abs", "max rel", "cosine", "over tol", "NaN A/B"]
DIAG_COL = COLUMNS.index("diagnosis")


def _rows(tensors):
    ts = sorted(tensors, key=worst_first_key)
    num = lambda x: None if x is None else (float(f"{x:.4g}") if isinstance(x, float) else x)  # noqa: E731
    return [[t["name"], t["status"], "; ".join(t.get("diagnosis") or []) or None, str(t.get("shape_a")),
             str(t.get("shape_b")), t.get("dtype_a"), t.get("dtype_b"),
             num(t.get("max_abs")), str(t.get("max_abs_index")) if t.get("max_abs_index") is not None else None,
             num(t.get("mean_abs")), num(t.get("max_rel")), num(t.get("cosine")), t.get("n_over_tol"),
             f"{t.get('nan_a', 0)}/{t.get('nan_b', 0)}"] for t in ts]


def _compare_view(d: dict) -> dict:
    """What the compare section shows: key-set differences, reasons, diagnosis, warnings, config
    differences, the heatmap and the statuses the tensor table filters by."""
    tensors = d.get("tensors", [])
    return {"only_a": [t["name"] for t in tensors if t["status"] == Status.ONLY_A][:200],
            "only_b": [t["name"] for t in tensors if t["status"] == Status.ONLY_B][:200],
            "reasons": reasons(d), "notes": d.get("notes") or [],
            "diag": [(t["name"], x) for t in tensors for x in (t.get("diagnosis") or [])][:500],
            "warnings": d.get("warnings") or [], "strict": d.get("strict"),
            "config_diff": [(str(k), repr(a), repr(b)) for k, a, b in d.get("config_diff") or []],
            "heat": _heat_view(tensors, (d.get("format_a"), d.get("format_b"))),
            "statuses": sorted({t["status"] for t in tensors}), "columns": COLUMNS, "omitted": omitted_text(d)}


def logits_gate(d: dict) -> str:
    """The verdict's reason in words: the deciding signal against its limit, the floor and the profile."""
    sig = next((r for r in d.get("signals") or [] if r.get("signal") == d.get("deciding_signal")), None)
    if sig is None:
        return f"max per-token KL {fmt(_num(d.get('max_kl')))} (threshold {fmt(_num(d.get('threshold')))})"
    ok = _num(sig.get("ratio")) <= 1
    return (f"decided by {sig['signal']}: {fmt(_num(sig['observed']))} is {'within' if ok else 'over'} its limit "
            f"{fmt(_num(sig['limit']))} (noise floor {fmt(_num(sig['floor']))}, {d.get('profile')} profile)")


def _signals_view(d: dict) -> Optional[dict]:
    fl = d.get("noise_floor") or {}
    if not fl:
        return None
    return {"applied_to": str(fl.get("applied_to")), "encoding": str(fl.get("encoding")),
            "reference": str(fl.get("reference")), "profile": str(d.get("profile")),
            "rows": [(str(r["signal"]), fmt(_num(r["observed"])), fmt(_num(r["floor"])), fmt(_num(r["limit"])),
                      "over" if _num(r["ratio"]) > 1 else "ok") for r in d.get("signals") or []]}


def _kl_color(kl: float, thr: float) -> str:
    if kl != kl or kl > thr:
        r = min(1.0, math.log10(max(kl / thr, 1.0) + 1) / 3) if kl == kl else 1.0
        return f"rgb({int(240 - 80 * r)},{int(140 - 110 * r)},{int(90 - 60 * r)})"
    r = 0.0 if kl <= 0 else min(1.0, max(0.0, (math.log10(kl / thr) + 9) / 9))  # 1e-9 x thr .. thr
    return f"rgb({int(215 - 60 * r)},{int(239 - 40 * r)},{int(220 - 90 * r)})"


def _token_kl_view(d: dict) -> Optional[dict]:
    """The per-token KL grid as SVG geometry: one rect (x, y, w, h, fill, tooltip) per sequence and position."""
    grid = d.get("token_kl") or []
    if not grid or not grid[0]:
        return None
    thr = _num(d.get("threshold")) or 1e-30
    T = len(grid[0])
    w = max(4, min(16, 760 // T))
    h = 16
    left, top = 46, 16
    shift = int(bool(d.get("skip_first")))
    rows = []  # per sequence: its cells (x, y, width, height, fill, tooltip) and its label's baseline
    for si, row in enumerate(grid):
        rects = [(left + pi * w, top + si * h, w - 1, h - 1, _kl_color(_num(v), thr),
                  f"seq {si}, pos {pi + shift}: KL {fmt(_num(v))}") for pi, v in enumerate(row)]
        rows.append((rects, top + si * h + 12, f"seq {si}"))
    return {"width": left + T * w + 4, "height": top + len(grid) * h + 18, "left": left, "right": left + T * w,
            "last": T - 1 + shift, "threshold": fmt(thr), "rows": rows}


def _layers_view(d: dict) -> Optional[dict]:
    """The per-layer hidden-state divergence as SVG geometry: bars on a log scale against each layer's limit."""
    errs = [_num(x) for x in d.get("layer_rel_errors") or []]
    if not errs:
        return None
    from ckdiff.compare.noise import PROFILES
    prof = PROFILES.get(d.get("profile")) or PROFILES["standard"]
    floor = [_num(x) for x in (d.get("noise_floor") or {}).get("layer_rel_errors") or []]
    limits = [prof.hidden_mult * (floor[i] if i < len(floor) else 0.0) + prof.hidden_abs for i in range(len(errs))]
    thr = max(limits)
    lo, hi = -18, 1  # log10 range drawn
    H, bw, left = 160, max(10, min(36, 700 // len(errs))), 44
    y = lambda v: 8 + H * (hi - max(lo, min(hi, math.log10(v) if v > 0 else lo))) / (hi - lo)  # noqa: E731
    bars = []
    for i, v in enumerate(errs):
        top = y(v)
        bars.append((left + i * bw + 1, f"{top:.1f}", bw - 2, f"{max(1.0, 8 + H - top):.1f}",
                     "#b3261e" if not v <= limits[i] else "#2e8b57",
                     f"hidden state {i}: relative error {fmt(v)} (limit {fmt(limits[i])})"))
    first = d.get("first_divergent_layer")
    right = left + len(errs) * bw
    return {"width": right + 130, "height": H + 30, "left": left, "right": right,
            "ticks": [(f"{y(10.0 ** e) + 4:.1f}", f"1e{e}") for e in (0, -6, -12, -18)],
            "ty": f"{y(thr):.1f}", "ty_label": f"{y(thr) + 4:.1f}", "threshold": fmt(thr), "bars": bars,
            "first": "none" if first is None else first}


def _topk_view(d: dict) -> Optional[dict]:
    w = d.get("worst_topk") or {}
    if not w.get("a_ids"):
        return None
    seq, pos = (d.get("max_kl_at") or [0, 0])[:2]
    return {"k": len(w["a_ids"]), "seq": seq, "pos": pos,
            "rows": [(i + 1, a, fmt(_num(la), 4), b, fmt(_num(lb), 4)) for i, (a, la, b, lb)
                     in enumerate(zip(w["a_ids"], w["a_logprob"], w["b_ids"], w["b_logprob"]))]}


def _logits_view(d: dict) -> dict:
    at = lambda x: "-" if x is None else ", ".join(map(str, x))  # noqa: E731
    kv = [("verdict", logits_gate(d)),
          ("tokens", f"{d.get('batch')} sequences x {d.get('length')} positions of random ids (seed {d.get('seed')}), "
                     f"compute {d.get('dtype')}, vocabulary {d.get('vocab_compared')}"),
          (f"KL({d.get('kl_reference', 'A')} || other)", f"max {fmt(_num(d.get('max_kl')))} at sequence, position "
                               f"{at(d.get('max_kl_at'))}; p99 {fmt(_num(d.get('p99_kl')))}; mean "
                               f"{fmt(_num(d.get('mean_kl')))}"),
          ("top-1 agreement", f"{_num(d.get('top1_agreement')):.4f}"),
          (f"mutual top-{d.get('topk')}", f"{_num(d.get('topk_agreement')):.4f}"
           + (f" (first failure at sequence, position {at(d.get('first_topk_failure'))})"
              if d.get("first_topk_failure") else "")),
          ("max |logit difference|", f"{fmt(_num(d.get('max_abs')))} at sequence, position, token "
                                     f"{at(d.get('max_abs_at'))}"),
          ("NMSE", fmt(_num(d.get("nmse"))))]
    return {"kv": kv, "notes": d.get("notes", []), "signals": _signals_view(d), "token_kl": _token_kl_view(d),
            "layers": _layers_view(d), "topk": _topk_view(d)}


def _suite_view(d: dict) -> list[dict]:
    return [{"converter": c["converter"], "model": c["model"], "variant": c.get("variant") or "-",
             "check": c["check"], "ok": ok_text(c["ok"]), "detail": c["detail"], "command": c.get("command")}
            for c in d.get("checks", [])]


def _instance(res, module: str, name: str) -> bool:
    """``isinstance(res, module.name)`` without importing ``module`` (logits and golden import torch): a
    result of that type exists only once its module is loaded."""
    mod = sys.modules.get(module)
    return mod is not None and isinstance(res, getattr(mod, name))


class _Shape:
    """What a result holds, from its type: two sides with tensors (compare, golden), two sides run as
    models (logits), or converter checks (roundtrip, demo)."""

    def __init__(self, res):
        from ckdiff.compare.result import CompareResult
        self.tensors = isinstance(res, CompareResult)
        self.logits = _instance(res, "ckdiff.compare.logits", "LogitsResult")
        self.checks = _instance(res, "ckdiff.golden.suite", "SuiteResult")
        self.sides = self.tensors or self.logits
        self.mapping = self.tensors or self.checks
        if not (self.tensors or self.logits or self.checks):
            raise TypeError(f"no report layout for a {type(res).__name__}")


def _escape(value):
    """The environment's ``finalize``: every value a template prints is passed through ``html_text``
    (``printable`` plus ``& < > " '`` as entities, the one HTML escape ckdiff uses), which writes control
    characters and direction marks as visible escapes, something markupsafe's escape does not do. Values
    already ``Markup`` (the package's static CSS and JavaScript, macro output) pass as they are."""
    return value if isinstance(value, Markup) else Markup(html_text(value))


@functools.lru_cache(maxsize=1)
def environment():
    """The jinja2 environment the HTML report renders through: templates shipped in
    ``ckdiff/reports/templates``, autoescape on for every template (so ``~``, ``join``, ``replace`` and
    macro output escape as well), undefined names an error rather than an empty string."""
    import jinja2
    env = jinja2.Environment(loader=jinja2.PackageLoader("ckdiff.reports", "templates"), autoescape=True,
                             finalize=_escape, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["breakable"] = breakable
    # the data block goes through jinja2's own ``tojson`` (``< > & '`` as \\u escapes, so no value can close
    # the block or open a comment in it), compact and in the order the page's script reads it
    env.policies["json.dumps_kwargs"] = {"separators": (",", ":")}
    return env


def render_html(kind: str, res, command: str = "") -> str:
    shape = _Shape(res)
    doc = _clean(envelope(kind, bounded_result(res), res.verdict(), command))
    d = doc["result"]
    ok = res.equivalent
    title = {"compare": "Checkpoint diff", "logits": "Logit comparison", "golden": "Golden diff",
             "roundtrip": "Round trip", "demo": "Converter suite"}.get(kind, kind)
    headline = f"{'EQUIVALENT' if ok else 'DIFFER'}" if not shape.checks else ("PASS" if ok else "FAIL")
    if shape.tensors and d["counts"]:
        headline += ": " + ", ".join(f"{v} {k}" for k, v in sorted(d["counts"].items()))
    sub = None
    if shape.logits:
        sub = logits_gate(d)
    elif shape.checks:
        sub = tally([SimpleNamespace(ok=c["ok"]) for c in d["checks"]])
    rows = _rows(d["tensors"]) if shape.tensors else []
    view = {
        "title": title, "ok": ok, "headline": headline, "sub": sub,
        "sides": ([(str(d["a"]), str(d.get("format_a"))), (str(d["b"]), str(d.get("format_b")))]
                  if shape.sides else None),
        "command": doc["command"], "ckdiff_version": doc["ckdiff_version"], "torch_version": doc["torch_version"],
        "schema": doc["schema"],
        "compare": _compare_view(d) if shape.tensors else None,
        "logits": _logits_view(d) if shape.logits else None,
        "checks": _suite_view(d) if shape.checks else None,
        "mapping": [(", ".join(s), ", ".join(t), o) for s, t, o in d["mapping"]] if shape.mapping else [],
        "data": {"rows": [[printable(c) if isinstance(c, str) else c for c in r] for r in rows], "diag": DIAG_COL},
        "css": CSS, "js": JS if rows else None,
    }
    return environment().get_template("report.html.j2").render(view)


def render_markdown(kind: str, res, command: str = "") -> str:
    shape = _Shape(res)
    doc = _clean(envelope(kind, bounded_result(res), res.verdict(), command))
    d = doc["result"]
    ok = res.equivalent
    icon = ":white_check_mark:" if ok else ":x:"
    lines = [f"## {icon} ckdiff {kind}: **{'equivalent' if ok else 'differ'}**" if kind != "demo"
             else f"## {icon} ckdiff converter suite: **{'pass' if ok else 'fail'}**", ""]
    if shape.sides:
        lines += [f"A: {md_code(d['a'])} ({md_text(d.get('format_a'))}) · B: {md_code(d['b'])} ({md_text(d.get('format_b'))})",
                  ""]
    if shape.tensors and d["counts"]:
        lines += ["| status | tensors |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(d["counts"].items())] + [""]
    if shape.logits:
        lines += [f"{logits_gate(d)}; top-1 agreement {_num(d['top1_agreement']):.4f}; first divergent layer "
                  f"{'none' if d['first_divergent_layer'] is None else d['first_divergent_layer']}", ""]
    if shape.tensors and reasons(d):
        lines += [f"- {md_cell(r)}" for r in reasons(d)] + [""]
    if shape.tensors and d.get("warnings"):
        lines += [f"**Warnings** (hold on both sides alike{'' if d.get('strict') else '; fail with `--strict`'}):", ""]
        lines += [f"- {md_cell(w)}" for w in d["warnings"]] + [""]
    bad = sorted((t for t in d["tensors"] if not is_ok(t["status"])), key=worst_first_key) if shape.tensors else []
    if bad:
        n_bad = len(bad) + (d.get("tensors_omitted") or {}).get("mismatching", 0)
        lines += ["<details><summary>" + f"{n_bad} mismatching tensors</summary>", "",
                  "| tensor | status | max abs @ index | diagnosis |", "|---|---|---|---|"]
        for t in bad[:200]:
            lines.append(f"| {md_code(t['name'])} | {t['status']} | {fmt(t.get('max_abs'))} @ {t.get('max_abs_index')} | "
                         f"{md_cell('; '.join(t.get('diagnosis') or []) or '-')} |")
        lines += ["", "</details>", ""]
    if shape.tensors and omitted_text(d):
        lines += [md_text(omitted_text(d)), ""]
    if shape.checks:
        failed = [c for c in d["checks"] if c["ok"] is False]
        lines += [f"{len(d['checks']) - len(failed)}/{len(d['checks'])} checks passed", "",
                  "<details><summary>all checks</summary>", "", "| converter | model | options | check | ok | detail |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {md_text(c['converter'])} | {md_text(c['model'])} | {md_text(c.get('variant') or '-')} | {md_text(c['check'])} | "
                  f"{ {True: 'yes', False: '**NO**'}.get(c['ok'], 'skip')} | "
                  f"{md_cell(c['detail'])} |" for c in d["checks"]]
        lines += ["", "</details>", ""]
    lines += [f"<sub>{md_code(doc['command']) + ' · ' if doc['command'] else ''}ckdiff {doc['ckdiff_version']} · torch {doc['torch_version']}</sub>", ""]
    return "\n".join(lines)


__all__ = ["render_html", "render_markdown"]
