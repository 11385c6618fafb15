"""The golden side does not share the code it checks: its Megatron / Meta layouts come from
golden/fixtures.py (written from the specs) and its own writer, so a wrong key or TP split in the
converters shows up in the golden diff even where the round trip and the logit check share the bug."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ckdiff.models import families
from ckdiff.formats import layouts, megatron_llm as megatron
from ckdiff.models.config import ModelConfig
from ckdiff.golden import emit as E
from ckdiff.golden import fixtures as FX
from ckdiff.golden.suite import check_converter
from helpers import diff


def _by_check(checks):
    return {c.check: c for c in checks}


def test_wrong_megatron_key_in_the_converters_is_caught_by_the_golden_diff(tmp_path, monkeypatch):
    # Falcon's MLP norm name used for Llama's post-attention norm, in the converters' table only
    monkeypatch.setitem(layouts.MEGATRON, "mlp_norm", layouts.MEGATRON["mlp_ln"])
    checks = _by_check(check_converter("hf-to-megatron", "llama-gqa", tmp_path))
    # the round trip and the logit check read through the same (wrong) table: both stay green ...
    assert checks["roundtrip"].ok and checks["logits"].ok, [(c.check, c.detail) for c in checks.values()]
    # ... the golden, written from the spec's names, disagrees
    assert not checks["golden"].ok
    assert "post_attention_layernorm" in checks["golden"].detail or "mlp_layernorm" in checks["golden"].detail


def test_wrong_tp_axis_in_the_converters_is_caught_by_the_golden_diff(tmp_path, monkeypatch):
    # attention dense split by rows instead of columns, in the writer and the reader alike
    from ckdiff.tensor.ops import Shard, ShardRow, ShardTable
    wrong = ShardTable([ShardRow(r"self_attention\.dense\.weight$", Shard.ROWS)] + megatron.TP_TABLE.rows)
    monkeypatch.setattr(megatron, "TP_TABLE", wrong)
    checks = _by_check(check_converter("hf-to-megatron", "llama-gqa", tmp_path, options={"tp": 2}))
    assert checks["roundtrip"].ok, checks["roundtrip"].detail  # split and merge agree with each other
    assert not checks["golden"].ok  # the golden's rank files split columns, as the spec says
    assert "dense" in checks["golden"].detail


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


SPEC_CFG = ModelConfig("llama", **FX.SPEC_TOY, max_pos=64)


@pytest.mark.parametrize("side", ["golden", "converter"])
def test_megatron_rank_files_are_the_specs_toy_at_tp2_pp2(tmp_path, side):
    """MLF section 10's table, verbatim, for the golden writer and for the converter."""
    if side == "golden":
        out = E.emit(tmp_path / "g", "", "megatron", tp=2, pp=2, vocab_rows=256, cfg=SPEC_CFG)
    else:
        from ckdiff.convert.api import hf_to_megatron
        src = E.emit(tmp_path / "hf", "", "hf", cfg=SPEC_CFG)
        hf_to_megatron("llama2", tmp_path / "c", model_path=src, tp=2, pp=2, make_vocab_size_divisible_by=128)
        out = tmp_path / "c"
    assert (out / FX.MEGATRON_TRACKER).read_text() == "release"
    for t in range(2):
        for rank, want in FX.SPEC_TOY_TP2_PP2.items():
            obj = torch.load(out / "release" / rank.format(t=t) / FX.MEGATRON_RANK_FILE, weights_only=False)
            assert obj["checkpoint_version"] == 3.0 and obj["iteration"] == "release"
            got = {k: list(v.shape) for k, v in _flat(obj["model"]).items()}
            assert got == want, (side, rank.format(t=t))


