"""Reversible ops: every op's reverse undoes it; the rotary maps match the spec's row lists."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckdiff.tensor.ops import (
    Chain,
    Concat,
    Each,
    FuseQKV,
    Identity,
    PermuteRope,
    Split,
    SplitQKV,
    Stack,
    round_trip_ok,
    rope_to_half,
    rope_to_interleaved,
)
from ckdiff.tensor.table import R, invert


def test_spec_row_lists():
    rows = torch.arange(16)[:, None]
    # d = 16: Megatron/Meta rows hold HF rows 0,8,1,9,...; conversely HF rows hold Meta rows 0,2,4,...
    assert rope_to_interleaved(rows, 1, 16)[:, 0].tolist() == [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
    assert rope_to_half(rows, 1, 16)[:, 0].tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]
    # the wrong k map (K=2 rows treated as H=4 heads of 8) (the bug class Meta/HF permutation code ships)
    wrong = rope_to_half(torch.arange(32)[:, None], 4, 8)[:, 0].tolist()
    assert wrong == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15, 16, 18, 20, 22, 17, 19, 21, 23,
                     24, 26, 28, 30, 25, 27, 29, 31]


def test_fused_qkv_toy_layout():
    # Megatron-LLM's fused qkv per query group: H=4, K=2, d=16 -> [P(q0), P(q1), P(k0), v0, P(q2), P(q3), P(k1), v1]
    q, k, v = (torch.full((n * 16, 1), float(t)) for t, n in ((1, 4), (2, 2), (3, 2)))
    q = q + torch.arange(64)[:, None] / 1000
    fused = FuseQKV(4, 2, 16)([q, k, v])[0][:, 0]
    blocks = [int(fused[i * 16]) for i in range(8)]
    assert blocks == [1, 1, 2, 3, 1, 1, 2, 3]
    assert torch.equal(fused[64:80], q[32:48, 0])  # group 1 starts with query head 2


@settings(max_examples=60, deadline=None)
@given(K=st.integers(1, 4), r=st.integers(1, 4), hd=st.sampled_from([2, 4, 8, 12]), cols=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_every_op_reverses_exactly(K, r, hd, cols, seed):
    g = torch.Generator().manual_seed(seed)
    H = K * r
    q, k, v = (torch.randn(n * hd, cols, generator=g) for n in (H, K, K))
    ops = [
        (PermuteRope(H, hd), [q]), (PermuteRope(K, hd, False), [k]), (Concat((H * hd, K * hd)), [q, k]),
        (Split((hd, H * hd - hd)), [q]), (Stack(3), [k, v, k.clone()]), (FuseQKV(H, K, hd), [q, k, v]),
        (SplitQKV(H, K, hd), [torch.cat([q, k, v])]),
        (Chain((Each((PermuteRope(H, hd), PermuteRope(K, hd), Identity())), FuseQKV(H, K, hd))), [q, k, v]),
    ]
    for op, xs in ops:
        assert round_trip_ok(op, xs), op


def test_a_table_inverse_is_derived():
    rules = [R("a.{i}.q", "b.{i}.wq", PermuteRope(4, 8)), R(["x", "y"], "z", Concat((2, 3)))]
    inv = invert(rules)
    assert [(r.src, r.dst) for r in inv] == [(("b.{i}.wq",), ("a.{i}.q",)), (("z",), ("x", "y"))]
    assert inv[0].op == PermuteRope(4, 8, False) and inv[1].op == Split((2, 3))
    assert invert(inv) == rules
