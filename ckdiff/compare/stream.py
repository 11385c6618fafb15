"""Streaming two tensors chunk by chunk: element ranges, page-cache windows of file-backed sides, rows gathered
through a table on a read-ahead thread, and the kernel inputs of a chunk."""
from __future__ import annotations


import math
import queue
import threading
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np

if TYPE_CHECKING:
    import torch

    from ckdiff.tensor.lazy import LazyTensor


def _raw(t: LazyTensor) -> bool:
    """A tensor stored as plain bytes at ``lo`` of a file that maps windows (safetensors)."""
    return hasattr(t, "lo") and hasattr(getattr(t, "file", None), "window")


def _prefetch(items: Iterator, depth: int = 1, torch_threads: Optional[int] = None) -> Iterator:
    """Iterate ``items`` on a reader thread, ``depth`` items ahead (torch ops release the GIL).
    ``torch_threads``: torch's intra-op threads for the reader thread's own ops (a per-thread setting)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def run():
        if torch_threads:
            import torch  # a caller that sets torch's threads has loaded it
            torch.set_num_threads(torch_threads)
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put((done, e))

    th = threading.Thread(target=run, name="ckdiff-read-ahead", daemon=True)
    th.start()
    try:
        while True:
            x = q.get()
            if isinstance(x, tuple) and len(x) == 2 and x[0] is done:
                if x[1] is not None:
                    raise x[1]
                return
            yield x
    finally:
        stop.set()
        th.join()


def _window(t, lo: int, hi: int, ahead: int = 0) -> np.ndarray:
    """Raw bytes of elements [lo, hi) of a file-backed tensor, over a map of the page cache (no
    copy); the next ``ahead`` elements are asked of the disk meanwhile (a cold cache)."""
    isz = t.dtype.itemsize
    if ahead:
        t.file.will_need(t.lo + hi * isz, ahead * isz)
    return t.file.window(t.lo + lo * isz, (hi - lo) * isz)


def _read_rows(t: LazyTensor, lo: int, hi: int, row: int) -> torch.Tensor:
    if not t.shape:
        return t.load().reshape(1)
    return t.rows(lo // row, hi // row).contiguous().reshape(-1)


def _ranges(ta: LazyTensor, tb: LazyTensor, chunk_bytes: int, raw: bool) -> tuple[list, int]:
    """Element ranges covering both tensors; whole rows unless both sides are file-backed."""
    n = ta.numel
    isz = max(ta.dtype.itemsize, tb.dtype.itemsize)
    row = max(1, n // max(1, ta.nrows)) if ta.shape else 1
    if raw:
        step = max(1, chunk_bytes // isz)
    else:  # rows gathered through a table (a TP merge, a QKV split) pass through temporaries several
        # times their size: 2 MiB at a time keeps the peak flat (HF vs Megatron TP=2, 1 GiB: peak
        # RssAnon 436 MiB with 8 MiB, 255 MiB with 2 MiB, no slower)
        step = max(1, max(1, chunk_bytes // 16) // max(1, row * isz)) * row
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)], row


def _pairs(ta, tb, ranges, row: int) -> Iterator:
    """(lo, hi, chunk a, chunk b) for each range: a file-backed side as its raw bytes over a map
    (uint8 numpy, nothing copied), any other side as a flat tensor gathered through its table.
    Chunks with a gathered side are made on a thread one chunk ahead. (Two gathering threads were
    no faster and raced on a group's computed outputs: 4 GiB HF vs Megatron TP=2, 240 -> 669 MiB.)"""
    raw_a, raw_b = _raw(ta), _raw(tb)

    def gen():
        for lo, hi in ranges:
            ahead = hi - lo
            ca = _window(ta, lo, hi, min(ahead, ta.numel - hi)) if raw_a else _read_rows(ta, lo, hi, row)
            cb = _window(tb, lo, hi, min(ahead, tb.numel - hi)) if raw_b else _read_rows(tb, lo, hi, row)
            yield lo, hi, ca, cb
    return gen() if (raw_a and raw_b) or len(ranges) < 2 else _prefetch(gen())


def _kin(x, dtype):
    """Kernel input (compare/kernels.py) for a chunk: raw bytes of ``dtype`` or a tensor."""
    if isinstance(x, np.ndarray):
        from ckdiff.compare.kernels import plan  # numba: loaded once a chunk differs
        p = plan(dtype)
        if p is not None:
            return x, x.size // dtype.itemsize, p[0], p[1]
        import torch  # integers wider than 16 bits are converted through torch (never a float checkpoint's)
        x = torch.frombuffer(x, dtype=dtype) if x.size else torch.empty(0, dtype=dtype)
    from ckdiff.compare.kernels import as_kernel_input
    return as_kernel_input(x)


def _unravel(flat: int, shape) -> list:
    idx = []
    for s in reversed(shape):
        idx.append(flat % s if s else 0)
        flat //= s if s else 1
    return list(reversed(idx))


def _fill_stats(r, st, shape, numel: int) -> None:
    """A TensorResult's figures from a kernel accumulator (Stats or ScaledStats) of the whole tensor."""
    r.max_abs = max(0.0, st.max_abs)
    r.max_abs_index = _unravel(st.max_idx, shape) if st.max_idx is not None else None
    r.mean_abs = st.sum_abs / max(1, numel)
    r.max_rel = st.max_rel
    r.cosine = st.cosine
    r.norm_a, r.norm_b = math.sqrt(max(0.0, st.na)), math.sqrt(max(0.0, st.nb))
    r.n_over_tol = st.over
    r.nan_a, r.nan_b, r.inf_a, r.inf_b = st.nan_a, st.nan_b, st.inf_a, st.inf_b


def _new_stats():
    from ckdiff.compare.kernels import Stats  # numba: loaded once a chunk differs
    return Stats()
