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

GGUF: llama.cpp's own ``convert_hf_to_gguf.py`` (llama-cpp-python 0.3.36 sdist, ``vendor/llama.cpp``; run by
tests/producers/gguf_convert.py) converts those transformers-written models; its ``conversion/deepseek.py`` writes
``deepseek2.rope.scaling.yarn_log_multiplier`` = 0.1 x mscale_all_dim and no mscale. ckdiff reads it back as
mscale = mscale_all_dim = multiplier / 0.1: the file of the V3 case, of a V2-style case (0.707 both) and of
1/sqrt(2) both (compared at float32), and of mscale_all_dim 0 (mscale 1 then unused) is EQUIVALENT to its source,
config and logits; the file of the split case (mscale 0.5 written nowhere) differs in
rope_scaling, named. ckdiff's own GGUF writer (self-agreement only) writes the same key and refuses the split case.
"""
from __future__ import annotations

import pytest
import torch
import transformers

from ckdiff.formats.readers import open_checkpoint
from ckdiff.golden.models import TINY
from ckdiff.models.config import model_config
from ckdiff.runtime.forward import run
from helpers import redraw

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0}
CASES = {"v3": {"mscale": 1.0, "mscale_all_dim": 1.0}, "split": {"mscale": 0.5, "mscale_all_dim": 1.0},
         "no-all-dim": {"mscale": 1.0, "mscale_all_dim": 0.0}}
# v2: DeepSeek-V2's published 0.707; 1/sqrt(2) has no short float32 decimal: read back 0.7071068, equal at float32
CONVERTED = {"v3": CASES["v3"], "v2": {"mscale": 0.707, "mscale_all_dim": 0.707},
             "sqrt": {"mscale": 0.5 ** 0.5, "mscale_all_dim": 0.5 ** 0.5}, "split": CASES["split"],
             "no-all-dim": CASES["no-all-dim"]}  # multiplier 0: no score scale, and mscale is never read


def deepseek_yarn(out, mscales: dict, seed: int = 0):
    """transformers' DeepseekV3ForCausalLM for ckdiff's tiny DeepSeek-V3 config with YaRN, every parameter and
    buffer random (norms around 1, e_score_correction_bias included), saved to ``out``."""
    hf = {k: v for k, v in TINY["deepseek-v3"].to_hf().items() if k not in ("torch_dtype", "rope_theta")}
    hf.update(max_position_embeddings=640, rope_parameters={**YARN, **mscales})
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(seed)
    model = redraw(transformers.DeepseekV3ForCausalLM(config).eval(), seed)
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


# ------------------------------------------------------------------ GGUF, written by llama.cpp's converter
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (HF dir written by transformers, the f32 GGUF llama.cpp's converter made of it)."""
    from pathlib import Path

    from producers import gguf_converted

    def sources(out):
        for seed, (name, m) in enumerate(CONVERTED.items()):
            deepseek_yarn(out / name, m, seed)
        return [f"{out / n}:f32:{out / n}.gguf:spm" for n in CONVERTED]
    root = gguf_converted(tmp_path_factory, "gguf-yarn-deepseek", sources, Path(__file__).read_text())
    return {n: (root / n, root / f"{n}.gguf") for n in CONVERTED}


def _gguf_fields(path):
    import gguf

    from ckdiff.formats.gguf import _fields
    return _fields(gguf.GGUFReader(str(path)))


