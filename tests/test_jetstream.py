"""HF/Meta -> JetStream-pt and back, quantization exactly as the spec."""
import json

import pytest
import torch

from ckdiff.formats.readers import open_checkpoint
from ckdiff.tensor.ops import rope_to_interleaved
from ckdiff.formats.jetstream_quant import BOUND, dequantize, quantize
from ckdiff.golden.emit import emit
from helpers import assert_same, convert

JS = ["to-jetstream", "--model_name"]


@pytest.mark.parametrize("version,model_name", [(2, "llama-2"), (3, "llama-3"), (2, "llama")])
def test_golden_workflow_meta_path_equals_hf_path(tiny_hf, tmp_path, version, model_name):
    meta = emit(tmp_path / "meta", "llama-gqa", "meta", shards=2, llama_version=version)
    assert convert(*JS, model_name, "--input_checkpoint_dir", meta, "--output_checkpoint_dir", tmp_path / "golden") == 0
    assert convert(*JS, model_name, "--input_checkpoint_dir", tiny_hf("llama-gqa"), "--output_checkpoint_dir",
                   tmp_path / "new", "--from_hf=True") == 0
    assert_same(tmp_path / "golden", tmp_path / "new")


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha-tied", "llama-mqa-hd", "mistral-gqa", "gemma", "mixtral"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("safetensors", [True, False])
def test_round_trip_bit_exact(tiny_hf, tmp_path, name, dtype, safetensors):
    src = tiny_hf(name, dtype)
    flag = "--output_safetensors" if safetensors else "--no-output_safetensors"
    model_name = name if name in ("gemma", "mixtral") else "llama-2"
    assert convert(*JS, model_name, "--input_checkpoint_dir", src, "--output_checkpoint_dir", tmp_path / "js",
                   "--from_hf", flag) == 0
    files = sorted(p.name for p in (tmp_path / "js").iterdir())
    assert files == (["model.safetensors", "params.json"] if safetensors else
                     ["checklist.chk", "consolidated.00.pth", "params.json"])
    assert_same(emit(tmp_path / "golden", name, "jetstream", dtype), tmp_path / "js")
    params = json.loads((tmp_path / "js/params.json").read_text())
    ck = open_checkpoint(str(src))
    assert params["rope_theta"] == ck.config["rope_theta"] and params["head_dim"] == ck.config["head_dim"]
    assert convert("jetstream-to-hf", "--input_checkpoint_dir", tmp_path / "js", "--output_checkpoint_dir",
                   tmp_path / "back") == 0
    assert_same(src, tmp_path / "back")


def test_spec_index_spot_checks(tiny_hf, tmp_path):
    src = tiny_hf("llama-spec")  # H=4, K=2, hd=16
    convert(*JS, "llama-2", "--input_checkpoint_dir", src, "--output_checkpoint_dir", tmp_path / "js")
    hf, js = open_checkpoint(str(src)), open_checkpoint(str(tmp_path / "js"))
    q_hf, q_js = hf["model.layers.0.self_attn.q_proj.weight"].load(), js["layers.0.attention.wq.weight"].load()
    k_hf, k_js = hf["model.layers.0.self_attn.k_proj.weight"].load(), js["layers.0.attention.wk.weight"].load()
    assert torch.equal(q_hf[8], q_js[1]) and torch.equal(q_hf[24], q_js[17])
    assert torch.equal(k_hf[9], k_js[3]) and torch.equal(k_hf[23], k_js[30])


@pytest.mark.parametrize("qtype,name", [("int8_per_channel", "llama-gqa"), ("int4_per_channel", "llama-gqa"),
                                        ("int8_blockwise", "llama-blockwise"), ("int4_blockwise", "llama-blockwise")])
