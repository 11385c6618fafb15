"""Plain float safetensors checkpoints compared without torch (ckdiff/compare/lane.py): the same result as the
full comparison (compare/diff.py), field by field and in both orders, wherever it answers; declined wherever
anything could read differently; and the command never loads torch on such a pair.

The checkpoints are written by transformers' ``save_pretrained`` (tests/producers ``tiny_llama``: GQA, 8 heads
and 2 KV heads, random weights); each mutation rewrites the weights through the safetensors package
(``safetensors.torch.save_file``), so every file here comes from the tools that write the format."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.compare.lane import compare_plain, float_values
from ckdiff.formats.readers import open_checkpoint
from ckdiff.tensor.ops import rope_to_interleaved
from tests.producers import cached, tiny_llama

Q, K = "model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return cached(tmp_path_factory, "lane-llama", tiny_llama, "lane")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The same kind of model saved as two shards with model.safetensors.index.json."""
    def build(out):
        tiny_llama(out / "m", seed=3)
        import transformers
        m = transformers.AutoModelForCausalLM.from_pretrained(out / "m")
        m.save_pretrained(out, max_shard_size="40KB")
        shutil.rmtree(out / "m")
    return cached(tmp_path_factory, "lane-sharded", build, "lane-sharded")


def _mutated(src, dst, change, config=None):
    """A copy of the directory ``src`` whose weights file holds ``change(state)`` (and its config updated)."""
    shutil.copytree(src, dst)
    w = dst / "model.safetensors"
    state = load_file(w)
    change(state)
    save_file({k: v.contiguous() for k, v in state.items()}, w, metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _both(a, b, diagnose=True):
    """The lane's result equals the full comparison's, in both orders; returns the A-B result."""
    out = None
    for x, y in ((a, b), (b, a)):
        lane = compare_plain(str(x), str(y), diagnose=diagnose)
        assert lane is not None, "declined"
        full = compare_checkpoints(open_checkpoint(str(x)), open_checkpoint(str(y)), Options(diagnose=diagnose))
        assert lane.to_dict() == full.to_dict()
        out = out or lane
    return out


def _one(s):
    s[Q][5, 3] += 0.25


def _noise(s):
    g = torch.Generator().manual_seed(1)
    s[K] = s[K] * (1 + 1e-2 * torch.randn(s[K].shape, generator=g))


def _rows(s):
    g = torch.Generator().manual_seed(2)
    s[Q] = s[Q][torch.randperm(s[Q].shape[0], generator=g)]


def _rotary(s):
    s[Q] = rope_to_interleaved(s[Q], 8, 8)
    s[K] = rope_to_interleaved(s[K], 2, 8)


def _scaled(s):
    s["model.norm.weight"] = s["model.norm.weight"] * 2


def _cast(s):
    for k in s:
        s[k] = s[k].half()


def _nan(s):
    s[Q][0, 0] = float("nan")
    s[K][1, 1] = float("inf")


def _head(s):
    s["lm_head.weight"] = s["model.embed_tokens.weight"].clone()


def _shapes(s):
    s["lm_head.weight"] = s["lm_head.weight"][:-2].clone()
    s["model.norm.weight"] = torch.cat([s["model.norm.weight"], s["model.norm.weight"][-1:]])


MUTATIONS = {"copy": lambda s: None, "one element": _one, "noise": _noise, "rows permuted": _rows,
             "rotary": _rotary, "scaled norm": _scaled, "cast to fp16": _cast, "nan and inf": _nan,
             "head is the embedding": _head, "shapes": _shapes}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_same_result_as_the_full_comparison(tmp_path, base, case):
    b = _mutated(base, tmp_path / "b", MUTATIONS[case])
    res = _both(base, b)
    assert _both(base, b, diagnose=False).equivalent == res.equivalent
    assert res.equivalent == (case in ("copy", "cast to fp16"))
    # every differing tensor gets a cause, or a note saying why none was sought
    assert all(t.diagnosis or t.note for t in res.tensors if t.status.value == "differ")
    if case == "shapes":
        assert all(t.diagnosis for t in res.tensors if t.status.value == "shape")


def test_config_differences_and_bf16_weights(tmp_path, base):
    """A config that changes the function is a difference; bf16 weights read through the bf16 decode."""
    a = _mutated(base, tmp_path / "a", lambda s: s.update({k: v.bfloat16() for k, v in s.items()}))
    b = _mutated(a, tmp_path / "b", _one, config={"rope_theta": 5e5})
    res = _both(a, b)
    assert res.config_diff and not res.equivalent


def test_sharded_directories_with_an_index(tmp_path, sharded):
    assert (sharded / "model.safetensors.index.json").is_file()
    b = tmp_path / "b"
    shutil.copytree(sharded, b)
    shard = sorted(b.glob("model-*.safetensors"))[-1]
    state = load_file(shard)
    name = sorted(state)[0]
    state[name] = state[name] + 0.5
    save_file(state, shard, metadata={"format": "pt"})
    res = _both(sharded, b)
    assert [t.name for t in res.tensors if not t.ok] == [name]


def test_values_decode_exactly():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, generator=g)
    x[3], x[4], x[5] = float("nan"), float("inf"), -0.0
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        t = x.to(dt)
        name = str(dt).replace("torch.", "")
        got = float_values(t.view(torch.uint8).numpy().view({"bfloat16": "<u2", "float16": "<f2", "float32": "<f4",
                                                              "float64": "<f8"}[name]), name)
        want = t.double().numpy()
        assert ((got == want) | (got != got) & (want != want)).all(), dt
        assert (torch.from_numpy(got.astype("float64")).signbit() == t.double().signbit()).all()


