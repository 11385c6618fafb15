"""Reports never land on an input, and names from any reader reach every report sink escaped.

Fixtures: ckdiff's golden writers (HF through ckdiff's HF writer, Meta, Megatron-LLM, Megatron-Core via
torch.distributed.checkpoint.save, GGUF via the gguf package's writer)."""
import os
from pathlib import Path

import pytest

from ckdiff.golden.emit import emit

LAYOUTS = ["hf", "meta", "megatron", "mcore", "gguf"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    out = {layout: emit(base / layout, "llama-gqa", layout, shards=2 if layout == "hf" else 1) for layout in LAYOUTS}
    from ckdiff.golden.models import write_tiny_hf
    tok = base / "tok"  # an HF directory with tokenizer files, read by `ckdiff logits`
    write_tiny_hf(tok, "llama-gqa", "float32", 0)
    out["hf+tokenizer"] = tok
    return out


def _files(root: Path) -> list:
    return sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_file_of_an_input_is_a_report_target(seeds, run_cli, layout):
    """Every file the reader opened or will open (indexes, configs, trackers, metadata, shards) is an input."""
    root = seeds[layout]
    files = _files(root)
    assert files
    for f in files:
        before = f.read_bytes()
        code, _, err = run_cli(root, root, "--json", f, "-q")
        assert code == 2 and "refusing to overwrite" in err, (f, err)
        assert f.read_bytes() == before, f


def test_a_hard_link_to_an_input_is_not_a_report_target(seeds, run_cli, tmp_path):
    root = seeds["megatron"]
    tracker = root / "latest_checkpointed_iteration.txt"
    link = tmp_path / "report.json"
    os.link(tracker, link)
    code, _, err = run_cli(root, root, "--json", link, "-q")
    assert code == 2 and "refusing to overwrite" in err, err
    assert tracker.read_text().strip() == "release"


def test_logits_refuses_its_tokenizer_files_as_targets(seeds, run_cli):
    root = seeds["hf+tokenizer"]
    for f in _files(root):
        code, _, err = run_cli("logits", root, root, "--markdown", f, "--length", 4)
        assert code == 2 and "refusing to overwrite" in err, (f, err)


# ------------------------------------------------------------------ names through every sink
EVIL = "w`<img src=x onerror=alert(1)>`![i](http://evil.example/i.png)<!--<script>|*b*\x1b[2J\u202e.weight"
RAW = ("<img", "<script", "<!--", "\x1b", "\u202e")  # live markup or raw controls in a report as shown
RAW_TERMINAL = ("\x1b", "\u202e")


def _write(reader: str, d: Path, tensors: dict) -> Path:
    """``tensors`` in the format a reader reads: safetensors (the safetensors package), a torch.save file,
    a DCP directory (torch.distributed.checkpoint.save)."""
    import torch
    from safetensors.torch import save_file
    if reader == "safetensors":
        save_file(tensors, d / "m.safetensors")
        return d / "m.safetensors"
    if reader == "torch":
        torch.save(tensors, d / "m.pt")
        return d / "m.pt"
    from helpers import dcp_save
    dcp_save(tensors, d / "dcp", flatten=False)
    return d / "dcp"


@pytest.mark.parametrize("reader", ["safetensors", "torch", "dcp"])
def test_hostile_names_reach_every_sink_escaped(tmp_path, run_cli, reader):
    import json

    import torch
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 3, generator=g)
    paths = []
    for side, scale in (("a", 1.0), ("b", 1.5)):
        d = tmp_path / side
        d.mkdir()
        paths.append(_write(reader, d, {EVIL: w * scale, "ok": w}))
    md, page, js = tmp_path / "r.md", tmp_path / "r.html", tmp_path / "r.json"
    code, out, err = run_cli(*paths, "--markdown", md, "--html", page, "--json", js)
    assert code == 1, err
    from markdown_it import MarkdownIt  # a CommonMark renderer (rich's own dependency): what a viewer shows
    shown_md = MarkdownIt("commonmark").enable("table").render(md.read_text())
    rows = [r for r in shown_md.split("<tr>") if "weight" in r]
    assert len(rows) == 1 and rows[0].count("<td>") == 4  # the name stays in its one cell of its one row
    for sink, text, raws in (("terminal", out + err, RAW_TERMINAL), ("markdown as rendered", shown_md, RAW),
                             ("html", page.read_text().replace("<script id=data", "").replace("<script>const D", ""),
                              RAW)):
        for raw in raws:
            assert raw not in text, (sink, raw)
    page_text = page.read_text()
    data = json.loads(page_text.split("<script id=data type=application/json>")[1].split("</script>")[0])
    from ckdiff.text import printable
    assert any(r[0] == printable(EVIL) for r in data["rows"])  # the data block holds the name, shown as text
    assert page_text.count("<script") == 2  # the data block and the page's own script, nothing opened by a name
    assert json.loads(js.read_text())["result"]["tensors"][0]["name"] in (EVIL, "ok")  # JSON keeps the name exactly


def test_hostile_directory_names_are_escaped_on_the_terminal(tmp_path, run_cli, seeds):
    import shutil
    d = tmp_path / "m\x1b]0;owned\x07\u202etxt.exe"
    shutil.copytree(seeds["hf+tokenizer"], d)
    for argv in (("inspect", d), (d, d), ("logits", d, d, "--length", 4, "--batch", 1)):
        code, out, err = run_cli(*argv)
        assert code == 0, (argv, err)
        assert "\x1b" not in out + err and "\u202e" not in out + err and "\x07" not in out + err, argv
        assert "\\x1b" in out, argv
