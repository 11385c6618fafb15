"""A checkpoint of a model type no family declares gets one line, "family X is not declared for this
layout", instead of the unmapped tensors its own extra weights leave over (the Qwen2 case; after Qwen2 is
declared, the first undeclared of the candidates below takes its place).

Fixture: written by transformers' save_pretrained (AutoModelForCausalLM.from_config, random weights)."""
import pytest
import torch

from ckdiff.models import families

CANDIDATES = ("qwen2", "olmo2", "stablelm")  # each has tensors a Llama table does not know (biases, q/k norms)


@pytest.fixture(scope="module")
def undeclared(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM
    mt = next((m for m in CANDIDATES if families.for_model_type(m) is None), None)
    assert mt is not None, "every candidate is declared: add an undeclared model type to CANDIDATES"
    cfg = AutoConfig.for_model(mt, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                               max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("undeclared") / mt
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return mt, out


def test_undeclared_family_is_one_line(undeclared, tmp_path, run_cli):
    mt, src = undeclared
    code, out, err = run_cli("convert", "hf-to-megatron", "llama2", "--model-path", src, "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"family {mt} is not declared for this layout" in err and "unmapped" not in err
    code, out, _ = run_cli("check", src)
    assert code == 1 and f"family {mt} is not declared" in out
