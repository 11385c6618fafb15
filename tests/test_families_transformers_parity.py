"""Qwen2, Qwen3, Qwen3-MoE, DeepSeek-V3 and GPT-OSS: declared once (ckdiff/models/families/), checked against
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
from ckdiff.models.config import ModelConfig, model_config
from ckdiff.formats.readers import open_checkpoint
from ckdiff.runtime import forward as runtimes
from ckdiff.golden.models import TINY, hf_state, lazy
from helpers import redraw

FAMILIES = {  # tiny model -> transformers model class
    "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
    "qwen3-moe": transformers.Qwen3MoeForCausalLM, "deepseek-v3": transformers.DeepseekV3ForCausalLM,
    "gpt-oss": transformers.GptOssForCausalLM,
    "deepseek-v3-q": transformers.DeepseekV3ForCausalLM, "qwen3-moe-dense0": transformers.Qwen3MoeForCausalLM,
}


def transformers_model(name: str, seed: int = 0):
    """transformers' model for the tiny config ckdiff writes, every parameter and buffer random."""
    cfg = TINY[name]
    hf = {k: v for k, v in cfg.to_hf().items() if k != "torch_dtype"}
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(seed)
    return redraw(FAMILIES[name](config).eval(), seed, router_scale=1.0)


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
    ids = {k: ck.config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}  # transformers' own
    assert cfg == replace(TINY[name], hf_model_type=cfg.hf_model_type, **ids)
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


