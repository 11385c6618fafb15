"""DeepSeek-V3 (GGUF arch ``deepseek2``) and GPT-OSS (``gpt-oss``) GGUF files written by llama.cpp's own
``convert_hf_to_gguf.py`` (llama-cpp-python 0.3.36 sdist, ``vendor/llama.cpp``; .ci/run fetches it), compared with
their HF sources.

Producer: the converter's ``main()`` (tests/producers/gguf_convert.py) on tiny transformers models saved by
``save_pretrained`` (random weights, norms, biases, sinks and e_score_correction_bias included):
- DeepSeek-V3: 4 heads (MLA: every head has its own k and v, so no GQA to pick), q LoRA 24, kv LoRA 16, nope 8,
  rope 4, v 8, 8 routed experts in 2 groups, one shared expert, layer 0 dense; config.json names
  ``scoring_func: sigmoid`` as DeepSeek's published config does. The converter splits ``kv_b_proj`` into
  ``attn_k_b`` (per head, transposed) and ``attn_v_b`` and writes no ``attn_kv_b``.
- DeepSeek-V3 without q LoRA (``q_proj``, as V2-Lite), every layer MoE, two shared experts, norm_topk_prob false.
- GPT-OSS: 4 query heads over 2 KV heads, hidden 96 (head_dim 16), 4 experts of 32, window 4 on even layers,
  default rope (the converter writes no rope scaling for it). The converter de-interleaves ``gate_up_proj``.
- GPT-OSS with MXFP4 experts: its expert weights written by tests/test_encoding_mxfp4.py's quantizer in the
  layout OpenAI ships (no tool that writes it runs on CPU); the converter repacks them to GGML MXFP4 unrounded.

Documented limitation of the producer: the converter's GPT-2 BPE vocab step needs a hub tokenizer it knows, so the
vocab is written by its sentencepiece step (``:spm`` in gguf_convert.py); tensors and hyperparameters are the
converter's as they are.

Bugs are injected by editing a converted file's tensor bytes in place (``GGUFReader(..., "r+")``), as a converter
with that bug would have written them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_equivalent_both_ways
from producers import edit_gguf, edit_gguf_tensors, gguf_converted, tiny_llama

_DS = dict(num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=8, head_dim=4, intermediate_size=96, moe_intermediate_size=32,
           n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
           first_k_dense_replace=1, num_nextn_predict_layers=0)
_DS_Q = {**_DS, "q_lora_rank": None, "n_routed_experts": 4, "n_group": 1, "n_shared_experts": 2,
         "first_k_dense_replace": 0, "norm_topk_prob": False, "routed_scaling_factor": 1.5}
_OSS = dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
            num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
ARCH = {"ds": "deepseek2", "ds-q": "deepseek2", "oss": "gpt-oss", "ossmx": "gpt-oss"}
TYPES = {"ds": ("f32", "q8_0"), "ds-q": ("f32",), "oss": ("f32", "q8_0"), "ossmx": ("f16",)}
NO_GATING = "ds-no-gating"  # config.json without scoring_func, as transformers saves it
# YaRN as GPT-OSS ships it (truncate false: the correction range not rounded) and with truncate true
_YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "original_max_position_embeddings": 64,
         "beta_fast": 32.0, "beta_slow": 1.0}
YARN = {"oss-yarn": False, "oss-yarn-trunc": True}
MTP = "ds-mtp"  # with its MTP layer (layer 2, DeepSeek-V3's published layout)


def _set(d: Path, **kv) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kv)
    (d / "config.json").write_text(json.dumps(cfg))


def _random_buffers(d: Path, seed: int) -> None:
    """e_score_correction_bias is a buffer transformers saves as zeros: drawn at random like every weight."""
    from safetensors.torch import load_file, save_file
    st = load_file(str(d / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for k in [k for k in st if k.endswith("e_score_correction_bias")]:
        st[k] = 0.5 * torch.randn(st[k].shape, generator=g)
    save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})


def _add_mtp(src: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    from ckdiff.models.families import MTP_NAMES
    shutil.copytree(src, out)
    st = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    D, V = 64, 100
    for k in [k for k in st if k.startswith("model.layers.1.")]:
        st[k.replace("layers.1.", "layers.2.")] = torch.randn(st[k].shape, generator=g)
    shapes = {"embed_tokens.weight": (V, D), "eh_proj.weight": (D, 2 * D), "shared_head.head.weight": (V, D)}
    for n in MTP_NAMES:
        st[f"model.layers.2.{n}"] = torch.randn(shapes.get(n, (D,)), generator=g)
    save_file(st, str(out / "model.safetensors"), metadata={"format": "pt"})
    _set(out, num_nextn_predict_layers=1)


@pytest.fixture(scope="session")
def mla_gguf(tmp_path_factory):
    def sources(out):
        from safetensors.torch import load_file
        from test_encoding_mxfp4 import write_mxfp4
        tiny_llama(out / "ds", 7, "DeepseekV3", **_DS)
        tiny_llama(out / "ds-q", 8, "DeepseekV3", **_DS_Q)
        for seed, d in enumerate(("ds", "ds-q")):
            _random_buffers(out / d, seed)
        tiny_llama(out / "oss", 9, "GptOss", **_OSS)
        write_mxfp4(out / "ossmx", out / "oss", load_file(str(out / "oss" / "model.safetensors")))
        for name, trunc in YARN.items():
            tiny_llama(out / name, 9, "GptOss", **{**_OSS, "rope_parameters": {**_YARN, "truncate": trunc}})
        shutil.copytree(out / "ds", out / NO_GATING)
        for d in ("ds", "ds-q"):
            _set(out / d, scoring_func="sigmoid")
        _add_mtp(out / "ds", out / MTP)
        return [f"{out / name}:{t}:{out / f'{name}.{t}.gguf'}:spm"
                for name in list(ARCH) + [NO_GATING, MTP, *YARN] for t in TYPES.get(name, ("f32",))]
    return gguf_converted(tmp_path_factory, "gguf-mla-oss", sources, Path(__file__).read_text())


@pytest.mark.parametrize("name", list(ARCH))
def test_converter_output_equivalent_with_hf_source(mla_gguf, run_cli, name):
    import gguf
    for t in TYPES[name]:
        f = mla_gguf / f"{name}.{t}.gguf"
        r = gguf.GGUFReader(str(f))
        assert r.fields["general.architecture"].contents() == ARCH[name]
        types = {x.name: x.tensor_type.name for x in r.tensors}
        if name.startswith("ds"):  # the split MLA tensors, no attn_kv_b
            assert "blk.0.attn_k_b.weight" in types and not any("attn_kv_b" in n for n in types)
        if name == "ossmx":
            assert types["blk.1.ffn_gate_exps.weight"] == types["blk.1.ffn_down_exps.weight"] == "MXFP4"
        assert_equivalent_both_ways(run_cli, f, mla_gguf / name, f"{name} {t}", quant=t == "q8_0" or name == "ossmx")


def test_mxfp4_experts_against_the_float_source(mla_gguf, run_cli):
    """The float GPT-OSS against the GGUF of its MXFP4 encoding: every expert judged in units of its FP4 step
    times the block scale, as the HF MXFP4 reader judges OpenAI's blocks."""
    code, out, err = run_cli(mla_gguf / "oss", mla_gguf / "ossmx.f16.gguf")
    assert code == 0 and out.startswith("EQUIVALENT") and "6 quant" in out.splitlines()[0], out + err


