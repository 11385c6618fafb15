"""Converters keep every function-defining config value they read (special token ids, rope theta and
scaling, sliding window, activation, tie) or refuse in one line; convert then invert yields a config with
no function-defining difference, for every converter and every family it takes.

Sources: the tiny models of golden/models.py written by write_tiny_hf, with the config values under test
set in their config.json (Llama-3's BOS 128000 and EOS list; Falcon's 11/11 are transformers' FalconConfig
defaults, checked below)."""
import json

import pytest

from ckdiff.compare.diff import compare_config_semantics
from ckdiff.models.config import canonical_config, compare_configs
from ckdiff.formats.readers import open_checkpoint
from ckdiff.golden.models import write_tiny_hf
from ckdiff.golden.suite import REGISTRY, config_drift, convert

LLAMA3_IDS = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
LINEAR = {"rope_type": "linear", "factor": 4.0}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def _falcon_ids():
    from transformers import FalconConfig
    c = FalconConfig()
    return {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}


# (converter, tiny model, config.json edits): every source family each HF-source converter takes
CASES = [
    ("hf-to-megatron", "llama-gqa", {**LLAMA3_IDS, "rope_theta": 500000.0, "rope_scaling": LINEAR}),
    ("hf-to-megatron", "mistral-gqa", {"bos_token_id": 5, "eos_token_id": 6}),
    ("hf-to-megatron", "llama-mha-tied", {"bos_token_id": 0, "eos_token_id": 0}),
    ("hf-to-megatron", "falcon-7b", "falcon"),
    ("hf-to-megatron", "falcon-40b", "falcon"),
    ("hf-to-megatron", "falcon-7b", {"rope_scaling": LINEAR, "rope_theta": 20000.0}),
    ("to-jetstream", "llama-gqa", {**LLAMA3_IDS, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
    ("to-jetstream", "llama-mqa-hd", {"bos_token_id": 3, "eos_token_id": 4, "rope_scaling": LINEAR}),
    ("to-jetstream", "gemma", {"bos_token_id": 7, "eos_token_id": 8}),
    ("to-jetstream", "mixtral", {"bos_token_id": 9, "eos_token_id": [10, 11]}),
]


def _source(tmp, model, edits):
    src = write_tiny_hf(tmp / "src", model)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(_falcon_ids() if edits == "falcon" else edits)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize("name,model,edits", CASES, ids=[f"{c}-{m}" for c, m, _ in CASES])
def test_convert_then_invert_keeps_the_function_defining_config(name, model, edits, tmp_path):
    src = _source(tmp_path, model, edits)
    c = REGISTRY[name]
    tgt = convert(c, src, tmp_path / "tgt")
    back = convert(c.inverse, tgt, tmp_path / "back")
    a, t, b = (open_checkpoint(str(p)) for p in (src, tgt, back))
    ca = canonical_config(a.format, a.config, a.tensors)
    cb = canonical_config(b.format, b.config, b.tensors)
    assert compare_configs(ca, cb)[0] == [], (name, model)
    for k in ("bos_token_id", "eos_token_id"):
        assert cb[k] == ca[k], (k, ca[k], cb[k])
    assert config_drift(src, back) == []
    # the converted checkpoint states the same function as its source, across the two layouts
    diffs, findings, _, _ = compare_config_semantics(a, t)
    assert diffs == [] and findings == [], (diffs, findings)


def test_falcon_defaults_are_transformers(tmp_path):
    assert _falcon_ids() == {"bos_token_id": 11, "eos_token_id": 11}


def test_rope_scaling_megatron_llm_cannot_carry_is_refused(tmp_path, run_cli):
    src = _source(tmp_path, "llama-gqa", {"rope_scaling": LLAMA3_ROPE})
    code, _, err = run_cli("convert", "hf-to-megatron", "llama2", "--model-path", src, "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "llama3" in err and "rope" in err
    assert not (tmp_path / "o").exists()


def test_hf_to_megatron_llama_passes_its_own_roundtrip(tmp_path, run_cli):
    src = write_tiny_hf(tmp_path / "src", "llama-gqa")
    code, _, err = run_cli("convert", "hf-to-megatron", "llama", "--model-path", src, "--out", tmp_path / "meg")
    assert code == 0, err
    code, out, _ = run_cli("roundtrip", "megatron-to-hf", tmp_path / "meg", "--no-logits", "--work", tmp_path / "w")
    assert code == 0, out
