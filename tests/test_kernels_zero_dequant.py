"""Quantized-vs-float metrics where elements dequantize to 0 (relative error exactly 1)."""
import pytest
import torch

from ckdiff.compare.kernels import ScaledStats, Side
from tests.test_perf_kernels import quant_reference


def _quantize(w):
    scale = w.float().abs().amax(1) / 127
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@pytest.mark.parametrize("flip", [None, "early", "late"])
def test_max_rel_with_zero_codes_is_exact(flip):
    g = torch.Generator().manual_seed(5)
    R, C = 64, 2048
    w = (torch.randn(R, C, generator=g) * 0.02).to(torch.bfloat16)
    q, scale = _quantize(w)
    assert int((q == 0).sum()) > R  # many elements dequantize to 0: their relative error is exactly 1
    if flip:  # one code of the wrong sign: a relative error above 1, in the first or the last block
        i = 1 if flip == "early" else R - 2
        j = int(torch.nonzero(q[i] > 3)[0])
        q[i, j] = -q[i, j]
    ref = quant_reference(w, q, scale[:, None].expand(R, C))
    st = ScaledStats()
    for lo in range(0, R, 16):
        st.add(Side(w[lo:lo + 16]), Side(q[lo:lo + 16], 1, scale[lo:lo + 16].reshape(-1, 1), (1, C)), 0.0, 1.5, lo * C)
    assert st.max_rel == ref["rel"]
    assert (st.max_rel == 1.0) == (flip is None)
    assert st.max_abs == ref["max_abs"] and st.max_idx == ref["idx"]


def test_max_rel_when_only_zero_codes_differ():
    """Every other element dequantizes exactly: the relative error 1 comes from the zero codes alone."""
    g = torch.Generator().manual_seed(6)
    R, C = 8, 512
    q = torch.randint(-127, 128, (R, C), generator=g, dtype=torch.int8)
    q[q == 0] = 1
    scale = torch.full((R,), 2.0 ** -10)
    w = (q.float() * scale[:, None]).to(torch.bfloat16)
    assert torch.equal(w.float(), q.float() * scale[:, None])  # exact
    w[3, 7] = 1e-6  # quantizes to 0
    q[3, 7] = 0
    ref = quant_reference(w, q, scale[:, None].expand(R, C))
    st = ScaledStats()
    st.add(Side(w), Side(q, 1, scale.reshape(R, 1), (1, C)), 0.0, 1.5, 0)
    assert ref["rel"] == 1.0 and st.max_rel == 1.0
