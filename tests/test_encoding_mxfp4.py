"""MXFP4 expert weights as GPT-OSS ships them (``*_blocks`` + ``*_scales``), read as logical views.

Fixtures: the float GPT-OSS checkpoint is written by transformers (``GptOssForCausalLM.save_pretrained``, a tiny
config with GQA and every parameter random). The MXFP4 side is written by this file's own quantizer from the OCP
Microscaling spec v1.0 in the stored layout transformers 5.25 dequantizes (``integrations/mxfp4.py``): no tool
that writes this layout runs on CPU (transformers' quantizer needs triton kernels). The layout itself is checked
against transformers' own dequantizer (``convert_moe_packed_tensors``), so the fixture cannot agree with ckdiff
only by sharing its mistakes."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.formats.mxfp4 import Mxfp4
from ckdiff.formats.readers import open_checkpoint
from ckdiff.tensor.fp4 import FP4, round_fp4

EXPERTS = ("gate_up_proj", "down_proj")
VALUES = torch.cat([FP4, -FP4])
INT4 = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1])  # a nibble read as a signed int4


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MXFP4 of logical experts ``[E, K, R]``: (blocks uint8 ``[E, R, K/32, 16]``, scales uint8 ``[E, R, K/32]``)."""
    E, K, R = w.shape
    x = w.float().transpose(1, 2).reshape(E, R, K // 32, 32)  # stored order: blocks along the input dim K
    amax = x.abs().amax(-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    q = round_fp4((x / torch.exp2(e)[..., None]).clamp(-6, 6))
    nib = (q.abs()[..., None] == FP4).float().argmax(-1) + 8 * (torch.signbit(q)).long()
    nib = nib.to(torch.uint8).reshape(E, R, K // 32, 16, 2)
    return (nib[..., 0] | (nib[..., 1] << 4)), (e + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def gptoss(tmp_path_factory):
    """(float dir written by transformers, MXFP4 dir, float state)."""
    from test_families_transformers_parity import transformers_model
    root = tmp_path_factory.mktemp("mxfp4")
    model = transformers_model("gpt-oss", seed=3)
    cfg = model.config
    assert 1 < cfg.num_key_value_heads < cfg.num_attention_heads
    model.save_pretrained(root / "float")
    state = load_file(str(root / "float" / "model.safetensors"))
    return root / "float", write_mxfp4(root / "mxfp4", root / "float", state), state


def write_mxfp4(out, src, state, mutate=None):
    out.mkdir()
    enc = {}
    for k, v in state.items():
        if k.endswith(EXPERTS):
            blocks, scales = quantize(v)
            if mutate:
                blocks, scales = mutate(k, blocks, scales)
            enc[k + "_blocks"], enc[k + "_scales"] = blocks, scales
        else:
            enc[k] = v
    save_file(enc, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                       "model.layers.*.mlp.router"]}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_the_stored_layout_is_the_one_transformers_dequantizes(gptoss):
    _, mx, state = gptoss
    ck = open_checkpoint(str(mx), stored=True)
    view = open_checkpoint(str(mx)).tensors["model.layers.0.mlp.experts.gate_up_proj"]
    assert isinstance(view, Mxfp4)
    theirs = convert_moe_packed_tensors(ck.tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"].load(),
                                        ck.tensors["model.layers.0.mlp.experts.gate_up_proj_scales"].load(),
                                        dtype=torch.float32)
    assert torch.equal(view.dequantized(), theirs)
    w = state["model.layers.0.mlp.experts.gate_up_proj"].float()
    units = view.units(0, view.shape[0]).reshape(w.shape)
    assert float(((view.dequantized() - w).abs() / units).max()) <= 1.0 and not torch.equal(view.dequantized(), w)


def test_mxfp4_against_its_float_source_both_ways(gptoss):
    flt, mx, _ = gptoss
    for a, b in ((mx, flt), (flt, mx)):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)))
        assert res.equivalent, [(t.name, t.status, t.diagnosis) for t in res.tensors if not t.ok]
        assert res.counts().get("quant") == 4  # two layers, gate_up and down
    same = compare_checkpoints(open_checkpoint(str(mx)), open_checkpoint(str(mx)))
    assert same.equivalent and set(same.counts()) == {"equal"}


