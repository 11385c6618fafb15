"""NVFP4 and MXFP8 in NVIDIA Model Optimizer's unified HF export (``hf_quant_config.json``; NVFP4's
``weight_scale_2`` multiplies; MXFP8 has an E8M0 scale per 32).

Fixtures are written by the producer itself: nvidia-modelopt 0.47.0 ``mtq.quantize(model, NVFP4_DEFAULT_CFG)``
(and ``MXFP8_DEFAULT_CFG``) + ``export_hf_checkpoint`` of a tiny transformers ``LlamaForCausalLM`` (GQA, every parameter random, calibrated
on a 12-token batch), on CPU; the float side is the same model saved by ``save_pretrained`` before quantizing.
Bugs are then made the way a converter makes them: values written with compressed-tensors' convention (the
global scale dividing), nibbles read high first, ``weight_scale_2`` stored inverted."""
from __future__ import annotations

import copy
import json
import shutil
import warnings

import modelopt.torch.quantization as mtq  # the producer, pinned in .ci/run
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.formats.modelopt import ModeloptNvfp4
from ckdiff.formats.readers import open_checkpoint
from ckdiff.tensor.fp4 import FP4

VALUES = torch.cat([FP4, -FP4])
INT4 = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1])  # a nibble read as a signed int4
Q = "model.layers.1.self_attn.q_proj"


def _export(root, qcfg, name):
    """(float dir by save_pretrained, ``name`` dir by modelopt's export with ``qcfg``)."""
    from modelopt.torch.export import export_hf_checkpoint
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                                   architectures=["LlamaForCausalLM"])
    assert 1 < cfg.num_key_value_heads < cfg.num_attention_heads
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_((1.0 if n.endswith("norm.weight") else 0.0) + torch.randn(p.shape, generator=g) * 0.1)
    q = copy.deepcopy(model)  # before save_pretrained, which leaves the config's dtype as a string
    model.save_pretrained(root / "float")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = mtq.quantize(q, qcfg, lambda m: m(torch.randint(0, 100, (2, 12), generator=g)))
        export_hf_checkpoint(q, export_dir=root / name)
    return root / "float", root / name


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("modelopt"), mtq.NVFP4_DEFAULT_CFG, "nvfp4")


@pytest.fixture(scope="module")
def exported_mxfp8(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("modelopt-mxfp8"), mtq.MXFP8_DEFAULT_CFG, "mxfp8")


def test_the_export_reads_as_views_equal_to_modelopts_own_dequantizer(exported):
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    _, nv = exported
    ck = open_checkpoint(str(nv))
    view = ck.tensors[Q + ".weight"]
    assert isinstance(view, ModeloptNvfp4) and Q + ".weight_scale_2" not in ck.tensors
    st = load_file(str(nv / "model.safetensors"))
    theirs = NVFP4QTensor(torch.Size(view.shape), torch.float32, st[Q + ".weight"]).dequantize(
        dtype=torch.float32, scale=st[Q + ".weight_scale"], double_scale=st[Q + ".weight_scale_2"],
        block_sizes={-1: 16})
    assert torch.equal(view.dequantized(), theirs)


def test_export_against_its_float_source_both_ways(exported):
    flt, nv = exported
    for a, b in ((nv, flt), (flt, nv)):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)))
        assert res.equivalent, [(t.name, t.status, t.diagnosis) for t in res.tensors if not t.ok]
        assert res.counts().get("quant") == 14  # 7 linears in each of 2 layers
    same = compare_checkpoints(open_checkpoint(str(nv)), open_checkpoint(str(nv)))
    assert same.equivalent and set(same.counts()) == {"equal"}


