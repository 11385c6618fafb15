"""The mismatch diagnosis (ckdiff/compare/diagnose.py) without torch: it imports without torch, its row maps are
the row moves of the torch ops they stand for (tensor/ops.py), and a pair whose lazy tensors load as numpy
arrays gets, in a process that never loads torch, the very diagnoses the same pair gets through torch tensors.

Fixtures: random weights made here, mutated with ckdiff's own ops (tensor/ops.py: rotary permutations, QKV
fusion) and by hand (a transpose, permuted rows, a scale, ...), diagnosed in memory as in
tests/test_diagnose_bounds.py; GQA: 8 query heads, 2 KV heads."""
from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ckdiff.compare.diagnose import _fuse_qkv, _fused_qkv_maps, _row_maps, _to_half, _to_interleaved, diagnose_result
from ckdiff.compare.diff import compare_checkpoints
from ckdiff.compare.result import Options
from ckdiff.tensor.lazy import Checkpoint, EagerTensor
from ckdiff.tensor.ops import FuseQKV, rope_to_half, rope_to_interleaved

ROOT = Path(__file__).resolve().parents[1]
H, K, D, HID, FF, VOCAB, E = 8, 2, 8, 64, 96, 80, 4
CONFIG = {"model_type": "llama", "num_attention_heads": H, "num_key_value_heads": K, "head_dim": D,
          "hidden_size": HID, "intermediate_size": FF, "vocab_size": VOCAB, "num_hidden_layers": 3}


def _fresh(code: str, *argv) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_diagnosis_imports_without_torch():
    out = _fresh("import sys, ckdiff.compare.diagnose; print(sorted(m for m in sys.modules if m.startswith('torch')))")
    assert out.strip() == "[]"


# ---------------------------------------------------------------- row maps
def _torch_map(fn, n: int) -> np.ndarray:
    """The row map of a torch row op: the op applied to a column of row indices."""
    return fn(torch.arange(n).unsqueeze(1)).squeeze(1).numpy()


SPLITS = [(h, d) for h in (1, 2, 3, 4, 6, 8, 12, 16, 32) for d in (2, 4, 6, 8, 16, 24, 64, 128)]


@pytest.mark.parametrize("heads,head_dim", SPLITS)
def test_rotary_index_maps_are_the_torch_ops_row_moves(heads, head_dim):
    n = heads * head_dim
    ids = np.arange(n, dtype=np.int64)
    assert np.array_equal(_to_interleaved(ids, heads, head_dim),
                          _torch_map(lambda x: rope_to_interleaved(x, heads, head_dim), n))
    assert np.array_equal(_to_half(ids, heads, head_dim), _torch_map(lambda x: rope_to_half(x, heads, head_dim), n))
    # with another split of the same rows (the wrong head count), composed either way
    for h2 in (2, 4, heads * 2):
        if n % h2 or (n // h2) % 2:
            continue
        d2 = n // h2
        for f, g, tf, tg in ((_to_half, _to_interleaved, rope_to_half, rope_to_interleaved),
                             (_to_interleaved, _to_half, rope_to_interleaved, rope_to_half)):
            assert np.array_equal(g(f(ids, heads, head_dim), h2, d2),
                                  _torch_map(lambda x: tg(tf(x, heads, head_dim), h2, d2), n))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 8), (6, 3, 4), (12, 4, 16), (32, 8, 128), (4, 4, 2),
                                                     (16, 2, 64), (9, 3, 6)])
def test_fused_qkv_index_map_is_fuse_qkv_row_moves(heads, kv_heads, head_dim):
    q = np.arange(heads * head_dim, dtype=np.int64)
    k = heads * head_dim + np.arange(kv_heads * head_dim, dtype=np.int64)
    v = (heads + kv_heads) * head_dim + np.arange(kv_heads * head_dim, dtype=np.int64)
    want = FuseQKV(heads, kv_heads, head_dim)([torch.from_numpy(x).unsqueeze(1) for x in (q, k, v)])[0].squeeze(1)
    assert np.array_equal(_fuse_qkv(q, k, v, heads, kv_heads, head_dim), want.numpy())


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 8), (12, 4, 16), (16, 2, 64), (6, 3, 4)])
def test_every_row_map_is_a_permutation_and_each_fused_map_moves_rows_as_its_finding_says(heads, kv_heads, head_dim):
    cfg = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim}
    for rows in (heads * head_dim, kv_heads * head_dim):
        for _, m in _row_maps(rows, cfg) + _row_maps(rows, cfg, "columns"):
            assert m.dtype == np.int64 and np.array_equal(np.sort(m), np.arange(rows))
    n = (heads + 2 * kv_heads) * head_dim
    g = torch.Generator().manual_seed(heads)
    q, k, v = (torch.randn(x * head_dim, 3, generator=g) for x in (heads, kv_heads, kv_heads))
    fuse = FuseQKV(heads, kv_heads, head_dim)
    maps = {f.text: m for f, m in _fused_qkv_maps(n, cfg)}
    a = fuse([q, k, v])[0]
    # each hypothesis, built with the torch ops, is found by its own map (B row i == A row map[i])
    cases = {"QKV fused as [Q; K; V] instead of Megatron's group order [q x H/K, k, v] x K": torch.cat([q, k, v]),
             "k and v swapped in the fused QKV": fuse([q, v, k])[0],
             f"in the fused QKV, q: rotary permutation P (half-split -> interleaved), {heads} heads x {head_dim} rows":
                 fuse([rope_to_interleaved(q, heads, head_dim), k, v])[0],
             f"in the fused QKV, k: rotary permutation P^-1 (interleaved -> half-split), {kv_heads} heads x "
             f"{head_dim} rows": fuse([q, rope_to_half(k, kv_heads, head_dim), v])[0]}
    for text, b in cases.items():
        assert torch.equal(a[torch.from_numpy(maps[text])], b), text


