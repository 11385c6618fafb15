"""``ckdiff inspect PATH``: names, shapes, dtypes and sizes of one checkpoint."""
from __future__ import annotations

from ckdiff.commands import common

NAME = "inspect"
LONG = 2000  # listings longer than this are written as plain text
SUMMARY = "list a checkpoint's tensors (layers collapsed), parameter count and bytes"


def parser(prog: str = "ckdiff inspect"):
    return common.one_side_parser(prog, "List a checkpoint's tensors with repeated layers collapsed "
                                  "(layers.{0..31}.attention.wq.weight), its parameter count and bytes.",
                                  lambda p: p.add_argument("--full", action="store_true",
                                                           help="one row per tensor, no collapsing"))


def run(argv, command: str = "") -> int:
    from ckdiff.formats.readers import dtype_name
    from ckdiff.reports.render import collapse_layers, render_json
    from ckdiff.text import terminal
    args = parser().parse_args(argv)
    ck = common.open_one_side(args)
    rows = [(n, t.shape, dtype_name(t.dtype)) for n, t in ck.tensors.items()]
    shown = [(n, list(s), d, 1) for n, s, d in rows] if args.full else collapse_layers(rows)
    console = common.console(args)
    console.print(f"{terminal(ck.path)} \\[{ck.format}]: {len(ck)} tensors, {ck.num_params:,} parameters, "
                  f"{ck.num_bytes:,} bytes")
    for k in ("tp", "pp", "iteration", "shards"):
        if k in ck.meta:
            console.print(terminal(f"{k}: {ck.meta[k]}"))
    if not args.quiet:
        from ckdiff.reports.terminal import inspect_lines
        lines = inspect_lines(shown, console.width)
        if len(lines) > LONG:  # a rich print costs ~0.1 ms a line: a 200k-tensor listing goes out as plain text
            console.print(lines[0], no_wrap=True, crop=False, overflow="ignore")
            console.file.writelines(line.plain + "\n" for line in lines[1:])
        for line in lines if len(lines) <= LONG else ():
            console.print(line, no_wrap=True, crop=False, overflow="ignore")
    if args.json:
        doc = {"path": ck.path, "format": ck.format, "num_params": ck.num_params, "num_bytes": ck.num_bytes,
               "tensors": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in rows]}
        common.write_report(args.json, render_json("inspect", doc, "ok", command), (ck,), "json",
                            args.force)
    return 0

