"""Comparator: statuses, metrics, tolerances, exit codes, JSON."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckdiff.compare.diff import Options, compare_tensor
from ckdiff.tensor.lazy import EagerTensor
from ckdiff.io.safetensors import read_safetensors, write_safetensors
from ckdiff.golden.models import lazy


def _edit(src, dst, fn):
    """Copy an HF dir, applying fn(state) -> state to its weights."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    state = {k: v.load().clone() for k, v in read_safetensors(f).items()}
    state = fn(state)
    f.unlink()
    write_safetensors(f, lazy(state).values())
    return dst


def test_identical_exit_0(tiny_hf, run_cli):
    p = tiny_hf()
    code, out, _ = run_cli(p, p)
    assert code == 0 and out.startswith("EQUIVALENT")


def test_one_element_changed_names_tensor_and_index(tiny_hf, tmp_path, run_cli):
    def bump(s):
        s["model.layers.1.mlp.down_proj.weight"][17, 42] += 0.5
        return s
    b = _edit(tiny_hf(), tmp_path / "b", bump)
    code, out, _ = run_cli(tiny_hf(), b, "--json", tmp_path / "r.json")
    assert code == 1
    assert "model.layers.1.mlp.down_proj.weight" in out and "[17, 42]" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["schema"] == "ckdiff.result/1" and doc["verdict"] == "differ"
    bad = [t for t in doc["result"]["tensors"] if t["status"] != "equal"]
    assert len(bad) == 1 and bad[0]["max_abs_index"] == [17, 42] and bad[0]["n_over_tol"] == 1
    assert bad[0]["bit_exact"] is False and abs(bad[0]["max_abs"] - 0.5) < 1e-6
    assert bad[0]["diagnosis"][0].startswith("one element changed at [17, 42], isolated")  # from the metrics


def test_missing_key_shape_and_cast_reported_as_such(tiny_hf, tmp_path, run_cli):
    def edit(s):
        del s["model.layers.0.mlp.up_proj.weight"]
        s["model.norm.weight"] = torch.cat([s["model.norm.weight"], torch.ones(1)])
        s["lm_head.weight"] = s["lm_head.weight"].to(torch.bfloat16)
        s["extra.weight"] = torch.randn(3)
        return s
    b = _edit(tiny_hf(), tmp_path / "b", edit)
    code, out, _ = run_cli(tiny_hf(), b, "--json", tmp_path / "r.json")
    assert code == 1
    st_ = {t["name"]: t["status"] for t in json.loads((tmp_path / "r.json").read_text())["result"]["tensors"]}
    assert st_["model.layers.0.mlp.up_proj.weight"] == "only-a"
    assert st_["extra.weight"] == "only-b"
    assert st_["model.norm.weight"] == "shape"
    assert st_["lm_head.weight"] == "cast"  # within bf16 rounding: reported, not a failure by itself
    # --strict-dtype makes the cast a mismatch too
    code, _, _ = run_cli(tiny_hf(), b, "--only", "lm_head.weight", "--strict-dtype")
    assert code == 1
    code, _, _ = run_cli(tiny_hf(), b, "--only", "lm_head.weight")
    assert code == 0


def test_every_mismatch_reported_and_filters(tiny_hf, tmp_path, run_cli):
    def edit(s):
        for i in range(2):
            s[f"model.layers.{i}.self_attn.o_proj.weight"] *= 1.01
        return s
    b = _edit(tiny_hf(), tmp_path / "b", edit)
    code, out, _ = run_cli(tiny_hf(), b)
    assert code == 1 and out.count("o_proj") == 2 and "scaled" in out
    assert run_cli(tiny_hf(), b, "--ignore", "*o_proj*")[0] == 0
    assert run_cli(tiny_hf(), b, "--only", "*layers.0.*", "--ignore", "*o_proj*")[0] == 0
    # a per-pattern tolerance with its reason
    code, out, _ = run_cli(tiny_hf(), b, "--tol", "*o_proj*=0.1:known rescale")
    assert code == 0


def test_nan_policy():
    a = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    b = a.clone()
    b[0] = float("nan")
    opts = Options(atol=1e-3)
    r = compare_tensor("t", EagerTensor("t", a), EagerTensor("t", a.clone()), Options())
    assert r.status == "equal"  # NaN == NaN at the same place (bytes identical)
    r = compare_tensor("t", EagerTensor("t", a), EagerTensor("t", b), opts)
    assert r.status == "differ" and r.nan_a == 1 and r.nan_b == 2 and r.n_over_tol == 1
    assert r.max_abs_index == [0]