def test_golden_qkv_and_rope_rows_follow_the_spec_examples():
    """MLF section 7's block table and section 8's d=16 row list, on labelled rows."""
    cfg = SPEC_CFG
    hd = cfg.head_dim
    hf = E.hf_state(cfg)
    # label every row of q/k/v by (kind, head, row within head)
    labels = {}
    for kind, heads in (("q", cfg.heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
        key = families.family("llama").hf_names[kind].format(i=0)
        hf[key] = torch.tensor([[float(100 * h + r)] * cfg.hidden for h in range(heads) for r in range(hd)])
        labels[kind] = heads
    _, layers = E.megatron_layout(cfg, hf)
    qkv = layers[0][FX.MEGATRON_LAYER["qkv"]][0][:, 0]
    blocks = []
    for b in range(len(FX.SPEC_QKV_BLOCKS)):
        rows = qkv[b * hd:(b + 1) * hd]
        head = int(rows[0]) // 100
        within = [int(x) % 100 for x in rows]
        blocks.append((head, within))
    for (head, within), name in zip(blocks, FX.SPEC_QKV_BLOCKS):
        assert head == int(name.rstrip(")")[-1])
        assert within == (FX.SPEC_ROPE_ROWS if name.startswith("P(") else list(range(hd))), name


def test_golden_native_and_legacy_names_read_the_same(tmp_path):
    legacy = E.emit(tmp_path / "l", "llama-gqa", "megatron", tp=2, pp=2)
    native = E.emit(tmp_path / "n", "llama-gqa", "megatron", tp=2, pp=2, form="native")
    assert (native / FX.MEGATRON_TRACKER).read_text() == "1000"
    assert (native / "iter_0001000").is_dir()
    res = diff(legacy, native)
    assert res.equivalent and all(t.status == "equal" for t in res.tensors), res.counts()


def test_golden_meta_shards_split_on_the_specs_axes(tmp_path):
    out = E.emit(tmp_path / "m", "llama-gqa", "meta", shards=2)
    cfg = E.tiny_config("llama-gqa")
    s0 = torch.load(out / "consolidated.00.pth")
    assert list(s0["tok_embeddings.weight"].shape) == [cfg.vocab, cfg.hidden // 2]  # Llama-2: hidden axis
    assert list(s0["layers.0.attention.wo.weight"].shape) == [cfg.hidden, cfg.q_rows // 2]
    assert list(s0["layers.0.attention.wk.weight"].shape) == [cfg.kv_rows // 2, cfg.hidden]
    assert list(s0["norm.weight"].shape) == [cfg.hidden]
    out3 = E.emit(tmp_path / "m3", "llama-gqa", "meta", shards=2, llama_version=3)
    assert list(torch.load(out3 / "consolidated.01.pth")["tok_embeddings.weight"].shape) == [cfg.vocab // 2, cfg.hidden]


# ---------------------------------------------------------------- a family declared elsewhere (BRIEF toy)
_L = "model.layers.{i}."
TOY = families.Family("toy-qkv-bias", ("toy_qkv_bias",), "ToyQkvBiasForCausalLM", families.Block(qkv_bias=True),
                      {**families.LLAMA_NAMES, "q_b": _L + "self_attn.q_proj.bias",
                       "k_b": _L + "self_attn.k_proj.bias", "v_b": _L + "self_attn.v_proj.bias"},
                      layouts=frozenset({"hf", "megatron"}))


@pytest.fixture
def toy_family():
    families.register(TOY)
    yield TOY
    del families.FAMILIES[TOY.name]
    for mt in TOY.hf_model_types:
        families._BY_MODEL_TYPE.pop(mt, None)


def _toy_state(cfg):
    """HF tensors of the toy: the llama tensors plus random q/k/v biases."""
    hf = E.hf_state(replace(cfg, family="llama"), seed=4)
    g = torch.Generator().manual_seed(9)
    for i in range(cfg.layers):
        for s, rows in (("q_b", cfg.q_rows), ("k_b", cfg.kv_rows), ("v_b", cfg.kv_rows)):
            hf[TOY.hf_names[s].format(i=i)] = torch.randn(rows, generator=g)
    return hf


def _expected_fused_bias(cfg, q, k, v):
    """The same layout by another route: reshape-based rotary interleave and group order."""
    H, K, hd = cfg.heads, cfg.kv_heads, cfg.head_dim
    inter = lambda b, n: b.view(n, 2, hd // 2).transpose(1, 2).reshape(-1)  # noqa: E731
    q, k = inter(q, H).view(K, H // K, hd), inter(k, K).view(K, 1, hd)
    return torch.cat([q, k, v.view(K, 1, hd)], dim=1).reshape(-1)


def test_a_declared_family_with_qkv_biases_gets_its_golden_megatron_layout(tmp_path, toy_family):
    cfg = replace(E.tiny_config("llama-gqa"), family=TOY.name, hf_model_type="toy_qkv_bias")
    hf = _toy_state(cfg)
    _, layers = E.megatron_layout(cfg, hf)
    bias_key = "{attn}.query_key_value.bias"
    for i in range(cfg.layers):
        q, k, v = (hf[TOY.hf_names[s].format(i=i)] for s in ("q_b", "k_b", "v_b"))
        fused, rule = layers[i][bias_key]
        assert rule == "rows" and torch.equal(fused, _expected_fused_bias(cfg, q, k, v))
    tp = 2
    files = E.write_megatron_golden(tmp_path / "toy", cfg, hf, tp=tp, pp=2)
    assert len(files) == 4
    args = torch.load(files[0], weights_only=False)["args"]
    assert args.ckdiff_family == TOY.name and args.add_qkv_bias is True
    per_rank = (cfg.q_rows + 2 * cfg.kv_rows) // tp  # whole KV groups per TP rank
    for f in files:
        obj = torch.load(f, weights_only=False)
        stage = int(Path(f).parent.name[-3:])
        t = int(Path(f).parent.name[8:10])
        layer = stage  # one layer per stage (2 layers, PP=2): stage-local index 0
        b = obj["model"]["language_model"]["transformer"]["layers.0.attention.query_key_value.bias"]
        whole = layers[layer][bias_key][0]
        assert torch.equal(b, whole[t * per_rank:(t + 1) * per_rank])


def test_family_declarations_use_the_specs_hf_names():
    """The golden takes a model's HF names from its family declaration: pin those to the specs."""
    assert dict(families.family("llama").hf_names) == FX.SPEC_HF_NAMES["llama"]
    assert dict(families.family("falcon").hf_names) == FX.SPEC_HF_NAMES["falcon"]
    mixtral = dict(families.family("mixtral").hf_names)
    for slot, name in FX.SPEC_HF_NAMES["mixtral_experts"].items():
        assert mixtral.pop(slot) == name
    assert mixtral == {k: v for k, v in FX.SPEC_HF_NAMES["llama"].items() if k not in ("gate", "up", "down")}
