"""A tensor missing on one side of a comparison across layouts: the mapping goes on without it, the targets it
feeds are one-sided rows naming it, coverage accounts for the fused inputs set aside, in both orders.

Fixtures: the HF model is written by transformers (``LlamaForCausalLM.save_pretrained``, GQA with 4 heads and 2
KV heads, random weights). The JetStream and Megatron-LLM checkpoints are written from it by ckdiff's
converters (``to-jetstream``, ``hf-to-megatron``), which test_jetstream.py and test_megatron.py prove equal,
bit for bit, to the original tools' output. Each fault then takes one tensor out the way a converter that
skips it leaves it: safetensors' ``save_file`` for the HF and JetStream files, ``torch.save`` of the rank dict
for a Megatron-LLM rank file (as Megatron-LLM saves them). The mapping mechanics (``table.apply`` with
``absent``) are checked on ckdiff's own generated Mixtral tensors (golden/models.py ``hf_state``): that proves
the tables' bookkeeping, not agreement with another tool.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import convert

QKV1 = "language_model.encoder.layers.1.self_attention.query_key_value.weight"
WQ1 = "layers.1.attention.wq.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("align-missing")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(root / "hf")
    assert convert("to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", root / "hf",
                   "--output_checkpoint_dir", root / "js", "--from_hf") == 0
    assert convert("hf-to-megatron", "llama2", "--model-path", root / "hf", "--out", root / "meg", "--tp", 2) == 0
    return root


def _without(src, out, key):
    """A copy of the safetensors directory ``src`` without tensor ``key``."""
    shutil.copytree(src, out)
    for f in out.glob("*.safetensors"):
        st = load_file(str(f))
        if key in st:
            del st[key]
            save_file(st, str(f), metadata={"format": "pt"})
            return out
    raise AssertionError(f"{key} not in {src}")


def _rank_without(src, out, rank, key):
    """A copy of the Megatron-LLM directory ``src`` whose ``rank`` file lacks ``key`` (its legacy name)."""
    shutil.copytree(src, out)
    f = out / "release" / rank / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    del obj["model"]["language_model"]["transformer"][key]
    torch.save(obj, f)
    return out


def _compare(run_cli, a, b, tmp_path):
    report = tmp_path / "r.json"
    code, out, err = run_cli(a, b, "--json", report, "--force")
    return code, " ".join(out.split()), err, json.loads(report.read_text())["result"]


def _one_sided(doc):
    return [t for t in doc["tensors"] if t["status"] in ("only-a", "only-b")]


def _accounted(doc):
    for side in ("A", "B"):
        assert doc["coverage"][side]["unaccounted"] == [], doc["coverage"]


def test_jetstream_missing_one_wq_is_named_in_both_orders(ckpts, run_cli, tmp_path):
    bad = _without(ckpts / "js", tmp_path / "js-no-wq", WQ1)
    hf = ckpts / "hf"
    # B (JetStream) is mapped into HF: the HF target it cannot build is one-sided and names the JetStream tensor
    code, out, err, doc = _compare(run_cli, hf, bad, tmp_path)
    assert code == 1 and out.startswith("DIFFER: 21 tensors (1 only-a, 20 equal)"), out + err
    assert f"missing in B: {WQ1} (the mapping needs it for model.layers.1.self_attn.q_proj.weight" in out
    assert "different naming" not in out and "could not be mapped" not in out
    (row,) = _one_sided(doc)
    assert row["name"] == "model.layers.1.self_attn.q_proj.weight" and row["note"] == f"missing in B: {WQ1}"
    _accounted(doc)
    # the other order: HF (complete) is mapped into JetStream, the same tensor is missing, named
    code, out, err, doc = _compare(run_cli, bad, hf, tmp_path)
    assert code == 1 and out.startswith("DIFFER: 21 tensors (1 only-b, 20 equal)"), out + err
    assert f"missing in A: {WQ1}" in out and "different naming" not in out
    (row,) = _one_sided(doc)
    assert row["name"] == WQ1 and row["note"] == f"missing in A: {WQ1}"
    _accounted(doc)


def test_hf_missing_k_against_fused_qkv_sets_q_and_v_aside(ckpts, run_cli, tmp_path):
    bad = _without(ckpts / "hf", tmp_path / "hf-no-k", K0)
    qkv0 = QKV1.replace("layers.1", "layers.0")
    # B (HF) is mapped into Megatron-LLM: the fused QKV of layer 0 cannot be built; q and v are set aside
    code, out, err, doc = _compare(run_cli, ckpts / "meg", bad, tmp_path)
    assert code == 1 and out.startswith("DIFFER: 15 tensors (1 only-a, 14 equal)"), out + err
    assert f"missing in B: {K0} (the mapping needs it for {qkv0}" in out and "different naming" not in out
    (row,) = _one_sided(doc)
    assert row["name"] == qkv0 and row["note"] == f"missing in B: {K0}"
    _accounted(doc)
    aside = doc["coverage"]["B"]["dropped"]
    assert sorted(aside) == [K0.replace("k_proj", "q_proj"), K0.replace("k_proj", "v_proj")]
    assert all(why.startswith(f"set aside: input of {qkv0}") and why.endswith(K0) for why in aside.values())
    # the other order: Megatron-LLM is mapped into HF, the HF tensor is missing, named
    code, out, err, doc = _compare(run_cli, bad, ckpts / "meg", tmp_path)
    assert code == 1 and out.startswith("DIFFER: 21 tensors (1 only-b, 20 equal)"), out + err
    assert f"missing in A: {K0}" in out and "different naming" not in out
    _accounted(doc)


def test_megatron_rank_file_lacking_a_tensor(ckpts, run_cli, tmp_path):
    bad = _rank_without(ckpts / "meg", tmp_path / "meg-r1", "mp_rank_01", "layers.1.attention.query_key_value.weight")
    lacks = f"mp_rank_01/model_optim_rng.pt lacks {QKV1}"
    qkv = [f"model.layers.1.self_attn.{p}_proj.weight" for p in "kqv"]  # sorted
    # compared: the reader leaves the incomplete tensor out and says so; the mapping names it from both orders
    code, out, err, doc = _compare(run_cli, ckpts / "hf", bad, tmp_path)
    assert code == 1 and out.startswith("DIFFER: 21 tensors (3 only-a, 18 equal)"), out + err
    assert lacks in out and f"missing in B: {QKV1} (the mapping needs it for {', '.join(qkv)}" in out
    assert sorted(t["name"] for t in _one_sided(doc)) == sorted(qkv)
    assert all(t["note"] == f"missing in B: {QKV1}" for t in _one_sided(doc))
    _accounted(doc)
    assert doc["coverage"]["B"]["dropped"][QKV1].startswith("skipped by the megatron reader: mp_rank_01 lacks")
    code, out, err, doc = _compare(run_cli, bad, ckpts / "hf", tmp_path)
    assert code == 1 and out.startswith("DIFFER: 15 tensors (1 only-b, 14 equal)"), out + err
    assert lacks in out and f"missing in A: {QKV1}" in out and "different naming" not in out
    _accounted(doc)
    # checked: a finding, exit 1
    code, out, err = run_cli("check", bad)
    assert code == 1 and out.startswith("FINDINGS: 1"), out + err
    assert f"coverage: {lacks} (TP rank 0 of its stage holds a shard)" in " ".join(out.split())
    # converted: refused in one line naming the rank file, exit 2, nothing written
    code, out, err = run_cli("convert", "megatron-to-hf", "--input_dir", bad, "--output_dir", tmp_path / "out")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "mp_rank_01/model_optim_rng.pt" in err and QKV1 in err and "incomplete" in err
    assert not (tmp_path / "out").exists()


def test_check_and_converters_on_a_missing_hf_tensor(ckpts, run_cli, tmp_path):
    bad = _without(ckpts / "hf", tmp_path / "hf-no-k", K0)
    code, out, err = run_cli("check", bad)
    assert code == 1 and f"coverage: missing tensor '{K0}'" in out, out + err
    for argv in (("to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", bad, "--output_checkpoint_dir",
                  tmp_path / "js", "--from_hf"), ("hf-to-megatron", "llama2", "--model-path", bad, "--out",
                                                  tmp_path / "meg")):
        code, out, err = run_cli("convert", *argv)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"missing tensor '{K0}'" in err


def test_a_mapping_that_cannot_be_made_says_why_in_one_line(ckpts, run_cli, tmp_path):
    """A tensor no rule knows (not a missing one) still stops the mapping of its side: one note with the reason,
    and the naming advice stays (the sides are then compared by name). In the other order the complete side is
    the one mapped, and the extra tensor is a one-sided row. DIFFER both ways."""
    extra = tmp_path / "hf-extra"
    shutil.copytree(ckpts / "hf", extra)
    f = extra / "model.safetensors"
    st = load_file(str(f))
    st["model.layers.0.mlp.up_proj.bias"] = torch.randn(96)
    save_file(st, str(f), metadata={"format": "pt"})
    code, out, err, doc = _compare(run_cli, ckpts / "js", extra, tmp_path)
    assert code == 1, out + err
    (note,) = [n for n in doc["notes"] if "could not be mapped" in n]
    assert "\n" not in note and str(tmp_path) not in note, note
    assert note == ("layouts differ (jetstream vs hf) and B could not be mapped: unmapped tensors "
                    "['model.layers.0.mlp.up_proj.bias']: the converter does not know them")
    assert any("different naming" in n for n in doc["notes"])
    code, out, err, doc = _compare(run_cli, extra, ckpts / "js", tmp_path)
    assert code == 1 and out.startswith("DIFFER: 22 tensors (1 only-a, 21 equal)"), out + err
    assert "missing in B: model.layers.0.mlp.up_proj.bias" in out and "different naming" not in out


def test_apply_passes_what_is_absent_through_both_passes():
    """HF -> JetStream for a Mixtral with one expert's w1 missing: the stacked target is absent, named by the HF
    tensor, through the canonical pass; the other experts are set aside; without ``absent`` it is an error."""
    from ckdiff.errors import InputError
    from ckdiff.formats.layouts import convert
    from ckdiff.golden.models import hf_state, lazy, tiny_config
    cfg = tiny_config("mixtral")
    state = hf_state(cfg, seed=3)
    gone = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    del state[gone]
    with pytest.raises(InputError, match="missing tensor 'model.layers.1.block_sparse_moe.experts.2.w1.weight'"):
        convert(lazy(state), "hf", "jetstream", cfg)
    absent, cover = {}, []
    out = convert(lazy(state), "hf", "jetstream", cfg, cover=cover, absent=absent)
    assert absent == {"layers.1.block_sparse_moe.cond_ffn.w1": [gone]}
    assert "layers.1.block_sparse_moe.cond_ffn.w1" not in out and "layers.0.block_sparse_moe.cond_ffn.w1" in out
    assert torch.equal(out["layers.1.block_sparse_moe.cond_ffn.w3"].load()[2],
                       state["model.layers.1.block_sparse_moe.experts.2.w3.weight"])
    aside = cover[1]["set_aside"]
    assert sorted(aside) == [gone.replace("experts.2", f"experts.{e}") for e in (0, 1, 3)]
    # back to HF from the JetStream side without that stacked tensor: all four experts' w1 named by it
    js = convert(lazy(hf_state(cfg, seed=3)), "hf", "jetstream", cfg)
    del js["layers.0.block_sparse_moe.cond_ffn.w2"]
    absent = {}
    convert(js, "jetstream", "hf", cfg, absent=absent)
    assert absent == {f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight": ["layers.0.block_sparse_moe.cond_ffn.w2"]
                      for e in range(4)}
