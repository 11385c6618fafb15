"""No false alarms on correct checkpoints: layouts that define the same function are EQUIVALENT, with
the equivalence named; the same rewrite done to one tensor only still fails.

Fixtures: HF checkpoints by transformers' save_pretrained (tiny random Llama / Mixtral, GQA 4 heads /
2 KV heads), GGUF by the gguf package's writer (formats/gguf.py write_gguf)."""
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from ckdiff.formats.readers import open_checkpoint
from ckdiff.golden.models import hf_state, tiny_config
from helpers import diff, llama_hf, rewrite_hf


def test_tied_head_stored_equal_is_equivalent(tmp_path):
    tied = llama_hf(tmp_path / "tied", 1, tied=True)
    assert "lm_head.weight" not in load_file(str(tied / "model.safetensors"))

    def store_head(s):
        s["lm_head.weight"] = s["model.embed_tokens.weight"].clone()
    stored = rewrite_hf(tied, tmp_path / "stored", store_head, lambda c: c.update(tie_word_embeddings=False))
    for a, b in ((tied, stored), (stored, tied)):
        res = diff(a, b)
        assert res.equivalent, (res.counts(), res.config_diff, res.notes)
        assert any("named equivalence (tied head)" in n for n in res.notes)
    # a stored head that is not the embedding is still a difference
    def other_head(s):
        s["lm_head.weight"] = s["model.embed_tokens.weight"].flip(0).clone()
    wrong = rewrite_hf(tied, tmp_path / "wrong", other_head, lambda c: c.update(tie_word_embeddings=False))
    assert not diff(tied, wrong).equivalent


def test_gguf_output_equal_to_token_embd_is_equivalent(tmp_path):
    from ckdiff.formats.gguf import write_gguf
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
        res = diff(a, b)
        assert res.equivalent, (res.counts(), res.config_diff, res.notes)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A tiny random Mixtral saved by transformers in both of its layouts (per-expert and fused)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=100, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128)
    m = MixtralForCausalLM(cfg)
    root = tmp_path_factory.mktemp("mixtral")
    m.save_pretrained(root / "orig")
    m.save_pretrained(root / "fused", save_original_format=False)
    return root / "orig", root / "fused"


def test_transformers5_fused_experts_are_the_same_model(mixtral, run_cli):
    orig, fused = mixtral
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(str(fused / "model.safetensors"))
    for a, b in ((orig, fused), (fused, orig)):
        code, out, err = run_cli(a, b)
        assert code == 0 and "fused expert layout" in out, (out, err)
    code, out, err = run_cli("logits", orig, fused, "-q")
    assert code == 0, (out, err)


PERM = [2, 0, 3, 1]
_E = "model.layers.1.block_sparse_moe.experts.{e}.w{n}.weight"
_ROUTER = "model.layers.1.block_sparse_moe.gate.weight"


def _permute(experts, router):
    def edit(s):
        if experts:
            old = {(e, n): s[_E.format(e=e, n=n)] for e in range(4) for n in (1, 2, 3)}
            for e in range(4):
                for n in (1, 2, 3):
                    s[_E.format(e=e, n=n)] = old[(PERM[e], n)].clone()
        if router:
            s[_ROUTER] = s[_ROUTER][PERM].clone()
    return edit


def test_experts_reordered_with_their_router_rows_is_a_named_equivalence(mixtral, tmp_path):
    orig, _ = mixtral
    both = rewrite_hf(orig, tmp_path / "both", _permute(True, True))
    res = diff(orig, both)
    assert res.equivalent, [(t.name, t.status, t.diagnosis) for t in res.tensors if not t.ok]
    moved = [t for t in res.tensors if t.status == "reordered"]
    assert moved and all("permuted together with their router rows" in t.diagnosis[0] for t in moved)
    assert any(t.name == _ROUTER for t in moved)
    experts_only = rewrite_hf(orig, tmp_path / "experts", _permute(True, False))
    res = diff(orig, experts_only)
    assert not res.equivalent
    assert any("router rows are not" in " ".join(t.diagnosis) for t in res.tensors if not t.ok)
    router_only = rewrite_hf(orig, tmp_path / "router", _permute(False, True))
    res = diff(orig, router_only)
    assert not res.equivalent
    assert "router rows of layer 1 permuted" in " ".join(res.tensors[[t.name for t in res.tensors].index(_ROUTER)].diagnosis)