def test_deepseek_mtp_layer_read_when_present_and_named_when_missing(written, tmp_path):
    """transformers saves no MTP layer. A config that counts one (num_nextn_predict_layers=1) with no tensor of
    layer num_hidden_layers gets a finding; with the layer present (written here in DeepSeek-V3's published
    layout, README_WEIGHTS.md: a decoder layer plus enorm/hnorm/eh_proj/shared_head as layer 2) the checkpoint
    reads, runs and compares EQUIVALENT with its copy."""
    import json

    from safetensors.torch import load_file, save_file

    from ckdiff.models.families import MTP_NAMES
    _, path = written["deepseek-v3"]
    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    config = json.loads((missing / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (missing / "config.json").write_text(json.dumps(config))
    res = compare_checkpoints(open_checkpoint(str(path)), open_checkpoint(str(missing)))
    assert not res.equivalent
    assert any("num_nextn_predict_layers=1 but there is no tensor of layer 2 (the MTP layer)" in f
               for f in res.config_findings), res.config_findings

    present = tmp_path / "present"
    shutil.copytree(missing, present)
    st = load_file(str(present / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    D, V = TINY["deepseek-v3"].hidden, TINY["deepseek-v3"].vocab
    shapes = {"embed_tokens.weight": (V, D), "eh_proj.weight": (D, 2 * D), "shared_head.head.weight": (V, D)}
    for k in [k for k in st if k.startswith("model.layers.1.")]:
        st[k.replace("layers.1.", "layers.2.")] = torch.randn(st[k].shape, generator=g)
    for n in MTP_NAMES:
        st[f"model.layers.2.{n}"] = torch.randn(shapes.get(n, (D,)), generator=g)
    save_file(st, str(present / "model.safetensors"), metadata={"format": "pt"})
    ck = open_checkpoint(str(present))
    assert model_config(ck).extra["mtp_layers"] == 1
    shutil.copytree(present, tmp_path / "copy")
    res = compare_checkpoints(ck, open_checkpoint(str(tmp_path / "copy")))
    assert res.equivalent and not res.config_findings
    assert compare_logits(ck, open_checkpoint(str(tmp_path / "copy")), batch=1, length=8).equivalent


@pytest.mark.parametrize("name", list(FAMILIES))
def test_other_layouts_refused_in_one_line_with_the_reason(name):
    from ckdiff.models import families
    from ckdiff.convert import api
    from ckdiff.formats import layouts
    from ckdiff.errors import InputError, UsageError
    has = families.family(TINY[name].family).layouts  # every one of them: GGUF too (llama.cpp's tables)
    assert has == {"hf", "gguf"}
    for layout in sorted({"megatron", "meta", "jetstream", "mcore", "gguf"} - has):
        with pytest.raises(InputError) as e:
            layouts.hf_to(layout, TINY[name])
        msg = str(e.value)
        assert f"has no {layout} layout here: " in msg and f"(its layouts: {', '.join(sorted(has))})" in msg \
            and "\n" not in msg, msg
    state = hf_state(TINY[name])  # a whole model: refused before its tensors are read
    with pytest.raises(InputError, match="has no megatron layout here"):
        layouts.convert(lazy(state), "hf", "megatron", TINY[name])
    fam = TINY[name].family  # the converters' --model / --model_name given the family's name
    with pytest.raises(UsageError, match=f"model '{fam}': {fam} has no megatron layout here: Megatron-LLM has no"):
        api._megatron_model(fam)


def test_family_bug_classes_caught_with_their_cause_named(tmp_path):
    """The mutation self-test's family entries (tests/selftest/catalogue.py FAMILY_CATALOGUE): MLA rotary rows
    in the latent part, k_nope/v swapped, GPT-OSS gate/up de-interleaved, shared expert / e_score_correction_bias
    / sinks dropped, q/k norm swapped, q/k permuted like llama's, MTP layer counted but missing, Qwen2's window layers and Qwen3-MoE's
    norm_topk_prob lost. The golden models are
    ckdiff's own tiny weights drawn from the declarations (their names and shapes are transformers', above)."""
    from selftest.catalogue import FAMILY_CATALOGUE, run_state_mutations
    outcomes = run_state_mutations(tmp_path, FAMILY_CATALOGUE)
    assert len(outcomes) == len(FAMILY_CATALOGUE) >= 11
    assert all(o.caught for o in outcomes), [(o.mutation, o.details) for o in outcomes if not o.caught]
    assert all(o.named for o in outcomes), [(o.mutation, o.details) for o in outcomes if not o.named]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_declared_gguf_names_are_llama_cpps(name):
    """Each GGUF name a family declares is the one the gguf package's TensorNameMap (llama.cpp's
    convert_hf_to_gguf.py mapping) gives its HF tensor; per-expert HF names are looked up the way the converter
    does after stacking them (expert number dropped). The arch name is the gguf package's."""
    gguf = pytest.importorskip("gguf")
    import re

    from ckdiff.models import families
    fam = families.family(TINY[name].family)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == fam.gguf_arch)
    tmap = gguf.get_tensor_name_map(arch, TINY[name].layers)
    names = fam.layout_names["gguf"]
    assert names and set(names) <= set(fam.hf_names)
    # slots the converter splits, by the HF names it gives the parts before mapping them (llama.cpp
    # conversion/deepseek.py: kv_b_proj -> k_b_proj, v_b_proj; conversion/gpt_oss.py: gate_up_proj -> gate_proj,
    # up_proj)
    parts = {"kv_up": ("k_b_proj", "v_b_proj"), "experts_gate_up": ("gate_proj", "up_proj"),
             "experts_gate_up_b": ("gate_proj", "up_proj")}
    for slot, want in names.items():
        if isinstance(want, tuple):
            fused = fam.hf_names[slot].format(i=1)
            for part, w in zip(parts[slot], want):
                hf = re.sub(r"(kv_b_proj|gate_up_proj)(_bias)?", part, fused)
                got = tmap.get_name(hf, try_suffixes=(".weight", ".bias")) if hf.endswith(".weight") \
                    else tmap.get_name(hf[:-len("_bias")] if hf.endswith("_bias") else hf) + \
                    (".bias" if fused.endswith("_bias") else ".weight")
                assert got == w.format(i=1), (slot, hf, got)
            continue
        hf = re.sub(r"\.\{e\}", "", fam.hf_names[slot]).format(i=1)
        if hf.endswith((".weight", ".bias")):
            got = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        elif hf.endswith("_bias"):  # e_score_correction_bias, down_proj_bias: the converter writes ".bias"
            got = tmap.get_name(hf[:-len("_bias")]) + ".bias"
        else:  # sinks, fused experts: the converter writes ".weight"
            got = tmap.get_name(hf) + ".weight"
        assert got == want.format(i=1), (slot, hf, got)


@pytest.mark.parametrize("name,edit,says", [
    ("deepseek-v3", {"n_group": 3}, "key 'n_group': 8 routed experts do not split into 3 groups"),
    ("deepseek-v3", {"topk_group": 3}, "key 'topk_group': 3 groups chosen out of n_group 2"),
    ("deepseek-v3", {"kv_lora_rank": "16"}, "key 'kv_lora_rank': expected a positive integer"),
    ("deepseek-v3", {"routed_scaling_factor": -1.0}, "key 'routed_scaling_factor': expected a positive finite"),
    ("deepseek-v3", {"scoring_func": "softmax"}, "key 'scoring_func': 'softmax' is not supported"),
    ("gpt-oss", {"layer_types": ["sliding_attention"]}, "key 'layer_types': expected 2 of full_attention"),
    ("gpt-oss", {"swiglu_limit": True}, "key 'swiglu_limit': expected a positive finite number"),
    ("qwen2", {"use_sliding_window": "yes"}, "key 'use_sliding_window': expected true or false"),
    ("qwen3-moe", {"mlp_only_layers": [0, -1]}, "key 'mlp_only_layers': expected a list of integers >= 0"),
])
def test_family_config_values_checked_in_one_line(name, edit, says):
    from ckdiff.errors import InputError
    hf = {**TINY[name].to_hf(), **edit}
    with pytest.raises(InputError) as e:
        ModelConfig.from_hf(hf, {}, "config.json")
    assert says in str(e.value) and "\n" not in str(e.value) and "config.json" in str(e.value), str(e.value)


def test_mla_rotary_rows_in_the_other_pair_order_named():
    """q_b_proj with every head's rotary rows moved from interleaved pairs to half-split order (a converter that
    permutes DeepSeek's q like a llama q): the family's diagnosis names it; an unrelated change is not named."""
    from ckdiff.models import families
    cfg = TINY["deepseek-v3"]
    dn, dr = cfg.extra["qk_nope_head_dim"], cfg.head_dim
    a = hf_state(cfg)["model.layers.0.self_attn.q_b_proj.weight"]
    b = a.clone()
    for h in range(cfg.heads):  # spec: half-split row j takes interleaved row 2j, row dr/2 + j takes 2j + 1
        rot = a[h * (dn + dr) + dn:(h + 1) * (dn + dr)]
        b[h * (dn + dr) + dn:(h + 1) * (dn + dr)] = torch.cat([rot[0::2], rot[1::2]])
    diagnose = families.family("deepseek-v3").diagnose
    assert "MLA rotary rows of q_b_proj in the other pair order" in diagnose("q_up", a, b, cfg)
    c = a.clone()
    c[3, 2] += 1.0
    assert diagnose("q_up", a, c, cfg) is None