def _float_from(tmp_path, nv, how):
    """A float checkpoint a converter reading the export ``how`` would write (float32)."""
    st = load_file(str(nv / "model.safetensors"))
    out = {}
    for k, v in st.items():
        if k.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue
        if v.dtype != torch.uint8:
            out[k] = v
            continue
        m = k[: -len(".weight")]
        lo, hi = (v & 15).long(), (v >> 4).long()
        nib = torch.stack((hi, lo) if how == "nibbles" else (lo, hi), -1).reshape(v.shape[0], -1)
        s, s2 = st[m + ".weight_scale"].float(), st[m + ".weight_scale_2"].float()
        if how == "fp8":  # an FP8 dequantizer: each byte one e4m3 value, the group size from the shapes (8 bytes)
            out[k] = v.view(torch.float8_e4m3fn).float() * s.repeat_interleave(8, 1) * s2
            continue
        per = _per_element(s, nib.shape, how) if how.startswith(("row", "stream")) else s.repeat_interleave(16, 1)
        if how == "row32":  # computed in bf16 arithmetic, as a dequantizer running in bf16 does
            out[k] = (VALUES[nib].bfloat16() * per.bfloat16() * s2.bfloat16()).float()
            continue
        out[k] = (INT4 if how == "int4" else VALUES)[nib] * per * (1 / s2 if how == "divided" else s2)
    d = tmp_path / f"float-{how}"
    d.mkdir()
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((nv / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _per_element(s: torch.Tensor, shape, how: str) -> torch.Tensor:
    """Block scales ``s`` spread over ``shape`` by a dequantizer with the block size hard-coded: ``row<b>``, element
    j of a row takes that row's scale j // b; ``stream<b>``, element n of the flat codes takes flat scale n // b."""
    R, C = shape
    if how.startswith("row"):
        return s[:, torch.arange(C) // int(how[3:])]
    return s.reshape(-1)[torch.arange(R * C) // int(how[6:])].reshape(R, C)


@pytest.mark.parametrize("how,kind,params", [
    ("row32", "block-size-wrong", {"stored": 16, "read": 32, "order": "each row's own scales"}),
    ("stream32", "block-size-wrong", {"stored": 16, "read": 32, "order": "the scales read as one stream across rows"}),
    ("fp8", "codes-of-another-encoding", {"codes": "FP4 e2m1, two per byte", "read": "FP8 e4m3, one per byte"}),
    ("int4", "codes-of-another-encoding", {"read": "int4, each nibble a signed integer"})])
def test_a_dequantizer_for_other_blocks_or_codes_is_named_both_ways(tmp_path, exported, how, kind, params):
    """NVFP4 read with MX's 32-element blocks, its bytes read as FP8 (a weight of half the input width: a shape
    mismatch whose cause is still named), or its nibbles as signed int4 (an int4 dequantizer); the float side
    written here by hand from the export's tensors."""
    _, nv = exported
    good, bad = _float_from(tmp_path, nv, "right"), _float_from(tmp_path, nv, how)
    for a, b in ((nv, good), (good, nv)):
        assert compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b))).equivalent
    for a, b in ((nv, bad), (bad, nv)):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options(diagnose=True))
        wrong = [t for t in res.tensors if not t.ok]
        assert not res.equivalent and len(wrong) == 14
        for t in wrong:
            assert [f["kind"] for f in t.findings] == [kind], (t.name, t.diagnosis)
            assert params.items() <= t.findings[0].items() and (t.status.value == "shape") == (how == "fp8")


@pytest.mark.parametrize("how,kind", [("divided", "scale-reciprocal"), ("nibbles", "nibbles-swapped")])
def test_a_misread_conversion_is_named(tmp_path, exported, how, kind):
    _, nv = exported
    assert compare_checkpoints(open_checkpoint(str(nv)), open_checkpoint(str(_float_from(tmp_path, nv, "right")))) \
        .equivalent
    res = compare_checkpoints(open_checkpoint(str(nv)), open_checkpoint(str(_float_from(tmp_path, nv, how))),
                              Options(diagnose=True))
    wrong = [t for t in res.tensors if not t.ok]
    assert len(wrong) == 14
    for t in wrong:
        assert [f["kind"] for f in t.findings] == [kind], (t.name, t.diagnosis)


def test_weight_scale_2_stored_inverted_is_named(tmp_path, exported):
    flt, nv = exported
    st = load_file(str(nv / "model.safetensors"))
    st[Q + ".weight_scale_2"] = 1 / st[Q + ".weight_scale_2"]  # compressed-tensors' global where modelopt's belongs
    d = tmp_path / "inverted"
    shutil.copytree(nv, d)
    save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})
    res = compare_checkpoints(open_checkpoint(str(flt)), open_checkpoint(str(d)), Options(diagnose=True))
    wrong = [t for t in res.tensors if not t.ok]
    assert [t.name for t in wrong] == [Q + ".weight"]
    assert [f["kind"] for f in wrong[0].findings] == ["scale-reciprocal"], wrong[0].diagnosis


@pytest.mark.parametrize("edit,words", [({"quant_algo": "W4A8_AWQ"}, "quant_algo 'W4A8_AWQ' is not read"),
                                        ({"group_size": 32}, "group_size 32")])
def test_what_is_not_read_is_one_line(tmp_path, exported, run_cli, edit, words):
    _, nv = exported
    d = tmp_path / "edited"
    shutil.copytree(nv, d)
    hq = json.loads((d / "hf_quant_config.json").read_text())
    hq["quantization"].update(edit)
    (d / "hf_quant_config.json").write_text(json.dumps(hq))
    code, _, err = run_cli(d, d)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err and "hf_quant_config.json" in err


# ------------------------------------------------------------------ MXFP8 (e4m3 codes, an E8M0 scale per 32)
def test_mxfp8_export_reads_as_views_equal_to_modelopts_own_dequantizer(exported_mxfp8):
    from modelopt.torch.quantization.qtensor.mxfp8_tensor import MXFP8QTensor
    from ckdiff.formats.modelopt import ModeloptMxfp8
    _, mx8 = exported_mxfp8
    view = open_checkpoint(str(mx8)).tensors[Q + ".weight"]
    assert isinstance(view, ModeloptMxfp8)
    st = load_file(str(mx8 / "model.safetensors"))
    theirs = MXFP8QTensor(torch.Size(view.shape), torch.float32, st[Q + ".weight"]).dequantize(
        dtype=torch.float32, scale=st[Q + ".weight_scale"])
    assert torch.equal(view.dequantized(), theirs)


