"""HF <-> Megatron-LLM: layouts, shards, refusals, config carry-over, tokenizer export."""
import argparse
import json

import pytest
import torch

from ckdiff.formats.readers import open_checkpoint
from ckdiff.io.pickles import load_pickle
from ckdiff.golden.emit import emit
from helpers import assert_same, convert, diff, train_spm, tree

CASES = [("llama-gqa", "llama2", 1, 1), ("llama-gqa", "llama2", 2, 2), ("llama-gqa", "llama2", 2, 1),
         ("mistral-gqa", "mistral", 3, 2), ("llama-mha-tied", "llama", 4, 1), ("llama-mha-tied", "codellama", 2, 2), ("falcon-7b", "falcon", 1, 2),
         ("falcon-40b", "falcon", 2, 2)]


@pytest.mark.parametrize("name,model,tp,pp", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_bit_exact(tiny_hf, tmp_path, name, model, tp, pp, dtype):
    src = tiny_hf(name, dtype)
    assert convert("hf-to-megatron", model, "--model-path", src, "--out", tmp_path / "meg", "--tp", tp, "--pp", pp) == 0
    ck = open_checkpoint(str(tmp_path / "meg"))
    assert (ck.meta["tp"], ck.meta["pp"]) == (tp, pp)
    # the merged view equals the independently emitted golden (up to vocab padding when TP does not divide it)
    res = diff(emit(tmp_path / "golden", name, "megatron", dtype), tmp_path / "meg")
    for t in res.tensors:
        assert t.status == "equal" or (t.status == "shape" and "padding" in t.diagnosis[0]), (t.name, t.status)
    assert convert("megatron-to-hf", "--input_dir", tmp_path / "meg", "--output_dir", tmp_path / "back") == 0
    assert_same(src, tmp_path / "back")


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-gqa", "falcon-7b", "falcon-40b"])
def test_export_loads_in_transformers_with_same_logits(tiny_hf, tmp_path, name):
    transformers = pytest.importorskip("transformers")
    src = tiny_hf(name)
    model = {"mistral-gqa": "mistral", "llama-gqa": "llama2"}.get(name, "falcon")
    convert("hf-to-megatron", model, "--model-path", src, "--out", tmp_path / "meg", "--tp", {"falcon-7b": 1, "mistral-gqa": 3}.get(name, 2))
    convert("megatron-to-hf", "--input_dir", tmp_path / "meg", "--output_dir", tmp_path / "back")
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    logits = []
    for d in (src, tmp_path / "back"):
        m, info = transformers.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True,
                                                                    attn_implementation="eager")
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        logits.append(m(ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_meta_source_equals_hf_source(tiny_hf, tmp_path):
    meta = emit(tmp_path / "meta", "llama-gqa", "meta", shards=2)
    assert convert("hf-to-megatron", "llama2", "--model-path", meta, "--out", tmp_path / "from-meta") == 0
    assert convert("hf-to-megatron", "llama2", "--model-path", tiny_hf("llama-gqa"), "--out", tmp_path / "from-hf") == 0
    assert_same(tmp_path / "from-meta", tmp_path / "from-hf")
    # the original's --cache-dir probe for Meta weights
    assert convert("hf-to-megatron", "llama2", "--cache-dir", meta, "--out", tmp_path / "probe") == 0
    assert_same(tmp_path / "probe", tmp_path / "from-hf")


def test_tp2_pp2_equals_tp1_pp1_and_files_as_spec(tiny_hf, tmp_path):
    src = tiny_hf("llama-spec")
    convert("hf-to-megatron", "llama2", "--model-path", src, "--out", tmp_path / "a", "--tp", 2, "--pp", 2)
    convert("hf-to-megatron", "llama2", "--model-path", src, "--out", tmp_path / "b")
    assert_same(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert [p for p in tree(tmp_path / "a") if p.endswith(".pt")] == [
        f"release/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt" for t in range(2) for p in range(2)]
    assert [p for p in tree(tmp_path / "b") if p.endswith(".pt")] == ["release/mp_rank_00/model_optim_rng.pt"]
    # spec toy at TP=2, PP=2: rank 1 of stage 0 holds group 1 of the QKV and rows [up_1; gate_1]
    full = load_pickle(tmp_path / "b/release/mp_rank_00/model_optim_rng.pt")
    r1 = load_pickle(tmp_path / "a/release/mp_rank_01_000/model_optim_rng.pt")
    ft, rt = full["model"]["language_model"]["transformer"], r1["model"]["language_model"]["transformer"]
    qkv = ft["layers.0.attention.query_key_value.weight"]
    assert qkv.shape == (128, 64)
    assert torch.equal(rt["layers.0.attention.query_key_value.weight"], qkv[64:])
    h4h = ft["layers.0.mlp.dense_h_to_4h.weight"]
    assert torch.equal(rt["layers.0.mlp.dense_h_to_4h.weight"], torch.cat([h4h[96:192], h4h[288:]]))
    assert torch.equal(rt["layers.0.attention.dense.weight"], ft["layers.0.attention.dense.weight"][:, 32:])
    # stage 1 holds global layer 1 as local layer 0, the final norm and lm_head
    s1 = load_pickle(tmp_path / "a/release/mp_rank_00_001/model_optim_rng.pt")["model"]["language_model"]
    assert torch.equal(s1["transformer"]["layers.0.input_layernorm.weight"], ft["layers.1.input_layernorm.weight"])
    assert "final_layernorm.weight" in s1["transformer"] and s1["lm_head"].shape == (128, 64)
    # v0 sits in rows 48-63 of the TP=1 fused matrix; P(k1) in rows 96-111 (verification-lessons section 8)
    hf = open_checkpoint(str(src))
    assert torch.equal(qkv[48:64], hf["model.layers.0.self_attn.v_proj.weight"].load()[:16])
    k = hf["model.layers.0.self_attn.k_proj.weight"].load()[16:32]
    assert torch.equal(qkv[96:112], torch.stack([k[[0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15][r]] for r in range(16)]))


def test_args_namespace_as_spec(tiny_hf, tmp_path):
    convert("hf-to-megatron", "mistral", "--model-path", tiny_hf("mistral-gqa"), "--out", tmp_path / "m")
    obj = load_pickle(tmp_path / "m/release/mp_rank_00/model_optim_rng.pt")
    a = obj["args"]
    assert isinstance(a, argparse.Namespace) and obj["checkpoint_version"] == 3.0 and obj["iteration"] == "release"
    assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.num_attention_heads_kv) == (2, 64, 6, 3)
    assert (a.ffn_hidden_size, a.glu_activation, a.use_rms_norm, a.tie_embed_logits) == (168, "swiglu", True, False)
    assert (a.rope_theta, a.sliding_window_size, a.layernorm_epsilon) == (1e6, 16, 1e-5)
    assert a.position_embedding_type == "rotary" and a.bias_droput_fusion is False
    convert("megatron-to-hf", "--input_dir", tmp_path / "m", "--output_dir", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert (cfg["model_type"], cfg["rope_theta"], cfg["sliding_window"], cfg["rms_norm_eps"]) == ("mistral", 1e6, 16, 1e-5)


def test_legacy_and_native_names_read_alike(tiny_hf, tmp_path):
    convert("hf-to-megatron", "llama2", "--model-path", tiny_hf("llama-gqa"), "--out", tmp_path / "legacy")
    f = tmp_path / "legacy/release/mp_rank_00/model_optim_rng.pt"
    obj = load_pickle(f)
    lm = obj["model"]["language_model"]
    native = {k.replace(".attention.", ".self_attention."): v for k, v in lm.pop("transformer").items()}
    lm["encoder"] = native
    lm["embedding"] = {"word_embeddings": {"weight": lm["embedding"]["word_embeddings.weight"]}}
    d = tmp_path / "native/iter_0001000/mp_rank_00"
    d.mkdir(parents=True)
    torch.save(obj, d / "model_optim_rng.pt")
    (tmp_path / "native/latest_checkpointed_iteration.txt").write_text("1000")
    assert_same(tmp_path / "legacy", tmp_path / "native")


def test_vocab_padding_and_strip(tiny_hf, tmp_path):
    src = tiny_hf("llama-gqa")
    convert("hf-to-megatron", "llama2", "--model-path", src, "--out", tmp_path / "p", "--tp", 2,
            "--make-vocab-size-divisible-by", 128)
    ck = open_checkpoint(str(tmp_path / "p"))
    emb = ck["language_model.embedding.word_embeddings.weight"].load()
    assert emb.shape[0] == 256 and torch.equal(emb[100:], emb[99:100].expand(156, -1))
    res = diff(tmp_path / "p", emit(tmp_path / "g", "llama-gqa", "megatron"))
    pad = [t for t in res.tensors if t.status == "shape"]
    assert pad and all(any("padding" in d and "copies of the last real row" in d for d in t.diagnosis) for t in pad)
    convert("megatron-to-hf", "--input_dir", tmp_path / "p", "--output_dir", tmp_path / "back")
    assert_same(src, tmp_path / "back")  # padding stripped: the true vocab comes back exactly
    assert json.loads((tmp_path / "back/config.json").read_text())["vocab_size"] == 100


@pytest.mark.parametrize("argv,msg", [
    (["--tp", "4"], "TP=4 does not divide the 2 KV heads"),
    (["--pp", "3"], "PP=3 does not divide the 2 layers"),
    (["--size", "7"], "--size 7 expects"),
])
def test_refusals_exit_2_before_writing(tiny_hf, tmp_path, run_cli, argv, msg):
    code, _, err = run_cli("convert", "hf-to-megatron", "llama2", "--model-path", tiny_hf("llama-gqa"),
                           "--out", tmp_path / "o", *argv)
    assert code == 2 and msg in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_falcon_mqa_refuses_tp2(tiny_hf, tmp_path, run_cli):
    code, _, err = run_cli("convert", "hf-to-megatron", "falcon", "--model-path", tiny_hf("falcon-7b"),
                           "--out", tmp_path / "o", "--tp", 2)
    assert code == 2 and "1 KV heads" in err


def test_output_dir_rules(tiny_hf, tmp_path, run_cli):
    src = tiny_hf("llama-gqa")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_cli("convert", "hf-to-megatron", "llama2", "--model-path", src, "--out", out)
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").exists()
    code, _, _ = run_cli("convert", "hf-to-megatron", "llama2", "--model-path", src, "--out", out, "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists()
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    code, _, err = run_cli("convert", "hf-to-megatron", "llama2", "--model-path", src, "--out", src / "inside")
    assert code == 2 and "overlaps the input" in err
    assert before == {p: p.stat().st_mtime_ns for p in src.rglob("*")}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    words = ["alpha", "beta", "gamma", "delta", "rotary", "permute", "layer", "norm", "head", "query", "key"]
    return train_spm(tmp_path_factory.mktemp("spm"), words, 0, 10, 200, 50)


def test_tokenizer_export(tiny_hf, tmp_path, spm_model):
    transformers = pytest.importorskip("transformers")
    convert("hf-to-megatron", "llama2", "--model-path", tiny_hf("llama-gqa"), "--out", tmp_path / "m")
    assert convert("megatron-to-hf", "--input_dir", tmp_path / "m", "--output_dir", tmp_path / "hf",
                   "--vocab_file", spm_model, "--vocab_extra_ids_list", "<extra_0>,<extra_1>",
                   "--override_special_tokens", "pad=<EOD>") == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok.convert_tokens_to_ids(["<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>", "<extra_0>", "<extra_1>"])
    assert ids == list(range(50, 57))
    assert tok.pad_token == "<EOD>" and tok.cls_token == "<CLS>" and len(tok) <= 100
    assert tok("alpha beta").input_ids[0] == tok.bos_token_id


def test_tokenizer_never_outgrows_vocab(tiny_hf, tmp_path, spm_model, run_cli):
    convert("hf-to-megatron", "llama2", "--model-path", tiny_hf("llama-gqa"), "--out", tmp_path / "m")
    extra = ",".join(f"<x{i}>" for i in range(60))
    code, _, err = run_cli("convert", "megatron-to-hf", "--input_dir", tmp_path / "m", "--output_dir",
                           tmp_path / "hf", "--vocab_file", spm_model, "--vocab_extra_ids_list", extra)
    assert code == 2 and "do not fit" in err and not (tmp_path / "hf").exists()


def test_rotate_half_era_is_an_explicit_option(tiny_hf, tmp_path):
    from ckdiff.compare.logits import compare_logits
    src = tiny_hf("llama-gqa")
    convert("hf-to-megatron", "llama2", "--model-path", src, "--out", tmp_path / "old", "--legacy-rotate-half", "--tp", 2)
    convert("hf-to-megatron", "llama2", "--model-path", src, "--out", tmp_path / "new")
    old, new = open_checkpoint(str(tmp_path / "old")), open_checkpoint(str(tmp_path / "new"))
    assert old.config["ckdiff_rotary"] == "rotate_half"
    key = "language_model.encoder.layers.0.self_attention.query_key_value.weight"
    assert not torch.equal(old[key].load(), new[key].load())  # q/k rows left in HF order
    assert compare_logits(open_checkpoint(str(src)), old).equivalent  # the runtime honours the era
    convert("megatron-to-hf", "--input_dir", tmp_path / "old", "--output_dir", tmp_path / "back")
    assert_same(src, tmp_path / "back")
    # the weights alone cannot tell the eras apart: forcing the wrong one is caught by the diff
    convert("megatron-to-hf", "--input_dir", tmp_path / "old", "--output_dir", tmp_path / "wrong",
            "--rotary_convention", "interleaved")
    res = diff(src, tmp_path / "wrong")
    bad = [t for t in res.tensors if t.status != "equal"]
    assert {t.name.split(".")[-2] for t in bad} == {"q_proj", "k_proj"}
    assert all(any("rotary permutation" in d for d in t.diagnosis) for t in bad)


def test_cache_dir_supplies_the_default_tokenizer_offline(tiny_hf, tmp_path, spm_model):
    convert("hf-to-megatron", "llama2", "--model-path", tiny_hf("llama-gqa"), "--out", tmp_path / "m")
    (tmp_path / "m" / "tokenizer.model").unlink(missing_ok=True)
    repo = tmp_path / "cache" / "models--meta-llama--Llama-2-7b-hf"
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "snapshots" / ("a" * 40) / "tokenizer.model").write_bytes(spm_model.read_bytes())
    assert convert("megatron-to-hf", "--input_dir", tmp_path / "m", "--output_dir", tmp_path / "hf",
                   "--cache_dir", tmp_path / "cache") == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == spm_model.read_bytes()
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