# ---------------------------------------------------------------- one pair, through torch and through numpy
def _pair() -> tuple[dict, dict]:
    """A (bf16 and float32 tensors) and B: A with one mutation per tensor that differs."""
    g = torch.Generator().manual_seed(28)

    def w(*shape, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)
    a = {"model.embed_tokens.weight": w(VOCAB, HID), "lm_head.weight": w(VOCAB, HID),
         "model.norm.weight": w(HID, dtype=torch.float32) + 1}
    for i in range(3):
        p = f"model.layers.{i}."
        a.update({p + "self_attn.q_proj.weight": w(H * D, HID), p + "self_attn.k_proj.weight": w(K * D, HID),
                  p + "self_attn.v_proj.weight": w(K * D, HID), p + "self_attn.o_proj.weight": w(HID, H * D),
                  p + "mlp.gate_proj.weight": w(FF, HID), p + "mlp.up_proj.weight": w(FF, HID),
                  p + "mlp.down_proj.weight": w(HID, FF), p + "input_layernorm.weight": w(HID, dtype=torch.float32) + 1,
                  p + "post_attention_layernorm.weight": w(HID, dtype=torch.float32) + 1})
    moe = "model.layers.2.block_sparse_moe."
    for e in range(E):
        a[f"{moe}experts.{e}.w1.weight"] = w(24, HID)
        a[f"{moe}experts.{e}.w2.weight"] = w(HID, 24)
    a[moe + "gate.weight"] = w(E, HID)
    a["model.layers.0.self_attention.query_key_value.weight"] = FuseQKV(H, K, D)(
        [w(H * D, HID), w(K * D, HID), w(K * D, HID)])[0]
    b = {k: v.clone() for k, v in a.items()}
    L = "model.layers.{}.".format
    b[L(0) + "self_attn.q_proj.weight"] = rope_to_interleaved(a[L(0) + "self_attn.q_proj.weight"], H, D)
    b[L(1) + "self_attn.k_proj.weight"] = rope_to_half(a[L(1) + "self_attn.k_proj.weight"], K, D)
    # re-permuted as one head of K * D rows where it is K heads x D
    k0 = a[L(0) + "self_attn.k_proj.weight"]
    b[L(0) + "self_attn.k_proj.weight"] = rope_to_interleaved(rope_to_half(k0, K, D), 1, K * D)
    b[L(0) + "self_attn.o_proj.weight"] = a[L(0) + "self_attn.o_proj.weight"].T.contiguous()
    o1 = a[L(1) + "self_attn.o_proj.weight"]
    b[L(1) + "self_attn.o_proj.weight"] = rope_to_interleaved(o1.T, H, D).T.contiguous()
    b[L(2) + "self_attn.o_proj.weight"] = a[L(2) + "self_attn.o_proj.weight"][torch.randperm(HID, generator=g)]
    perm = torch.randperm(FF, generator=g)
    for n in ("gate_proj", "up_proj"):
        b[L(1) + f"mlp.{n}.weight"] = a[L(1) + f"mlp.{n}.weight"][perm]
    b[L(1) + "mlp.down_proj.weight"] = a[L(1) + "mlp.down_proj.weight"][:, perm]
    v = a[L(2) + "self_attn.v_proj.weight"]
    b[L(2) + "self_attn.v_proj.weight"] = torch.cat([v[K * D // 2:], v[:K * D // 2]])
    b[L(2) + "mlp.gate_proj.weight"] = a[L(2) + "mlp.gate_proj.weight"] * 2
    b[L(0) + "input_layernorm.weight"] = a[L(0) + "input_layernorm.weight"] - 1
    b[L(2) + "mlp.up_proj.weight"] = a[L(1) + "mlp.up_proj.weight"].clone()
    b["lm_head.weight"] = a["model.embed_tokens.weight"].clone()
    b[L(2) + "mlp.down_proj.weight"][5, 7] += 0.5
    b[L(2) + "self_attn.k_proj.weight"][3, 4] = float("nan")
    q1 = b[L(1) + "self_attn.q_proj.weight"]
    q1[3 * D:4 * D] = 0
    emb = a["model.embed_tokens.weight"]
    b["model.embed_tokens.weight"] = torch.cat([emb, emb[-1:].expand(8, HID)])
    b[L(1) + "post_attention_layernorm.weight"] = (a[L(1) + "post_attention_layernorm.weight"] * 2).to(torch.bfloat16)
    ep = [2, 0, 3, 1]
    for e in range(E):
        for x in ("w1", "w2"):
            b[f"{moe}experts.{e}.{x}.weight"] = a[f"{moe}experts.{ep[e]}.{x}.weight"].clone()
    b[moe + "gate.weight"] = a[moe + "gate.weight"][ep]
    fused = "model.layers.0.self_attention.query_key_value.weight"
    q, k, v = a[fused][_part_rows("q")], a[fused][_part_rows("k")], a[fused][_part_rows("v")]
    b[fused] = FuseQKV(H, K, D)([q, v, k])[0]
    return a, b


def _part_rows(which: str) -> torch.Tensor:
    """Rows of q, k or v in a Megatron fused QKV (group order [q x H/K, k, v] x K)."""
    ids = torch.arange((H + 2 * K) * D).reshape(K, (H // K + 2) * D)
    r = H // K * D
    part = {"q": ids[:, :r], "k": ids[:, r:r + D], "v": ids[:, r + D:]}[which]
    return part.reshape(-1)


NUMPY_TENSOR = r"""
import math

class NumpyTensor:
    # the lazy-tensor surface the diagnosis reads, over numpy arrays (bfloat16 values held as float32)
    def __init__(self, name, values, dtype, itemsize):
        self.name, self._v, self.dtype, self.itemsize = name, values, dtype, itemsize
        self.shape = tuple(values.shape)
    numel = property(lambda self: math.prod(self.shape))
    nbytes = property(lambda self: self.numel * self.itemsize)
    nrows = property(lambda self: self.shape[0] if self.shape else 1)
    def load(self):
        return self._v
    def rows(self, start, stop):
        return self._v.reshape(1) if self._v.ndim == 0 else self._v[start:stop]
"""

NUMPY_SIDE = NUMPY_TENSOR + r"""
import json, pickle, sys, types
import numpy as np
from ckdiff.compare.diagnose import diagnose_result

d = sys.argv[1]
meta = json.load(open(f"{d}/meta.json"))
res = pickle.load(open(f"{d}/result.pkl", "rb"))
sides = []
for s in ("a", "b"):
    arrays = np.load(f"{d}/{s}.npz")
    tensors = {n: NumpyTensor(n, arrays[str(i)], *meta[s][n]) for i, n in enumerate(meta[s + "_names"])}
    sides.append(types.SimpleNamespace(path=s, format="safetensors", tensors=tensors, config=meta["config"], meta={}))
diagnose_result(res, *sides)
assert not [m for m in sys.modules if m.startswith("torch")], "torch was imported"
print(json.dumps({"tensors": [[t.name, str(t.status), t.diagnosis, t.note] for t in res.tensors], "notes": res.notes}))
"""


def _view(res) -> dict:
    return {"tensors": [[t.name, str(t.status), t.diagnosis, t.note] for t in res.tensors], "notes": res.notes}


def test_a_numpy_pair_gets_the_diagnoses_of_the_torch_pair_without_torch(tmp_path):
    a, b = _pair()
    cka = Checkpoint("a", "safetensors", {n: EagerTensor(n, t) for n, t in a.items()}, CONFIG, {})
    ckb = Checkpoint("b", "safetensors", {n: EagerTensor(n, t) for n, t in b.items()}, CONFIG, {})
    res = compare_checkpoints(cka, ckb, Options(diagnose=False), map_layouts=False)
    (tmp_path / "result.pkl").write_bytes(pickle.dumps(res))
    meta = {"config": CONFIG}
    for s, side in (("a", a), ("b", b)):
        names = list(side)
        meta[s + "_names"] = names
        meta[s] = {n: [str(t.dtype).replace("torch.", ""), t.element_size()] for n, t in side.items()}
        np.savez(tmp_path / f"{s}.npz", **{str(i): side[n].float().numpy() if side[n].dtype == torch.bfloat16
                                          else side[n].numpy() for i, n in enumerate(names)})
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    want = copy.deepcopy(res)
    diagnose_result(want, cka, ckb)
    want = json.loads(json.dumps(_view(want)))
    got = json.loads(_fresh(NUMPY_SIDE, tmp_path))
    assert got == want
    # the pair exercises the hypotheses it was made for
    text = json.dumps(want)
    for s in ("rotary permutation: B == P(A)", "rotary permutation with the wrong head count", "transposed: B == A^T",
              "columns: rotary permutation", "rows permuted", "equivalent reordering: MLP hidden units",
              "halves swapped", "scaled: B == 2 * A", "offset: B == A - 1", "another layer's tensor",
              "the untied output head was replaced by the embedding", "one element changed at [5, 7]",
              "NaN introduced", "one head's rows zeroed", "padding: the first 80 rows agree",
              "copies of the last real row", "the experts of layer 2 are permuted together",
              "k and v swapped in the fused QKV", "rotary permutation in some layers only"):
        assert s in text, s


def _numpy_side(path: str, tensors: dict, config: dict):
    """A checkpoint whose tensors load as numpy arrays (bfloat16 values as float32). Their dtypes stay torch's:
    ModelConfig.from_hf, which a family hook's caller reads, asks a dtype ``is_floating_point``."""
    import types
    ns: dict = {}
    exec(NUMPY_TENSOR, ns)
    made = {n: ns["NumpyTensor"](n, t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy(), t.dtype,
                                 t.element_size()) for n, t in tensors.items()}
    return types.SimpleNamespace(path=path, format="safetensors", tensors=made, config=config, meta={})


def test_a_family_diagnose_hook_runs_on_numpy_loads():
    """DeepSeek-V3's own diagnosis (models/families/deepseek.py, on torch tensors) also names a pair whose tensors
    load as numpy arrays: q_b_proj with every head's rotary rows moved from interleaved pairs to half-split order.
    Weights: ckdiff's tiny DeepSeek-V3 (golden/models.py), random."""
    from ckdiff.golden.models import TINY, hf_state
    cfg = TINY["deepseek-v3"]
    dn, dr = cfg.extra["qk_nope_head_dim"], cfg.head_dim
    a = hf_state(cfg)
    b = dict(a)
    q = "model.layers.0.self_attn.q_b_proj.weight"
    b[q] = a[q].clone()
    for h in range(cfg.heads):
        rot = a[q][h * (dn + dr) + dn:(h + 1) * (dn + dr)]
        b[q][h * (dn + dr) + dn:(h + 1) * (dn + dr)] = torch.cat([rot[0::2], rot[1::2]])
    hf = cfg.to_hf()
    cka = Checkpoint("a", "safetensors", {n: EagerTensor(n, t) for n, t in a.items()}, hf, {})
    ckb = Checkpoint("b", "safetensors", {n: EagerTensor(n, t) for n, t in b.items()}, hf, {})
    res = compare_checkpoints(cka, ckb, Options(diagnose=False), map_layouts=False)
    want, got = copy.deepcopy(res), copy.deepcopy(res)
    diagnose_result(want, cka, ckb)
    diagnose_result(got, _numpy_side("a", a, hf), _numpy_side("b", b, hf))
    assert _view(got) == _view(want)
    row = next(t for t in got.tensors if t.name == q)
    assert row.diagnosis[0].startswith("MLA rotary rows of q_b_proj in the other pair order"), row.diagnosis


def test_shape_mismatches_of_empty_tensors_are_named_from_their_shapes():
    """numpy holds no array of some empty shapes; any two empty tensors of one shape are equal, and a side with
    no rows against one with some has no last real row to pad with."""
    from ckdiff.compare.diagnose import diagnose_pair
    g = torch.Generator().manual_seed(3)
    assert diagnose_pair("w", torch.zeros(2, 0), torch.zeros(3, 0, dtype=torch.bfloat16)) == [
        "padding: the first 2 rows agree; B has 1 extra rows (copies of the last real row)"]
    assert diagnose_pair("w", torch.zeros(0, 4), torch.zeros(4, 0)) == ["transposed: B == A^T"]
    assert diagnose_pair("w", torch.zeros(0, 4), torch.zeros(0, 8)) == [
        "shards concatenated on the wrong axis: B is A's 2 shards along dim 0 concatenated along dim 1 ([0, 4] -> "
        "[0, 8])"]
    assert diagnose_pair("w", torch.zeros(0, 4), torch.randn(2, 4, generator=g)) == []
    assert diagnose_pair("w", torch.zeros(0, 1 << 31, 1 << 31), torch.zeros(0, 1 << 61)) == []