def test_quantized_structure_and_bounds(tiny_hf, tmp_path, run_cli, qtype, name):
    src = tiny_hf(name)
    assert convert(*JS, "llama-2", "--input_checkpoint_dir", src, "--output_checkpoint_dir", tmp_path / "q",
                   "--quantize_weights", "--quantize_type", qtype) == 0
    q = open_checkpoint(str(tmp_path / "q"), stored=True)
    flt = open_checkpoint(str(emit(tmp_path / "f", name, "jetstream")))
    bits = 8 if "int8" in qtype else 4
    D, F = flt["layers.0.attention.wo.weight"].shape[0], flt["layers.0.feed_forward.w1.weight"].shape[0]
    for k, t in flt.tensors.items():
        if "norm" in k:
            assert q[k].dtype == t.dtype and k + "_scaler" not in q
            continue
        codes, s = q[k].load(), q[k + "_scaler"].load()
        assert codes.dtype == torch.int8 and s.dtype == torch.bfloat16 and bool((s > 0).all())
        lim = 8 if k == "tok_embeddings.weight" else bits
        assert int(codes.min()) >= -(2 ** (lim - 1)) and int(codes.max()) <= 2 ** (lim - 1) - 1
        out, n = t.shape
        if k == "tok_embeddings.weight":
            assert codes.shape == (out, n) and s.shape == (n,)
        elif "blockwise" in qtype:
            assert codes.shape == (n // 128, 128, out) and s.shape == ((n // 128, out) if n > 128 else (out,))
        else:
            assert codes.shape == (out, n) and s.shape == (out,)
    assert (D, F) == ((256, 768) if "blockwise" in qtype else (64, 96))
    # every element within its bound, judged by the comparator in units of its own scale
    code, out_text, _ = run_cli(tmp_path / "f", tmp_path / "q", "--json", tmp_path / "r.json")
    assert code == 0, out_text
    doc = json.loads((tmp_path / "r.json").read_text())["result"]
    assert sum(t["status"] == "quant" for t in doc["tensors"]) == 16
    assert "dequantized" in " ".join(doc["notes"])
    # two quantized checkpoints compare codes and scales exactly
    assert run_cli(tmp_path / "q", tmp_path / "q")[0] == 0
    # dequantized export
    assert convert("jetstream-to-hf", "--input_checkpoint_dir", tmp_path / "q", "--output_checkpoint_dir",
                   tmp_path / "dq") == 0
    assert open_checkpoint(str(tmp_path / "dq"))["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32


def test_blockwise_refuses_non_multiple_of_128(tiny_hf, tmp_path, run_cli):
    code, _, err = run_cli("convert", *JS, "llama-2", "--input_checkpoint_dir", tiny_hf("llama-gqa"),
                           "--output_checkpoint_dir", tmp_path / "q", "--quantize_weights", "--quantize_type",
                           "int4_blockwise")
    assert code == 2 and "not a multiple of 128" in err and not (tmp_path / "q").exists()


def test_quantization_commutes_with_rope_permutation():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 256, generator=g).to(torch.bfloat16)
    for blockwise in (False, True):
        q1, s1 = quantize(rope_to_interleaved(w, 4, 16), 4, blockwise)
        q0, s0 = quantize(w, 4, blockwise)
        if blockwise:  # permute the out axis of codes [nb, 128, out] and scales [nb, out]
            perm = rope_to_interleaved(torch.arange(64)[:, None], 4, 16)[:, 0]
            assert torch.equal(q1, q0[..., perm]) and torch.equal(s1, s0[..., perm])
        else:
            assert torch.equal(q1, rope_to_interleaved(q0, 4, 16))
            assert torch.equal(s1, rope_to_interleaved(s0[:, None], 4, 16)[:, 0])


@pytest.mark.parametrize("bits", [8, 4])
def test_element_bound_on_gaussian_weights(bits):
    w = torch.randn(512, 384, generator=torch.Generator().manual_seed(bits)).to(torch.bfloat16)
    for blockwise in (False, True):
        q, s = quantize(w, bits, blockwise)
        deq = dequantize(q, s, w.shape)
        per = dequantize(torch.ones_like(q), s, w.shape)
        assert float(((w.float() - deq).abs() / per).max()) <= BOUND[bits]


def test_quantized_vs_float_catches_a_corrupted_code(tiny_hf, tmp_path, run_cli):
    from ckdiff.io.safetensors import read_safetensors, write_safetensors
    from ckdiff.golden.models import lazy
    convert(*JS, "llama-2", "--input_checkpoint_dir", tiny_hf("llama-gqa"), "--output_checkpoint_dir", tmp_path / "q",
            "--quantize_weights")
    f = tmp_path / "q/model.safetensors"
    st = {k: v.load().clone() for k, v in read_safetensors(f).items()}
    st["layers.1.attention.wv.weight"][3, 7] += 3
    f.unlink()
    write_safetensors(f, lazy(st).values())
    code, out, _ = run_cli(emit(tmp_path / "f", "llama-gqa", "jetstream"), tmp_path / "q")
    assert code == 1 and "layers.1.attention.wv.weight" in out and "[3, 7]" in out


def test_transformers_loads_jetstream_export(tiny_hf, tmp_path):
    transformers = pytest.importorskip("transformers")
    convert(*JS, "llama-3", "--input_checkpoint_dir", tiny_hf("llama-mha-tied"), "--output_checkpoint_dir", tmp_path / "js")
    convert("jetstream-to-hf", "--input_checkpoint_dir", tmp_path / "js", "--output_checkpoint_dir", tmp_path / "hf")
    m, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and m.config.tie_word_embeddings


def test_gemma_and_mixtral_layouts(tiny_hf, tmp_path, run_cli):
    convert(*JS, "gemma", "--input_checkpoint_dir", tiny_hf("gemma"), "--output_checkpoint_dir", tmp_path / "g")
    g = open_checkpoint(str(tmp_path / "g"))
    hf = open_checkpoint(str(tiny_hf("gemma")))
    assert "embedder.weight" in g and "output.weight" not in g  # tied, JetStream Gemma names
    # no rotary permutation for Gemma: q rows are HF rows (H * head_dim = 128 != hidden 64)
    assert torch.equal(g["layers.0.self_attn.wq.weight"].load(), hf["model.layers.0.self_attn.q_proj.weight"].load())
    assert g["layers.0.self_attn.wq.weight"].shape == (128, 64)
    code, _, err = run_cli("convert", *JS, "gemma", "--input_checkpoint_dir", tiny_hf("gemma"),
                           "--output_checkpoint_dir", tmp_path / "g4", "--quantize_weights", "--quantize_type",
                           "int4_per_channel")
    assert code == 2 and "int8 per channel only" in err
    code, _, err = run_cli("convert", *JS, "mixtral", "--input_checkpoint_dir", tiny_hf("llama-gqa"),
                           "--output_checkpoint_dir", tmp_path / "x")
    assert code == 2 and "expects a mixtral checkpoint" in err
    convert(*JS, "mixtral", "--input_checkpoint_dir", tiny_hf("mixtral"), "--output_checkpoint_dir", tmp_path / "m",
            "--quantize_weights", "--quantize_type", "int8_per_channel")
    m = open_checkpoint(str(tmp_path / "m"), stored=True)
    assert m["layers.0.block_sparse_moe.cond_ffn.w1"].shape == (4, 48, 64)
    assert m["layers.0.block_sparse_moe.cond_ffn.w1_scaler"].shape == (4, 48)
    assert m["layers.0.block_sparse_moe.cond_ffn.w2_scaler"].shape == (4, 64)
    assert m["layers.0.block_sparse_moe.gate.weight_scaler"].shape == (4,)
    hf = open_checkpoint(str(tiny_hf("mixtral")))
    w2 = hf["model.layers.1.block_sparse_moe.experts.3.w2.weight"].load()
    flt = open_checkpoint(str(emit(tmp_path / "f", "mixtral", "jetstream")))
    assert torch.equal(flt["layers.1.block_sparse_moe.cond_ffn.w2"].load()[3], w2)
    assert run_cli(tmp_path / "f", tmp_path / "m")[0] == 0  # each element within its scale bound