def _ref_metrics(a: np.ndarray, b: np.ndarray, atol, rtol):
    d = np.abs(a - b)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.abs(a) > 0, d / np.abs(a), np.where(d > 0, np.inf, 0.0))
    cos = float(a.ravel() @ b.ravel() / math.sqrt((a.ravel() @ a.ravel()) * (b.ravel() @ b.ravel())))
    return dict(max_abs=float(d.max()), idx=int(d.argmax()), mean_abs=float(d.mean()), max_rel=float(rel.max()),
                cos=cos, over=int((d > atol + rtol * np.abs(a)).sum()))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 9), st.integers(0, 2**31 - 1), st.floats(0, 0.3),
       st.sampled_from([torch.float32, torch.float64]), st.integers(1, 7))
def test_metrics_match_numpy_reference(rows, cols, seed, noise, dtype, chunk_rows):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype)
    b = (a.double() + noise * torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(dtype)
    opts = Options(atol=1e-3, rtol=1e-2, chunk_bytes=chunk_rows * cols * a.element_size())
    r = compare_tensor("t", EagerTensor("t", a), EagerTensor("t", b), opts)
    ref = _ref_metrics(a.double().numpy(), b.double().numpy(), 1e-3, 1e-2)
    if torch.equal(a, b):
        assert r.status == "equal" and r.bit_exact
        return
    assert r.max_abs == pytest.approx(ref["max_abs"], rel=1e-12, abs=1e-15)
    assert r.max_abs_index == list(np.unravel_index(ref["idx"], (rows, cols)))
    assert r.mean_abs == pytest.approx(ref["mean_abs"], rel=1e-9)
    assert r.max_rel == pytest.approx(ref["max_rel"], rel=1e-9)
    assert r.cosine == pytest.approx(ref["cos"], rel=1e-9)
    assert r.n_over_tol == ref["over"]
    assert r.status == ("differ" if ref["over"] else "close")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.integers(0, 2**31 - 1), st.sampled_from([torch.bfloat16, torch.float16]))
def test_cast_tolerance_accepts_one_rounding(n, seed, low):
    a = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    r = compare_tensor("t", EagerTensor("t", a), EagerTensor("t", a.to(low)), Options())
    assert r.status == "cast", (r.max_abs, r.tol_source)
    assert r.tol_source.startswith("dtype")


def test_bit_exact_uses_bytes_not_floats():
    a = torch.tensor([0.0, 1.0])
    b = torch.tensor([-0.0, 1.0])  # equal as floats, different bytes
    r = compare_tensor("t", EagerTensor("t", a), EagerTensor("t", b), Options())
    assert r.bit_exact is False and r.status == "close" and "signed zeros" in r.note


def test_usage_error_exit_2(run_cli, tiny_hf):
    code, _, err = run_cli(tiny_hf(), "/nonexistent/x")
    assert code == 2 and err.startswith("ckdiff: error:") and "Traceback" not in err
    code, _, err = run_cli(tiny_hf(), tiny_hf(), "--tol", "bad")
    assert code == 2 and "GLOB=ATOL" in err


def test_different_layouts_are_mapped_and_say_so(tmp_path, run_cli, ckdiff_golden):
    hf, meg = ckdiff_golden("llama-gqa", "hf"), ckdiff_golden("llama-gqa", "megatron", tp=2, pp=2)
    code, out, _ = run_cli(hf, meg, "--json", tmp_path / "r.json")
    assert code == 0 and "mapped into the hf layout" in out
    doc = json.loads((tmp_path / "r.json").read_text())["result"]
    assert doc["format_b"] == "megatron->hf" and any("fuse qkv" in row[2] or "split grouped qkv" in row[2]
                                                     for row in doc["mapping"])
    code, out, _ = run_cli(hf, meg, "--no-map", "-q")
    assert code == 1 and "only-a" in out
    # a bug on the mapped side is reported under A's names, with its cause
    from ckdiff.tensor.ops import rope_to_half
    _edit(ckdiff_golden("llama-gqa", "jetstream"), tmp_path / "js", lambda s: {
        **s, "layers.1.attention.wk.weight": rope_to_half(s["layers.1.attention.wk.weight"], 2, 8)})
    code, out, _ = run_cli(hf, tmp_path / "js", "--json", tmp_path / "r2.json")
    bad = [t for t in json.loads((tmp_path / "r2.json").read_text())["result"]["tensors"] if t["status"] != "equal"]
    assert code == 1 and [t["name"] for t in bad] == ["model.layers.1.self_attn.k_proj.weight"]
    assert "rotary permutation" in bad[0]["diagnosis"][0]
