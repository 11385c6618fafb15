"""A family known only from its declaration passes round trip, golden and logits.

The toy family is llama with q/k/v biases (what Qwen2 adds). It is declared in this file with one
``families.register`` call and nothing else in ckdiff is told about it: the config is written and read
from the declaration, the tiny weights are drawn from its slots, hf-to-megatron / megatron-to-hf run
their tables over its slots, the independent golden emitter lays it out from the spec fixtures, and
the reference runtimes are composed from its Block. Each check is also shown to fail on a broken
variant, so a pass means something.
"""
from __future__ import annotations

import pytest
import torch

from ckdiff.models import families
from ckdiff.compare.diff import compare_checkpoints
from ckdiff.compare.logits import compare_logits
from ckdiff.models.config import ModelConfig
from ckdiff.formats.readers import open_checkpoint
from ckdiff.models.families import LLAMA_NAMES, Block, Family
from ckdiff.golden import suite
from ckdiff.golden.emit import emit, padded_rows

_L = "model.layers.{i}."
TOY = Family("toy-qkv-bias-e2e", ("toy_qkv_bias_e2e",), "ToyQkvBiasForCausalLM", Block(qkv_bias=True),
             {**LLAMA_NAMES, "q_b": _L + "self_attn.q_proj.bias", "k_b": _L + "self_attn.k_proj.bias",
              "v_b": _L + "self_attn.v_proj.bias"},
             layouts=frozenset({"hf", "megatron"}))
QKV_BIAS = "language_model.encoder.layers.{i}.self_attention.query_key_value.bias"


@pytest.fixture
def toy():
    fam = families.register(TOY)
    try:
        yield fam
    finally:
        families.unregister(fam.name)


def toy_config() -> ModelConfig:
    # GQA 8/2 (r = 4 != K), head_dim != hidden / heads, odd vocab, untied
    return ModelConfig(TOY.name, hidden=48, layers=2, heads=8, kv_heads=2, head_dim=8, ffn=80, vocab=97,
                       max_pos=128, rope_theta=10000.0)


def test_toy_family_round_trip_golden_and_logits(toy, tmp_path):
    cfg = toy_config()
    src = emit(tmp_path / "hf", "", "hf", cfg=cfg, seed=5)
    ck = open_checkpoint(str(src))
    assert any(k.endswith("self_attn.q_proj.bias") for k in ck.tensors)

    # round trip hf -> megatron (TP=2) -> hf, bit for bit, with the logit check on the Megatron side
    rt = suite.roundtrip("hf-to-megatron", src, tmp_path / "rt", tp=2)
    assert [c.check for c in rt.checks] == ["roundtrip", "logits"]
    assert rt.equivalent, [c.detail for c in rt.checks]

    # golden: the converter's output equals the independent emitter's Megatron layout
    out = suite.convert("hf-to-megatron", src, tmp_path / "conv", {"tp": 2})
    gold = emit(tmp_path / "gold", "", "megatron", cfg=cfg, seed=5, tp=2,
                vocab_rows=padded_rows(cfg.vocab, 2, None))  # an odd vocab is padded to 128 x TP
    res = compare_checkpoints(open_checkpoint(str(gold)), open_checkpoint(str(out)))
    assert res.equivalent, [(t.name, t.status) for t in res.tensors if t.status not in ("equal", "close")]
    names = {t.name for t in res.tensors}
    assert QKV_BIAS.format(i=1) in names

    # logits in each layout's own runtime agree
    lr = compare_logits(open_checkpoint(str(src)), open_checkpoint(str(out)))
    assert lr.equivalent and lr.max_kl < lr.threshold


def test_toy_family_checks_fail_on_a_broken_bias(toy, tmp_path):
    """The same checks are red when the fused bias is wrong (k and v biases swapped in layer 1)."""
    cfg = toy_config()
    src = emit(tmp_path / "hf", "", "hf", cfg=cfg, seed=5)
    gold = emit(tmp_path / "gold", "", "megatron", cfg=cfg, seed=5, vocab_rows=padded_rows(cfg.vocab, 1, None))
    out = suite.convert("hf-to-megatron", src, tmp_path / "conv", {"tp": 1})
    # a broken input: the same HF source with k_b and v_b of layer 1 swapped, converted the same way
    bad_src = emit(tmp_path / "hf-bad", "", "hf", cfg=cfg, seed=5)
    from safetensors.torch import load_file, save_file
    f = next(p for p in bad_src.iterdir() if p.suffix == ".safetensors")
    state = load_file(str(f))
    kb, vb = _L.format(i=1) + "self_attn.k_proj.bias", _L.format(i=1) + "self_attn.v_proj.bias"
    state[kb], state[vb] = state[vb].clone(), state[kb].clone()
    save_file(state, str(f), metadata={"format": "pt"})
    bad = suite.convert("hf-to-megatron", bad_src, tmp_path / "conv-bad", {"tp": 1})

    assert compare_checkpoints(open_checkpoint(str(gold)), open_checkpoint(str(out))).equivalent
    res = compare_checkpoints(open_checkpoint(str(gold)), open_checkpoint(str(bad)))
    assert not res.equivalent
    bad_names = {t.name for t in res.tensors if t.status not in ("equal", "close")}
    assert bad_names == {QKV_BIAS.format(i=1)}
    lr = compare_logits(open_checkpoint(str(src)), open_checkpoint(str(bad)))
    assert not lr.equivalent and lr.max_kl > lr.threshold
    assert torch.isfinite(torch.tensor(lr.max_kl))
