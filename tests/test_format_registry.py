"""The format registry (formats/registry.py), the status enum (compare/status.py), diagnosis findings,
and the reports: a format declared once is detected, read, inspected and compared from
its declaration alone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ckdiff.compare.status import OK, ORDER, Status
from ckdiff.formats import registry
from ckdiff.formats.layouts import convert_formats
from ckdiff.formats.readers import detect_format, open_checkpoint
from ckdiff.tensor.lazy import Checkpoint, EagerTensor
from ckdiff.formats.registry import Format, Input

MARKER = "toy.marker"


# ---------------------------------------------------------------- a toy format, declared in the test only
def _is_toy(p: Path) -> bool:
    return p.is_dir() and (p / MARKER).is_file()


def _read_toy(p: Path, fmt: str = "toy", **_) -> Checkpoint:
    """A directory holding ``toy.marker``, ``toy.json`` (an HF config) and one ``<tensor name>.npy`` per tensor."""
    tensors = {}
    for f in sorted(p.glob("*.npy")):
        name = f.name[:-len(".npy")]
        tensors[name] = EagerTensor(name, torch.from_numpy(np.load(f)), str(f))
    config = json.loads((p / "toy.json").read_text())
    return Checkpoint(str(p), fmt, tensors, config=config, meta={"files": [str(f) for f in sorted(p.glob("*.npy"))]})


def _toy_format(priority: int = 5, name: str = "toy", detect=_is_toy) -> Format:
    from ckdiff.models.config import ModelConfig, _canonical_hf
    from ckdiff.formats.layouts import DROP
    return Format(name, "toy: a marker file, toy.json and one .npy file per HF-named tensor", detect, _read_toy,
                  priority=priority, layout="hf", config_file="toy.json", config=ModelConfig.from_hf,
                  canonical=_canonical_hf, drop=tuple(DROP["hf"]), layer=r"^model\.layers\.(\d+)\.")


@pytest.fixture
def toy():
    f = registry.register(_toy_format())
    yield f
    registry.unregister(f.name)


def write_toy(hf_dir: Path, out: Path, change=None) -> Path:
    """The tensors and config of an HF checkpoint as a toy directory; ``change(name, array)`` may edit one."""
    ck = open_checkpoint(str(hf_dir))
    out.mkdir()
    (out / MARKER).write_text("toy\n")
    (out / "toy.json").write_text(json.dumps(ck.config))
    for name, t in ck.tensors.items():
        a = t.load().numpy().copy()
        if change is not None:
            a = change(name, a)
        np.save(out / f"{name}.npy", a)
    return out


def test_toy_format_is_listed_detected_read_and_inspected(toy, tiny_hf, tmp_path, run_cli):
    d = write_toy(tiny_hf(), tmp_path / "toy")
    assert "toy" in registry.names() and detect_format(d) == "toy"
    ck = open_checkpoint(str(d))
    assert ck.format == "toy" and len(ck.tensors) > 10
    code, out, _ = run_cli("inspect", d)
    assert code == 0 and "[toy]" in out and "model.layers.{0..1}.self_attn.q_proj.weight" in out
    code, out, _ = run_cli("inspect", "--help")
    assert code == 0 and "toy" in out.split("--format", 1)[1]
    code, out, _ = run_cli("help")
    assert code == 0 and "toy: a marker file" in out  # the declaration's description is the help text
    # the config reader comes from the declaration
    cfg = registry.model_config(ck)
    assert 1 < cfg.kv_heads < cfg.heads and cfg.layers == 2


def test_toy_format_is_compared_like_any_layout(toy, tiny_hf, ckdiff_golden, tmp_path, run_cli):
    hf = tiny_hf()
    d = write_toy(hf, tmp_path / "toy")
    code, out, _ = run_cli(d, hf, "--json", tmp_path / "same.json")
    assert code == 0, out
    doc = json.loads((tmp_path / "same.json").read_text())["result"]
    assert doc["format_a"] == "toy" and not doc["mapping"] and not doc["config_diff"]
    # a different layout is mapped into the toy's names through the toy's declared layout
    meg = ckdiff_golden("llama-gqa", "megatron")
    code, out, _ = run_cli(d, meg, "--json", tmp_path / "meg.json")
    res = json.loads((tmp_path / "meg.json").read_text())["result"]
    assert code == 0, out
    assert res["format_b"] == "megatron->hf" and res["mapping"] and set(res["counts"]) == {"equal"}


def test_toy_format_mismatch_is_found_diagnosed_and_drawn_per_layer(toy, tiny_hf, tmp_path, run_cli):
    hf = tiny_hf()
    key = "model.layers.1.input_layernorm.weight"
    d = write_toy(hf, tmp_path / "toy", lambda n, a: a * 2 if n == key else a)
    code, out, _ = run_cli(hf, d, "--json", tmp_path / "r.json", "--html", tmp_path / "r.html")
    assert code == 1
    res = json.loads((tmp_path / "r.json").read_text())["result"]
    bad = [t for t in res["tensors"] if t["status"] != "equal"]
    assert [t["name"] for t in bad] == [key] and bad[0]["diagnosis"] == ["scaled: B == 2 * A"]
    html = (tmp_path / "r.html").read_text()
    assert "<th>layer 1</th>" in html and "input_layernorm" in html


def test_detection_priority_decides_between_overlapping_formats(tiny_hf):
    hf = tiny_hf()
    overlaps_hf = lambda p: p.is_dir() and (p / "config.json").is_file()  # noqa: E731
    assert detect_format(hf) == "hf"
    before = registry.register(_toy_format(priority=55, name="toy-before-hf", detect=overlaps_hf))
    try:
        assert detect_format(hf) == "toy-before-hf"
    finally:
        registry.unregister(before.name)
    after = registry.register(_toy_format(priority=65, name="toy-after-hf", detect=overlaps_hf))
    try:
        assert detect_format(hf) == "hf"
    finally:
        registry.unregister(after.name)
    assert detect_format(hf) == "hf"


def test_builtin_detection_order_and_registry_rules():
    # the order detect_format always used: the most specific directory layouts first
    assert [f.name for f in registry.detection_order(Input.DIR)] == \
        ["mcore", "dcp", "megatron", "jetstream", "meta", "hf", "gguf-split", "tensors"]
    assert [f.name for f in registry.detection_order(Input.FILE)] == ["file", "gguf", "gguf-kvb"]
    with pytest.raises(ValueError, match="priority 60 is taken by 'hf'"):
        registry.register(_toy_format(priority=60, name="toy-clash"))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(_toy_format(priority=61, name="hf"))
    assert "toy-clash" not in registry.names()
    # what alignment needs, from the declarations: Meta and JetStream share names, plain formats have no layout
    assert registry.get("meta").key_names == registry.get("jetstream").key_names == "meta"
    assert registry.get("tensors").layout is None and registry.get("dcp").layout is None
    assert registry.get("megatron").true_vocab({"true_vocab_size": 100}) == 100
    assert registry.lookup("megatron->hf", "target").name == "hf"
    assert [e.name for e in registry.encodings()] == ["compressed-tensors", "fp8", "jetstream", "mlx", "modelopt", "mxfp4"]


# ---------------------------------------------------------------- statuses: one enum, JSON unchanged
def test_status_values_order_and_ok_set_are_defined_once():
    from ckdiff.compare.diff import CompareResult, TensorResult
    from ckdiff.reports.render import render_json, worst_first_key
    assert [s.value for s in Status] == ["equal", "close", "cast", "quant", "reordered", "dtype", "differ", "shape",
                                         "only-a", "only-b"]
    assert set(ORDER) == set(Status)
    assert {s.value for s in OK} == {"equal", "close", "cast", "quant", "reordered"}
    ts = [TensorResult(f"t{i}", s, numel=4, max_abs=float(i)) for i, s in enumerate(Status)]
    assert [t.ok for t in ts] == [s in OK for s in Status]
    res = CompareResult("a", "b", "hf", "hf", ts)
    doc = json.loads(render_json("compare", res.to_dict(), res.verdict()))
    # the JSON holds the plain strings, exactly as before the enum
    assert [t["status"] for t in doc["result"]["tensors"]] == [s.value for s in Status]
    assert all(type(t["status"]) is str for t in doc["result"]["tensors"])
    assert doc["result"]["counts"] == {s.value: 1 for s in Status}
    assert f"{Status.ONLY_A}" == str(Status.ONLY_A) == "only-a"
    # the terminal order and the reports' order are the same one
    assert [t.name for t in res.worst_first()] == \
        [t["name"] for t in sorted(doc["result"]["tensors"], key=worst_first_key)]


def test_markdown_lists_only_failing_statuses():
    from ckdiff.compare.diff import CompareResult, TensorResult
    from ckdiff.reports.html import render_markdown
    ts = [TensorResult("layers.0.re.weight", Status.REORDERED, diagnosis=["equivalent reordering: x"]),
          TensorResult("layers.0.bad.weight", Status.DIFFER, numel=4, n_over_tol=1, max_abs=1.0)]
    md = render_markdown("compare", CompareResult("a", "b", "hf", "hf", ts))
    assert "1 mismatching tensors" in md and "layers.0.bad.weight" in md and "layers.0.re.weight" not in md


# ---------------------------------------------------------------- small fixes
def test_markdown_table_cells_escape_pipes():
    from ckdiff.compare.diff import CompareResult, TensorResult
    from ckdiff.golden.suite import CheckResult, SuiteResult
    from ckdiff.reports.html import render_markdown
    t = TensorResult("w|x.weight", Status.DIFFER, numel=4, n_over_tol=1, max_abs=1.0, diagnosis=["a | b\nc"])
    md = render_markdown("compare", CompareResult("a", "b", "tensors", "tensors", [t]))
    row = next(line for line in md.splitlines() if "w\\|x.weight" in line)
    assert row == "| <code>w\\|x.weight</code> | differ | 1 @ None | a \\| b c |"
    assert row.replace("\\|", "").count("|") == 5  # four cells: the row keeps its shape
    s = SuiteResult([CheckResult("conv", "llama", "golden", False, "A: x | y")])
    md = render_markdown("roundtrip", s)
    assert "| A: x \\| y |" in md


def test_alignment_note_names_the_side_that_could_not_be_mapped(tiny_hf, ckdiff_golden, tmp_path):
    """A float HF side against a quantized GGUF side: the float side (A) is the one mapped, so the notes
    must name A (they named B whatever the side). A missing tensor no longer stops the mapping (the target
    it feeds is left out and named); a tensor no rule knows still does."""
    from ckdiff.compare.align import align
    from safetensors.torch import load_file, save_file
    src = tiny_hf()
    t = {}
    for f in sorted(src.glob("*.safetensors")):
        t.update(load_file(f))
    del t["model.layers.1.mlp.up_proj.weight"]
    b = open_checkpoint(str(ckdiff_golden("llama-gqa", "gguf-Q8_0")))
    for name, extra in (("missing", {}), ("unknown", {"model.layers.0.mlp.up_proj.bias": torch.randn(96)})):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
        save_file({**t, **extra}, d / "model.safetensors")
        a2, _, rows, notes = align(open_checkpoint(str(d)), b)
        if not extra:
            assert rows and notes[0].startswith("A (hf) was mapped")
            assert a2.meta["absent"] == {"blk.1.ffn_up.weight": ["model.layers.1.mlp.up_proj.weight"]}
            continue
        assert not rows
        assert len(notes) == 1 and "and A could not be mapped" in notes[0] and "B could not" not in notes[0]
        assert "model.layers.0.mlp.up_proj.bias" in notes[0]


def test_gguf_names_get_a_per_layer_view():
    from ckdiff.reports.html import heatmap
    ts = [{"name": f"blk.{i}.attn_q.weight", "status": "equal"} for i in range(3)] + \
         [{"name": "token_embd.weight", "status": "equal"}]
    layers, kinds, _ = heatmap(ts, ("gguf",))
    assert layers == [0, 1, 2] and kinds == ["attn_q.weight"]


def test_html_sections_follow_the_result_type():
    from ckdiff.compare.diff import CompareResult, TensorResult
    from ckdiff.golden.suite import CheckResult, SuiteResult
    from ckdiff.reports.html import render_html
    page = render_html("compare", CompareResult("a", "b", "hf", "hf", [TensorResult("x", Status.EQUAL, numel=1)]))
    assert "<h2>Tensors</h2>" in page and "<h2>Checks</h2>" not in page and "A: <code>a</code>" in page
    page = render_html("demo", SuiteResult([CheckResult("conv", "llama", "roundtrip", True, "ok")]))
    assert "<h2>Checks</h2>" in page and "<h2>Tensors</h2>" not in page and "A: <code>" not in page
    with pytest.raises(TypeError):
        render_html("compare", object())


# ---------------------------------------------------------------- diagnosis findings carry their kind
def test_column_maps_are_worded_for_columns_and_rotary_is_a_kind():
    from ckdiff.compare.diagnose import Cause, _row_maps, diagnose_pair
    from ckdiff.tensor.ops import rope_to_interleaved
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "hidden_size": 32}
    rows = {f.cause: f for f, _ in _row_maps(32, cfg)}
    cols = {f.cause: f for f, _ in _row_maps(32, cfg, "columns")}
    assert rows[Cause.HALVES].text.startswith("halves swapped: B == [A[half:]; A[:half]]")
    assert cols[Cause.HALVES].text.startswith("halves swapped: B == [A[:, half:], A[:, :half]]")
    assert rows[Cause.ROTARY].rotary and rows[Cause.ROTARY].text.endswith(" rows")
    assert cols[Cause.ROTARY].text.endswith(" columns") and not rows[Cause.HALVES].rotary
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 24, generator=g)
    # rows of a projection that takes no rotary permutation: the finding says it, whatever its wording
    d = diagnose_pair("model.layers.0.self_attn.v_proj.weight", w, rope_to_interleaved(w, 4, 8), cfg)
    assert d == ["rotary permutation: B == P(A), half-split -> interleaved, 4 heads x 8 rows (applied to the wrong "
                 "tensor: v_proj takes no rotary permutation)"]
    wt = torch.randn(24, 32, generator=g)
    d = diagnose_pair("model.layers.0.self_attn.o_proj.weight", wt, rope_to_interleaved(wt.T, 4, 8).T.contiguous(), cfg)
    assert d == ["columns: rotary permutation: B == P(A), half-split -> interleaved, 4 heads x 8 columns (applied to "
                 "the wrong tensor: o_proj takes no rotary permutation)"]


def test_rotary_in_some_layers_only_comes_from_the_findings(tiny_hf, tmp_path):
    from ckdiff.compare.diff import compare_checkpoints
    from ckdiff.tensor.ops import rope_to_interleaved
    from safetensors.torch import load_file, save_file
    src = tiny_hf()
    d = tmp_path / "rot0"
    d.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg))
    t = {}
    for f in sorted(src.glob("*.safetensors")):
        t.update(load_file(f))
    q = "model.layers.0.self_attn.q_proj.weight"
    H = cfg["num_attention_heads"]
    t[q] = rope_to_interleaved(t[q], H, t[q].shape[0] // H).contiguous()
    save_file(t, d / "model.safetensors")
    res = compare_checkpoints(open_checkpoint(str(src)), open_checkpoint(str(d)))
    by = {r.name: r for r in res.tensors}
    assert by[q].status == Status.DIFFER and by[q].diagnosis[0].startswith("rotary permutation: B == P(A)")
    assert by[q].diagnosis[-1] == "in some layers only (layers [0]; layers [1] are equal)"
    assert any(n.startswith("rotary permutation in some layers only: model.layers.{i}.self_attn.q_proj.weight")
               for n in res.notes)


# ---------------------------------------------------------------- a toy format with its own key table
NAMES = {"embed": "t.embed", "norm": "t.norm", "head": "t.head", "attn_norm": "t.{i}.ln1", "q": "t.{i}.q",
         "k": "t.{i}.k", "v": "t.{i}.v", "o": "t.{i}.o", "mlp_norm": "t.{i}.ln2", "gate": "t.{i}.gate",
         "up": "t.{i}.up", "down": "t.{i}.down"}


def _toy_table(cfg) -> list:
    """Rows from canonical HF (llama slots) to the toy's own names: renames only."""
    from ckdiff.tensor.table import R
    from ckdiff.models.families import LLAMA_NAMES
    return [R(LLAMA_NAMES[s], NAMES[s]) for s in NAMES if not (s == "head" and cfg.tied)]


