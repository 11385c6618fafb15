"""Terminal renderers (rich). Each takes a result object and the console the command chose.

The compare table fits the console width: tensor names are never wrapped or cut, columns are dropped
from the right (least important first) when they do not fit, and each diagnosis goes on its own
indented line under its row.
"""
from __future__ import annotations

import textwrap

from rich.markup import escape
from rich.text import Text

from ckdiff.text import printable, terminal
from ckdiff.compare.status import Status, is_ok
from ckdiff.reports.render import collapse_layers, fmt

GAP = 2
STATUS_STYLE = {Status.ONLY_A: "bold red", Status.ONLY_B: "bold red", Status.SHAPE: "bold red",
                Status.DIFFER: "bold red", Status.DTYPE: "red", Status.CAST: "yellow", Status.QUANT: "green",
                Status.CLOSE: "green", Status.EQUAL: "green", Status.REORDERED: "green"}


def _shape(t) -> str:
    a, b = (list(s) if s is not None else None for s in (t.shape_a, t.shape_b))
    if a == b:
        return str(a or "-")
    return f"{a or '-'} / {b or '-'}"


def _dtype(t) -> str:
    if t.dtype_a == t.dtype_b or None in (t.dtype_a, t.dtype_b):
        return t.dtype_a or t.dtype_b or "-"
    return f"{t.dtype_a} / {t.dtype_b}"


def _where(t) -> str:
    if t.max_abs_index is None:
        return "-"
    nan = f" nan {t.nan_a}/{t.nan_b}" if t.nan_a or t.nan_b else ""
    return f"{fmt(t.max_abs)} @ {t.max_abs_index}{nan}"


# optional columns, most important first: (header, cell)
OPTIONAL = [
    ("max abs @ index", _where),
    ("shape A / B", _shape),
    ("dtype A / B", _dtype),
    ("over tol", lambda t: str(t.n_over_tol) if t.status == Status.DIFFER else "-"),
    ("mean abs", lambda t: fmt(t.mean_abs) if t.status == Status.DIFFER else "-"),
    ("cosine", lambda t: fmt(t.cosine, 6) if t.cosine is not None and t.status == Status.DIFFER else "-"),
]


def mismatch_table(rows, width: int) -> list[Text]:
    """Lines for the mismatching tensors ``rows`` at console ``width``."""
    cols = [("status", lambda t: t.status), ("tensor", lambda t: printable(t.name))]
    cells = {h: [f(t) for t in rows] for h, f in cols + OPTIONAL}
    widths = {h: max([len(h)] + [len(c) for c in cells[h]]) for h in cells}
    used = widths["status"] + GAP + widths["tensor"]
    shown = ["status", "tensor"]
    for h, _ in OPTIONAL:
        if used + GAP + widths[h] <= width:
            shown.append(h)
            used += GAP + widths[h]
    out = []
    head = Text()
    for i, h in enumerate(shown):
        head.append(h.ljust(widths[h]) if i < len(shown) - 1 else h, style="bold")
        if i < len(shown) - 1:
            head.append(" " * GAP)
    out.append(head)
    indent = widths["status"] + GAP
    # when even the max-abs column finds no room beside the names, the main facts go on a line under each row
    spill = [] if OPTIONAL[0][0] in shown else OPTIONAL[:3]
    for j, t in enumerate(rows):
        line = Text()
        for i, h in enumerate(shown):
            c = cells[h][j]
            last = i == len(shown) - 1
            line.append(c if last else c.ljust(widths[h]), style=STATUS_STYLE.get(c) if h == "status" else None)
            if not last:
                line.append(" " * GAP)
        out.append(line)
        if spill:
            facts = "  ".join(f"{h.replace(' A / B', '')} {f(t)}" if h != "max abs @ index" else f"max abs {f(t)}"
                              for h, f in spill if f(t) != "-")
            for part in textwrap.wrap(facts, max(20, width - indent)):
                out.append(Text(" " * indent + part))
        for d in t.diagnosis:
            for k, part in enumerate(textwrap.wrap(printable(d), max(20, width - indent - 3))):
                out.append(Text(" " * indent + ("-> " if k == 0 else "   ") + part, style="cyan"))
    return out