@pytest.mark.parametrize("gguf_file,hf", [("ds.f32", "ds"), ("oss.f32", "oss"), ("ds.q8_0", "ds"), ("oss.q8_0", "oss"),
                                           ("ossmx.f16", "ossmx"), ("ossmx.f16", "oss")])
def test_logits_agree(mla_gguf, run_cli, gguf_file, hf):
    """At q8_0 and MXFP4 the noise floor is the source encoded as the file stores each tensor (llama.cpp keeps
    routers F32, quantizes GPT-OSS's experts along D after the transposition): a correct file lands on it."""
    code, out, err = run_cli("logits", mla_gguf / f"{gguf_file}.gguf", mla_gguf / hf)
    assert code == 0 and out.startswith("EQUIVALENT"), out + err
    if gguf_file.endswith("q8_0"):
        assert "mean_kl from the encoded reference: observed 0," in out, out


def test_yarn_as_gpt_oss_ships_it_is_named(mla_gguf, run_cli):
    """GPT-OSS's YaRN does not round its correction range (truncate false); ggml's rope always rounds it outward
    (ggml_rope_yarn_corr_dims), and the GGUF has no key to say otherwise: the config difference is named and the
    logits differ. With truncate true (transformers' default) the file is EQUIVALENT and the logits agree, so
    the YaRN betas, factor and original length are read back as HF spells them."""
    f = mla_gguf / "oss-yarn.f32.gguf"
    code, out, err = run_cli(mla_gguf / "oss-yarn", f)
    assert code == 1 and out.startswith("DIFFER: 41 tensors (41 equal)"), out + err
    assert "config rope_scaling:" in out and "'truncate': False" in out, out
    code, out, err = run_cli("logits", f, mla_gguf / "oss-yarn")
    assert code == 1 and out.startswith("DIFFER"), out + err
    f = mla_gguf / "oss-yarn-trunc.f32.gguf"
    for args in ((mla_gguf / "oss-yarn-trunc", f), (f, mla_gguf / "oss-yarn-trunc"),
                 ("logits", f, mla_gguf / "oss-yarn-trunc")):
        code, out, err = run_cli(*args)
        assert code == 0 and out.startswith("EQUIVALENT"), out + err


