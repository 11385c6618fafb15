"""Self-contained HTML and Markdown reports rendered from one result object.

The HTML page embeds its data as JSON and draws the tensor table with a few
lines of inline JavaScript (sort by clicking a header, filter by name and
status), so a 70B-scale report with thousands of tensors stays small: each
tensor is one compact JSON row, not a block of markup. No remote assets.
"""
from __future__ import annotations

import html
import json
import re

from .render import _clean, envelope, fmt

LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.(.+)$")


def heatmap(tensors: list[dict]) -> tuple[list[int], list[str], dict]:
    """(layers, kinds, {(layer, kind): max_abs}) over tensors with a layer index."""
    cells: dict = {}
    layers, kinds = set(), []
    for t in tensors:
        m = LAYER.search(t["name"])
        if not m:
            continue
        i, kind = int(m.group(1)), m.group(2)
        layers.add(i)
        if kind not in kinds:
            kinds.append(kind)
        v = t.get("max_abs") or 0.0
        if t["status"] in ("only-a", "only-b", "shape"):
            v = float("inf")
        cells[(i, kind)] = max(cells.get((i, kind), 0.0), v)
    return sorted(layers), kinds, cells


def _heat_html(tensors) -> str:
    layers, kinds, cells = heatmap(tensors)
    if not layers:
        return ""
    finite = [v for v in cells.values() if v not in (float("inf"),) and v > 0]
    top = max(finite) if finite else 1.0
    head = "".join(f"<th title='{html.escape(k)}'>{html.escape(k.replace('.weight', ''))}</th>" for k in kinds)
    rows = []
    for i in layers:
        tds = []
        for k in kinds:
            v = cells.get((i, k))
            if v is None:
                tds.append("<td class=na></td>")
            elif v == float("inf"):
                tds.append("<td style='background:#7a0000;color:#fff' title='missing or shape'>x</td>")
            elif v == 0:
                tds.append("<td style='background:#e6f4ea' title='0'></td>")
            else:
                a = 0.25 + 0.75 * (v / top)
                tds.append(f"<td style='background:rgba(200,30,30,{a:.2f})' title='{fmt(v)}'>{fmt(v, 2)}</td>")
        rows.append(f"<tr><th>layer {i}</th>{''.join(tds)}</tr>")
    return (f"<h2>Max-abs difference per layer</h2><div class=scroll><table class=heat><tr><th></th>{head}</tr>"
            + "".join(rows) + "</table></div>")


CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}
.banner{padding:12px 16px;border-radius:6px;font-size:18px;font-weight:600;margin-bottom:12px}
.ok{background:#e6f4ea;color:#0b6b2b}.bad{background:#fde7e7;color:#9b1111}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;
vertical-align:top}th{background:#f5f5f5;cursor:pointer}code{background:#f3f3f3;padding:1px 4px}
.scroll{overflow:auto;max-height:520px}.heat td{min-width:36px;font-size:11px;text-align:center}
.na{background:#fafafa}#tensors td.s-differ,#tensors td.s-shape,#tensors td.s-only-a,#tensors td.s-only-b,
#checks td.s-NO{color:#9b1111;font-weight:600}small{color:#666}"""

JS = """const D=JSON.parse(document.getElementById('data').textContent);
function render(){const rows=D.rows,q=document.getElementById('q').value.toLowerCase(),
st=document.getElementById('st').value,tb=document.querySelector('#tensors tbody');let h='',n=0;
for(const r of rows){if(q&&!r[0].toLowerCase().includes(q))continue;if(st&&r[1]!==st)continue;n++;
h+='<tr>'+r.map((c,i)=>'<td'+(i===1?' class="s-'+c+'"':'')+'>'+(c===null?'-':String(c).replace(/&/g,'&amp;').replace(/</g,'&lt;'))+'</td>').join('')+'</tr>';}
tb.innerHTML=h;document.getElementById('count').textContent=n+' of '+rows.length+' tensors';}
let sortCol=-1,asc=true;document.querySelectorAll('#tensors th').forEach((th,i)=>th.onclick=()=>{
asc=(sortCol===i)?!asc:(i<2);sortCol=i;D.rows.sort((a,b)=>{const x=a[i],y=b[i];
if(x===y)return 0;if(x===null)return 1;if(y===null)return -1;return (x<y?-1:1)*(asc?1:-1);});render();});
document.getElementById('q').oninput=render;document.getElementById('st').onchange=render;render();"""

COLUMNS = ["tensor", "status", "shape A", "shape B", "dtype A", "dtype B", "max abs", "index", "mean abs",
           "max rel", "cosine", "over tol", "NaN A/B", "diagnosis"]


def _rows(tensors):
    order = {"only-a": 0, "only-b": 0, "shape": 1, "differ": 2, "dtype": 3, "cast": 4, "quant": 5, "close": 6,
             "equal": 7}
    ts = sorted(tensors, key=lambda t: (order.get(t["status"], 9), -(t.get("max_abs") or 0)))
    num = lambda x: None if x is None else (float(f"{x:.4g}") if isinstance(x, float) else x)  # noqa: E731
    return [[t["name"], t["status"], str(t.get("shape_a")), str(t.get("shape_b")), t.get("dtype_a"), t.get("dtype_b"),
             num(t.get("max_abs")), str(t.get("max_abs_index")) if t.get("max_abs_index") is not None else None,
             num(t.get("mean_abs")), num(t.get("max_rel")), num(t.get("cosine")), t.get("n_over_tol"),
             f"{t.get('nan_a', 0)}/{t.get('nan_b', 0)}", "; ".join(t.get("diagnosis") or []) or None] for t in ts]


def _compare_section(d: dict) -> str:
    tensors = d.get("tensors", [])
    parts = []
    only_a = [t["name"] for t in tensors if t["status"] == "only-a"]
    only_b = [t["name"] for t in tensors if t["status"] == "only-b"]
    if only_a or only_b:
        parts.append("<h2>Key-set differences</h2><ul>" + "".join(
            f"<li>only in A: <code>{html.escape(n)}</code></li>" for n in only_a[:200]) + "".join(
            f"<li>only in B: <code>{html.escape(n)}</code></li>" for n in only_b[:200]) + "</ul>")
    diag = [(t["name"], x) for t in tensors for x in (t.get("diagnosis") or [])]
    notes = d.get("notes") or []
    if diag or notes:
        parts.append("<h2>Diagnosis</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "".join(
            f"<li><code>{html.escape(n)}</code>: {html.escape(x)}</li>" for n, x in diag[:500]) + "</ul>")
    if d.get("config_diff"):
        parts.append("<h2>Config differences</h2><table><tr><th>key</th><th>A</th><th>B</th></tr>" + "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(repr(a))}</td><td>{html.escape(repr(b))}</td></tr>"
            for k, a, b in d["config_diff"]) + "</table>")
    parts.append(_heat_html(tensors))
    statuses = sorted({t["status"] for t in tensors})
    opts = "".join(f"<option>{s}</option>" for s in statuses)
    parts.append("<h2>Tensors</h2><p><input id=q placeholder='filter by name' size=40> "
                 f"<select id=st><option value=''>all statuses</option>{opts}</select> <small id=count></small></p>"
                 "<div class=scroll><table id=tensors><thead><tr>"
                 + "".join(f"<th>{c}</th>" for c in COLUMNS) + "</tr></thead><tbody></tbody></table></div>")
    return "".join(parts)


def _logits_section(d: dict) -> str:
    keys = ["max_kl", "mean_kl", "max_kl_at", "gate_kl", "threshold", "threshold_reason", "top1_agreement",
            "topk_agreement", "first_topk_failure", "max_abs", "max_abs_at", "nmse", "first_divergent_layer",
            "layer_rel_errors", "dtype", "batch", "length", "seed", "vocab_compared"]
    rows = "".join(f"<tr><th>{k}</th><td>{html.escape(str(d.get(k)))}</td></tr>" for k in keys if k in d)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in d.get("notes", []))
    return f"<h2>Logits</h2><table>{rows}</table>" + (f"<ul>{notes}</ul>" if notes else "")


def _suite_section(d: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(c['converter'])}</td><td>{html.escape(c['model'])}</td>"
        f"<td>{html.escape(c.get('variant') or '-')}</td><td>{c['check']}</td>"
        f"<td class='s-{'yes' if c['ok'] else 'NO'}'>{'yes' if c['ok'] else 'NO'}</td><td>{html.escape(c['detail'])}</td></tr>"
        for c in d.get("checks", []))
    return ("<h2>Checks</h2><table id=checks><tr><th>converter</th><th>model</th><th>options</th><th>check</th><th>ok</th>"
            f"<th>detail</th></tr>{rows}</table>")


