"""Misreadings of compressed-tensors' float-quantized / pack-quantized and GGUF's legacy quant types are named.

The encoded side is written by the producing library: compressed-tensors 0.20.0's ``ModelCompressor`` (the ``ct``
fixture of tests/test_producer_compressed_tensors.py, a tiny GQA Llama with random weights) and gguf-py's own
``quants.quantize`` with its ``GGUFWriter`` (driven by ``ckdiff.formats.gguf.write_gguf``, which adds llama.cpp's
metadata keys; the blocks are gguf-py's). The float side is what a converter with the bug writes, made here from
the stored tensors with the producer's own decoding (compressed-tensors' ``unpack_from_int32`` and
``dequantize``; gguf-py's ``quants.dequantize``) and the bug applied on top of it. ``ckdiff A B`` must name the
misreading's kind on every tensor the bug changes, both ways round; the right decoding must pass (no finding).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from test_producer_compressed_tensors import ct  # noqa: F401 (the session fixtures)
from test_producer_gguf import gguf_files  # noqa: F401


def _compare(a, b):
    from ckdiff.compare.diff import compare_checkpoints
    from ckdiff.formats.readers import open_checkpoint
    return compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)))


def _save_float(src, dst, out: dict):
    """``out`` (float tensors by HF name) written as an HF directory with ``src``'s config minus its
    quantization_config (a dequantized model as converters save it)."""
    dst.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    c = json.loads((src / "config.json").read_text())
    c.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def _check(enc, good, bad, kind, changed):
    """``good`` passes against ``enc`` both ways; against ``bad`` exactly the tensors ``changed`` differ, each named
    ``kind`` and nothing else."""
    for a, b in ((enc, good), (good, enc)):
        res = _compare(a, b)
        assert res.equivalent, [(t.name, t.status, t.diagnosis) for t in res.tensors if not t.ok]
    for a, b in ((enc, bad), (bad, enc)):
        res = _compare(a, b)
        wrong = {t.name: [f["kind"] for f in t.findings] for t in res.tensors if not t.ok}
        assert set(wrong) == set(changed) and all(k == [kind] for k in wrong.values()), \
            (sorted(changed), [(t.name, t.diagnosis) for t in res.tensors if not t.ok])


# ------------------------------------------------------------------ compressed-tensors
def _ct_float(src, dst, how):
    """The float checkpoint a converter dequantizing the compressed-tensors directory ``src`` ``how`` writes, with
    compressed-tensors' own ``unpack_from_int32`` and ``dequantize``; returns (path, names of the weights whose
    values the bug changes)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.lifecycle.forward_helpers import _dequantize
    q = json.loads((src / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**q["config_groups"]["group_0"]["weights"])
    sd = load_file(src / "model.safetensors")
    mods = sorted(k[: -len(".weight_scale")] for k in sd if k.endswith(".weight_scale"))
    parts = {f"{m}.{p}" for m in mods for p in ("weight", "weight_packed", "weight_shape", "weight_scale",
                                                  "weight_zero_point")}
    out = {k: v for k, v in sd.items() if k not in parts}
    changed = set()
    bits = args.num_bits
    for m in mods:
        s, zp = sd[f"{m}.weight_scale"], sd.get(f"{m}.weight_zero_point")
        if f"{m}.weight" in sd:  # float-quantized: float8_e4m3fn codes
            w = sd[f"{m}.weight"]
            right = dequantize(w, s, None, args)
            if how == "e5m2":
                v = dequantize(w.view(torch.float8_e5m2), s, None, args)
            elif how == "uint8":
                v = dequantize(w.view(torch.uint8), s, None, args)
            elif how == "reciprocal":
                v = dequantize(w, 1 / s, None, args)
            elif how == "transposed" and args.strategy == "channel" and w.shape[0] == w.shape[1]:
                v = w.float() * s.reshape(1, -1)  # the [out, 1] scales flattened: broadcast over the columns
            elif how == "transposed" and s.dim() == 2 and s.shape[0] == s.shape[1] > 1:
                v = dequantize(w, s.T.contiguous(), None, args)
            else:
                v = right
        else:  # pack-quantized: int codes in int32 words
            R, C = sd[f"{m}.weight_shape"].tolist()
            G = s.shape[1]
            codes = unpack_from_int32(sd[f"{m}.weight_packed"], bits, torch.Size([R, C])).to(torch.int16)
            z = unpack_from_int32(zp, bits, torch.Size([R, G]), packed_dim=0) if zp is not None else None
            right = dequantize(codes, s, z, args)
            off = 1 << (bits - 1)
            if how == "offset-forgotten":
                v = dequantize(codes + off, s, z, args)
            elif how == "offset-twice":
                v = dequantize(codes - off, s, z, args)
            elif how == "zp-sign":
                v = dequantize(codes, s, -z, args)
            elif how == "reciprocal":
                v = dequantize(codes, 1 / s, z, args)
            elif how == "reversed":  # the fields of each int32 word in the opposite order
                per = 32 // bits
                v = dequantize(codes.reshape(R, -1, per).flip(-1).reshape(R, C), s, z, args)
            elif how == "group64":  # groups of 64 hard-coded: element j takes its row's scale / zero point j // 64
                idx = torch.arange(C) // 64
                v = _dequantize(codes, s[:, idx], z[:, idx] if z is not None else None)
            else:
                v = right
        out[f"{m}.weight"] = v.float()
        if not torch.equal(v.float(), right.float()):
            changed.add(f"{m}.weight")
    return _save_float(src, dst, out), changed


@pytest.mark.parametrize("scheme,how,kind", [
    ("fp8-channel", "e5m2", "codes-of-another-encoding"),
    ("fp8-block", "uint8", "codes-of-another-encoding"),
    ("fp8-tensor", "reciprocal", "scale-reciprocal"),
    ("fp8-block", "reciprocal", "scale-reciprocal"),
    ("fp8-channel", "transposed", "scale-transposed"),
    ("fp8-block", "transposed", "scale-transposed"),
    ("int4-group", "offset-forgotten", "code-offset-wrong"),
    ("int8-channel-zp", "offset-forgotten", "code-offset-wrong"),
    ("int4-group-zp", "offset-twice", "code-offset-wrong"),
    ("int4-group", "reversed", "word-order-reversed"),
    ("int8-channel", "reversed", "word-order-reversed"),
    ("int4-group-zp", "zp-sign", "offset-sign-wrong"),
    ("int8-channel-zp", "zp-sign", "offset-sign-wrong"),
    ("int8-channel", "reciprocal", "scale-reciprocal"),
    ("int4-group-zp", "reciprocal", "scale-reciprocal"),
    ("int4-group", "group64", "group-size-wrong"),
    ("int4-group-zp", "group64", "group-size-wrong"),
    # from the bfloat16 source: bf16 scales, and compressed-tensors' dequantize computing in bf16
    ("bf16/int4-group-zp", "zp-sign", "offset-sign-wrong"),
    ("bf16/int8-channel-zp", "offset-forgotten", "code-offset-wrong"),
    ("bf16/fp8-block", "e5m2", "codes-of-another-encoding"),
])
def test_ct_misreading_is_named_both_ways(ct, tmp_path, scheme, how, kind):  # noqa: F811
    """Every quantized Linear (14) misread, or where the shapes let the broadcast through, the square ones."""
    good, _ = _ct_float(ct[scheme], tmp_path / "right", "right")
    bad, changed = _ct_float(ct[scheme], tmp_path / how, how)
    assert changed, "the bug changes nothing in this fixture: the test could not fail"
    if how == "transposed":  # only where the shapes let the broadcast through: q_proj, o_proj (and down_proj's
        # 2 x 2 grid of 32 x 48 blocks)
        assert {n.split(".")[-2] for n in changed} == ({"q_proj", "o_proj"} if scheme == "fp8-channel"
                                                       else {"q_proj", "o_proj", "down_proj"}), changed
    else:
        assert len(changed) == 14, changed
    _check(ct[scheme], good, bad, kind, changed)


# ------------------------------------------------------------------ GGUF legacy types
def _gguf_names(cfg) -> dict:
    """GGUF name -> (HF name, rotary head count or 0) of llama.cpp's llama tensors."""
    out = {"token_embd.weight": ("model.embed_tokens.weight", 0), "output.weight": ("lm_head.weight", 0)}
    for i in range(cfg.layers):
        for g, h, heads in (("attn_q", "self_attn.q_proj", cfg.heads), ("attn_k", "self_attn.k_proj", cfg.kv_heads),
                            ("attn_v", "self_attn.v_proj", 0), ("attn_output", "self_attn.o_proj", 0),
                            ("ffn_gate", "mlp.gate_proj", 0), ("ffn_up", "mlp.up_proj", 0),
                            ("ffn_down", "mlp.down_proj", 0)):
            out[f"blk.{i}.{g}.weight"] = (f"model.layers.{i}.{h}.weight", heads)
    return out


def _gguf_float(gguf_path, src, dst, cfg, how):
    """The HF checkpoint a converter dequantizing the GGUF file ``gguf_path`` ``how`` writes (the float source
    ``src`` gives the tensors GGUF keeps in float, and config.json): gguf-py's ``quants.dequantize`` of each
    quantized tensor with the bug applied, q and k permuted back to HF's rotary order; returns (path, GGUF names
    of the tensors the bug changes)."""
    import gguf

    from ckdiff.formats.readers import open_checkpoint
    from ckdiff.tensor.ops import rope_to_half
    out = {k: t.load().float() for k, t in open_checkpoint(str(src)).tensors.items()}
    names, changed = _gguf_names(cfg), set()
    for rt in gguf.GGUFReader(str(gguf_path)).tensors:
        qt = rt.tensor_type
        if qt.name == "Q4_K":
            v, right = _q4k_float(rt, how)
            hf_name, heads = names[rt.name]
            if not torch.equal(v, right):
                changed.add(rt.name)
            out[hf_name] = rope_to_half(v, heads, cfg.head_dim) if heads else v
            continue
        if qt.name not in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
            continue
        raw = np.array(rt.data)
        bs = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}[qt.name]
        R = raw.shape[0]
        blocks = raw.reshape(R, -1, bs)
        right = torch.from_numpy(gguf.quants.dequantize(raw, qt).astype(np.float32))
        C = right.shape[1]
        d = torch.from_numpy(blocks[:, :, :2].copy().view(np.float16).astype(np.float32)[..., 0])
        per = d.repeat_interleave(32, 1)
        if how == "interleaved":  # element 2j from byte j's low nibble, 2j+1 from its high one
            v = right.reshape(R, -1, 2, 16).transpose(2, 3).reshape(R, C)
        elif how == "halves-swapped":
            v = right.reshape(R, -1, 2, 16).flip(2).reshape(R, C)
        elif how == "bf16":  # the fp16 d (and m) bytes decoded as bfloat16
            one = blocks.copy()
            one[:, :, :2] = np.array([1.0], dtype=np.float16).view(np.uint8)
            has_m = qt.name in ("Q4_1", "Q5_1")
            if has_m:
                one[:, :, 2:4] = 0
            codes = torch.from_numpy(gguf.quants.dequantize(one.reshape(R, -1), qt).astype(np.float32))
            def bf(lo):
                return torch.from_numpy(blocks[:, :, lo:lo + 2].copy()).view(torch.bfloat16).float()[..., 0]
            v = codes * bf(0).repeat_interleave(32, 1) + (bf(2).repeat_interleave(32, 1) if has_m else 0.0)
        elif how == "min-sign":  # d * q - m: m's sign bit flipped, then gguf-py's own dequantization
            flip = blocks.copy()
            flip[:, :, 3] ^= 0x80
            v = torch.from_numpy(gguf.quants.dequantize(flip.reshape(R, -1), qt).astype(np.float32))
        elif how == "offset-forgotten":  # Q4_0's stored nibble (code + 8) taken as the code
            v = right + 8 * per
        elif how == "reciprocal":
            v = right / per / per
        else:
            v = right
        hf_name, heads = names[rt.name]
        if not torch.equal(v, right):
            changed.add(rt.name)
        out[hf_name] = rope_to_half(v, heads, cfg.head_dim) if heads else v
    return _save_float(src, dst, out), changed