def test_missing_gating_function_is_named(mla_gguf, run_cli):
    """transformers saves no scoring_func; llama.cpp's converter then writes no expert_gating_func and llama.cpp
    runs a deepseek2 file without it with softmax gating: the weights are equal, the function is not."""
    f = mla_gguf / f"{NO_GATING}.f32.gguf"
    for a, b, want in ((mla_gguf / NO_GATING, f, "A='sigmoid' B='softmax'"), (f, mla_gguf / NO_GATING,
                                                                              "A='softmax' B='sigmoid'")):
        code, out, err = run_cli(a, b)
        assert code == 1 and out.startswith("DIFFER: 34 tensors (34 equal)"), out + err
        assert f"config scoring_func: {want}" in out, out


def test_mtp_layer_dropped_is_reported(mla_gguf, run_cli, tmp_path):
    """llama.cpp's deepseek2 converter skips the MTP layer: the config difference says so, and the coverage
    record names every MTP tensor as dropped by the rule that says why (not silently equal)."""
    f = mla_gguf / f"{MTP}.f32.gguf"
    code, out, err = run_cli(mla_gguf / MTP, f, "--json", tmp_path / "r.json")
    assert code == 1 and out.startswith("DIFFER: 34 tensors (34 equal)") and "config mtp_layers: A=1 B=0" in out, \
        out + err
    cov = json.loads((tmp_path / "r.json").read_text())["result"]["coverage"]["A"]
    dropped = [k for k, why in cov["dropped"].items() if "an MTP layer" in why]
    assert len(dropped) == 38 + 6 and all(k.startswith("model.layers.2.") for k in dropped), cov["dropped"]
    assert not cov["unaccounted"]
    code, out, err = run_cli(f, mla_gguf / MTP)
    assert code == 1 and "config mtp_layers: A=0 B=1" in out, out + err


def _swap_experts(name, e0, e1):
    def edit(t):
        x = np.array(t[name][e0])
        t[name][e0] = t[name][e1]
        t[name][e1] = x
    return edit


def _zero(name):
    def edit(t):
        t[name][...] = 0
    return edit


@pytest.mark.parametrize("src,edit,named", [
    # e_score_correction_bias lost (expert choice on the raw sigmoid scores)
    ("ds.f32", _zero("blk.1.exp_probs_b.bias"), ["blk.1.exp_probs_b.bias"]),
    # two experts' down projections swapped in the stacked tensor (quantized bytes moved as they are)
    ("ds.q8_0", _swap_experts("blk.1.ffn_down_exps.weight", 2, 5), ["blk.1.ffn_down_exps.weight"]),
    # k_b of MLA with the heads' k parts in the wrong order
    ("ds.f32", _swap_experts("blk.0.attn_k_b.weight", 0, 3), ["blk.0.attn_k_b.weight"]),
    ("oss.f32", _zero("blk.0.attn_sinks.weight"), ["blk.0.attn_sinks.weight"]),
    # (both sides MXFP4: one order compares in the HF layout, where gate and up are one fused tensor)
    ("ossmx.f16", _swap_experts("blk.1.ffn_up_exps.weight", 0, 1),
     ["blk.1.ffn_up_exps.weight|model.layers.1.mlp.experts.gate_up_proj"]),
])
def test_planted_bug_is_named(mla_gguf, run_cli, tmp_path, src, edit, named):
    bad = edit_gguf_tensors(mla_gguf / f"{src}.gguf", tmp_path / "bad.gguf", edit)
    hf = mla_gguf / src.split(".")[0]
    for a, b in ((hf, bad), (bad, hf)):
        code, out, err = run_cli(a, b)
        assert code == 1 and out.startswith("DIFFER: ") and "(1 differ," in out.splitlines()[0], out + err
        assert all(any(f"differ  {n}" in out for n in alt.split("|")) for alt in named), out


