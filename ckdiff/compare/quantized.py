"""The one comparator for block-scaled tensors (``tensor/blockscaled.py``) against a float tensor or another
encoding, judged element by element in units of each element's own block scale.

Element ``i`` is within tolerance when ``|a_i - b_i| <= bound_a * unit_a_i + bound_b * unit_b_i``: a correct
encoding is at most its bound (about one step) from the float it encodes, on each encoded side; a float side
contributes 0. The sglang weight checker uses the same per-element rule (a mean error lets per-element
corruption hide). Two tensors of the same encoding compare their stored codes and scales exactly. Rows are
streamed in bounded blocks, read on a thread one block ahead, through one numba kernel
(``kernels.ScaledStats``) that decodes codes and multiplies the scales itself.
"""
from __future__ import annotations

import math

import torch

from ckdiff.formats.readers import dtype_name
from ckdiff.tensor.blockscaled import BlockScaled
from ckdiff.compare.result import TensorResult
from ckdiff.compare.stream import _fill_stats, _prefetch
from ckdiff.compare.kernels import ScaledStats, Side
from ckdiff.compare.status import Status


def kind(t) -> str:
    """What a report shows in the dtype column: the encoding of a view, else the dtype."""
    return t.encoding if isinstance(t, BlockScaled) else dtype_name(t.dtype)


def _flat(t: torch.Tensor, C: int) -> torch.Tensor:
    return t.reshape(-1, C)


def _side(t, lo: int, hi: int, C: int, problems: list) -> tuple[Side, float]:
    """Kernel side of rows [lo, hi) of ``t`` and its bound (0 for a float side)."""
    if not isinstance(t, BlockScaled):
        return Side(_flat(t.rows(lo, hi), C)), 0.0
    s = t.scaled(lo, hi)
    for p in t.problems(s):
        if p not in problems:
            problems.append(p)
    if s.dense:
        return Side(_flat(s.codes.float(), C), 2, s.grid, (1, 1)), t.bound or 0.0
    return Side(_flat(s.codes, C), 1, s.grid, s.block, s.step_table()), t.bound or 0.0


def _step(ta, tb, chunk_bytes: int) -> int:
    """Rows per block: about ``chunk_bytes`` of float32-equivalent elements, a multiple of both views'
    row alignment (a block row of FP8 scales)."""
    row = max(1, math.prod(ta.shape[1:]))
    align = math.lcm(*(t.row_align if isinstance(t, BlockScaled) else 1 for t in (ta, tb)))
    step = max(1, chunk_bytes // (4 * row))
    return max(align, step // align * align)


def _same_encoding(ta, tb) -> bool:
    return isinstance(ta, BlockScaled) and isinstance(tb, BlockScaled) and type(ta) is type(tb) \
        and ta.encoding == tb.encoding


def compare_scaled(name: str, ta, tb, chunk_bytes: int = 32 << 20) -> TensorResult:
    """``ta`` vs ``tb`` (lazy, at least one block-scaled), streamed by row blocks through one kernel.
    Row blocks of 32 MiB of float32-equivalent rows keep the kernel launches few."""
    r = TensorResult(name=name, status=Status.QUANT, shape_a=ta.shape, shape_b=tb.shape,
                     dtype_a=kind(ta), dtype_b=kind(tb), numel=ta.numel)
    if tuple(ta.shape) != tuple(tb.shape):
        r.status, r.bit_exact = Status.SHAPE, False
        return r
    n = ta.nrows
    step = _step(ta, tb, chunk_bytes)
    if _same_encoding(ta, tb):
        if all(torch.equal(ta.raw(lo, min(n, lo + step)), tb.raw(lo, min(n, lo + step))) for lo in range(0, n, step)):
            r.status, r.bit_exact, r.cosine, r.tol_source = Status.EQUAL, True, 1.0 if ta.numel else None, \
                "exact (codes and scales)"
            r.note = f"{ta.encoding} codes and scales identical"
            return r
    C = ta.shape[-1] if ta.shape else 1
    problems: list = []

    def blocks():
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            (sa, ba), (sb, bb) = _side(ta, lo, hi, C, problems), _side(tb, lo, hi, C, problems)
            yield lo, sa, sb, ba, bb
    st = ScaledStats()
    ba = bb = 0.0
    # one torch thread on the reader: an OpenMP team of its own would spin beside the kernel's threads
    for lo, sa, sb, ba, bb in _prefetch(blocks(), torch_threads=1):
        st.add(sa, sb, ba, bb, lo * max(1, ta.numel // max(1, n)))
    _fill_stats(r, st, ta.shape, ta.numel)
    r.bit_exact = False
    r.tol_source = " + ".join(f"{t.encoding}: {t.bound} x scale" for t in (ta, tb) if isinstance(t, BlockScaled))
    r.note = f"dequantized; max error {st.max_units:.3g} x scale ({r.tol_source})"
    if problems:
        r.note += "; " + "; ".join(problems)
    if st.over or problems:
        r.status = Status.DIFFER
    return r


__all__ = ["compare_scaled", "kind"]