def test_mxfp8_export_against_its_float_source_both_ways(exported_mxfp8):
    flt, mx8 = exported_mxfp8
    for a, b in ((mx8, flt), (flt, mx8)):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)))
        assert res.equivalent, [(t.name, t.status, t.diagnosis) for t in res.tensors if not t.ok]
        assert res.counts().get("quant") == 14


def _mxfp8_float(tmp_path, mx8, how):
    """A float checkpoint a converter reading the MXFP8 export ``how`` writes: ``right``; ``row64`` / ``stream64``
    (64-element blocks hard-coded, see ``_per_element``); ``e5m2`` (the e4m3 bytes decoded as e5m2: NaN and inf
    where the e4m3 exponent is all ones); ``uint8`` (the bytes cast to float as integers 0..255)."""
    st = load_file(str(mx8 / "model.safetensors"))
    out = {k: v for k, v in st.items() if not k.endswith((".weight_scale", ".input_scale"))}
    for k in list(out):
        if out[k].dtype != torch.float8_e4m3fn:
            continue
        s = torch.exp2(st[k + "_scale"].float() - 127)
        per = _per_element(s, out[k].shape, how) if how.startswith(("row", "stream")) else s.repeat_interleave(32, 1)
        out[k] = out[k].view({"e5m2": torch.float8_e5m2, "uint8": torch.uint8}.get(how, out[k].dtype)).float() * per
    d = tmp_path / f"mxfp8-float-{how}"
    d.mkdir()
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((mx8 / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("how,kind,params", [
    ("row64", "block-size-wrong", {"stored": 32, "read": 64, "order": "each row's own scales"}),
    ("stream64", "block-size-wrong", {"stored": 32, "read": 64, "order": "the scales read as one stream across rows"}),
    ("e5m2", "codes-of-another-encoding", {"codes": "FP8 e4m3", "read": "FP8 e5m2"}),
    ("uint8", "codes-of-another-encoding", {"codes": "FP8 e4m3", "read": "uint8, each byte an unsigned integer"})])
def test_mxfp8_other_blocks_or_codes_are_named_both_ways(tmp_path, exported_mxfp8, how, kind, params):
    _, mx8 = exported_mxfp8
    good, bad = _mxfp8_float(tmp_path, mx8, "right"), _mxfp8_float(tmp_path, mx8, how)
    for a, b in ((mx8, good), (good, mx8)):
        assert compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b))).equivalent
    for a, b in ((mx8, bad), (bad, mx8)):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options(diagnose=True))
        wrong = [t for t in res.tensors if not t.ok]
        assert not res.equivalent and len(wrong) == 14
        for t in wrong:
            assert [f["kind"] for f in t.findings] == [kind], (t.name, t.diagnosis)
            assert params.items() <= t.findings[0].items()


def test_mxfp8_scale_bytes_used_as_values_and_a_doubled_block_are_named(tmp_path, exported_mxfp8):
    flt, mx8 = exported_mxfp8
    st = load_file(str(mx8 / "model.safetensors"))
    bad = {k: v for k, v in st.items() if not k.endswith((".weight_scale", ".input_scale"))}
    for k in list(bad):
        if bad[k].dtype == torch.float8_e4m3fn:  # a converter that multiplies by the E8M0 byte itself
            bad[k] = bad[k].float() * st[k + "_scale"].float().repeat_interleave(32, 1)
    d = tmp_path / "bytes"
    d.mkdir()
    save_file(bad, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((mx8 / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (d / "config.json").write_text(json.dumps(cfg))
    res = compare_checkpoints(open_checkpoint(str(mx8)), open_checkpoint(str(d)), Options(diagnose=True))
    wrong = [t for t in res.tensors if not t.ok]
    assert len(wrong) == 14 and all([f["kind"] for f in t.findings] == ["e8m0-as-value"] for t in wrong)
    doubled = tmp_path / "doubled"
    shutil.copytree(mx8, doubled)
    st[Q + ".weight_scale"][3, 1] += 1  # that block's scale doubled
    save_file(st, str(doubled / "model.safetensors"), metadata={"format": "pt"})
    res = compare_checkpoints(open_checkpoint(str(flt)), open_checkpoint(str(doubled)), Options(diagnose=True))
    wrong = [t for t in res.tensors if not t.ok]
    assert [t.name for t in wrong] == [Q + ".weight"]
    assert "scale-multiplied" in [f["kind"] for f in wrong[0].findings], wrong[0].diagnosis
