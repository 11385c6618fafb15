"""The --json report is written row by row (a result of 10^6 tensors is never one string in memory), and the
streamed text is byte for byte what rendering the whole result at once gives."""
from __future__ import annotations

import json

import torch

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.formats.readers import open_checkpoint
from ckdiff.golden.models import hf_state, lazy, tiny_config
from ckdiff.io.writers import write_hf
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
