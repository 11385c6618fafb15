"""The fused single-pass metrics against a straightforward float64 reference.

Random tensors of every supported dtype with NaN, +-Inf, -0.0 and subnormals, odd sizes, and
chunk sizes that put chunk boundaries anywhere; both the file-backed (pread) path and the
in-memory path. Also: rows of derived (row-moving) tensors equal slices of the whole.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckdiff.compare.diff import Options, compare_tensor
from ckdiff.tensor.lazy import DerivedGroup, EagerTensor
from ckdiff.tensor.ops import Chain, Concat, Each, FuseQKV, Identity, PermuteRope, Split, SplitQKV
from ckdiff.io.safetensors import read_safetensors, write_safetensors

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int8,
          torch.int16, torch.int32]
SPECIAL = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-40, 5e-8, 1e-310]


def reference(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> dict:
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    fin = torch.isfinite(x) & torch.isfinite(y)
    same = (torch.isnan(x) & torch.isnan(y)) | (x == y)
    d = torch.where(fin, (x - y).abs(), torch.where(same, 0.0, math.inf))
    m = float(d.max())
    idx = int(torch.nonzero(d == m)[0])
    ax = x.abs()
    rel = torch.where(d > 0, torch.where(fin & (ax > 0), d / ax, math.inf), 0.0)
    over = torch.where(fin, d > atol + rtol * ax, d > 0)
    xf, yf = x[fin], y[fin]
    na, nb = float((xf * xf).sum()), float((yf * yf).sum())
    return {"max_abs": m, "idx": idx, "sum_abs": float(d[fin].sum()), "max_rel": float(rel.max()),
            "over": int(over.sum()), "cosine": float((xf * yf).sum()) / math.sqrt(na * nb) if na > 0 and nb > 0 else None,
            "nan_a": int(torch.isnan(x).sum()), "nan_b": int(torch.isnan(y).sum()),
            "inf_a": int(torch.isinf(x).sum()), "inf_b": int(torch.isinf(y).sum())}


def make(dtype, n, seed, specials, scale):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = (torch.randn(n, generator=g, dtype=torch.float64) * scale)
        for pos, v in specials:
            t[pos % n] = v
        return t.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), (n,), generator=g).to(dtype)


@st.composite
def pairs(draw):
    da = draw(st.sampled_from(DTYPES))
    db = draw(st.sampled_from([da, da, torch.float32, torch.bfloat16]))
    n = draw(st.integers(1, 5000))
    cols = draw(st.sampled_from([1, 3, 7, 64]))
    n = max(cols, n - n % cols)
    spec = draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIAL)), max_size=6))
    a = make(da, n, draw(st.integers(0, 999)), spec, draw(st.sampled_from([1e-3, 1.0, 100.0])))
    mode = draw(st.sampled_from(["same", "one", "noise", "other"]))
    if mode == "same":
        b = a.clone()
    elif mode == "one":
        b = a.clone()
        vals = [1.0, -2.0, math.nan, math.inf, 0.0] if da.is_floating_point else [1, -2, 0]
        b[draw(st.integers(0, n - 1))] = draw(st.sampled_from(vals))
    elif mode == "noise" and da.is_floating_point:
        b = (a.double() * (1 + 1e-2 * torch.randn(n, dtype=torch.float64))).to(da)
    else:
        b = make(da, n, draw(st.integers(1000, 2000)), spec[:2], 1.0)
    b = b.to(db) if db != da and b.dtype.is_floating_point else b
    shape = (n // cols, cols) if cols > 1 else (n,)
    tol = draw(st.sampled_from([(0.0, 0.0), (1e-5, 1e-3), (0.1, 0.0)]))
    chunk = draw(st.sampled_from([8, 40, 1000, 1 << 20]))
    return a.reshape(shape), b.reshape(shape), tol, chunk


def check(r, ref, a):
    assert r.n_over_tol == ref["over"]
    assert (r.nan_a, r.nan_b, r.inf_a, r.inf_b) == (ref["nan_a"], ref["nan_b"], ref["inf_a"], ref["inf_b"])
    assert r.max_abs == ref["max_abs"] or (math.isinf(r.max_abs) and math.isinf(ref["max_abs"]))
    flat = 0
    for i, s in zip(r.max_abs_index, a.shape):
        flat = flat * s + i
    assert flat == ref["idx"]
    assert r.mean_abs * a.numel() == pytest.approx(ref["sum_abs"], rel=1e-9, abs=1e-300)
    assert r.max_rel == pytest.approx(ref["max_rel"], rel=1e-6)
    if ref["cosine"] is None:
        assert r.cosine is None
    else:
        assert r.cosine == pytest.approx(ref["cosine"], rel=1e-9, abs=1e-12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pairs())
def test_fused_metrics_match_reference(tmp_path_factory, case):
    a, b, (atol, rtol), chunk = case
    opts = Options(atol=atol, rtol=rtol, chunk_bytes=chunk)
    r = compare_tensor("t", EagerTensor("t", a), EagerTensor("t", b), opts)
    identical = a.dtype == b.dtype and bytes(a.contiguous().view(torch.uint8).reshape(-1).numpy()) == bytes(
        b.contiguous().view(torch.uint8).reshape(-1).numpy())
    assert r.bit_exact == identical
    if not identical:
        check(r, reference(a, b, atol, rtol), a)
    # the file-backed path (pread into reused buffers, read-ahead thread) gives the same result
    d = tmp_path_factory.mktemp("st")
    write_safetensors(d / "a.safetensors", [EagerTensor("t", a)])
    write_safetensors(d / "b.safetensors", [EagerTensor("t", b)])
    ra = compare_tensor("t", read_safetensors(d / "a.safetensors")["t"], read_safetensors(d / "b.safetensors")["t"], opts)
    for f in ("status", "bit_exact", "max_abs", "max_abs_index", "n_over_tol", "nan_a", "nan_b", "inf_a", "inf_b"):
        assert getattr(ra, f) == getattr(r, f) or (f == "max_abs" and math.isnan(r.max_abs)), f
    assert ra.mean_abs == pytest.approx(r.mean_abs, rel=1e-9, abs=1e-300)


def test_reference_can_fail():
    """The check above is not vacuous: a one-element change is found at its index, over tolerance."""
    a = torch.randn(37, 5)
    b = a.clone()
    b[20, 3] += 1.0
    r = compare_tensor("t", EagerTensor("t", a), EagerTensor("t", b), Options(chunk_bytes=64))
    assert r.status == "differ" and r.max_abs_index == [20, 3] and r.n_over_tol == 1
    assert r.max_abs == pytest.approx(1.0, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.sampled_from([2, 4, 6]), st.integers(1, 5), st.integers(0, 99))
def test_row_moving_ops_read_only_rows(kv, head_dim, cols, seed):
    heads = kv * 2
    g = torch.Generator().manual_seed(seed)
    q = EagerTensor("q", torch.randn(heads * head_dim, cols, generator=g))
    k = EagerTensor("k", torch.randn(kv * head_dim, cols, generator=g))
    v = EagerTensor("v", torch.randn(kv * head_dim, cols, generator=g))
    ops = [(Chain((Each((PermuteRope(heads, head_dim), PermuteRope(kv, head_dim), Identity())),
                   FuseQKV(heads, kv, head_dim))), [q, k, v]),
           (Concat((heads * head_dim, kv * head_dim)), [q, k]),
           (Split((head_dim, heads * head_dim - head_dim)), [q])]
    fused = DerivedGroup(ops[0][1], ops[0][0]).tensors(["f"])[0]
    ops.append((Chain((SplitQKV(heads, kv, head_dim), Each((PermuteRope(heads, head_dim, False),
                                                             PermuteRope(kv, head_dim, False), Identity())))), [fused]))
    for op, ins in ops:
        grp = DerivedGroup(ins, op)
        outs = grp.tensors([f"o{i}" for i in range(len(grp.infer()))])
        assert grp.row_map(0) is not None
        for t in outs:
            full = grp.fn([x.load() for x in ins])[t.index]
            n = t.shape[0]
            for lo in range(0, n, 3):
                assert torch.equal(t.rows(lo, min(n, lo + 5)), full[lo:lo + 5])
    # the split-and-unpermute of the fused tensor gives back q, k, v row for row
    back = DerivedGroup([fused], ops[-1][0]).tensors(["q", "k", "v"])
    for t, orig in zip(back, (q, k, v)):
        assert torch.equal(t.rows(0, t.shape[0]), orig.load())


def test_value_changing_ops_are_not_row_mapped():
    t = EagerTensor("w", torch.randn(6, 3))
    g = DerivedGroup([t], lambda xs: [xs[0] * 1.01])
    assert g.row_map(0) is None
    out = g.tensors(["w"])[0]
    assert torch.equal(out.rows(1, 4), t.load()[1:4] * 1.01)


def test_result_independent_of_thread_count_and_visit_order():
    """Sums are per fixed block and folded in offset order: 1 or 2 threads, bytes-first or not,
    give bit-identical results (what a sharded run relies on)."""
    import numba
    g = torch.Generator().manual_seed(3)
    a = torch.randn(301, 257, generator=g).to(torch.bfloat16)
    b = a.clone()
    b[200:] = (b[200:].float() * 1.05).to(torch.bfloat16)  # differs only in a late chunk
    results = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        try:
            results.append(compare_tensor("t", EagerTensor("t", a), EagerTensor("t", b), Options(chunk_bytes=4096)))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    results.append(compare_tensor("t", EagerTensor("t", a), EagerTensor("t", b.float()), Options(chunk_bytes=4096)))
    x, y, z = results
    assert x == y and not x.bit_exact and x.max_abs > 0
    assert (x.mean_abs, x.cosine, x.max_abs, x.max_abs_index) == (z.mean_abs, z.cosine, z.max_abs, z.max_abs_index)


def test_per_channel_quantization_reads_row_blocks():
    """A per-channel quantized weight (codes and scales) read by row blocks equals the whole result."""
    from ckdiff.formats.jetstream_quant import Quantize
    w = EagerTensor("w", torch.randn(37, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16))
    for bits in (8, 4):
        g = DerivedGroup([w], Quantize(bits, False))
        codes, scale = g.tensors(["w", "w_scaler"])
        whole_c, whole_s = g.fn([w.load()])
        for lo, hi in [(0, 1), (3, 20), (36, 37), (0, 37)]:
            assert torch.equal(codes.rows(lo, hi), whole_c[lo:hi])
            assert torch.equal(scale.rows(lo, hi), whole_s[lo:hi])
