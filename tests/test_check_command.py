"""``ckdiff check X``: lint one checkpoint, exit 0 clean / 1 findings / 2 trouble, JSON like the other commands.

The base fixture is written by transformers (LlamaForCausalLM.save_pretrained, GQA 4 heads / 2 KV
heads, random weights); each fault is one edit of it through safetensors' own save_file."""
import json

import pytest
import torch

from ckdiff.golden.emit import emit
from helpers import llama_hf, rewrite_hf


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return llama_hf(tmp_path_factory.mktemp("check") / "llama", 0)


def _nan(s):
    s["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")


def _half(s):
    s["model.layers.0.self_attn.q_proj.weight"] = s["model.layers.0.self_attn.q_proj.weight"].half()


def _drop_head(s):
    del s["lm_head.weight"]


def _extra(s):
    s["model.layers.0.self_attn.q_proj.bias"] = torch.randn(64)


FAULTS = {  # name -> (tensor edit, config edit, the check that must name it, words of its line)
    "nan": (_nan, None, "values", "model.layers.1.mlp.up_proj.weight: 1 NaN"),
    "mixed-dtypes": (_half, None, "dtypes", "float16"),
    "untied-without-head": (_drop_head, None, "tied", "untied but there is no lm_head.weight"),
    "unmapped-tensor": (_extra, None, "coverage", "q_proj.bias"),
    "vocab-padding": (None, lambda c: c.update(vocab_size=90), "padding", "100 rows but the config's vocab size is 90"),
    "config-vs-shapes": (None, lambda c: c.update(num_key_value_heads=1), "config", "num_key_value_heads"),
}


def test_clean_checkpoints_pass(llama, tmp_path, run_cli):
    code, out, _ = run_cli("check", llama, "--json", tmp_path / "r.json")
    assert code == 0 and out.startswith("CLEAN"), out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["kind"] == "check" and doc["verdict"] == "clean" and doc["result"]["findings"] == []
    assert {"config", "coverage", "values", "dtypes", "tied"} <= set(doc["result"]["checks"])
    for lay in ("megatron", "gguf"):  # the golden emitter's Megatron-LLM layout; GGUF through the gguf package
        code, out, _ = run_cli("check", emit(tmp_path / lay, "llama-gqa", lay))
        assert code == 0, (lay, out)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_is_a_finding(llama, tmp_path, run_cli, fault):
    edit, cedit, check, words = FAULTS[fault]
    bad = rewrite_hf(llama, tmp_path / fault, edit, cedit)
    code, out, err = run_cli("check", bad, "--json", tmp_path / "r.json")
    assert code == 1, (out, err)
    found = json.loads((tmp_path / "r.json").read_text())["result"]["findings"]
    assert any(f["check"] == check and words in f["text"] for f in found), found
    assert words in " ".join(out.split())


def test_unreadable_input_is_one_line_exit_2(tmp_path, run_cli):
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 3)
    code, out, err = run_cli("check", tmp_path / "x.safetensors")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "x.safetensors" in err
