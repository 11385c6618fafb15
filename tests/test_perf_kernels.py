"""The vectorised kernels against straightforward float64 references where the first property tests
(tests/test_kernels.py) reach little: many blocks (the running maximum of the relative difference
skips blocks that cannot beat it), tiny and subnormal magnitudes, the quantized-vs-float kernel
(per channel, blockwise, per-column scales), and the comparison's own read buffers."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckdiff.compare.diff import Options, compare_tensor
from ckdiff.compare.kernels import BLOCK, ScaledStats, Side, Stats, as_kernel_input
from ckdiff.tensor.lazy import EagerTensor

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def ref_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    fin = torch.isfinite(x) & torch.isfinite(y)
    d = (x - y).abs()
    rel = torch.where(d > 0, torch.where(fin & (x.abs() > 0), d / x.abs(), math.inf), 0.0)
    return float(rel.max())


@st.composite
def many_blocks(draw):
    dt = draw(st.sampled_from(FLOATS))
    nblk = draw(st.integers(2, 24))
    n = nblk * BLOCK - draw(st.integers(0, BLOCK - 1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10**6)))
    mag = draw(st.sampled_from([1e-38, 1e-30, 1e-3, 1.0, 1e30]))
    if dt == torch.float16 and mag > 1e3:  # finite values only here (NaN/Inf: tests/test_kernels.py)
        mag = 1e3
    a = torch.randn(n, generator=g, dtype=torch.float64) * mag
    # relative noise that grows, shrinks or peaks anywhere, so the running maximum changes late
    shape = draw(st.sampled_from(["up", "down", "peak", "flat"]))
    pos = torch.linspace(0, 1, n, dtype=torch.float64)
    amp = {"up": pos, "down": 1 - pos, "peak": (pos - draw(st.floats(0, 1))).abs().neg().exp() ** 40,
           "flat": torch.ones(n, dtype=torch.float64)}[shape]
    b = a * (1 + 1e-2 * amp * torch.randn(n, generator=g, dtype=torch.float64))
    for _ in range(draw(st.integers(0, 4))):  # zeros and subnormals on either side
        i = draw(st.integers(0, n - 1))
        v = draw(st.sampled_from([0.0, -0.0, 1e-45, 1e-310, 5e-324]))
        (a if draw(st.booleans()) else b)[i] = v
    return a.to(dt), b.to(draw(st.sampled_from([dt, torch.float32, torch.float64])))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(many_blocks())
def test_max_rel_exact_over_many_blocks(case):
    a, b = case
    s = Stats()
    s.add(as_kernel_input(a), as_kernel_input(b), 0, 0.0, 0.0)
    assert s.max_rel == ref_rel(a, b)
    d = (a.double() - b.double()).abs()
    assert s.max_abs == float(d.max()) and s.max_idx == int(torch.nonzero(d == d.max())[0])
    assert s.over == int((d > 0).sum())


def test_max_rel_blocks_skipped_only_when_they_cannot_win():
    """A later block whose relative difference beats the earlier maximum by the last bit is found."""
    n = 8 * BLOCK
    a = torch.ones(n, dtype=torch.float64)
    b = a.clone()
    b[10] = 1 + 2.0 ** -30
    b[7 * BLOCK + 5] = 1 + 2.0 ** -30 + 2.0 ** -52  # beats it by one ulp of 1
    s = Stats()
    s.add(as_kernel_input(a), as_kernel_input(b), 0, 0.0, 0.0)
    assert s.max_rel == 2.0 ** -30 + 2.0 ** -52 and s.max_idx == 7 * BLOCK + 5


def quant_reference(w, q, scale_of, bound=1.5):
    """float64 reference of the quantized-vs-float metrics; ``scale_of`` [R, C] float32 per element. Sums and
    norms over the pairs where both sides are finite (the policy of the plain kernel)."""
    x = w.double()
    se = scale_of.float()
    deq = (q.float() * se).double()
    sd = se.double()
    d = (x - deq).abs()
    fin = d <= 1.7976931348623157e308
    ax = x.abs()
    rel = torch.where(fin & (d > 0), torch.where(ax > 0, d / ax, math.inf), 0.0)
    units = torch.where(fin, d / sd.abs().clamp_min(1e-30), math.inf)
    dd = torch.where(fin, d, math.inf)
    m = float(dd.max())
    return {"max_abs": m, "idx": int(torch.nonzero(dd.reshape(-1) == m)[0]), "sum": float(d[fin].sum()),
            "rel": float(rel.max()), "units": float(units.max()),
            "over": int((~fin | (d > bound * sd.abs())).sum()),
            "nan": int((~fin & torch.isnan(x)).sum()), "inf": int((~fin & ~torch.isnan(x)).sum()),
            "dot": float((x * deq)[fin].sum()), "na": float((x * x)[fin].sum()), "nb": float((deq * deq)[fin].sum()),
            "cmin": int(q.min()), "cmax": int(q.max())}


@st.composite
def quant_case(draw):
    kind = draw(st.sampled_from(["channel", "block", "column"]))
    R = draw(st.integers(1, 20))
    cdiv = draw(st.sampled_from([4, 16, 128]))
    C = cdiv * draw(st.integers(1, 5)) if kind == "block" else draw(st.integers(1, 300))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10**6)))
    dt = draw(st.sampled_from([torch.bfloat16, torch.float32, torch.float16]))
    w = (torch.randn(R, C, generator=g) * draw(st.sampled_from([1e-3, 1.0]))).to(dt)
    for _ in range(draw(st.integers(0, 3))):
        w[draw(st.integers(0, R - 1)), draw(st.integers(0, C - 1))] = draw(st.sampled_from(
            [math.nan, math.inf, -math.inf, 0.0, 1e-40]))
    q = torch.randint(-128, 128, (R, C), generator=g, dtype=torch.int8)
    if kind == "channel":
        scale = torch.rand(R, generator=g) * 0.01 + draw(st.sampled_from([0.0, 1e-4]))
        return w, q, scale.reshape(R, 1), (1, C), scale[:, None].expand(R, C)
    if kind == "block":
        nb = C // cdiv
        scale = torch.rand(R * nb, generator=g) * 0.01
        return w, q, scale.reshape(R, nb), (1, cdiv), scale.reshape(R, nb).repeat_interleave(cdiv, 1)
    scale = torch.rand(C, generator=g) * 0.01 + 1e-5
    return w, q, scale.reshape(1, C), (R, 1), scale[None, :].expand(R, C)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(quant_case(), st.integers(1, 4))
def test_quant_kernel_matches_reference(case, pieces):
    w, q, grid, block, full = case
    ref = quant_reference(w, q, full)
    st_ = ScaledStats()
    R = w.shape[0]
    step = max(1, -(-R // pieces))
    for lo in range(0, R, step):  # row blocks, as compare/quantized.py streams them
        hi = min(R, lo + step)
        g = grid if block[0] > 1 else grid[lo:hi]
        st_.add(Side(w[lo:hi]), Side(q[lo:hi], 1, g, block), 0.0, 1.5, lo * w.shape[1])
    assert st_.max_abs == ref["max_abs"] and st_.max_idx == ref["idx"]
    assert (st_.over, st_.nan_a, st_.inf_a) == (ref["over"], ref["nan"], ref["inf"])
    assert st_.max_rel == ref["rel"]
    assert st_.max_units == pytest.approx(ref["units"], rel=1e-12)
    assert st_.sum_abs == pytest.approx(ref["sum"], rel=1e-9, abs=1e-300)
    for k in ("dot", "na", "nb"):
        assert getattr(st_, k) == pytest.approx(ref[k], rel=1e-9, abs=1e-300)


def test_quant_reference_can_fail():
    """One code off by 3 scales is found at its index and counted over both bounds."""
    w = torch.randn(5, 64).to(torch.bfloat16)
    scale = w.float().abs().amax(1) / 127
    q = torch.round(w.float() / scale[:, None]).to(torch.int8)
    q[3, 17] = (q[3, 17].int() - 3 if q[3, 17] > 0 else q[3, 17].int() + 3).to(torch.int8)
    st_ = ScaledStats()
    st_.add(Side(w), Side(q, 1, scale.reshape(5, 1), (1, 64)), 0.0, 1.5, 0)
    assert st_.max_idx == 3 * 64 + 17 and st_.over == 1 and 2.4 < st_.max_units < 3.6


def test_float16_decoded_exactly_for_every_bit_pattern():
    """float16 is decoded by bit arithmetic (not a table): every one of the 65536 patterns, NaN,
    Inf, subnormals and -0.0 included, equals its float64 value."""
    import numpy as np
    h = torch.from_numpy(np.arange(65536, dtype=np.uint16).view(np.int16)).view(torch.float16)
    r = compare_tensor("h", EagerTensor("h", h), EagerTensor("h", h.double()), Options())
    assert r.status == "cast" and r.max_abs == 0.0 and r.n_over_tol == 0 and r.max_rel == 0.0
    assert (r.nan_a, r.nan_b, r.inf_a, r.inf_b) == (2046, 2046, 2, 2)
    b = h.double().clone()
    b[0x3C00] = 1.0 + 2.0 ** -20  # 1.0 in float16, moved by less than its ulp
    r = compare_tensor("h", EagerTensor("h", h), EagerTensor("h", b), Options(atol=0.0, rtol=0.0))
    assert r.max_abs == 2.0 ** -20 and r.max_abs_index == [0x3C00] and r.n_over_tol == 1


@st.composite
def scaled_sides(draw):
    """Two sides of [R, C] rows, each plain, codes (int8 or float8) times a block grid, or dense values with units."""
    from ckdiff.tensor.blockscaled import Scaled
    R, C = draw(st.integers(1, 12)), draw(st.integers(1, 700))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10**6)))
    x = torch.randn(R, C, generator=g) * 0.1

    def side():
        kind = draw(st.sampled_from(["plain", "int8", "fp8", "dense"]))
        if kind == "plain":
            return kind, (x * (1 + 1e-3 * torch.randn(R, C, generator=g))).to(draw(st.sampled_from(
                [torch.float32, torch.bfloat16]))), None
        br, bc = draw(st.sampled_from([1, 2, 5])), draw(st.sampled_from([1, 7, 32, 4096]))
        grid = torch.rand(-(-R // br), -(-C // bc), generator=g) * 0.01 + 1e-4
        s = Scaled(x, grid, (br, bc))
        if kind == "dense":
            return kind, x.clone(), Scaled(x.clone(), grid.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:R, :C],
                                           (1, 1), dense=True)
        codes = (x / s.per_element())
        codes = codes.round().clamp(-128, 127).to(torch.int8) if kind == "int8" else codes.to(torch.float8_e4m3fn)
        return kind, None, Scaled(codes, grid, (br, bc))
    return side(), side(), draw(st.sampled_from([0.0, 0.5, 1.5]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scaled_sides())
def test_scaled_kernel_matches_reference_for_every_kind_of_side(case):
    """Every combination of sides through the one kernel (the general path and the int8 fast path)
    against values and units computed in torch from the block-scaled protocol."""
    from ckdiff.tensor.blockscaled import step_table
    (ka, pa, sa), (kb, pb, sb), bound = case

    def kside(k, p, s):
        if k == "plain":
            return Side(p), p.double(), torch.zeros(p.shape, dtype=torch.float64)
        if s.dense:
            return Side(s.codes, 2, s.grid, (1, 1)), s.values().double(), s.units().double()
        return Side(s.codes, 1, s.grid, s.block, step_table(s.codes.dtype)), s.values().double(), s.units().double()
    (A, xa, ua), (B, xb, ub) = kside(ka, pa, sa), kside(kb, pb, sb)
    st_ = ScaledStats()
    st_.add(A, B, bound if ka != "plain" else 0.0, bound if kb != "plain" else 0.0, 0)
    ba, bb = (bound if ka != "plain" else 0.0), (bound if kb != "plain" else 0.0)
    d = (xa - xb).abs()
    assert st_.over == int((d > ba * ua + bb * ub).sum())
    assert st_.max_abs == float(d.max()) and st_.max_idx == int(torch.nonzero(d.reshape(-1) == d.max())[0])
    assert st_.max_units == pytest.approx(float((d / (ua + ub).clamp_min(1e-30)).max()), rel=1e-12)
    assert st_.sum_abs == pytest.approx(float(d.sum()), rel=1e-9, abs=1e-300)
