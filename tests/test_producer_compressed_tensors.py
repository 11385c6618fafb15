"""compressed-tensors checkpoints written by compressed-tensors itself (the version .ci/run pins, 0.20.0).

Producer: tests/producers/ct_save.py, on a tiny transformers ``LlamaForCausalLM`` (GQA 8 heads / 2 KV heads,
random weights, saved by ``save_pretrained``): compressed-tensors' own ``apply_quantization_config`` on every
Linear but ``lm_head``, its ``calculate_qparams`` (``generate_gparam`` for NVFP4) over each strategy's min/max,
``ModelCompressor.compress_model`` and ``save_pretrained`` + ``update_config``, for each scheme in
``ct_save.schemes()``: FP8 block (32 x 48, so several blocks and partial ones), channel and tensor
(``float-quantized``); int4 group 32 and int4/int8 channel, symmetric and with zero points
(``pack-quantized``); NVFP4 (``nvfp4-pack-quantized``); FP8 block, int4/int8 with zero points and NVFP4 also
from the source cast to bfloat16 (bf16 scales and arithmetic). Built once per session (cached like the other
producers, tests/producers/__init__.py). Bugs are injected by editing a written checkpoint's tensors or
config as a converter with that bug would have written them.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from producers import HERE, cached, launch_together, tiny_llama, version

CT = version("compressed-tensors")
SCHEMES = ("fp8-block", "fp8-channel", "fp8-tensor", "int4-group", "int4-group-zp", "int8-channel",
           "int8-channel-zp", "int4-channel", "nvfp4")


def _format(scheme: str) -> str:
    return "nvfp4-pack-quantized" if scheme == "nvfp4" else "float-quantized" if scheme.startswith("fp8") \
        else "pack-quantized"


BF16 = ("fp8-block", "int4-group-zp", "int8-channel-zp", "nvfp4")  # also from a bfloat16 source


@pytest.fixture(scope="session")
def ct(tmp_path_factory):
    """The HF source ("hf") and one compressed-tensors directory per scheme, written by compressed-tensors;
    the same from the source cast to bfloat16 ("hf-bf16", "bf16/<scheme>": bf16 scales, bf16 arithmetic)."""
    def build(out):
        import transformers
        tiny_llama(out / "hf")
        transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.bfloat16).save_pretrained(
            out / "hf-bf16")
        launch_together((HERE / "ct_save.py", 1, out / "hf", out, *SCHEMES),
                        (HERE / "ct_save.py", 1, out / "hf-bf16", out / "bf16", *BF16))
    root = cached(tmp_path_factory, "ct", build, CT, torch.__version__, version("transformers"))
    return {"hf": root / "hf", "hf-bf16": root / "hf-bf16", **{s: root / s for s in SCHEMES},
            **{f"bf16/{s}": root / "bf16" / s for s in BF16}}


def _edit(src, dst, tensors=None, config=None):
    """A copy of ``src`` with its tensors (a dict, edited in place by ``tensors``) and/or its
    quantization_config (``config``) changed."""
    shutil.copytree(src, dst)
    if tensors:
        sd = load_file(dst / "model.safetensors")
        tensors(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        c = json.loads((dst / "config.json").read_text())
        config(c["quantization_config"])
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def _findings(path) -> dict:
    """{tensor: [finding kinds]} of a --json report (the typed findings, compare/findings.py)."""
    return {t["name"]: [f["kind"] for f in t.get("findings") or []]
            for t in json.loads(path.read_text())["result"]["tensors"] if t.get("findings")}


def _diagnosis(path) -> str:
    """Every diagnosis text of a --json report, one line each (the terminal wraps them)."""
    return "\n".join(d for t in json.loads(path.read_text())["result"]["tensors"] for d in t.get("diagnosis") or [])


def test_writer_is_compressed_tensors(ct):
    for s in SCHEMES:
        q = json.loads((ct[s] / "config.json").read_text())["quantization_config"]
        assert q["quant_method"] == "compressed-tensors" and q["version"] == CT and q["quantization_status"] == \
            "compressed", q
        assert q["format"] == _format(s), q
    names = set(load_file(ct["int4-group-zp"] / "model.safetensors"))
    m = "model.layers.0.mlp.down_proj."
    assert {m + "weight_packed", m + "weight_shape", m + "weight_scale", m + "weight_zero_point"} <= names
    assert m + "weight_global_scale" in set(load_file(ct["nvfp4"] / "model.safetensors"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_equivalent_with_hf_source_both_ways(ct, run_cli, scheme):
    for a, b, side in ((ct["hf"], ct[scheme], "B"), (ct[scheme], ct["hf"], "A")):
        code, out, err = run_cli(a, b)
        assert code == 0, out + err
        assert out.startswith("EQUIVALENT: 21 tensors (14 quant, 7 equal)"), out
        assert f"{side}: compressed-tensors {_format(scheme)}" in out, out


@pytest.mark.parametrize("scheme", BF16)
def test_bfloat16_source(ct, run_cli, scheme):
    """bf16 weights: the scales are bf16 and compressed-tensors computes in bf16; the bound widens by the
    rounding of x / s in bf16 (int8: 1.05, with zero points 1.55) and the reference quantizer computes in the
    dtype config.json names, so the logits land on the stored codes exactly."""
    for a, b in ((ct["hf-bf16"], ct[f"bf16/{scheme}"]), (ct[f"bf16/{scheme}"], ct["hf-bf16"])):
        code, out, err = run_cli(a, b)
        assert code == 0 and out.startswith("EQUIVALENT: 21 tensors (14 quant, 7 equal)"), out + err
    code, out, err = run_cli("logits", ct[f"bf16/{scheme}"], ct["hf-bf16"], "--json", "-")
    d = json.loads(out[out.index("{"):])
    assert d["result"]["from_encoded_reference"]["mean_kl"] == 0, d["result"]["from_encoded_reference"]
    if d["result"]["noise_floor"]["top1_agreement"] < 0.5:
        # int4 with zero points changes over half of this tiny model's predictions by itself: inconclusive
        assert code == 1 and d["result"]["verdict"] == "inconclusive", out + err
    else:
        assert code == 0 and d["result"]["verdict"] == "equivalent", out + err


def test_logical_names_and_exact_self_compare(ct, run_cli, tmp_path):
    code, out, err = run_cli("inspect", ct["int4-group-zp"])
    assert code == 0 and "model.layers.{0..1}.mlp.down_proj.weight" in out and "[64, 96]" in out, out
    assert "weight_packed" not in out and "weight_zero_point" not in out, out
    code, out, err = run_cli(ct["int4-group-zp"], ct["int4-group-zp"], "--json", tmp_path / "r.json")
    assert code == 0, out + err
    r = json.loads((tmp_path / "r.json").read_text())["result"]
    quant = [t for t in r["tensors"] if t["name"].endswith("down_proj.weight")]
    assert len(quant) == 2 and all(t["status"] == "equal" and t["tol_source"] == "exact (codes and scales)"
                                   for t in quant), quant


@pytest.mark.parametrize("scheme", ["fp8-block", "int4-group", "int8-channel-zp", "nvfp4"])
def test_logits_agree(ct, run_cli, scheme):
    code, out, err = run_cli("logits", ct[scheme], ct["hf"], "--json", "-")
    d = json.loads(out[out.index("{"):])["result"]
    # the file lands on the codes of the reference quantization of the float side: distance 0 from it
    assert d["from_encoded_reference"]["mean_kl"] == 0 and d["from_encoded_reference"]["top1_agreement"] == 1
    if d["noise_floor"]["top1_agreement"] < 0.5:  # int4 on this 64-wide model: the floor leaves nothing to judge
        assert code == 1 and d["verdict"] == "inconclusive", out + err
    else:
        assert code == 0 and d["verdict"] == "equivalent", out + err


def _swap_gate_up(sd):
    a, b = "model.layers.0.mlp.gate_proj.", "model.layers.0.mlp.up_proj."
    for k in [k for k in sd if k.startswith(a)]:
        leaf = k[len(a):]
        sd[a + leaf], sd[b + leaf] = sd[b + leaf], sd[a + leaf]


@pytest.mark.parametrize("scheme", ["int4-group", "fp8-block"])
def test_gate_up_swapped_is_named(ct, run_cli, tmp_path, scheme):
    bad = _edit(ct[scheme], tmp_path / "bad", _swap_gate_up)
    code, out, err = run_cli(ct["hf"], bad, "--json", tmp_path / "r.json")
    assert code == 1 and out.startswith("DIFFER"), out + err
    f = _findings(tmp_path / "r.json")
    assert f == {"model.layers.0.mlp.gate_proj.weight": ["encodes-other"],
                 "model.layers.0.mlp.up_proj.weight": ["encodes-other"]}, f
    enc = "int4 group 32" if scheme == "int4-group" else "fp8 block 32x48"
    d = _diagnosis(tmp_path / "r.json")
    assert (f"model.layers.0.mlp.gate_proj.weight is a correct compressed-tensors {enc} encoding of "
            "model.layers.0.mlp.up_proj.weight of the float side (the same layer") in d, d
    code, out, err = run_cli("logits", bad, ct["hf"])
    assert code == 1 and out.startswith("DIFFER"), out + err


def test_reciprocal_scale_is_named(ct, run_cli, tmp_path):
    def recip(sd):
        k = "model.layers.0.self_attn.q_proj.weight_scale"
        sd[k] = 1 / sd[k]
    bad = _edit(ct["fp8-block"], tmp_path / "bad", recip)
    code, out, err = run_cli(ct["hf"], bad, "--json", tmp_path / "r.json")
    assert code == 1, out + err
    assert _findings(tmp_path / "r.json") == {"model.layers.0.self_attn.q_proj.weight": ["scale-reciprocal"]}
    assert "reciprocal scales" in _diagnosis(tmp_path / "r.json"), out


def test_block_scale_zeroed_and_doubled_are_named(ct, run_cli, tmp_path):
    def zero(sd):
        sd["model.layers.1.mlp.up_proj.weight_scale"][1, 0] = 0
    bad = _edit(ct["fp8-block"], tmp_path / "zero", zero)
    code, out, err = run_cli(bad, ct["hf"], "--json", tmp_path / "z.json")
    assert code == 1, out + err
    assert _findings(tmp_path / "z.json") == {"model.layers.1.mlp.up_proj.weight": ["scale-zeroed"]}
    d = _diagnosis(tmp_path / "z.json")
    assert "1 of 6 block scales are 0" in d and "first at [1, 0]" in d, d

    def double(sd):
        sd["model.layers.1.mlp.down_proj.weight_scale"][:, 1] *= 2
    bad = _edit(ct["int4-group"], tmp_path / "double", double)
    code, out, err = run_cli(ct["hf"], bad, "--json", tmp_path / "d.json")
    assert code == 1, out + err
    assert _findings(tmp_path / "d.json") == {"model.layers.1.mlp.down_proj.weight": ["scale-multiplied"]}
    assert "multiplied by 2: 64 of 192" in _diagnosis(tmp_path / "d.json"), out


def test_nvfp4_halved_group_scale_is_named(ct, run_cli, tmp_path):
    def halve(sd):
        k = "model.layers.1.mlp.down_proj.weight_scale"
        sd[k][:, 1] = (sd[k][:, 1].float() / 2).to(sd[k].dtype)
    bad = _edit(ct["nvfp4"], tmp_path / "bad", halve)
    code, out, err = run_cli(ct["hf"], bad, "--json", tmp_path / "r.json")
    assert code == 1, out + err
    assert _findings(tmp_path / "r.json") == {"model.layers.1.mlp.down_proj.weight": ["scale-multiplied"]}, out


def _nvfp4_float(src, dst, how):
    """The float checkpoint a converter reading compressed-tensors' NVFP4 file ``how`` writes, computed here from
    the stored tensors: ``right`` (fp4 * weight_scale / weight_global_scale); ``multiplied`` (the global scale
    multiplying, modelopt's convention); ``row32`` (each row's scales applied to 32 columns each); ``fp8`` (each
    packed byte one e4m3 value, 8 bytes per scale: a weight of half the width)."""
    from ckdiff.tensor.fp4 import FP4_VALUES
    sd = load_file(src / "model.safetensors")
    out = {}
    for k, v in sd.items():
        if not k.endswith(".weight_packed"):
            if not k.endswith((".weight_scale", ".weight_global_scale", "input_global_scale")):
                out[k] = v
            continue
        m = k[: -len("_packed")]
        s, g = sd[m + "_scale"].float(), sd[m + "_global_scale"].float().reshape(())
        if how == "fp8":
            out[m] = v.view(torch.float8_e4m3fn).float() * s.repeat_interleave(8, 1) / g
            continue
        nib = torch.stack([v.long() & 15, v.long() >> 4], -1).reshape(v.shape[0], -1)
        per = s[:, torch.arange(nib.shape[1]) // 32] if how == "row32" else s.repeat_interleave(16, 1)
        out[m] = FP4_VALUES[nib] * per * (g if how == "multiplied" else 1 / g)
    dst.mkdir()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    c = json.loads((src / "config.json").read_text())
    c.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(c))
    return dst


@pytest.mark.parametrize("how,kind", [("multiplied", "scale-reciprocal"), ("row32", "block-size-wrong"),
                                      ("fp8", "codes-of-another-encoding")])
def test_nvfp4_misread_conversion_is_named_both_ways(ct, tmp_path, how, kind):
    """The global scale multiplied (modular/modular#6699's convention mix-up), a 32-element block hard-coded, the
    bytes read as FP8 (a shape mismatch whose cause is still named); the right reading passes both ways."""
    from ckdiff.compare.diff import compare_checkpoints
    from ckdiff.formats.readers import open_checkpoint
    nv, good, bad = ct["nvfp4"], _nvfp4_float(ct["nvfp4"], tmp_path / "right", "right"), \
        _nvfp4_float(ct["nvfp4"], tmp_path / how, how)
    for a, b in ((nv, good), (good, nv)):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)))
        assert res.equivalent, [(t.name, t.status) for t in res.tensors if not t.ok]
    for a, b in ((nv, bad), (bad, nv)):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)))
        wrong = [t for t in res.tensors if not t.ok]
        assert len(wrong) == 14 and all([f["kind"] for f in t.findings] == [kind] for t in wrong), \
            [(t.name, t.diagnosis) for t in wrong]


def test_dropped_tensors(ct, run_cli, tmp_path):
    def drop_module(sd):
        for k in [k for k in sd if k.startswith("model.layers.1.mlp.down_proj.")]:
            del sd[k]
    bad = _edit(ct["nvfp4"], tmp_path / "module", drop_module)
    code, out, err = run_cli(ct["hf"], bad)
    assert code == 1, out + err
    assert "only-a  model.layers.1.mlp.down_proj.weight" in out, out

    def drop_scale(sd):
        del sd["model.layers.1.mlp.down_proj.weight_scale"]
    bad = _edit(ct["int8-channel-zp"], tmp_path / "scale", drop_scale)
    code, out, err = run_cli(ct["hf"], bad)
    assert code == 2 and out == "", out + err
    assert err.count("\n") == 1 and "model.layers.1.mlp.down_proj.weight_scale missing for pack-quantized" in err, err


@pytest.mark.parametrize("scheme,edit,named", [
    ("fp8-block", lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight_scale": torch.ones(2, 2)}),
     "model.layers.0.mlp.up_proj.weight_scale: scales [2, 2] float32 do not fit fp8 block 32x48 quantization of "
     "model.layers.0.mlp.up_proj.weight [96, 64] (expected [3, 2])"),
    ("int4-group", lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(96, 64)}),
     "model.layers.0.mlp.up_proj.weight: a float weight stored beside its pack-quantized codes"),
    ("int4-group", lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight_shape": torch.tensor([96, 65])}),
     "model.layers.0.mlp.up_proj.weight_packed: [96, 8] int32 is not 96 rows of 65 int4 codes"),
    ("int4-group", lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight_zero_point":
                                         torch.zeros(12, 2, dtype=torch.int32)}),
     "model.layers.0.mlp.up_proj.weight_zero_point not expected for pack-quantized int4 group 32"),
    ("nvfp4", lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight_global_scale": torch.ones(2)}),
     "model.layers.0.mlp.up_proj.weight_global_scale: [2] float32 is not one float32 global scale"),
])
def test_stored_tensors_that_do_not_fit_are_one_line(ct, run_cli, tmp_path, scheme, edit, named):
    bad = _edit(ct[scheme], tmp_path / "bad", edit)
    code, out, err = run_cli(ct["hf"], bad)
    assert code == 2 and out == "" and err.count("\n") == 1, out + err
    assert named in err, err


def _weights(**kw):
    return lambda q: q["config_groups"]["group_0"]["weights"].update(**kw)


@pytest.mark.parametrize("edit,named", [
    (lambda q: q.update(format="marlin-24") or q["config_groups"]["group_0"].update(format="marlin-24"),
     "format 'marlin-24' is not read (read: float-quantized, pack-quantized, nvfp4-pack-quantized)"),
    (lambda q: q.update(quant_method="gptq"), "quant_method 'gptq' is not read"),
    (_weights(num_bits="4"), "num_bits '4' is not read"),
    (_weights(num_bits=16), "num_bits 16 is not read"),
    (_weights(strategy="block"), "strategy 'block' is not read (read: channel, group)"),
    (_weights(type="float"), "weight type 'float' is not read"),
    (_weights(group_size=0), "group_size 0 is not read"),
    (_weights(symmetric="yes"), "symmetric 'yes' is not read"),
    (_weights(actorder="group"), "actorder 'group'"),
    (lambda q: q.update(quantization_status="frozen"), "quantization_status 'frozen' is not read"),
    (lambda q: q.update(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity_config"),
])
def test_unknown_config_is_one_line(ct, run_cli, tmp_path, edit, named):
    bad = _edit(ct["int4-group"], tmp_path / "bad", config=edit)
    code, out, err = run_cli(bad, ct["hf"])
    assert code == 2 and out == "", out + err
    assert err.startswith(f"ckdiff: error: {bad / 'config.json'}: ") and err.count("\n") == 1, err
    assert named in err, err


@pytest.mark.parametrize("bits", range(2, 9))
def test_unpack_matches_pack_to_int32(bits):
    """Every width pack-quantized declares (2..8 bits; 3, 5, 6 and 7 straddle int32 words), rows and zero
    points (packed along dim 0), against compressed-tensors' own ``pack_to_int32``."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from ckdiff.formats.compressed_tensors import _unpack
    g = torch.Generator().manual_seed(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    q = torch.randint(lo, hi, (7, 45), generator=g, dtype=torch.int8)
    assert torch.equal(_unpack(pack_to_int32(q, bits), bits, 45) - hi, q.to(torch.int16))
    z = pack_to_int32(q, bits, packed_dim=0)
    assert torch.equal(_unpack(z.T.contiguous(), bits, 7).T - hi, q.to(torch.int16))