def _q4k_float(rt, how):
    """(buggy, right) values of a Q4_K tensor: gguf-py's ``quants.dequantize`` of its blocks, for the sub-scale bugs
    on blocks whose 12 scale bytes are rewritten so that the package's own ``get_scale_min`` reads what the buggy
    unpacking reads; interleaved nibbles as each 64 elements' placement."""
    import gguf
    raw = np.array(rt.data)
    R = raw.shape[0]
    qt = rt.tensor_type
    deq = lambda b: torch.from_numpy(gguf.quants.dequantize(b.reshape(R, -1), qt).astype(np.float32))  # noqa
    right = deq(raw)
    b = raw.reshape(-1, 144).copy()
    lo, mn, hi = (b[:, 4 + 4 * i: 8 + 4 * i].copy() for i in range(3))
    if how == "k-high-bits":  # sub-blocks 4-7 without the top two bits kept in bytes 0-7
        b[:, 4:12] &= 0x3F
    elif how == "k-low-rule":  # sub-blocks 4-7 read as 0-3 are: scale = byte 4+j & 63, minimum = byte 8+j & 63
        b[:, 4:8] = (lo & 0x3F) | (((mn >> 4) & 3) << 6)
        b[:, 8:12] = (mn & 0x3F) | (((hi >> 4) & 3) << 6)
        b[:, 12:16] = (mn & 0x0F) | ((hi & 0x0F) << 4)
    elif how == "k-nibbles":  # the scale and minimum nibbles of bytes 8-11 exchanged
        b[:, 12:16] = (hi >> 4) | ((hi & 0x0F) << 4)
    elif how == "interleaved":
        return right.reshape(R, -1, 2, 32).transpose(2, 3).reshape(R, -1), right
    return deq(b), right


