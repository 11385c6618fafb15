"""No false alarms on correct checkpoints: layouts that define the same function are EQUIVALENT, with
the equivalence named; the same rewrite done to one tensor only still fails.

Fixtures: HF checkpoints by transformers' save_pretrained (tiny random Llama / Mixtral, GQA 4 heads /
2 KV heads), GGUF by the gguf package's writer (gguf_io.write_gguf)."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.converters.formats import open_checkpoint
from ckdiff.golden.models import hf_state, tiny_config


def _llama(out, tied):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def _rewrite(src, out, edit_state=None, edit_config=None):
    out.mkdir()
    state = load_file(str(src / "model.safetensors"))
    if edit_state:
        edit_state(state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _diff(a, b):
    return compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options())


def test_tied_head_stored_equal_is_equivalent(tmp_path):
    tied = _llama(tmp_path / "tied", True)
    assert "lm_head.weight" not in load_file(str(tied / "model.safetensors"))

    def store_head(s):
        s["lm_head.weight"] = s["model.embed_tokens.weight"].clone()
    stored = _rewrite(tied, tmp_path / "stored", store_head, lambda c: c.update(tie_word_embeddings=False))
    for a, b in ((tied, stored), (stored, tied)):
        res = _diff(a, b)
        assert res.equivalent, (res.counts(), res.config_diff, res.notes)
        assert any("named equivalence (tied head)" in n for n in res.notes)
    # a stored head that is not the embedding is still a difference
    def other_head(s):
        s["lm_head.weight"] = s["model.embed_tokens.weight"].flip(0).clone()
    wrong = _rewrite(tied, tmp_path / "wrong", other_head, lambda c: c.update(tie_word_embeddings=False))
    assert not _diff(tied, wrong).equivalent


def test_gguf_output_equal_to_token_embd_is_equivalent(tmp_path):
    from ckdiff.converters.gguf_io import write_gguf
    from ckdiff.golden.emit import emit
    hf = emit(tmp_path / "hf", "llama-mha-tied", "hf")
    cfg = tiny_config("llama-mha-tied")
    state = hf_state(cfg, 0)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    path = tmp_path / "g" / "model.gguf"
    path.parent.mkdir()
    write_gguf(path, state, replace(cfg, tied=False), "F16")
    assert "output.weight" in open_checkpoint(str(path)).tensors
    for a, b in ((hf, path), (path, hf)):
        res = _diff(a, b)
        assert res.equivalent, (res.counts(), res.config_diff, res.notes)
