"""Family declarations (ckdiff/models/families/) as the one place a family is known.

A toy family (llama with q/k/v biases) is declared in a fixture and nothing else is told about it:
its config maps both ways, its tiny weights are drawn, its Megatron-LLM table fuses the biases the
way the spec says (checked against rows written out here, not against layouts.py). (The real Qwen2
family is checked against transformers in tests/test_families_transformers_parity.py.)
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ckdiff.models import families
from ckdiff.formats import layouts
from ckdiff.models.config import ModelConfig, canonical_config
from ckdiff.formats.megatron_llm import config_from_args, make_args
from ckdiff.errors import InputError
from ckdiff.models.families import LLAMA_NAMES, Block, Family
from ckdiff.golden.models import TINY, hf_state, lazy

_L = "model.layers.{i}."
BIASES = {"q_b": _L + "self_attn.q_proj.bias", "k_b": _L + "self_attn.k_proj.bias",
          "v_b": _L + "self_attn.v_proj.bias"}
QKV_BIAS = "language_model.encoder.layers.{i}.self_attention.query_key_value.bias"


def toy_family(name="toy-qkv-bias", model_type="toy_qkv_bias", arch="ToyQkvBiasForCausalLM"):
    return Family(name, (model_type,), arch, Block(qkv_bias=True), {**LLAMA_NAMES, **BIASES},
                  layouts=frozenset({"hf", "megatron"}))


@pytest.fixture
def toy():
    fam = families.register(toy_family())
    try:
        yield fam
    finally:
        families.unregister(fam.name)


def toy_config(**kw) -> ModelConfig:
    # GQA with 1 < K < H and H/K != K; head_dim != hidden/heads; odd vocab; untied
    base = dict(hidden=48, layers=2, heads=6, kv_heads=2, head_dim=12, ffn=80, vocab=97, max_pos=128,
                rope_theta=10000.0)
    base.update(kw)
    return ModelConfig("toy-qkv-bias", **base)


# ------------------------------------------------------------------ registry
def test_registry_refuses_duplicates_and_unregister_restores(toy):
    with pytest.raises(ValueError, match="already registered"):
        families.register(toy_family(model_type="toy_other"))
    with pytest.raises(ValueError, match="already selects family 'toy-qkv-bias'"):
        families.register(toy_family(name="toy-two"))
    with pytest.raises(ValueError, match="already selects family 'llama'"):
        families.register(toy_family(name="toy-three", model_type="mistral"))
    assert "toy-two" not in families.FAMILIES and "toy-three" not in families.FAMILIES
    assert families.for_model_type("TOY_QKV_BIAS") is toy
    families.unregister(toy.name)
    assert families.for_model_type("toy_qkv_bias") is None and families.get(toy.name) is None
    families.register(toy)  # the fixture unregisters it again


# ------------------------------------------------------------------ config table
def _round_trip(cfg: ModelConfig) -> ModelConfig:
    state = lazy(hf_state(cfg, seed=3))
    return ModelConfig.from_hf(cfg.to_hf(), state)


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-gqa", "llama-mha-tied", "gemma", "mixtral", "falcon-7b",
                                  "falcon-40b"])
def test_config_round_trip_of_declared_families(name):
    cfg = TINY[name]
    fam = families.family(cfg.family)
    back = _round_trip(cfg)
    hf = cfg.to_hf()
    ids = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}  # the family's defaults
    assert back == replace(cfg, hf_model_type=cfg.hf_model_type or fam.hf_model_types[0], **ids)
    assert hf["architectures"] == [fam.hf_type_defaults.get(hf["model_type"], {}).get(
        "architectures", [fam.hf_architecture])[0]]
    for f in ("hidden", "heads", "layers", "vocab"):
        assert hf[fam.hf_keys(f)[0]] == getattr(cfg, f)


def test_every_registered_family_round_trips(toy):
    seen = set()
    for cfg in list(TINY.values()) + [toy_config()]:
        seen.add(cfg.family)
        hf = cfg.to_hf()
        ids = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}  # the family's defaults
        assert _round_trip(cfg).to_dict() == replace(
            cfg, hf_model_type=cfg.hf_model_type or families.family(cfg.family).hf_model_types[0], **ids).to_dict()
    assert seen == set(families.FAMILIES)


def test_toy_config_written_from_the_declaration(toy):
    cfg = toy_config(sliding_window=32, rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf = cfg.to_hf()
    assert hf["model_type"] == "toy_qkv_bias" and hf["architectures"] == ["ToyQkvBiasForCausalLM"]
    assert hf["attention_bias"] is True and hf["hidden_act"] == "silu"
    assert (hf["num_key_value_heads"], hf["head_dim"], hf["intermediate_size"]) == (2, 12, 80)
    assert _round_trip(cfg) == replace(cfg, hf_model_type="toy_qkv_bias")
    canon = canonical_config("hf", hf, lazy(hf_state(cfg)))
    assert canon["family"] == "toy-qkv-bias" and canon["kv_heads"] == 2 and canon["sliding_window"] == 32
    # one config key per field and the family's defaults: an absent eps reads as the declared default
    del hf["rms_norm_eps"]
    assert ModelConfig.from_hf(hf, lazy(hf_state(cfg))).norm_eps == toy.eps_default_hf


def test_falcon_hook_reads_its_two_flags():
    cfg = TINY["falcon-40b"]
    hf = cfg.to_hf()
    assert (hf["new_decoder_architecture"], hf["multi_query"], hf["num_kv_heads"]) == (True, False, 2)
    assert "head_dim" not in hf and hf["ffn_hidden_size"] == cfg.ffn and hf["layer_norm_epsilon"] == cfg.norm_eps
    hf7 = TINY["falcon-7b"].to_hf()
    hf7.pop("num_kv_heads")
    hf7["n_head"] = hf7.pop("num_attention_heads")  # the alternate spelling
    back = ModelConfig.from_hf(hf7, lazy(hf_state(TINY["falcon-7b"])))
    assert (back.heads, back.kv_heads, back.two_norms) == (4, 1, False)
    with pytest.raises(InputError, match="parallel_attn=false"):
        ModelConfig.from_hf({**hf7, "parallel_attn": False}, lazy(hf_state(TINY["falcon-7b"])))


def test_meta_params_family_from_model_type():
    for name in ("llama-gqa", "mistral-gqa", "mixtral"):
        cfg = TINY[name]
        p = cfg.to_meta()
        meta = layouts.convert(lazy(hf_state(cfg)), "hf", "meta", cfg)
        back = ModelConfig.from_meta(p, meta)
        assert back.family == cfg.family and back.experts == cfg.experts
    assert "model_type" not in TINY["llama-gqa"].to_meta()
    assert TINY["mixtral"].to_meta()["model_type"] == "mixtral"


# ------------------------------------------------------------------ layout table of the toy family
def _interleave(w: torch.Tensor, heads: int, hd: int) -> torch.Tensor:
    """Spec (Meta/Megatron rotary rows): out[h*hd + 2j + i] = in[h*hd + i*hd/2 + j]."""
    out = torch.empty_like(w)
    for h in range(heads):
        for j in range(hd // 2):
            for i in range(2):
                out[h * hd + 2 * j + i] = w[h * hd + i * (hd // 2) + j]
    return out


def _expected_fused_bias(qb, kb, vb, H, K, hd):
    """Spec: for each KV group g, the interleaved q rows of its r = H/K heads, then k_g, then v_g."""
    q, k = _interleave(qb, H, hd), _interleave(kb, K, hd)
    r, rows = H // K, []
    for g in range(K):
        for j in range(r):
            rows += [q[(g * r + j) * hd + x] for x in range(hd)]
        rows += [k[g * hd + x] for x in range(hd)] + [vb[g * hd + x] for x in range(hd)]
    return torch.stack(rows)


def test_toy_megatron_table_fuses_biases_and_round_trips(toy):
    cfg = toy_config()
    state = hf_state(cfg, seed=11)
    assert all(state[BIASES[b].format(i=0)].std() > 0 for b in BIASES)  # random, never constant
    meg = layouts.convert(lazy(state), "hf", "megatron", cfg)
    H, K, hd = cfg.heads, cfg.kv_heads, cfg.head_dim
    for i in range(cfg.layers):
        got = meg[QKV_BIAS.format(i=i)].load()
        want = _expected_fused_bias(*(state[BIASES[b].format(i=i)] for b in ("q_b", "k_b", "v_b")), H, K, hd)
        assert torch.equal(got, want)
        # the weights' fused rows follow the same order (first column checked row by row)
        wq, wk, wv = (state[LLAMA_NAMES[s].format(i=i)][:, 0] for s in ("q", "k", "v"))
        fused = meg["language_model.encoder.layers.{i}.self_attention.query_key_value.weight".format(i=i)].load()
        assert torch.equal(fused[:, 0], _expected_fused_bias(wq, wk, wv, H, K, hd))
    assert not any(k.endswith("q_proj.bias") for k in meg)
    back = layouts.convert(meg, "megatron", "hf", cfg)
    assert set(back) == set(state)
    for k, v in state.items():
        assert torch.equal(back[k].load(), v), k


def test_toy_megatron_args_name_the_family(toy):
    cfg = toy_config()
    meg = layouts.convert(lazy(hf_state(cfg)), "hf", "megatron", cfg)
    args = vars(make_args(cfg, "toy-qkv-bias", 1, 1, cfg.vocab, cfg.vocab, 128))
    assert args["glu_activation"] == "swiglu" and args["use_rms_norm"] and args["num_attention_heads_kv"] == 2
    assert config_from_args(dict(args), meg).family == "toy-qkv-bias"
    # args without ckdiff's model field (the original tool's): the block fits, the bias tensor decides
    plain = {k: v for k, v in args.items() if k != "ckdiff_model"}
    assert config_from_args(dict(plain), meg).family == "toy-qkv-bias"
    llama = TINY["llama-gqa"]
    meg_llama = layouts.convert(lazy(hf_state(llama)), "hf", "megatron", llama)
    a = {k: v for k, v in vars(make_args(llama, "llama2", 1, 1, llama.vocab, llama.vocab, 128)).items()
         if k != "ckdiff_model"}
    assert config_from_args(a, meg_llama).family == "llama"


def test_layout_not_declared_is_refused_in_one_line(toy):
    cfg = toy_config()
    for layout in ("meta", "jetstream", "mcore", "gguf"):
        with pytest.raises(InputError) as e:
            layouts.hf_to(layout, cfg)
        assert f"toy-qkv-bias has no {layout} layout" in str(e.value) and "\n" not in str(e.value)


def test_hf_source_with_undeclared_bias_is_refused(toy):
    """The HF key list comes from the slots: a llama checkpoint carrying q/k/v biases is not silently
    converted without them."""
    llama = TINY["llama-gqa"]
    state = hf_state(llama)
    state[BIASES["q_b"].format(i=0)] = torch.randn(llama.q_rows)
    with pytest.raises(InputError, match="q_proj.bias"):
        layouts.convert(lazy(state), "hf", "megatron", llama)


def test_toy_converts_through_the_library_converters(toy, tmp_path):
    """hf-to-megatron and megatron-to-hf know the toy family from its declaration alone (its --model
    value is its name), and the round trip gives back every tensor bit for bit and the same config."""
    from ckdiff.convert import api
    from ckdiff.formats.readers import open_checkpoint
    from ckdiff.io.writers import write_hf
    cfg = toy_config()
    state = hf_state(cfg, seed=21)
    (tmp_path / "hf").mkdir()
    write_hf(tmp_path / "hf", lazy(state), cfg.to_hf(), 1)
    api.hf_to_megatron("toy-qkv-bias", tmp_path / "meg", model_path=tmp_path / "hf")
    meg = open_checkpoint(str(tmp_path / "meg"))
    assert any(k.endswith("query_key_value.bias") for k in meg.tensors)
    api.megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    back = open_checkpoint(str(tmp_path / "back"))
    assert set(back.tensors) == set(state)
    for k, v in state.items():
        assert torch.equal(back.tensors[k].load(), v), k
    assert ModelConfig.from_hf(back.config, back.tensors) == replace(cfg, hf_model_type="toy_qkv_bias")
    with pytest.raises(Exception, match="is a llama model, but this config describes a toy-qkv-bias architecture"):
        api.hf_to_megatron("llama2", tmp_path / "meg2", model_path=tmp_path / "hf")
