"""Reports of very many tensors: the --json report is written row by row (a result of 10^6 tensors is never
one string in memory), byte for byte what rendering the whole result at once gives; the page-sized reports
(HTML, Markdown, JUnit) list a bounded number of rows, the worst first, and say what they leave out."""
from __future__ import annotations

import json

import torch

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.formats.readers import open_checkpoint
from ckdiff.golden.models import hf_state, lazy, tiny_config
from ckdiff.io.writers import write_hf
from ckdiff.reports import render
from ckdiff.reports.render import iter_json, render_json
from ckdiff.tensor.lazy import Checkpoint


def _pair(tmp_path):
    cfg = tiny_config("llama-gqa")
    a = hf_state(cfg, 0)
    b = dict(a)
    b["model.layers.0.self_attn.q_proj.weight"] = a["model.layers.0.self_attn.q_proj.weight"].clone()
    b["model.layers.0.self_attn.q_proj.weight"][1, 2] = float("nan")
    b["model.layers.1.mlp.up_proj.weight"] = a["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16)
    del b["model.norm.weight"]
    for name, st in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        write_hf(tmp_path / name, lazy(st), cfg.to_hf(), 1)
    return compare_checkpoints(open_checkpoint(str(tmp_path / "a")), open_checkpoint(str(tmp_path / "b")), Options())


def test_streamed_json_is_the_whole_rendering(tmp_path):
    res = _pair(tmp_path)
    assert not res.equivalent and {"differ", "cast", "only-a"} <= set(res.counts())
    prov = {"inputs": [str(tmp_path / "a")], "options": {"x": 1}}
    whole = render_json("compare", res.to_dict(), res.verdict(), "ckdiff a b", prov)
    streamed = "".join(iter_json("compare", res.to_dict(tensors=False), res.tensor_dicts(), res.verdict(),
                                 "ckdiff a b", prov))
    assert streamed == whole
    assert len(json.loads(streamed)["result"]["tensors"]) == len(res.tensors)


def test_streamed_json_of_no_tensors(tmp_path):
    res = compare_checkpoints(Checkpoint("a", "file", {}), Checkpoint("b", "file", {}), Options())
    whole = render_json("compare", res.to_dict(), res.verdict())
    assert "".join(iter_json("compare", res.to_dict(tensors=False), res.tensor_dicts(), res.verdict())) == whole


def test_json_flag_writes_the_streamed_report(tmp_path, run_cli):
    _pair(tmp_path)
    code, _, err = run_cli(tmp_path / "a", tmp_path / "b", "--json", tmp_path / "r.json", "-q")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and not err and doc["verdict"] == "differ"
    rows = {t["name"]: t for t in doc["result"]["tensors"]}
    assert rows["model.layers.0.self_attn.q_proj.weight"]["status"] == "differ"
    q = open_checkpoint(str(tmp_path / "a")).tensors["model.layers.0.self_attn.q_proj.weight"]
    assert rows["model.layers.0.self_attn.q_proj.weight"]["shape_a"] == list(q.shape)
    assert rows["model.norm.weight"]["status"] == "only-a" and rows["model.norm.weight"]["shape_b"] is None


def _many(n_equal: int, n_differ: int):
    """A comparison of n_equal + n_differ small random tensors, the differing ones by growing amounts."""
    g = torch.Generator().manual_seed(5)
    a = {f"t.{i}": torch.randn(3, generator=g) for i in range(n_equal + n_differ)}
    b = {k: v.clone() for k, v in a.items()}
    for j in range(n_differ):
        b[f"t.{n_equal + j}"][1] += 0.01 * (j + 1)
    from ckdiff.tensor.lazy import EagerTensor
    ck = lambda st, p: Checkpoint(p, "file", {k: EagerTensor(k, v, p) for k, v in st.items()})  # noqa: E731
    return compare_checkpoints(ck(a, "a"), ck(b, "b"), Options(diagnose=False))


def test_page_reports_list_the_worst_rows_and_count_the_rest(monkeypatch):
    import xml.etree.ElementTree as ET
    from ckdiff.reports.html import render_html, render_markdown
    from ckdiff.reports.junit import render_junit
    monkeypatch.setattr(render, "REPORT_ROWS", 10)
    res = _many(30, 14)
    d = render.bounded_result(res)
    names = [t["name"] for t in d["tensors"]]
    worst = [t.name for t in res.worst_first()][:10]
    assert names == worst and all(t["status"] == "differ" for t in d["tensors"])
    assert d["tensors_omitted"] == {"mismatching": 4, "matching": 30} and d["counts"] == res.counts()
    html = render_html("compare", res, "ckdiff a b")
    assert "4 mismatching and 30 matching tensors not listed here" in html and '"t.43"' in html and '"t.0"' not in html
    md = render_markdown("compare", res)
    assert "14 mismatching tensors" in md and "not listed here" in md
    root = ET.fromstring(render_junit("compare", d, res.verdict()))
    failing = {c.get("name") for c in root.iter("testcase") if c.find("failure") is not None}
    assert "tensors not listed" in failing


def test_page_reports_of_few_rows_list_them_all(monkeypatch):
    monkeypatch.setattr(render, "REPORT_ROWS", 10)
    res = _many(3, 2)
    d = render.bounded_result(res)
    assert "tensors_omitted" not in d and len(d["tensors"]) == 5
    assert [t["name"] for t in d["tensors"][:2]] == [t.name for t in res.worst_first()][:2]