def _toy_config(raw: dict, tensors: dict, where: str):
    """The toy's config reader: its HF-style toy.json, checked against its tensors under their HF names."""
    from ckdiff.models.config import ModelConfig
    from ckdiff.models.families import LLAMA_NAMES
    hf = {}
    for s, pat in NAMES.items():
        for i in range(raw["num_hidden_layers"]) if "{i}" in pat else [0]:
            if pat.format(i=i) in tensors:
                hf[LLAMA_NAMES[s].format(i=i)] = tensors[pat.format(i=i)]
    return ModelConfig.from_hf(raw, hf, where)


@pytest.fixture
def toy_names():
    from ckdiff.models.config import _canonical_hf
    detect = lambda p: p.is_dir() and (p / "toy-names.marker").is_file()  # noqa: E731
    read = lambda p, **_: _read_toy(p, "toy-names")  # noqa: E731
    f = registry.register(Format("toy-names", "toy with its own tensor names", detect, read, priority=6,
                                 layout="toy-names", table=_toy_table, config_file="toy.json",
                                 config=_toy_config, canonical=_canonical_hf, layer=r"^t\.(\d+)\."))
    yield f
    registry.unregister(f.name)


def write_toy_names(hf_dir: Path, out: Path, change=None) -> Path:
    """An HF checkpoint written in the toy's names through the toy's own table (layouts.convert_formats)."""
    hf = open_checkpoint(str(hf_dir))
    cfg = registry.model_config(hf)
    tensors = convert_formats(hf.tensors, registry.get("hf"), registry.get("toy-names"), cfg)
    out.mkdir()
    (out / "toy-names.marker").write_text("toy\n")
    (out / "toy.json").write_text(json.dumps(hf.config))
    for name, t in tensors.items():
        a = t.load().numpy().copy()
        np.save(out / f"{name}.npy", change(name, a) if change else a)
    return out


