"""DeepSeek-V3 with YaRN rope scaling: the extra softmax scale, and the GGUF spelling of it.

transformers' DeepSeek attention (``modeling_deepseek_v3.py``, ``yarn_apply_mscale`` in ``modeling_rope_utils.py``,
v5) multiplies the score scale 1/sqrt(nope + rope) by mscale(factor, mscale_all_dim)^2 for any rope type but
default when ``mscale_all_dim`` is set and non-zero, on top of the cos/sin attention factor
mscale(factor, mscale) / mscale(factor, mscale_all_dim) of the rotary part. Each case here is written by
transformers itself (its DeepseekV3 config and model classes, every parameter redrawn at random, saved with
``save_pretrained``) and run through transformers and through ckdiff's reference runtime on 12-token prompts:
- mscale = mscale_all_dim = 1 (DeepSeek-V3's published config, factor 40): cos/sin factor 1, scores x 1.874;
- mscale 0.5, mscale_all_dim 1: both factors at work;
- mscale_all_dim 0: no extra score scale (the control: the logits differ from the first case).
MLA has no GQA to pick: every head has its own k and v (4 heads).
"""
from __future__ import annotations

import pytest
import torch
import transformers

from ckdiff.formats.readers import open_checkpoint
from ckdiff.golden.models import TINY
from ckdiff.models.config import model_config
from ckdiff.runtime.forward import run

NORMS = ("norm.weight", "layernorm.weight")
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0}
CASES = {"v3": {"mscale": 1.0, "mscale_all_dim": 1.0}, "split": {"mscale": 0.5, "mscale_all_dim": 1.0},
         "no-all-dim": {"mscale": 1.0, "mscale_all_dim": 0.0}}


def deepseek_yarn(out, mscales: dict, seed: int = 0):
    """transformers' DeepseekV3ForCausalLM for ckdiff's tiny DeepSeek-V3 config with YaRN, every parameter and
    buffer random (norms around 1, e_score_correction_bias included), saved to ``out``."""
    hf = {k: v for k, v in TINY["deepseek-v3"].to_hf().items() if k not in ("torch_dtype", "rope_theta")}
    hf.update(max_position_embeddings=640, rope_parameters={**YARN, **mscales})
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "rotary_emb" in n or not p.dtype.is_floating_point:
                continue
            base = 1.0 if n.endswith(NORMS) else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * (0.1 if base else 0.3))
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("yarn-deepseek")
    return {name: (deepseek_yarn(root / name, m), root / name) for name, m in CASES.items()}


def _logits(written, name):
    model, path = written[name]
    ck = open_checkpoint(str(path))
    ids = torch.randint(0, TINY["deepseek-v3"].vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits.float()
    return run(ck, model_config(ck), ids).logits, want


@pytest.mark.parametrize("name", list(CASES))
def test_runtime_matches_transformers_with_yarn(written, name):
    got, want = _logits(written, name)
    err = (got - want).abs().max().item()
    assert err <= 2e-5 * want.abs().max().item(), f"{name}: max |diff| {err:.3g}"
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_score_scale_changes_the_function(written):
    """The cases differ only in mscale / mscale_all_dim: transformers' logits differ between them, so the parity
    above checks the score scale and the cos/sin factor, not a function they leave alone."""
    base = _logits(written, "no-all-dim")[1]
    for name in ("v3", "split"):
        assert (_logits(written, name)[1] - base).abs().max() > 1e-2, name
