"""Qwen2, Qwen3, Qwen3-MoE, DeepSeek-V3 and GPT-OSS: declared once (ckdiff/families.py), checked against
transformers.

Each fixture is written by transformers itself: its own config class built from the config.json that
ckdiff writes for the tiny model, its own model class with every parameter and buffer redrawn at random
(norms around 1, biases, sinks and DeepSeek's e_score_correction_bias included: never constant), saved with
``save_pretrained``. Then:
- the names and shapes transformers writes are exactly the family's declared slots (ckdiff's tiny weights
  drawn from the declaration have the same keys and shapes);
- ckdiff reads the config back to the same ModelConfig;
- ckdiff's reference runtime, composed from the family's Block, gives transformers' logits on the same
  weights within float32 rounding (prompts of 12 tokens, longer than the sliding windows of 4);
- ``ckdiff hf/ hf/`` of two copies is EQUIVALENT and the logit check passes.
"""
from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
import transformers

from ckdiff.compare.diff import compare_checkpoints
from ckdiff.compare.logits import compare_logits
from ckdiff.converters.config import ModelConfig, model_config
from ckdiff.converters.formats import open_checkpoint
from ckdiff.golden import runtimes
from ckdiff.golden.models import TINY, hf_state

FAMILIES = {  # tiny model -> transformers model class
    "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
    "qwen3-moe": transformers.Qwen3MoeForCausalLM, "deepseek-v3": transformers.DeepseekV3ForCausalLM,
    "gpt-oss": transformers.GptOssForCausalLM,
}
NORMS = ("norm.weight", "layernorm.weight", "q_norm.weight", "k_norm.weight")


def transformers_model(name: str, seed: int = 0):
    """transformers' model for the tiny config ckdiff writes, every parameter and buffer random."""
    cfg = TINY[name]
    hf = {k: v for k, v in cfg.to_hf().items() if k != "torch_dtype"}
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(seed)
    model = FAMILIES[name](config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "rotary_emb" in n or not p.dtype.is_floating_point:
                continue
            base = 1.0 if n.endswith(NORMS) else 0.0
            scale = 0.1 if base else (1.0 if n.endswith(("gate.weight", "router.weight")) else 0.3)
            p.copy_(base + torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """name -> (transformers model, the directory it saved)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in FAMILIES:
        model = transformers_model(name)
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_declared_names_shapes_and_config_are_transformers(written, name):
    model, path = written[name]
    ck = open_checkpoint(str(path))
    theirs = {k: tuple(t.shape) for k, t in ck.tensors.items()}
    ours = {k: tuple(v.shape) for k, v in hf_state(TINY[name]).items()}
    assert theirs == ours
    cfg = model_config(ck)
    assert cfg == replace(TINY[name], hf_model_type=cfg.hf_model_type)
    for n, p in model.named_parameters():  # random, never constant
        assert p.std() > 0, n


@pytest.mark.parametrize("name", list(FAMILIES))
def test_runtime_matches_transformers(written, name):
    model, path = written[name]
    ck = open_checkpoint(str(path))
    cfg = model_config(ck)
    ids = torch.randint(0, cfg.vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits.float()
    got = runtimes.run(ck, cfg, ids).logits
    err = (got - want).abs().max().item()
    assert err <= 2e-5 * want.abs().max().item(), f"{name}: max |diff| {err:.3g}"
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_two_copies_are_equivalent(written, name, tmp_path):
    _, path = written[name]
    shutil.copytree(path, tmp_path / "b")
    a, b = open_checkpoint(str(path)), open_checkpoint(str(tmp_path / "b"))
    res = compare_checkpoints(a, b)
    assert res.equivalent and not res.config_diff and not res.config_findings, res.config_findings
    lr = compare_logits(a, b, batch=2, length=12)
    assert lr.equivalent and lr.max_kl == 0.0