def test_gate_up_taken_as_halves_is_caught(mla_gguf, run_cli, tmp_path):
    """A converter that splits GPT-OSS's fused gate_up_proj into halves instead of alternating columns: gate and
    up each differ, every other tensor is equal."""
    from safetensors.torch import load_file
    st = load_file(str(mla_gguf / "oss" / "model.safetensors"))

    def edit(t):
        for i in (0, 1):
            w = st[f"model.layers.{i}.mlp.experts.gate_up_proj"].transpose(1, 2).numpy()  # [E, 2F, D]
            F = w.shape[1] // 2
            t[f"blk.{i}.ffn_gate_exps.weight"][...] = w[:, :F]
            t[f"blk.{i}.ffn_up_exps.weight"][...] = w[:, F:]
    bad = edit_gguf_tensors(mla_gguf / "oss.f32.gguf", tmp_path / "bad.gguf", edit)
    code, out, err = run_cli(mla_gguf / "oss", bad)
    assert code == 1 and out.startswith("DIFFER: 41 tensors (4 differ, 37 equal)"), out + err
    assert "differ  blk.1.ffn_gate_exps.weight" in out and "differ  blk.0.ffn_up_exps.weight" in out, out


def _fields(path):
    import gguf

    from ckdiff.formats.gguf import _fields as read
    r = gguf.GGUFReader(str(path))
    return read(r), {t.name: None for t in r.tensors}


@pytest.mark.parametrize("name,key,value,says", [
    ("ds", "deepseek2.attention.kv_lora_rank", "16", "'deepseek2.attention.kv_lora_rank': expected a positive integer"),
    ("ds", "deepseek2.attention.key_length_mla", 4,
     "'deepseek2.attention.key_length_mla': expected more than rope.dimension_count (4)"),
    ("ds", "deepseek2.expert_gating_func", 3, "'deepseek2.expert_gating_func': expected 1 (softmax) or 2 (sigmoid)"),
    ("ds", "deepseek2.expert_weights_scale", -2.5, "'deepseek2.expert_weights_scale': expected a positive finite"),
    ("ds", "deepseek2.expert_weights_norm", 1, "'deepseek2.expert_weights_norm': expected true or false"),
    ("ds", "deepseek2.leading_dense_block_count", -1,
     "'deepseek2.leading_dense_block_count': expected an integer >= 0"),
    ("ds", "deepseek2.rope.dimension_count", None, "metadata lacks deepseek2.rope.dimension_count"),
    ("ds", "deepseek2.expert_feed_forward_length", 0, "'deepseek2.expert_feed_forward_length': expected a positive"),
    ("oss", "gpt-oss.embedding_length", "96", "'gpt-oss.embedding_length': expected a positive integer"),
    ("oss", "gpt-oss.attention.head_count_kv", True, "'gpt-oss.attention.head_count_kv': expected a positive integer"),
    ("oss", "gpt-oss.rope.freq_base", float("nan"), "'gpt-oss.rope.freq_base': expected a positive finite number"),
    ("oss-yarn", "gpt-oss.rope.scaling.yarn_beta_fast", "32", "'yarn_beta_fast': expected a positive finite number"),
    ("oss-yarn", "gpt-oss.rope.scaling.yarn_attn_factor", float("inf"), "'yarn_attn_factor': expected a finite number"),
    ("oss", "gpt-oss.attention.sliding_window", 2.5, "'gpt-oss.attention.sliding_window': expected a positive integer"),
])
def test_metadata_values_checked_in_one_line(mla_gguf, name, key, value, says):
    from ckdiff.errors import InputError
    from ckdiff.formats.gguf import config_from_gguf
    f, tensors = _fields(mla_gguf / f"{name}.f32.gguf")
    f = {k: v for k, v in f.items() if k != key} if value is None else {**f, key: value}
    with pytest.raises(InputError) as e:
        config_from_gguf(f, tensors, "x.gguf")
    assert says in str(e.value) and "\n" not in str(e.value) and "x.gguf" in str(e.value), str(e.value)