def _misread_float(tmp_path, mx, how):
    """A float checkpoint a converter that misreads the MXFP4 source would write (bf16)."""
    ck = open_checkpoint(str(mx), stored=True)
    out = {}
    for k, t in ck.tensors.items():
        if k.endswith("_scales"):
            continue
        if not k.endswith("_blocks"):
            out[k] = t.load()
            continue
        p = k[: -len("_blocks")]
        b, s = t.load(), ck.tensors[p + "_scales"].load()
        E, R, G, _ = b.shape
        lo, hi = b & 15, b >> 4
        nib = torch.stack((hi, lo) if how == "nibbles" else (lo, hi), -1).reshape(E, R, G * 32)
        scale = s.float() if how == "e8m0" else torch.exp2(s.float() - 127)
        if how == "fp8":  # an FP8 dequantizer: each byte one e4m3 value times its block's scale, [E, R, 16 G]
            v = (b.view(torch.float8_e4m3fn).float() * scale[..., None]).reshape(E, R, G * 16)
            out[p] = v.transpose(1, 2).to(torch.bfloat16)
            continue
        if how == "grid":
            scale = scale.reshape(E, G, R).transpose(1, 2)
        if how.startswith("row"):  # block size hard-coded: element j of a row takes that row's scale j // size
            per = scale[..., torch.arange(G * 32) // int(how[3:])]
        elif how.startswith("stream"):  # element n of all the codes takes scale n // size of all the scales
            per = scale.reshape(-1)[torch.arange(E * R * G * 32) // int(how[6:])].reshape(E, R, G * 32)
        else:
            per = scale.repeat_interleave(32, -1)
        v = (INT4 if how == "int4" else VALUES)[nib.long()] * per  # [E, R, K]
        out[p] = (v.reshape(E, G * 32, R) if how == "transpose" else v.transpose(1, 2)).to(torch.bfloat16)
    d = tmp_path / f"bf16-{how}"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(mx / "config.json", d / "config.json")
    return d


@pytest.mark.parametrize("how,kind", [("e8m0", "e8m0-as-value"), ("nibbles", "nibbles-swapped"),
                                      ("grid", "scale-transposed"), ("transpose", "not-transposed")])
def test_a_misread_conversion_is_named(tmp_path, gptoss, how, kind):
    _, mx, _ = gptoss
    bad = _misread_float(tmp_path, mx, how)
    res = compare_checkpoints(open_checkpoint(str(mx)), open_checkpoint(str(bad)), Options(diagnose=True))
    wrong = [t for t in res.tensors if not t.ok]
    # down_proj has one block per row (intermediate 32): its grid reads the same in either order
    expect = {"gate_up_proj"} if how == "grid" else set(EXPERTS)
    assert not res.equivalent and {t.name.rsplit(".", 1)[1] for t in wrong} == expect
    for t in wrong:
        assert [f["kind"] for f in t.findings] == [kind], (t.name, t.diagnosis)


@pytest.mark.parametrize("how,kind,params", [
    ("row64", "block-size-wrong", {"stored": 32, "read": 64, "order": "each row's own scales"}),
    ("stream128", "block-size-wrong", {"stored": 32, "read": 128,
                                       "order": "the scales read as one stream across rows"}),
    ("fp8", "codes-of-another-encoding", {"codes": "FP4 e2m1, two per byte", "read": "FP8 e4m3, one per byte"}),
    ("int4", "codes-of-another-encoding", {"read": "int4, each nibble a signed integer"})])
def test_a_dequantizer_for_other_blocks_or_codes_is_named_both_ways(tmp_path, gptoss, how, kind, params):
    """The float side written here by hand from the stored blocks: each scale applied to 64 (or 128) elements, or
    the bytes decoded one e4m3 value each (experts of half the input width: a shape mismatch whose cause is
    still named), or each nibble read as a signed int4. The right reading by the same writer is EQUIVALENT both ways."""
    _, mx, _ = gptoss
    good, bad = _misread_float(tmp_path, mx, "right"), _misread_float(tmp_path, mx, how)
    st = load_file(str(bad / "model.safetensors"))
    for a, b in ((mx, good), (good, mx)):
        assert compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b))).equivalent
    for a, b in ((mx, bad), (bad, mx)):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options(diagnose=True))
        wrong = [t for t in res.tensors if not t.ok]
        # per row, a 64-element block reads down_proj's single block per row right (intermediate 32)
        expect = {"gate_up_proj"} if how == "row64" else set(EXPERTS)
        assert not res.equivalent and {t.name.rsplit(".", 1)[1] for t in wrong} == expect
        for t in wrong:
            assert [f["kind"] for f in t.findings] == [kind], (t.name, t.diagnosis)
            assert params.items() <= t.findings[0].items(), t.findings
            if how == "fp8":
                assert t.status.value == "shape" and list(st[t.name].shape)[1] * 2 == \
                    open_checkpoint(str(mx)).tensors[t.name].shape[1]


def test_right_dequantization_is_not_a_misreading(tmp_path, gptoss):
    """The same writer with the right reading: EQUIVALENT, so the named misreadings are not just any bf16 file."""
    _, mx, _ = gptoss
    good = _misread_float(tmp_path, mx, "right")
    res = compare_checkpoints(open_checkpoint(str(mx)), open_checkpoint(str(good)))
    assert res.equivalent, [(t.name, t.status, t.diagnosis) for t in res.tensors if not t.ok]


@pytest.mark.parametrize("bug,kind", [("shifted", "scale-shifted"), ("doubled", "scale-multiplied")])
def test_wrong_stored_scales_are_named(tmp_path, gptoss, bug, kind):
    flt, _, state = gptoss

    def mutate(k, blocks, scales):
        if not k.endswith("layers.1.mlp.experts.down_proj"):
            return blocks, scales
        if bug == "shifted":  # each output row gets the scales of the next
            return blocks, torch.roll(scales, 1, dims=1)
        s = scales.clone()
        s[1, 2:5] += 1  # E8M0 byte + 1: the scale doubled
        return blocks, s
    mx = write_mxfp4(tmp_path / "bad", flt, state, mutate)
    res = compare_checkpoints(open_checkpoint(str(flt)), open_checkpoint(str(mx)), Options(diagnose=True))
    wrong = [t for t in res.tensors if not t.ok]
    assert [t.name for t in wrong] == ["model.layers.1.mlp.experts.down_proj"]
    assert kind in [f["kind"] for f in wrong[0].findings], wrong[0].diagnosis


def test_not_mxfp4_shapes_are_one_line(tmp_path, gptoss, run_cli):
    _, mx, _ = gptoss
    st = load_file(str(mx / "model.safetensors"))
    k = "model.layers.0.mlp.experts.gate_up_proj_scales"  # [E, R, 2] cut to [E, R, 1]
    st[k] = st[k][:, :, :1].contiguous()
    d = tmp_path / "broken"
    d.mkdir()
    save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(mx / "config.json", d / "config.json")
    code, out, err = run_cli(d, d)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not MXFP4 experts" in err
