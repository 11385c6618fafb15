"""The sharding, padding and renaming rows: each op's reverse undoes it, eagerly and through the
lazy row provenance the writers and the comparator read with; the tables give both directions."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckdiff.tensor.lazy import DerivedGroup, EagerTensor, OutputCache
from ckdiff.tensor.ops import PadRows, Shard, ShardMerge, ShardSplit, StripRows, round_trip_ok
from ckdiff.tensor.table import R, Rename, apply_present, invert, rename

SETTINGS = settings(max_examples=40, deadline=None)


def _rand(g, shape, dtype):
    x = torch.randn(shape, generator=g)
    return x.to(dtype)


def _rows_equal(lazy, whole, g):
    """Random row ranges of a lazy tensor read as ``whole`` has them, plus the whole."""
    n = whole.shape[0]
    assert torch.equal(lazy.load(), whole)
    for _ in range(4):
        a = int(torch.randint(0, n, (1,), generator=g))
        b = int(torch.randint(a + 1, n + 1, (1,), generator=g))
        assert torch.equal(lazy.rows(a, b), whole[a:b]), (a, b)


@SETTINGS
@given(rows=st.integers(1, 20), extra=st.integers(0, 20), cols=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_pad_then_strip_is_identity(rows, extra, cols, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, (rows, cols), dtype)
    op = PadRows(rows, rows + extra)
    assert op.reverse() == StripRows(rows, rows + extra) and op.reverse().reverse() == op
    assert round_trip_ok(op, [x])
    padded = op([x])[0]
    assert padded.shape == (rows + extra, cols)
    assert torch.equal(padded[rows:], x[-1:].expand(extra, cols))  # copies of the last row
    # through row provenance: the padded view and its strip read row ranges from the source
    lazy = DerivedGroup([EagerTensor("w", x)], op).tensors(["w"])[0]
    _rows_equal(lazy, padded, g)
    back = DerivedGroup([lazy], op.reverse()).tensors(["w"])[0]
    _rows_equal(back, x, g)
    assert DerivedGroup([lazy], op.reverse()).row_map(0) is not None  # read by rows, never whole


def test_pad_rows_refuse_a_wrong_size():
    with pytest.raises(ValueError, match="expected 5"):
        PadRows(5, 8)([torch.zeros(4, 2)])
    with pytest.raises(ValueError, match="expected 8"):
        StripRows(5, 8)([torch.zeros(7, 2)])


@SETTINGS
@given(how=st.sampled_from(list(Shard)), n=st.integers(1, 4), per=st.integers(1, 5), cols=st.integers(1, 4),
       vector=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_shard_split_then_merge_is_identity(how, n, per, cols, vector, seed):
    g = torch.Generator().manual_seed(seed)
    if how is Shard.COLS:
        shape = (per + 1, n * cols)
    else:
        rows = n * per * (2 if how is Shard.GLU else 1)
        shape = (rows,) if vector else (rows, cols)
    x = torch.randn(shape, generator=g)
    op = ShardSplit(how, n)
    assert op.reverse() == ShardMerge(how, n) and op.reverse().reverse() == op
    assert round_trip_ok(op, [x])
    pieces = op([x])
    assert len(pieces) == n
    if how is not Shard.REPLICATED:  # pieces merged and cut again are the same pieces
        assert round_trip_ok(op.reverse(), pieces)
        assert sum(p.numel() for p in pieces) == x.numel()
    if how is Shard.GLU:  # rank r holds [up_r; gate_r]
        f = shape[0] // 2
        assert torch.equal(pieces[-1][:per], x[f - per:f]) and torch.equal(pieces[0][per:], x[f:f + per])
    # lazily: each piece read by rows from the source, and the merge of lazy pieces read by rows
    lazy = DerivedGroup([EagerTensor("w", x)], op).tensors(["w"] * n)
    for lz, p in zip(lazy, pieces):
        _rows_equal(lz, p, g)
    merged = DerivedGroup(lazy, op.reverse()).tensors(["w"])[0]
    _rows_equal(merged, x, g)


def test_shard_split_refuses_what_does_not_divide():
    with pytest.raises(ValueError, match="3 column blocks"):
        ShardSplit(Shard.COLS, 3)([torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="two halves"):
        ShardSplit(Shard.GLU, 2)([torch.zeros(6, 4)])  # halves of 3 rows do not cut in 2


@SETTINGS
@given(layers=st.integers(0, 30), seed=st.integers(0, 2**31 - 1))
def test_legacy_names_round_trip(layers, seed):
    from ckdiff.formats.megatron_llm import LEGACY_NAMES, legacy_name, native_name
    assert invert(invert(LEGACY_NAMES)) == LEGACY_NAMES
    for tail in ("self_attention.query_key_value.weight", "self_attention.dense.weight",
                 "mlp.dense_h_to_4h.weight", "input_layernorm.weight"):
        native = f"language_model.encoder.layers.{layers}.{tail}"
        legacy = legacy_name(native)
        assert legacy == f"language_model.transformer.layers.{layers}.{tail.replace('self_attention.', 'attention.')}"
        assert native_name(legacy) == native and native_name(native) == native
    emb = "language_model.embedding.word_embeddings.weight"
    assert legacy_name(emb) == emb == native_name(emb)


def test_rename_rows_with_layer_numbers():
    rows = [Rename("a.{i}.b.", "x.{i}.y."), Rename("top.", "root.")]
    assert rename("top.a.12.b.w", rows) == "root.x.12.y.w"
    assert rename("root.x.12.y.w", invert(rows)) == "top.a.12.b.w"
    assert rename("top.a.b.w", rows) == "root.a.b.w"  # {i} is a layer number only


def test_megatron_tp_table_both_directions():
    from ckdiff.formats.megatron_llm import TP_TABLE, tp_axis
    L = "language_model.encoder.layers.3."
    assert tp_axis(L + "mlp.dense_h_to_4h.weight") is Shard.GLU
    assert tp_axis(L + "mlp.dense_h_to_4h.weight", glu=False) is Shard.ROWS  # Falcon: plain rows
    assert tp_axis(L + "self_attention.dense.weight") is Shard.COLS
    assert tp_axis(L + "self_attention.query_key_value.bias") is Shard.ROWS  # a bias goes as its weight
    assert tp_axis(L + "input_layernorm.weight") is Shard.REPLICATED
    assert tp_axis(L + "something.else") is None
    assert TP_TABLE.merge(L + "mlp.dense_4h_to_h.weight", 2) == TP_TABLE.split(L + "mlp.dense_4h_to_h.weight", 2).reverse()


@pytest.mark.parametrize("version,cut", [(1, Shard.COLS), (2, Shard.COLS), (3, Shard.ROWS)])
def test_meta_embedding_cut_per_version_and_read_back(version, cut):
    from ckdiff.formats.readers import META_SHARDS, meta_axis, meta_variant
    assert META_SHARDS.cut("tok_embeddings.weight", meta_variant(version)) is cut
    x = torch.randn(12, 8)
    pieces = ShardSplit(cut, 2)([x])
    # the reader finds the version's cut from the shard shape and params["dim"]
    assert meta_axis("tok_embeddings.weight", pieces[0].shape, {"dim": 8}, 2) is cut
    assert meta_axis("layers.0.attention.wo.weight", (8, 4), {"dim": 8}, 2) is Shard.COLS
    assert meta_axis("layers.0.mystery", (8, 4), {"dim": 8}, 2) is None


def test_vocab_rows_pad_and_strip_through_the_table(tmp_path):
    from ckdiff.formats.layouts import MEGATRON
    from ckdiff.formats.megatron_llm import pad_vocab_tensors, strip_vocab, vocab_rules
    g = torch.Generator().manual_seed(3)
    t = {MEGATRON["embed"]: EagerTensor(MEGATRON["embed"], torch.randn(10, 4, generator=g)),
         "other": EagerTensor("other", torch.randn(3, generator=g)),
         MEGATRON["head"]: EagerTensor(MEGATRON["head"], torch.randn(10, 4, generator=g))}
    rules = vocab_rules(t, 16)
    assert [r.op for r in rules] == [PadRows(10, 16)] * 2
    assert [r.op for r in invert(rules)] == [StripRows(10, 16)] * 2
    padded = pad_vocab_tensors(t, 16)
    assert list(padded) == list(t)  # order kept; the other tensor passes through untouched
    assert padded["other"] is t["other"] and padded[MEGATRON["embed"]].shape == (16, 4)
    back = strip_vocab(padded, 10)
    for k in t:
        assert torch.equal(back[k].load(), t[k].load())
    assert pad_vocab_tensors(t, 10)[MEGATRON["embed"]] is t[MEGATRON["embed"]]  # nothing to pad


def test_output_cache_is_owned_and_bounded():
    calls = []

    def op(xs):
        calls.append(1)
        return [xs[0] + 1, xs[0] - 1]
    cache = OutputCache(keep=1)
    a = DerivedGroup([EagerTensor("a", torch.randn(3, 2))], op, cache=cache).tensors(["p", "m"])
    b = DerivedGroup([EagerTensor("b", torch.randn(3, 2))], op, cache=cache).tensors(["p", "m"])
    calls.clear()  # (shape inference ran the op on the meta device)
    a[0].load(), a[1].load()
    assert len(calls) == 1  # both outputs from one run
    b[0].load()
    assert a[0].group._cache is None and b[0].group._cache is not None  # keep=1: a's outputs dropped
    loose = DerivedGroup([EagerTensor("c", torch.randn(3, 2))], op).tensors(["p", "m"])
    loose[0].load()
    assert loose[0].group._cache is None  # no cache given: nothing kept


def test_apply_present_maps_only_present_sources():
    t = {"a": EagerTensor("a", torch.randn(4, 2)), "b": EagerTensor("b", torch.randn(2))}
    out = apply_present(t, [R("a", "a", PadRows(4, 6)), R("zz", "zz", PadRows(1, 2))])
    assert list(out) == ["a", "b"] and out["a"].shape == (6, 2) and out["b"] is t["b"]


def test_meta_rope_freqs_use_head_dim(tmp_path):
    """rope.freqs has head_dim / 2 entries, also where head_dim != dim / n_heads."""
    from ckdiff.io.pickles import read_pickle_tensors
    from ckdiff.io.writers import write_meta_shards
    params = {"dim": 16, "n_heads": 2, "head_dim": 4, "rope_theta": 500.0}
    w = {"layers.0.attention.wq.weight": EagerTensor("q", torch.randn(8, 16))}
    write_meta_shards(tmp_path, w, params, 1, rope_freqs=True)
    freqs = read_pickle_tensors(tmp_path / "consolidated.00.pth")["rope.freqs"].load()
    assert freqs.shape == (2,)
    assert torch.allclose(freqs, 1.0 / 500.0 ** (torch.arange(0, 4, 2).float() / 4))


@pytest.mark.parametrize("tp,pp", [(2, 1), (4, 2)])
def test_megatron_tp_table_round_trips_through_rank_files_with_a_qkv_bias(tiny_hf, tmp_path, tp, pp):
    """Writer (TP_TABLE, LEGACY_NAMES) and reader (their inverses) agree on every tensor, a fused
    q/k/v bias included (cut by rows like its weight, as the toy qkv-bias family needs)."""
    from ckdiff.convert.api import read_source
    from ckdiff.formats.layouts import convert as layout_convert
    from ckdiff.formats.megatron_llm import make_args, read_megatron, write_megatron
    import argparse
    SAFE_GLOBALS = [argparse.Namespace]  # what the oracle torch.load(weights_only=True) needs
    ck, cfg = read_source(str(tiny_hf("llama-gqa")))
    tensors = layout_convert(ck.tensors, "hf", "megatron", cfg)
    g = torch.Generator().manual_seed(7)
    rows = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
    bias = {f"language_model.encoder.layers.{i}.self_attention.query_key_value.bias":
            EagerTensor("b", torch.randn(rows, generator=g)) for i in range(cfg.layers)}
    tensors.update(bias)
    write_megatron(tmp_path, tensors, cfg, tp, pp, make_args(cfg, "llama2", tp, pp, cfg.vocab, cfg.vocab, 128))
    back = read_megatron(tmp_path)
    assert set(back.tensors) == set(tensors)
    for k, t in tensors.items():
        assert torch.equal(back[k].load(), t.load()), k
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        r0 = torch.load(tmp_path / "release" / ("mp_rank_00" + ("_000" if pp > 1 else "")) / "model_optim_rng.pt",
                        weights_only=True)
    enc = r0["model"]["language_model"]["transformer"]
    assert torch.equal(enc["layers.0.attention.query_key_value.bias"],
                       bias[next(iter(bias))].load()[:rows // tp])  # legacy name, rank 0's rows


@SETTINGS
@given(stage=st.integers(0, 5), per=st.integers(1, 8), local=st.integers(0, 7))
def test_stage_names_round_trip(stage, per, local):
    from ckdiff.formats.megatron_llm import global_layer_name, native_name, stage_names
    i = stage * per + local % per
    name = f"language_model.encoder.layers.{i}.self_attention.dense.weight"
    written = rename(name, stage_names(stage, per))
    assert written == f"language_model.transformer.layers.{local % per}.attention.dense.weight"
    assert rename(written, invert(stage_names(stage, per))) == name
    assert global_layer_name(native_name(written), stage, per) == name  # what the reader does
