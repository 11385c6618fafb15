"""The logit metrics computed a block of positions of one sequence at a time equal a straightforward
whole-batch float64 computation: bit for bit for every per-token value, maximum, location and agreement,
to rounding for NMSE (its whole-tensor sums combine by blocks)."""
from __future__ import annotations

import math

import pytest
import torch

from ckdiff.compare import logits as L
from ckdiff.formats.readers import open_checkpoint
from ckdiff.golden.models import TINY
from ckdiff.runtime.forward import run


def whole_batch(logits_a, logits_b, vocab, topk, skip=False):
    """The whole [B, T, V] tensors in float64 at once: the definition the blocks must reproduce."""
    la, lb = logits_a[..., :vocab].double(), logits_b[..., :vocab].double()
    if skip:
        la, lb = la[:, 1:], lb[:, 1:]
    lpa, lpb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
    kl = (lpa.exp() * (lpa - lpb)).sum(-1)
    kmax, kidx = kl.reshape(-1).max(0)
    T = la.shape[1]
    k = min(topk, vocab)
    ta, tb = la.topk(k, -1).indices, lb.topk(k, -1).indices
    mutual = (tb == la.argmax(-1, keepdim=True)).any(-1) & (ta == lb.argmax(-1, keepdim=True)).any(-1)
    fail = (~mutual).nonzero()
    dmax, didx = (la - lb).abs().reshape(-1).max(0)
    di, kpos = int(didx), int(kidx)
    wa, wb = lpa[kpos // T, kpos % T], lpb[kpos // T, kpos % T]
    out = {"kl": kl, "max_kl": float(kmax), "mean_kl": float(kl.mean()), "max_kl_at": [kpos // T, kpos % T],
           "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).double().mean()), "topk": k,
           "topk_agreement": float(mutual.double().mean()),
           "first_topk_failure": [int(fail[0, 0]), int(fail[0, 1])] if len(fail) else None,
           "max_abs": float(dmax), "max_abs_at": [di // (T * vocab), (di // vocab) % T, di % vocab],
           "nmse": float(((la - lb) ** 2).mean() / la.var()) if la.var() > 0 else 0.0,
           "worst_topk": {"a_ids": wa.topk(k).indices.tolist(), "a_logprob": wa.topk(k).values.tolist(),
                          "b_ids": wb.topk(k).indices.tolist(), "b_logprob": wb.topk(k).values.tolist()}}
    return out


def same(got: L.LogitMetrics, want: dict):
    for key, w in want.items():
        g = getattr(got, key)
        if key == "kl":
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
        elif key == "worst_topk":
            assert repr(g) == repr(w)  # exact floats (repr round-trips), NaN included
        elif key == "nmse":
            assert g == pytest.approx(w, rel=1e-12, abs=0, nan_ok=True)
        elif isinstance(w, float) and math.isnan(w):
            assert math.isnan(g), key
        else:
            assert g == w, key


def random_logits(B, T, V, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * scale


@pytest.mark.parametrize("block_bytes", [None, 8 * 37 * 3, 1])  # default, 3 positions, 1 position
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("B,T,V,vocab,topk", [(3, 7, 40, 37, 5), (1, 5, 37, 37, 3), (4, 2, 11, 9, 20)])
def test_blocks_equal_the_whole_batch_on_random_logits(monkeypatch, block_bytes, skip, B, T, V, vocab, topk):
    if block_bytes is not None:
        monkeypatch.setattr(L, "METRIC_BLOCK_BYTES", block_bytes)
    a = random_logits(B, T, V, 1)
    b = a + random_logits(B, T, V, 2, scale=0.3)  # near: top-1 mostly agrees, some top-k misses
    b[0, -1] = a[0, -1]  # one identical token
    same(L.logit_metrics(a, b, vocab, topk, skip), whole_batch(a, b, vocab, topk, skip))


def test_ties_and_nan_take_the_first_occurrence(monkeypatch):
    """Equal logits (every |A - B| ties at 0 except later ones) and a NaN: the maxima's locations are the
    whole tensor's first occurrence, across blocks and sequences."""
    monkeypatch.setattr(L, "METRIC_BLOCK_BYTES", 8 * 10 * 2)
    a = random_logits(3, 5, 10, 6)
    b = a.clone()
    a[1, 3, 4], b[1, 3, 4] = 0.25, 0.75
    a[2, 0, 1], b[2, 0, 1] = 0.25, 0.75  # the same difference later: the first one is reported
    m = L.logit_metrics(a, b, 10, 3)
    same(m, whole_batch(a, b, 10, 3))
    assert m.max_abs == 0.5 and m.max_abs_at == [1, 3, 4]
    b[2, 4, 2] = float("nan")
    b[2, 2, 7] = float("nan")
    m = L.logit_metrics(a, b, 10, 3)
    same(m, whole_batch(a, b, 10, 3))
    assert math.isnan(m.max_abs) and m.max_abs_at == [2, 2, 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_equal_the_whole_batch_on_gqa_model_logits(monkeypatch, tiny_hf, dtype):
    """Logits of two GQA models (H=8, K=2), B side with a padded vocabulary cut back to the true one."""
    monkeypatch.setattr(L, "METRIC_BLOCK_BYTES", 8 * 100 * 5)
    V = TINY["llama-gqa"].vocab
    ids = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(8))
    outs = []
    for seed in (0, 1):
        ck = open_checkpoint(str(tiny_hf("llama-gqa", seed=seed)))
        outs.append(run(ck, L.config_of(ck), ids, dtype).logits)
    a = outs[0]
    b = torch.cat([outs[1], random_logits(3, 12, 28, 9)], -1)  # 28 padding rows of the head
    assert a.shape[1] > 1 and b.shape[-1] == V + 28
    for skip in (False, True):
        same(L.logit_metrics(a, b, V, 5, skip), whole_batch(a, b, V, 5, skip))