def named_casts(res, most: int = 6) -> str:
    """The cast tensors, named, with repeated layers collapsed: ``layers.{0..31}.x (float32 -> bfloat16)``."""
    rows = [(t.name, [], f"{t.dtype_a} -> {t.dtype_b}") for t in res.tensors if t.status == Status.CAST]
    groups = collapse_layers(rows)
    parts = [f"{n} ({d})" for n, _, d, _ in groups[:most]]
    if len(groups) > most:
        parts.append(f"... {len(groups) - most} more (see --json)")
    return ", ".join(parts)


def print_compare(res, console, limit: int = 40) -> None:
    counts = res.counts()
    ok = res.equivalent
    summary = res.counts_text()
    style = "bold green" if ok else "bold red"
    console.print(f"[{style}]{'EQUIVALENT' if ok else 'DIFFER'}[/{style}]: {len(res.tensors)} tensors ({summary})")
    console.print(f"A: {terminal(res.a)} \\[{res.format_a}]\nB: {terminal(res.b)} \\[{res.format_b}]")
    bad = [t for t in res.worst_first() if not t.ok]
    if bad:
        console.print(Text("mismatching tensors, worst first", style="italic"))
        for line in mismatch_table(bad[:limit], console.width):
            console.print(line, no_wrap=True, crop=False, overflow="ignore")
        if len(bad) > limit:
            console.print(f"... {len(bad) - limit} more mismatches (use --limit or --json for all)")
    rest = {k: v for k, v in counts.items() if is_ok(k)}
    if rest:
        console.print("matching: " + ", ".join(f"{v} {k}" for k, v in rest.items()))
    if counts.get(Status.CAST):
        console.print(terminal("cast: " + named_casts(res)))
    reasons = res.reasons()
    for r in reasons:
        console.print(terminal(r))
    for n in res.notes:
        if n not in reasons:
            console.print(terminal(f"note: {n}"))
    print_warnings(res, console)


def print_warnings(res, console) -> None:
    """Findings that hold on both sides: about the checkpoints, not their difference (fail with --strict)."""
    for w in getattr(res, "warnings", None) or []:
        console.print(terminal(f"warning: {w}") + (" (fails with --strict)" if not res.strict else ""),
                      style="yellow")


def print_logits(res, console) -> None:
    style = "bold green" if res.equivalent else "bold red"
    console.print(f"[{style}]{res.verdict().upper()}[/{style}]: "
                  + terminal(res.summary().removeprefix("inconclusive: ") if res.verdict() == "inconclusive"
                           else f"decided by {res.summary()}"))
    enc = res.encodings or {}
    console.print(terminal(f"A: {res.a} [{res.format_a}, {enc.get('A', '?')}]") + "\n"
                  + terminal(f"B: {res.b} [{res.format_b}, {enc.get('B', '?')}]"))
    console.print(f"tokens: {res.batch} x {res.length} (seed {res.seed}), compute {res.dtype}, vocab {res.vocab_compared}")
    fl = res.noise_floor or {}
    if fl:
        console.print(escape(f"noise floor ({res.profile} profile): {fl['applied_to']}'s weights as {fl['encoding']} "
                             f"vs {fl['reference']}: KL mean {fmt(fl['mean_kl'])}, p99 {fmt(fl['p99_kl'])}, max "
                             f"{fmt(fl['max_kl'])}, top-1 {fl['top1_agreement']:.4f}"))
        for r in res.signals:
            mark = "FAIL" if r["ratio"] > 1 else "ok"
            console.print(escape(f"  {r['signal']}: observed {fmt(r['observed'])}, floor {fmt(r['floor'])}, limit "
                                 f"{fmt(r['limit'])} ({mark})"))
    console.print(escape(f"KL({res.kl_reference} || other) max {fmt(res.max_kl)} at [seq, pos] {res.max_kl_at}, "
                         f"p99 {fmt(res.p99_kl)}, mean {fmt(res.mean_kl)}"))
    console.print(f"top-1 agreement {res.top1_agreement:.4f}; mutual top-{res.topk} {res.topk_agreement:.4f}"
                  + (escape(f" (first failure at {res.first_topk_failure})") if res.first_topk_failure else ""))
    console.print(escape(f"max |logit diff| {fmt(res.max_abs)} at [seq, pos, token] {res.max_abs_at}; "
                         f"NMSE {fmt(res.nmse)}"))
    if res.layer_rel_errors:
        div = "none" if res.first_divergent_layer is None else str(res.first_divergent_layer)
        console.print(f"first divergent layer: {div} (relative hidden-state error per layer: "
                      + ", ".join(fmt(x, 2) for x in res.layer_rel_errors) + ")")
    if res.tensor_diff is not None:
        console.print(f"tensor diff (run first): {res.tensor_diff}")
    for n in res.notes:
        console.print(terminal(f"note: {n}"))


