"""``ckdiff logits`` on malformed pairs, and the tensor diff it runs before the forward passes.

Fixtures: tiny HF checkpoints written by ckdiff's HF writer (safetensors + config.json, the layout
transformers reads; tests/test_logits.py checks the runtime against transformers on them).
"""
from __future__ import annotations

import json
import shutil

from safetensors.torch import load_file, save_file


def _edit(src, dst, fn):
    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    t = load_file(f)
    fn(t)
    save_file(t, f, metadata={"format": "pt"})
    return dst


def test_a_tensor_that_does_not_fit_the_config_is_one_line_naming_it(tiny_hf, tmp_path, run_cli):
    """llama-mqa-hd has a non-square o_proj (64 x 96): transposed, it used to end in
    'internal error RuntimeError: mat1 and mat2 shapes cannot be multiplied'."""
    src = tiny_hf("llama-mqa-hd")
    key = "model.layers.1.self_attn.o_proj.weight"
    bad = _edit(src, tmp_path / "bad", lambda t: t.__setitem__(key, t[key].T.contiguous()))
    for a, b, side in ((src, bad, "B"), (bad, src, "A")):
        code, out, err = run_cli("logits", a, b, "--no-tensor-diff", "--length", 8)
        lines = [x for x in err.strip().splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1, (code, err)
        assert f"{side}: tensor '{key}' [96, 64] does not fit the config" in lines[0] and str(bad) in lines[0]
        assert "Traceback" not in err and "internal error" not in err


def test_a_truncated_fused_projection_is_named_before_any_forward_pass(tiny_hf, tmp_path, run_cli):
    src = tiny_hf("llama-gqa")
    key = "model.layers.0.mlp.down_proj.weight"
    bad = _edit(src, tmp_path / "bad", lambda t: t.__setitem__(key, t[key][:, :32].contiguous()))
    code, _, err = run_cli("logits", src, bad, "--no-tensor-diff", "--length", 8, "--quiet")
    assert code == 2 and f"B: tensor '{key}' [64, 32] does not fit" in err and len(err.strip().splitlines()) == 1


def test_logits_say_when_only_the_weights_differ(tiny_hf, tmp_path, run_cli):
    """A norm x 1.00001 stays under every float32 limit of the logits; the tensor diff, run first, sees it
    and the logit report says so. Without the tensor diff the note is absent (the test can fail)."""
    src = tiny_hf("llama-gqa")
    key = "model.layers.0.input_layernorm.weight"
    bad = _edit(src, tmp_path / "bad", lambda t: t.__setitem__(key, t[key] * 1.00001))
    code, out, _ = run_cli("logits", src, bad, "--length", 12, "--json", tmp_path / "r.json")
    assert code == 0 and "seen by the tensor diff only" in out
    d = json.loads((tmp_path / "r.json").read_text())["result"]
    assert d["tensor_diff"] == "differ" and d["verdict"] == "equivalent"
    assert any("the weights differ; the logits do not show it at these prompts" in n and key in n for n in d["notes"])
    assert d["profile"] == "standard" and d["deciding_signal"] and d["noise_floor"]["encoding"] == "float32"
    code, out, _ = run_cli("logits", src, bad, "--length", 12, "--no-tensor-diff")
    assert code == 0 and "seen by the tensor diff only" not in out


def test_profiles_are_offered_and_change_the_limits(tiny_hf, run_cli):
    a, b = tiny_hf("llama-gqa"), tiny_hf("llama-gqa", "bfloat16")
    limits = {}
    for prof in ("strict", "standard", "relaxed"):
        code, out, _ = run_cli("logits", a, b, "--length", 12, "--profile", prof, "--no-tensor-diff")
        assert code == 0 and f"{prof} profile" in out, out
        limits[prof] = out
    code, _, err = run_cli("logits", a, b, "--profile", "lenient")
    assert code == 2 and "lenient" in err