@pytest.mark.parametrize("case", ["quantization config", "extra file", "sub-directory", "int tensor", "names",
                                  "file metadata", "scale tensor", "family with its own diagnoses",
                                  "file against directory"])
def test_declined_where_the_answer_needs_the_full_comparison(tmp_path, base, case):
    a = _mutated(base, tmp_path / "a", lambda s: None)
    b = _mutated(base, tmp_path / "b", lambda s: None)
    cfg = json.loads((b / "config.json").read_text())
    if case == "quantization config":
        cfg["quantization_config"] = {"quant_method": "fp8"}
    elif case == "extra file":
        (b / "params.json").write_text("{}")
    elif case == "sub-directory":
        (b / "original").mkdir()
    elif case == "int tensor":
        save_file({**load_file(b / "model.safetensors"), "ids": torch.arange(4)}, b / "model.safetensors")
    elif case == "names":
        s = load_file(b / "model.safetensors")
        s["extra.weight"] = s["model.norm.weight"].clone()
        save_file(s, b / "model.safetensors")
    elif case == "file metadata":
        save_file(load_file(b / "model.safetensors"), b / "model.safetensors", metadata={"format": "mlx"})
    elif case == "scale tensor":
        for x in (a, b):
            s = load_file(x / "model.safetensors")
            s["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(1)
            save_file(s, x / "model.safetensors")
    elif case == "family with its own diagnoses":
        cfg["model_type"] = "deepseek_v3"
    (b / "config.json").write_text(json.dumps(cfg))
    if case == "file against directory":
        assert compare_plain(str(a / "model.safetensors"), str(b)) is None
    else:
        assert compare_plain(str(a), str(b)) is None


def test_the_command_never_loads_torch_on_a_plain_pair(tmp_path, base):
    b = _mutated(base, tmp_path / "b", _noise)
    code = ("import sys\nfrom ckdiff.cli import main\nrc = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('exit', rc)\n")
    for args in ([str(base), str(tmp_path / "b")], [str(base), str(tmp_path / "b"), "--no-diagnose"],
                 [str(base), str(base)]):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "COLUMNS": "200"})
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().endswith("exit " + ("0" if args[1] == str(base) else "1")), r.stdout
    assert b.is_dir()


def test_reports_from_the_lane_match_the_full_comparison(tmp_path, base):
    """--json and --junit through the lane (torch never loaded) hold what the full comparison's do (forced by
    --format hf, which the lane leaves to it); --html and --markdown alike, apart from the command line."""
    b = _mutated(base, tmp_path / "b", _one)
    code = ("import sys\nfrom ckdiff.cli import main\nrc = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    lane = [str(tmp_path / f"lane.{x}") for x in ("json", "xml")]
    r = subprocess.run([sys.executable, "-c", code, str(base), str(b), "--no-diagnose", "-q", "--json", lane[0],
                        "--junit", lane[1]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    full = [str(tmp_path / f"full.{x}") for x in ("json", "xml")]
    from ckdiff.cli import main
    assert main([str(base), str(b), "--no-diagnose", "-q", "--format", "hf", "--json", full[0], "--junit", full[1]]) == 1
    x, y = (json.loads(open(p).read()) for p in (lane[0], full[0]))
    assert x["result"] == y["result"] and x["verdict"] == y["verdict"] == "differ"
    assert [f["path"] for i in x["provenance"]["inputs"] for f in i["files"]] == \
        [f["path"] for i in y["provenance"]["inputs"] for f in i["files"]]
    strip = lambda p: open(p).read().replace(" --format hf", "").replace("full.", "lane.")  # noqa: E731
    assert strip(full[1]) == open(lane[1]).read()
    for ext in ("html", "md"):
        flag = "--html" if ext == "html" else "--markdown"
        assert main([str(base), str(b), "--no-diagnose", "-q", flag, str(tmp_path / f"lane.{ext}")]) == 1
        assert main([str(base), str(b), "--no-diagnose", "-q", "--format", "hf", flag, str(tmp_path / f"full.{ext}")]) == 1
        assert strip(tmp_path / f"full.{ext}") == open(tmp_path / f"lane.{ext}").read()


def test_a_report_is_never_written_over_an_input(tmp_path, base):
    b = _mutated(base, tmp_path / "b", _one)
    from ckdiff.cli import main
    target = b / "model.safetensors"
    before = target.read_bytes()
    assert main([str(base), str(b), "--no-diagnose", "-q", "--json", str(target), "--force"]) == 2
    assert target.read_bytes() == before