SUITE_DETAIL_MIN = 48  # the detail column's least width in the table layout; narrower terminals get blocks


def print_suite(res, console) -> None:
    """The checks as a table; on a terminal too narrow for the table to keep the detail readable, one
    block per check (its key on one line, the detail wrapped at spaces below), so no word is ever split."""
    import textwrap

    from rich.table import Table
    ok = res.equivalent
    from ckdiff.compare.status import ok_text, tally
    console.print(f"[{'bold green' if ok else 'bold red'}]{'PASS' if ok else 'FAIL'}[/]: {tally(res.checks)}")
    rows = [(printable(c.converter), printable(c.model), printable(c.variant or "-"), c.check, ok_text(c.ok),
             printable(c.detail)) for c in res.checks]
    heads = ("converter", "model", "options", "check", "ok")
    key_width = sum(max([len(h), *(len(r[i]) for r in rows)]) + 3 for i, h in enumerate(heads)) + 4
    if console.width - key_width >= SUITE_DETAIL_MIN:
        t = Table()
        for col in heads:
            t.add_column(col, no_wrap=True)
        t.add_column("detail", overflow="fold", ratio=1)
        for r in rows:
            t.add_row(*(escape(x) for x in r))
        console.print(t)
        return
    width = max(console.width - 4, 20)
    for conv, model, opts, check, good, detail in rows:
        style = {"yes": "green", "skip": "yellow"}.get(good, "bold red")
        line = Text(f"{good:<4}", style=style)
        line.append(" ".join(x for x in (conv, model, opts if opts != "-" else "", check) if x))
        console.print(line, no_wrap=True, crop=False, overflow="ignore")
        for part in textwrap.wrap(detail, width, break_long_words=False, break_on_hyphens=False) or ["-"]:
            console.print(Text("    " + part), no_wrap=True, crop=False, overflow="ignore")


def inspect_lines(rows, width: int) -> list[Text]:
    """Lines for ``inspect``: (name, shape, dtype, count) rows; names never cut, the count column left out
    when it does not fit, shape and dtype under the name when even they do not."""
    cells = [(printable(n), str(sh), d, str(c)) for n, sh, d, c in rows]
    heads = ("tensor", "shape", "dtype", "count")
    w = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(heads)]
    cols = 4 if sum(w) + 3 * GAP <= width else (3 if sum(w[:3]) + 2 * GAP <= width else 1)

    def join(parts, widths):
        return (" " * GAP).join(p.ljust(x) for p, x in zip(parts[:-1], widths)) + \
            (" " * GAP if len(parts) > 1 else "") + parts[-1]
    out = [Text(join(list(heads[:cols]), w), style="bold")]
    for r in cells:
        out.append(Text(join(list(r[:cols]), w)))
        if cols == 1:
            out.append(Text("    " + "  ".join(r[1:3]) + ("" if r[3] == "1" else f"  x{r[3]}")))
    return out