def test_toy_format_with_its_own_names_maps_both_ways(toy_names, tiny_hf, ckdiff_golden, tmp_path, run_cli):
    hf = tiny_hf()
    d = write_toy_names(hf, tmp_path / "toy")
    assert detect_format(d) == "toy-names" and "t.0.q" in open_checkpoint(str(d)).tensors
    # HF mapped into the toy's names (B moves), and the toy mapped into Megatron's when Megatron is A
    for a, b, moved in ((d, hf, "hf->toy-names"), (ckdiff_golden("llama-gqa", "megatron"), d, "toy-names->megatron")):
        code, out, _ = run_cli(a, b, "--json", tmp_path / "r.json")
        res = json.loads((tmp_path / "r.json").read_text())["result"]
        assert code == 0, out
        assert res["format_b"] == moved and set(res["counts"]) == {"equal"} and res["mapping"]
        assert not any(c["unaccounted"] for c in res["coverage"].values())
    bad = write_toy_names(hf, tmp_path / "bad", lambda n, x: x * 2 if n == "t.1.ln2" else x)
    code, out, _ = run_cli(bad, hf, "--json", tmp_path / "r.json", "--html", tmp_path / "r.html")
    res = json.loads((tmp_path / "r.json").read_text())["result"]
    assert code == 1
    wrong = [t for t in res["tensors"] if t["status"] != "equal"]
    assert [t["name"] for t in wrong] == ["t.1.ln2"] and wrong[0]["diagnosis"] == ["scaled: B == 0.5 * A"]
    assert "<th>layer 1</th>" in (tmp_path / "r.html").read_text()  # the toy's layer pattern