@pytest.mark.parametrize("how,kind", [("k-high-bits", "sub-scales-misread"), ("k-low-rule", "sub-scales-misread"),
                                      ("k-nibbles", "sub-scales-misread"), ("interleaved", "nibbles-interleaved")])
def test_gguf_q4_k_misreading_is_named_both_ways(tmp_path, how, kind):
    """Q4_K blocks of random bytes (d, dmin in a weight's range) written by gguf-py's GGUFWriter: the package has
    no K-quant quantizer and llama.cpp's is compiled C, so these are not a quantizer's output, but every byte
    pattern is a valid block, and gguf-py's dequantization is the oracle of the right and the buggy readings. The
    float source for the tensors GGUF keeps in float comes from the file itself (ckdiff's GGUF -> HF table)."""
    from test_formats_dcp_mcore_gguf_fp8 import _random_kquant_gguf, _write_hf

    from ckdiff.formats.layouts import convert
    from ckdiff.formats.readers import open_checkpoint
    from ckdiff.golden.models import tiny_config
    from ckdiff.models.config import model_config
    cfg = tiny_config("llama-blockwise")
    enc = _random_kquant_gguf(tmp_path / "k.gguf", cfg, "Q4_K")
    ck = open_checkpoint(str(enc))
    src = _write_hf(tmp_path / "hf", {k: t.load().float().clone() for k, t in
                                      convert(ck.tensors, "gguf", "hf", model_config(ck)).items()}, model_config(ck))
    good, _ = _gguf_float(enc, src, tmp_path / "right", cfg, "right")
    bad, changed = _gguf_float(enc, src, tmp_path / how, cfg, how)
    assert len(changed) == 16, changed
    _check(enc, good, bad, kind, changed)