def render_html(kind: str, res, command: str = "") -> str:
    doc = _clean(envelope(kind, res.to_dict(), res.verdict(), command))
    d = doc["result"]
    ok = res.equivalent
    title = {"compare": "Checkpoint diff", "logits": "Logit comparison", "golden": "Golden diff",
             "roundtrip": "Round trip", "demo": "Converter suite"}.get(kind, kind)
    sides = ""
    if "a" in d:
        sides = (f"<p>A: <code>{html.escape(str(d['a']))}</code> [{html.escape(str(d.get('format_a')))}]<br>"
                 f"B: <code>{html.escape(str(d['b']))}</code> [{html.escape(str(d.get('format_b')))}]</p>")
    counts = d.get("counts")
    headline = f"{'EQUIVALENT' if ok else 'DIFFER'}" if kind != "demo" else ("PASS" if ok else "FAIL")
    if counts:
        headline += ": " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    body = [f"<div class='banner {'ok' if ok else 'bad'}' id=verdict>{html.escape(headline)}</div>",
            f"<h1>ckdiff {html.escape(title)}</h1>", sides,
            f"<p>Reproduce: <code>{html.escape(doc['command'])}</code><br><small>ckdiff {doc['ckdiff_version']}, "
            f"torch {doc['torch_version']}, schema {doc['schema']}</small></p>"]
    rows = []
    if "tensors" in d:
        body.append(_compare_section(d))
        rows = _rows(d["tensors"])
    if "max_kl" in d:
        body.append(_logits_section(d))
    if "checks" in d:
        body.append(_suite_section(d))
    if d.get("mapping"):
        body.append("<h2>Mapping</h2><table><tr><th>source</th><th>target</th><th>op</th></tr>" + "".join(
            f"<tr><td>{html.escape(', '.join(s))}</td><td>{html.escape(', '.join(t))}</td><td>{html.escape(o)}</td></tr>"
            for s, t, o in d["mapping"]) + "</table>")
    data = json.dumps({"rows": rows}, separators=(",", ":")).replace("</", "<\\/")
    script = f"<script id=data type=application/json>{data}</script>" + (f"<script>{JS}</script>" if rows else "")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>ckdiff {html.escape(title)}: "
            f"{'equivalent' if ok else 'differ'}</title><style>{CSS}</style></head><body>"
            + "".join(body) + script + "</body></html>\n")


def render_markdown(kind: str, res, command: str = "") -> str:
    doc = _clean(envelope(kind, res.to_dict(), res.verdict(), command))
    d = doc["result"]
    ok = res.equivalent
    icon = ":white_check_mark:" if ok else ":x:"
    lines = [f"## {icon} ckdiff {kind}: **{'equivalent' if ok else 'differ'}**" if kind != "demo"
             else f"## {icon} ckdiff converter suite: **{'pass' if ok else 'fail'}**", ""]
    if "a" in d:
        lines += [f"A: `{d['a']}` ({d.get('format_a')}) · B: `{d['b']}` ({d.get('format_b')})", ""]
    if d.get("counts"):
        lines += ["| status | tensors |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(d["counts"].items())] + [""]
    if "max_kl" in d:
        lines += [f"max per-token KL **{fmt(d['max_kl'])}** (threshold {fmt(d['threshold'])}, {d['threshold_reason']}); "
                  f"top-1 agreement {d['top1_agreement']:.4f}; first divergent layer {d['first_divergent_layer']}", ""]
    bad = [t for t in d.get("tensors", []) if t["status"] not in ("equal", "close", "cast", "quant")]
    if bad:
        lines += ["<details><summary>" + f"{len(bad)} mismatching tensors</summary>", "",
                  "| tensor | status | max abs @ index | diagnosis |", "|---|---|---|---|"]
        for t in bad[:200]:
            lines.append(f"| `{t['name']}` | {t['status']} | {fmt(t.get('max_abs'))} @ {t.get('max_abs_index')} | "
                         f"{'; '.join(t.get('diagnosis') or []) or '-'} |")
        lines += ["", "</details>", ""]
    if "checks" in d:
        failed = [c for c in d["checks"] if not c["ok"]]
        lines += [f"{len(d['checks']) - len(failed)}/{len(d['checks'])} checks passed", "",
                  "<details><summary>all checks</summary>", "", "| converter | model | options | check | ok | detail |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['converter']} | {c['model']} | {c.get('variant') or '-'} | {c['check']} | "
                  f"{'yes' if c['ok'] else '**NO**'} | "
                  f"{c['detail'].replace('|', '/')} |" for c in d["checks"]]
        lines += ["", "</details>", ""]
    lines += [f"<sub>`{doc['command']}` · ckdiff {doc['ckdiff_version']} · torch {doc['torch_version']}</sub>", ""]
    return "\n".join(lines)


__all__ = ["render_html", "render_markdown"]
