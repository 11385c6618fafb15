"""MLX affine-quantized safetensors as mlx-lm writes them, read as logical views.

Fixtures by the producer itself: mlx-lm 0.32.2 (``load_model``, ``quantize_model``, ``save_model``,
``save_config``) on mlx 0.32.4's CPU backend, from a tiny transformers ``LlamaForCausalLM`` (GQA, every parameter
random) saved by ``save_pretrained``, which is also the float side. The views are checked against mlx's own
``mx.dequantize``. Bugs are made the way a converter makes them: a float side written from a misread encoding,
and config values mlx never writes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx  # the producer, pinned in .ci/run
import numpy as np
import pytest
import torch
import transformers
from mlx_lm import utils as mlx_lm_utils
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file, save_file

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.formats.mlx import MlxAffine
from ckdiff.formats.readers import open_checkpoint

QUANTIZED = 16  # 7 linears in each of 2 layers, the embedding and lm_head


def quantized(case) -> int:
    """How many modules mlx-lm quantizes: those whose input width is a multiple of the group size (hidden 64,
    intermediate 128: at groups of 128 only the two down_proj)."""
    return 2 if case[1] == 128 else QUANTIZED
CASES = [(4, 32), (3, 64), (8, 32), (6, 128), (2, 64)]  # 3 and 6 bits straddle the uint32 words


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(float dir, {(bits, group): MLX dir}, MLX dir with a per-module override)."""
    root = tmp_path_factory.mktemp("mlx")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   architectures=["LlamaForCausalLM"])
    assert 1 < cfg.num_key_value_heads < cfg.num_attention_heads
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_((1.0 if n.endswith("norm.weight") else 0.0) + torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(root / "float")
    out = {}
    for bits, group in CASES + [("override", None)]:
        m, c = mlx_lm_utils.load_model(root / "float")
        if bits == "override":  # down_proj at 8 bits in groups of 64, the rest at 4 in groups of 32
            m, c = mlx_lm_utils.quantize_model(m, c, 32, 4, quant_predicate=lambda p, mod: (
                {"bits": 8, "group_size": 64} if p.endswith("down_proj") else True))
        else:
            m, c = mlx_lm_utils.quantize_model(m, c, group, bits)
        d = root / f"mlx-{bits}-{group}"
        d.mkdir()
        mlx_lm_utils.save_model(d, m)
        mlx_lm_utils.save_config(c, d / "config.json")
        out[(bits, group)] = d
    return root / "float", out


@pytest.mark.parametrize("case", CASES + [("override", None)], ids=str)
def test_views_equal_mlx_dequantize(written, case):
    _, dirs = written
    d = dirs[case]
    ck = open_checkpoint(str(d))
    st = load_np(str(d / "model.safetensors"))
    seen = 0
    for k, t in ck.tensors.items():
        if not isinstance(t, MlxAffine):
            continue
        m = k[: -len(".weight")]
        theirs = np.array(mx.dequantize(mx.array(st[m + ".weight"]), mx.array(st[m + ".scales"]),
                                        mx.array(st[m + ".biases"]), group_size=t.group, bits=t.bits))
        assert np.array_equal(t.dequantized().numpy(), theirs), k
        seen += 1
    assert seen == quantized(case)
    if case[0] == "override":
        assert ck.tensors["model.layers.1.mlp.down_proj.weight"].bits == 8
        assert ck.tensors["model.layers.1.mlp.up_proj.weight"].bits == 4


@pytest.mark.parametrize("case", CASES + [("override", None)], ids=str)
def test_mlx_against_its_float_source_both_ways(written, case):
    flt, dirs = written
    for a, b in ((dirs[case], flt), (flt, dirs[case])):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)))
        assert res.equivalent, [(t.name, t.status, t.max_abs) for t in res.tensors if not t.ok]
        assert res.counts().get("quant") == quantized(case)
    same = compare_checkpoints(open_checkpoint(str(dirs[case])), open_checkpoint(str(dirs[case])))
    assert same.equivalent and set(same.counts()) == {"equal"}