@pytest.mark.parametrize("qtype,how,kind", [
    ("Q4_0", "interleaved", "nibbles-interleaved"),
    ("Q4_1", "interleaved", "nibbles-interleaved"),
    ("Q5_0", "interleaved", "nibbles-interleaved"),
    ("Q5_1", "halves-swapped", "nibbles-swapped"),
    ("Q8_0", "bf16", "scale-of-another-encoding"),
    ("Q4_0", "bf16", "scale-of-another-encoding"),
    ("Q4_1", "bf16", "scale-of-another-encoding"),
    ("Q4_1", "min-sign", "offset-sign-wrong"),
    ("Q5_1", "min-sign", "offset-sign-wrong"),
    ("Q4_0", "offset-forgotten", "code-offset-wrong"),
    ("Q8_0", "reciprocal", "scale-reciprocal"),
])
def test_gguf_misreading_is_named_both_ways(tiny_hf, tmp_path, qtype, how, kind):
    from ckdiff.convert.api import read_source
    from ckdiff.formats.gguf import write_gguf
    src = tiny_hf("llama-gqa")
    ck, cfg = read_source(str(src))
    enc = write_gguf(tmp_path / "m.gguf", {k: t.load() for k, t in ck.tensors.items()}, cfg, qtype)
    good, _ = _gguf_float(enc, src, tmp_path / "right", cfg, "right")
    bad, changed = _gguf_float(enc, src, tmp_path / how, cfg, how)
    assert len(changed) == 16, changed  # every quantized tensor: 7 per layer, the embedding and the head
    _check(enc, good, bad, kind, changed)


@pytest.mark.parametrize("how,kind", [("bf16", "scale-of-another-encoding"), ("reciprocal", "scale-reciprocal")])
def test_llama_cpp_q8_0_misreading_is_named_both_ways(gguf_files, tmp_path, how, kind):  # noqa: F811
    """The Q8_0 file llama.cpp's own convert_hf_to_gguf.py wrote (``--outtype q8_0``, tests/test_producer_gguf.py)
    of a tiny Llama: every tensor it quantized, misread."""
    from ckdiff.convert.api import read_source
    src, enc = gguf_files / "llama", gguf_files / "llama.q8_0.gguf"
    _, cfg = read_source(str(src))
    good, _ = _gguf_float(enc, src, tmp_path / "right", cfg, "right")
    bad, changed = _gguf_float(enc, src, tmp_path / how, cfg, how)
    assert len(changed) >= 14, changed  # the 7 Linears of each of 2 layers at least
    _check(enc, good, bad, kind, changed)