def test_metadata_read_back(mla_gguf):
    """What each file's metadata says, as ckdiff reads it: MLA's key lengths, llama.cpp's defaults for keys the
    converter leaves out (no expert_weights_norm: false), GPT-OSS's window on the even layers and its fixed SwiGLU
    constants."""
    from ckdiff.formats.gguf import config_from_gguf
    c = config_from_gguf(*_fields(mla_gguf / "ds-q.f32.gguf"))
    assert (c.family, c.heads, c.kv_heads, c.head_dim, c.experts, c.experts_per_tok) == ("deepseek-v3", 4, 4, 4, 4, 2)
    x = c.extra
    assert (x["q_lora_rank"], x["kv_lora_rank"], x["qk_nope_head_dim"], x["v_head_dim"], x["n_shared_experts"],
            x["first_k_dense_replace"], x["norm_topk_prob"], x["routed_scaling_factor"], x["scoring_func"],
            x["mtp_layers"]) == (None, 16, 8, 8, 2, 0, False, 1.5, "sigmoid", 0)
    c = config_from_gguf(*_fields(mla_gguf / "oss.f32.gguf"))
    assert (c.family, c.hidden, c.heads, c.kv_heads, c.head_dim, c.sliding_window) == ("gpt-oss", 96, 4, 2, 16, 4)
    assert c.extra["layer_types"] == ["sliding_attention", "full_attention"]
    assert (c.extra["swiglu_limit"], c.extra["swiglu_alpha"]) == (7.0, 1.702)


def test_unknown_arch_is_one_line(mla_gguf, run_cli, tmp_path):
    """An arch no family declares (here deepseek2 renamed in place) stops with one line naming the file."""
    def edit(r):
        f = r.fields["general.architecture"]
        f.parts[f.data[0]][:] = np.frombuffer(b"deepseek3", dtype=np.uint8)
    bad = edit_gguf(mla_gguf / "ds.f32.gguf", tmp_path / "bad.gguf", edit)
    code, out, err = run_cli(mla_gguf / "ds", bad)
    assert code == 2 and err.startswith("ckdiff: error:") and len(err.strip().splitlines()) == 1, err
    assert "GGUF architecture 'deepseek3' has no table here" in err and "bad.gguf" in err, err


def test_fused_ops_round_trip():
    """The split ops and their reverses are exact inverses, and the split puts each head's k part transposed."""
    from ckdiff.tensor.ops_fused import Deinterleave, SplitKvB, SwapLast
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(4 * (8 + 6), 16, generator=g)
    k, v = SplitKvB(4, 8, 6)([kv])
    assert k.shape == (4, 16, 8) and v.shape == (4, 6, 16)
    assert torch.equal(k[2], kv[2 * 14:2 * 14 + 8].T) and torch.equal(v[3], kv[3 * 14 + 8:4 * 14])
    assert torch.equal(SplitKvB(4, 8, 6).reverse()([k, v])[0], kv)
    w = torch.randn(3, 10, 12, generator=g)  # [E, D, 2F]
    gate, up = Deinterleave(transpose=True)([w])
    assert gate.shape == (3, 6, 10) and torch.equal(gate[1, 2], w[1, :, 4]) and torch.equal(up[1, 2], w[1, :, 5])
    assert torch.equal(Deinterleave(True).reverse()([gate, up])[0], w)
    b = torch.randn(3, 12, generator=g)
    assert torch.equal(Deinterleave().reverse()(Deinterleave()([b]))[0], b)
    assert torch.equal(SwapLast()(SwapLast()([w]))[0], w)
    with pytest.raises(ValueError, match="kv_b_proj"):
        SplitKvB(4, 8, 8)([kv])


def test_shared_expert_dropped_on_the_hf_side_is_named(mla_gguf, run_cli, tmp_path):
    """An HF side that lost its shared expert (a converter back from GGUF that skips ffn_*_shexp): the mapping
    into the GGUF layout goes on without it, the GGUF targets it feeds are one-sided rows naming the missing HF
    tensor, and the verdict is DIFFER in both orders."""
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "ds"
    shutil.copytree(mla_gguf / "ds", bad)
    st = load_file(str(bad / "model.safetensors"))
    save_file({k: v for k, v in st.items() if ".shared_experts." not in k}, str(bad / "model.safetensors"),
              metadata={"format": "pt"})
    for side, (a, b) in (("A", (bad, mla_gguf / "ds.f32.gguf")), ("B", (mla_gguf / "ds.f32.gguf", bad))):
        code, out, err = run_cli(a, b)
        assert code == 1 and out.startswith("DIFFER"), out + err
        text = " ".join(out.split())
        for n in ("gate", "up", "down"):
            assert f"missing in {side}: model.layers.1.mlp.shared_experts.{n}_proj.weight" in text, out
        assert "(3 only-" in text and "different naming" not in text, out