def _misread(tmp_path, d, how):
    """A float checkpoint a converter misreading the MLX files ``how`` would write."""
    ck = open_checkpoint(str(d))
    out = {}
    for k, t in ck.tensors.items():
        if isinstance(t, MlxAffine):
            v = t.dequantized() if how == "right" else t.misreadings(0, t.nrows)[how][1]
            out[k] = v.contiguous()
        else:
            out[k] = t.load()
    p = tmp_path / f"float-{how}"
    p.mkdir()
    save_file(out, str(p / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("quantization"), cfg.pop("quantization_config", None)
    (p / "config.json").write_text(json.dumps(cfg))
    return p


def _unpacked_by_hand(t: MlxAffine, how: str, bits: int | None = None) -> torch.Tensor:
    """The misread values computed here from the stored words, independently of the view's own misreadings
    (``bits``: the width a dequantizer with it hard-coded reads, the first ``in`` fields of each row)."""
    w = t.packed.load().numpy().view(np.uint32)
    bits = bits or t.bits
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint32) * bits
    if how == "word-order-reversed":
        shifts = shifts[::-1]
    codes = torch.from_numpy(((w[..., None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)[:, :t.shape[1]]
                             .astype(np.int64))
    s, b = t.scales.load().float(), t.biases.load().float()
    g = 64 if how == "group-size-wrong" else t.group
    if how == "scales-biases-swapped":
        s, b = b, s
    idx = torch.arange(t.shape[1]) // g
    return codes.float() * s[:, idx] + b[:, idx]


@pytest.mark.parametrize("how", ["scales-biases-swapped", "word-order-reversed", "group-size-wrong"])
def test_a_misread_conversion_is_named(tmp_path, written, how):
    _, dirs = written
    d = dirs[(4, 32)]
    t = open_checkpoint(str(d)).tensors["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(t.misreadings(0, t.nrows)[how][1], _unpacked_by_hand(t, how), rtol=0, atol=1e-6)
    assert compare_checkpoints(open_checkpoint(str(d)), open_checkpoint(str(_misread(tmp_path, d, "right")))).equivalent
    res = compare_checkpoints(open_checkpoint(str(d)), open_checkpoint(str(_misread(tmp_path, d, how))),
                              Options(diagnose=True))
    wrong = [t for t in res.tensors if not t.ok]
    assert len(wrong) == QUANTIZED
    for t in wrong:
        assert [f["kind"] for f in t.findings] == [how], (t.name, t.diagnosis)


def test_bits_read_wrong_is_named_both_ways(tmp_path, written):
    """An 8-bit file dequantized by a converter that reads 4-bit codes (the logical shape from the config): the
    float side is written here by hand from the stored words; every quantized tensor is named bits-wrong."""
    flt, dirs = written
    d = dirs[(8, 32)]
    ck = open_checkpoint(str(d))
    out = {k: (_unpacked_by_hand(t, "bits-wrong", bits=4) if isinstance(t, MlxAffine) else t.load()).contiguous()
           for k, t in ck.tensors.items()}
    p = tmp_path / "float-bits4"
    p.mkdir()
    save_file(out, str(p / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("quantization"), cfg.pop("quantization_config", None)
    (p / "config.json").write_text(json.dumps(cfg))
    for a, b in ((d, p), (p, d)):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options(diagnose=True))
        assert not res.equivalent
        wrong = [t for t in res.tensors if not t.ok]
        assert len(wrong) == QUANTIZED
        for t in wrong:
            assert t.findings == [{"kind": "bits-wrong", "encoding": "MLX affine 8-bit, group 32", "stored": 8,
                                   "read": 4}], (t.name, t.diagnosis)
            assert "4-bit codes, the file's codes are 8-bit" in t.diagnosis[0]


@pytest.fixture(scope="module")
def zero_points(tmp_path_factory):
    """(float dir, mlx-lm's 4-bit groups of 32 of it) for a model whose zero points leave the 4-bit range: layer
    0's q_proj has head 1's rows zeroed (a pruned head: all-zero groups, zero point 0) and layer 1's up_proj has
    8 rows shifted by +0.4 and 8 by -0.4 (groups of one sign: the code of 0.0 lies past 15); random otherwise."""
    root = tmp_path_factory.mktemp("mlx-zp")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_((1.0 if n.endswith("norm.weight") else 0.0) + torch.randn(p.shape, generator=g) * 0.1)
        model.model.layers[0].self_attn.q_proj.weight[16:32] = 0
        model.model.layers[1].mlp.up_proj.weight[:8] += 0.4
        model.model.layers[1].mlp.up_proj.weight[8:16] -= 0.4
    model.save_pretrained(root / "float")
    m, c = mlx_lm_utils.load_model(root / "float")
    m, c = mlx_lm_utils.quantize_model(m, c, 32, 4)
    d = root / "mlx"
    d.mkdir()
    mlx_lm_utils.save_model(d, m)
    mlx_lm_utils.save_config(c, d / "config.json")
    return root / "float", d


def _zero_point_float(tmp_path, d, how):
    """The float side of a converter that turns each group's bias into an integer zero point z = -bias / scale
    (computed here from the stored scales and biases) and keeps it in 4 unsigned bits: ``offset``, z - 1 packed so
    0 comes back as 15 (ModelCloud/GPTQModel PR #2351); ``wrap``, z modulo 16; ``clip``, z clamped to [0, 15].
    Values (code - z') * scale, codes unpacked here from the words (4 bits, low first)."""
    ck = open_checkpoint(str(d), stored=True)
    out = {}
    for k, t in ck.tensors.items():
        if k.endswith((".scales", ".biases")):
            continue
        if t.dtype != torch.uint32:
            out[k] = t.load()
            continue
        m = k[: -len(".weight")]
        w = t.load().numpy().view(np.uint32)
        codes = torch.from_numpy(((w[..., None] >> (np.arange(8, dtype=np.uint32) * 4)) & 15)
                                 .reshape(w.shape[0], -1).astype(np.float32))
        s, b = ck.tensors[m + ".scales"].load().float(), ck.tensors[m + ".biases"].load().float()
        z = torch.round(-b / s)
        if how == "offset":
            z = torch.where(z == 0, 15.0, z)
        elif how == "wrap":
            z = torch.remainder(z, 16)
        elif how == "clip":
            z = z.clamp(0, 15)
        else:  # the right reading: code * scale + bias
            out[k] = codes * s.repeat_interleave(32, 1) + b.repeat_interleave(32, 1)
            continue
        out[k] = (codes - z.repeat_interleave(32, 1)) * s.repeat_interleave(32, 1)
    p = tmp_path / f"float-zp-{how}"
    p.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, str(p / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("quantization"), cfg.pop("quantization_config", None)
    (p / "config.json").write_text(json.dumps(cfg))
    return p


@pytest.mark.parametrize("how,says,tensors", [
    ("offset", "0 read as 15 (z - 1 packed)", {"model.layers.0.self_attn.q_proj.weight"}),
    ("wrap", "wrapped modulo 16", {"model.layers.1.mlp.up_proj.weight"}),
    ("clip", "clipped to [0, 15]", {"model.layers.1.mlp.up_proj.weight"})])
def test_a_zero_point_wrapped_in_its_bits_is_named_both_ways(tmp_path, zero_points, how, says, tensors):
    """mlx-lm's file against its float source and a right reading by this writer: EQUIVALENT both ways; the
    zero points wrapped or clipped: only the tensors with such groups differ, each named zero-point-underflow
    with the groups it changes (16 pruned rows x 2 groups; the shifted rows' groups of one sign)."""
    flt, d = zero_points
    for a, b in ((d, flt), (flt, d), (d, _zero_point_float(tmp_path, d, "right"))):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)))
        assert res.equivalent, [(t.name, t.status, t.max_abs) for t in res.tensors if not t.ok]
    bad = _zero_point_float(tmp_path, d, how)
    for a, b in ((d, bad), (bad, d)):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options(diagnose=True))
        wrong = [t for t in res.tensors if not t.ok]
        assert not res.equivalent and {t.name for t in wrong} == tensors
        for t in wrong:
            assert [f["kind"] for f in t.findings] == ["zero-point-underflow"], (t.name, t.diagnosis)
            f = t.findings[0]
            assert f["how"] == says and f["bits"] == 4 and (f["groups"] == 32 if how == "offset" else
                                                          16 <= f["groups"] <= 32), f


def _relabelled(tmp_path, d, **q):
    e = tmp_path / "relabelled"
    shutil.copytree(d, e)
    cfg = json.loads((e / "config.json").read_text())
    cfg["quantization"].update(q)
    cfg["quantization_config"] = cfg["quantization"]
    (e / "config.json").write_text(json.dumps(cfg))
    return e


def test_a_config_naming_other_bits_is_named_both_ways(tmp_path, written):
    """mlx-lm's 2-bit file with groups of 64 whose config says 4 bits in groups of 32 (the stored shapes fit both):
    the views are read at the config's bits, so every quantized module has half the float side's width; read at
    the bits and group size the shapes also fit it is the float side within one step, which the finding names."""
    flt, dirs = written
    e = _relabelled(tmp_path, dirs[(2, 64)], bits=4, group_size=32)
    for a, b in ((e, flt), (flt, e)):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options(diagnose=True))
        assert not res.equivalent
        wrong = [t for t in res.tensors if not t.ok]
        assert len(wrong) == QUANTIZED and {t.status.value for t in wrong} == {"shape"}
        for t in wrong:
            assert t.findings == [{"kind": "quant-config-wrong", "encoding": "MLX affine 4-bit, group 32", "bits": 2,
                                   "group": 64, "config_bits": 4, "config_group": 32}], (t.name, t.diagnosis)


def test_a_config_whose_bits_no_shape_fits_names_what_fits(tmp_path, written, run_cli):
    flt, dirs = written
    e = _relabelled(tmp_path, dirs[(2, 64)], bits=8, group_size=64)
    code, _, err = run_cli(e, flt)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the stored shapes fit 2-bit groups of 64, 4-bit groups of 32" in err and "model.safetensors" in err


@pytest.mark.parametrize("edit,words", [({"bits": 7}, "bits 7"), ({"mode": "mxfp4"}, "mode 'mxfp4' is not read"),
                                        ({"group_size": "32"}, "group_size '32'")])
def test_config_values_mlx_never_writes_are_one_line(tmp_path, written, run_cli, edit, words):
    _, dirs = written
    d = tmp_path / "edited"
    shutil.copytree(dirs[(4, 32)], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization"].update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(d, d)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err and "config.json" in err


def test_codes_whose_scales_do_not_fit_are_one_line(tmp_path, written, run_cli):
    _, dirs = written
    d = tmp_path / "cut"
    shutil.copytree(dirs[(4, 32)], d)
    st = load_file(str(d / "model.safetensors"))
    st["model.layers.0.mlp.up_proj.scales"] = st["model.layers.0.mlp.up_proj.scales"][:, :1].contiguous()
    save_file(st, str(Path(d) / "model.safetensors"), metadata={"format": "mlx"})
    code, _, err = run_cli(d, d)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "up_proj.scales" in err


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_quantizer_is_mlx_quantize(written, case):
    """The view's own quantizer (the logit check's noise floor) gives what mx.quantize + mx.dequantize give."""
    _, dirs = written
    t = open_checkpoint(str(dirs[case])).tensors["model.layers.0.mlp.down_proj.weight"]  # quantized at every group
    x = torch.randn(t.shape, generator=torch.Generator().manual_seed(5)) * 0.1
    q, s, b = mx.quantize(mx.array(x.numpy()), group_size=t.group, bits=t.bits)
    theirs = np.array(mx.dequantize(q, s, b, group_size=t.group, bits=t.bits))
    assert np.array_equal(t.reference(x).codes.numpy(), theirs)


def test_logits_of_mlx_against_float_pass_against_the_noise_floor(written, run_cli):
    flt, dirs = written
    code, out, err = run_cli("logits", dirs[(8, 32)], flt, "--length", 12)
    assert code == 0 and "from the encoded reference" in out, (out, err)
