"""Bugs that were missed or left unnamed: rope scaling or a sliding window dropped (HF rope_scaling /
rope_parameters of every type, GGUF rope.scaling.*, Megatron-Core args) is a config difference; FP8
weights in the other FP8 format than the config says are a finding; diagnoses that need equality match
up to a cast's rounding.

Fixtures: HF by write_tiny_hf / golden emitter, GGUF by the gguf package's writer, Megatron-Core by torch
DCP (golden/emit.py), FP8 through safetensors' save_file of torch's float8 dtypes."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.models.config import canonical_config, compare_configs
from ckdiff.formats.readers import open_checkpoint
from ckdiff.golden.emit import emit
from ckdiff.golden.models import hf_state, tiny_config

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                 "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def _canon(p):
    ck = open_checkpoint(str(p))
    return canonical_config(ck.format, ck.config, ck.tensors)


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_hf_rope_scaling_dropped_is_a_config_difference(kind, tiny_hf, tmp_path):
    src = tiny_hf()
    base = json.loads((src / "config.json").read_text())
    ck = open_checkpoint(str(src))
    plain = canonical_config("hf", base, ck.tensors)
    v4 = canonical_config("hf", {**base, "rope_scaling": SCALINGS[kind]}, ck.tensors)
    v5 = canonical_config("hf", {**base, "rope_parameters": {**SCALINGS[kind], "rope_theta": 10000.0}}, ck.tensors)
    for with_scaling in (v4, v5):
        diffs = compare_configs(with_scaling, plain)[0]
        assert [d[0] for d in diffs] == ["rope_scaling"], diffs
    assert compare_configs(v4, v5)[0] == []


def test_gguf_and_mcore_rope_scaling_and_window_dropped(tmp_path):
    cfg = tiny_config("llama-gqa")
    linear = replace(cfg, rope_scaling={"rope_type": "linear", "factor": 2.0})
    g_with = emit(tmp_path / "gw", "llama-gqa", "gguf", cfg=linear)
    g_without = emit(tmp_path / "gn", "llama-gqa", "gguf", cfg=cfg)
    assert [d[0] for d in compare_configs(_canon(g_with), _canon(g_without))[0]] == ["rope_scaling"]
    hf = emit(tmp_path / "hf", "llama-gqa", "hf", cfg=linear)
    assert compare_configs(_canon(hf), _canon(g_with))[0] == []  # the same scaling across layouts
    assert [d[0] for d in compare_configs(_canon(hf), _canon(g_without))[0]] == ["rope_scaling"]
    for sc in ({"rope_type": "linear", "factor": 2.0}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}):
        full = replace(cfg, rope_scaling=sc, sliding_window=32)
        m_with = emit(tmp_path / f"mw-{sc['rope_type']}", "llama-gqa", "mcore", cfg=full)
        m_without = emit(tmp_path / f"mn-{sc['rope_type']}", "llama-gqa", "mcore", cfg=cfg)
        assert sorted(d[0] for d in compare_configs(_canon(m_with), _canon(m_without))[0]) == \
            ["rope_scaling", "sliding_window"]
        hf_full = emit(tmp_path / f"hf-{sc['rope_type']}", "llama-gqa", "hf", cfg=full)
        assert compare_configs(_canon(hf_full), _canon(m_with))[0] == []


def test_fp8_stored_in_the_other_format_is_a_finding(tmp_path, run_cli):
    def fp8(out, dtype):
        out.mkdir()
        state = {k: (v.to(dtype) if v.dim() == 2 and "embed" not in k and "lm_head" not in k else v)
                 for k, v in hf_state(tiny_config("llama-gqa"), 0).items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        c = tiny_config("llama-gqa").to_hf()
        c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        (out / "config.json").write_text(json.dumps(c))
        return out
    right = fp8(tmp_path / "e4m3", torch.float8_e4m3fn)
    wrong = fp8(tmp_path / "e5m2", torch.float8_e5m2)
    code, out, _ = run_cli("check", wrong)
    assert code == 1 and "quantization_config.fmt says e4m3" in " ".join(out.split())
    assert run_cli("check", right)[0] == 0
    res = compare_checkpoints(open_checkpoint(str(right)), open_checkpoint(str(wrong)), Options(diagnose=False))
    assert any("quantization_config.fmt says e4m3" in f for f in res.config_findings)


def test_gate_up_swapped_in_an_f16_gguf_is_named(tmp_path):
    from ckdiff.formats.gguf import write_gguf
    cfg = tiny_config("llama-gqa")
    hf = emit(tmp_path / "hf", "llama-gqa", "hf")
    state = hf_state(cfg, 0)
    g, u = "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"
    state[g], state[u] = state[u], state[g]
    path = tmp_path / "g" / "model.gguf"
    path.parent.mkdir()
    write_gguf(path, state, cfg, "F16")
    res = compare_checkpoints(open_checkpoint(str(hf)), open_checkpoint(str(path)), Options())
    bad = {t.name: " ".join(t.diagnosis) for t in res.tensors if not t.ok}
    assert any("ffn_gate" in n or "gate_proj" in n for n in bad), bad
    text = " ".join(bad.values())
    assert "another tensor" in text and ("ffn_up" in text or "up_proj" in text), bad


def test_transposed_embedding_after_a_cast_is_named(tiny_hf, tmp_path):
    src = tiny_hf()
    out = tmp_path / "t"
    out.mkdir()
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(src / "model.safetensors")).items()}
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].T.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((src / "config.json").read_text())
    a, b = (open_checkpoint(str(p)) for p in (src, out))
    res = compare_checkpoints(a, b, Options())
    emb = next(t for t in res.tensors if t.name == "model.embed_tokens.weight")
    assert "transposed: B == A^T" in emb.diagnosis, (emb.status, emb.diagnosis)