@pytest.mark.parametrize("name", list(CONVERTED))
def test_converter_writes_the_log_multiplier_and_ckdiff_reads_mscales(converted, name):
    hf, f = converted[name]
    fields = _gguf_fields(f)
    m = CONVERTED[name]
    assert fields["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * m["mscale_all_dim"], rel=1e-7)
    assert not any("mscale" in k for k in fields)  # the converter has no key for mscale
    sc = model_config(open_checkpoint(str(f))).rope_scaling
    assert sc["mscale"] == sc["mscale_all_dim"] == pytest.approx(m["mscale_all_dim"], rel=2 ** -22)
    assert "yarn_log_multiplier" not in sc
    assert (sc["rope_type"], sc["factor"], sc["original_max_position_embeddings"]) == ("yarn", 40.0, 16)


@pytest.mark.parametrize("name", ["v3", "v2", "sqrt", "no-all-dim"])
def test_hf_and_its_gguf_agree_on_rope_scaling(converted, run_cli, name):
    """No config difference either way, and the logits agree (the GGUF runs through the same MLA score scale)."""
    hf, f = converted[name]
    for a, b in ((hf, f), (f, hf)):
        code, out, err = run_cli(a, b)
        assert code == 0 and out.startswith("EQUIVALENT") and "rope_scaling" not in out, out + err
    code, out, err = run_cli("logits", f, hf)
    assert code == 0 and out.startswith("EQUIVALENT"), out + err


def test_mscale_the_gguf_cannot_say_is_named(converted, run_cli):
    """mscale 0.5 with mscale_all_dim 1: the converter writes 0.1 and drops the 0.5 without a word. ckdiff names
    the rope_scaling difference in both orders, and the logits differ (the cos/sin factor is 1 in the file)."""
    hf, f = converted["split"]
    for a, b, want in ((hf, f, "'mscale': 0.5"), (f, hf, "'mscale': 1.0")):
        code, out, err = run_cli(a, b)
        assert code == 1 and out.startswith("DIFFER") and "config rope_scaling:" in out, out + err
        assert want in out.split("config rope_scaling:")[1].split(" B=")[0], out
    code, out, err = run_cli("logits", f, hf)
    assert code == 1 and out.startswith("DIFFER"), out + err


@pytest.mark.parametrize("value,says", [
    (-0.1, "'yarn_log_multiplier': expected a finite number >= 0"),
    (float("nan"), "'yarn_log_multiplier': expected a finite number"),
    ("0.1", "'yarn_log_multiplier': expected a finite number"),
])
def test_log_multiplier_checked_in_one_line(converted, value, says):
    from ckdiff.errors import InputError
    from ckdiff.formats.gguf import config_from_gguf
    f = converted["v3"][1]
    fields = {**_gguf_fields(f), "deepseek2.rope.scaling.yarn_log_multiplier": value}
    with pytest.raises(InputError) as e:
        config_from_gguf(fields, {}, "x.gguf")
    assert says in str(e.value) and "\n" not in str(e.value) and "x.gguf" in str(e.value), str(e.value)


@pytest.mark.parametrize("key,value", [("mscale", -1.0), ("mscale_all_dim", float("inf")), ("mscale", "1"),
                                       ("mscale_all_dim", True)])
def test_hf_mscales_checked_in_one_line(key, value):
    from ckdiff.errors import InputError
    from ckdiff.models.config import ModelConfig
    hf = {**TINY["deepseek-v3"].to_hf(), "rope_parameters": {**YARN, **CASES["v3"], key: value}}
    with pytest.raises(InputError) as e:
        ModelConfig.from_hf(hf, {}, "config.json")
    msg = str(e.value)
    assert f"field '{key}': expected a finite number >= 0" in msg and "\n" not in msg and "config.json" in msg, msg


def test_ckdiff_writer_writes_the_multiplier_and_refuses_what_gguf_cannot_say(converted, tmp_path):
    """ckdiff's own GGUF writer (golden fixtures; self-agreement only): the converter's key and value for the V3
    case (the same float32 as the converter's file), and one line refusing mscale != mscale_all_dim."""
    from ckdiff.errors import InputError
    from ckdiff.formats.gguf import write_gguf
    from ckdiff.golden.models import hf_state
    cfg = model_config(open_checkpoint(str(converted["v3"][0])))
    ours = write_gguf(tmp_path / "v3.gguf", hf_state(cfg, 0), cfg, "F32")
    key = "deepseek2.rope.scaling.yarn_log_multiplier"
    assert _gguf_fields(ours)[key] == _gguf_fields(converted["v3"][1])[key]
    assert model_config(open_checkpoint(str(ours))).rope_scaling == model_config(
        open_checkpoint(str(converted["v3"][1]))).rope_scaling
    split = model_config(open_checkpoint(str(converted["split"][0])))
    with pytest.raises(InputError) as e:
        write_gguf(tmp_path / "split.gguf", hf_state(split, 0), split, "F32")
    msg = str(e.value)
    assert "mscale 0.5 != mscale_all_dim 1.0" in msg and "split.gguf" in msg and "\n" not in msg, msg
    assert not (tmp_path / "split.gguf").exists()
