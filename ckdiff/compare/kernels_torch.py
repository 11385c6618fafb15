"""The compare metrics of compare/kernels.py (``Stats``) as torch operations on a chosen device.

``ckdiff A B --device cuda`` runs them on the GPU: each chunk is copied into one of two pinned host
buffers and sent with a non-blocking copy on a side stream, so that reading (page faults on the mapped
file, memcmp of the equal chunks) and the copy of the next chunk overlap the compute of this one; the
per-chunk results stay on the device and are folded once, when the tensor's metrics are asked for. With
``device="cpu"`` the same operations run on the host (the tests compare them with the numba kernels).

The semantics are those of ``kernels._metrics``, element by element in float64:
- both finite: d = |a - b| enters the sums (|d|, a.b, a.a, b.b); over tolerance when d > atol + rtol |a|;
  relative difference d / |a| (Inf where a is 0 and d > 0, 0 where d is 0);
- otherwise NaN and Inf are counted per side; both NaN or both the same Inf is d = 0, anything else is
  d = Inf, over tolerance and an Inf relative difference; such elements stay out of the sums;
- max |d| and its first flat index; sums kept per chunk and added in offset order.
Sums are reduced by torch in its own order, so they may differ from the numba kernel's in the last bits;
counts, maxima and their indices are identical.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ckdiff.errors import UsageError

_SUB = 1 << 22  # elements per pass: bounds the float64 temporaries (a few times 32 MiB)


def check_device(name: str) -> torch.device:
    """The torch device for ``--device NAME``; a UsageError (one line, exit 2) when it cannot run here."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {name!r}: expected cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available here (torch {torch.__version__}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise UsageError(f"--device {name!r}: expected cpu or cuda[:N]")
    return dev


class _Stager:
    """Host chunks to the device: two pinned buffers used in turn, each reused only after the copy out
    of it has finished (a CUDA event), the copies on their own stream so they overlap compute."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.bufs: list = [None, None]
        self.events: list = [None, None]
        self.turn = 0
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def put(self, x, dtype: torch.dtype) -> torch.Tensor:
        """``x``: raw bytes (uint8 numpy, a mapped window) of ``dtype`` elements, or a tensor."""
        if isinstance(x, np.ndarray):
            t = torch.frombuffer(x, dtype=torch.uint8) if x.size else torch.empty(0, dtype=torch.uint8)
        else:
            t = x.contiguous().reshape(-1)
            dtype = t.dtype
            t = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        if not self.cuda:
            return t.view(dtype) if t.numel() else torch.empty(0, dtype=dtype)
        k = self.turn
        self.turn ^= 1
        if self.events[k] is not None:
            self.events[k].synchronize()  # the previous copy out of this buffer is done
        buf = self.bufs[k]
        if buf is None or buf.numel() < t.numel():
            buf = self.bufs[k] = torch.empty(max(t.numel(), 1), dtype=torch.uint8, pin_memory=True)
        host = buf[:t.numel()]
        host.copy_(t)
        with torch.cuda.stream(self.stream):
            dev = host.to(self.device, non_blocking=True)
            ev = self.events[k] = torch.cuda.Event()
            ev.record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(ev)
        dev.record_stream(torch.cuda.current_stream(self.device))
        return dev.view(dtype) if dev.numel() else torch.empty(0, dtype=dtype, device=self.device)


def chunk_metrics(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float):
    """(float64 [sum |d|, a.b, a.a, b.b, max |d|, max rel], int64 [index of max |d|, over, NaN a, NaN b,
    Inf a, Inf b]) of two flat chunks of equal length, on their device, without a host sync."""
    x = a.to(torch.float64)
    y = b.to(torch.float64)
    fin = torch.isfinite(x) & torch.isfinite(y)
    xs = torch.where(fin, x, 0.0)
    ys = torch.where(fin, y, 0.0)
    d = (xs - ys).abs()
    ax = xs.abs()
    xn, yn = torch.isnan(x), torch.isnan(y)
    bad = ~fin & ~((xn & yn) | (x == y))  # a NaN against a number, or different infinities
    dd = torch.where(bad, math.inf, d)
    over = (fin & (d > atol + rtol * ax)).sum() + bad.sum()
    rel = torch.where(d > 0.0, d / ax, 0.0)  # d > 0 only where both are finite
    rel = torch.where(bad, math.inf, rel)
    mx, idx = dd.max(0)  # the first index of the maximum
    f = torch.stack([d.sum(), (xs * ys).sum(), (xs * xs).sum(), (ys * ys).sum(), mx, rel.max()])
    i = torch.stack([idx, over, xn.sum(), yn.sum(), torch.isinf(x).sum(), torch.isinf(y).sum()])
    return f, i


class TorchStats:
    """``kernels.Stats`` on a torch device: ``input`` stages a chunk, ``add`` queues its metrics; the
    attributes (max_abs, max_idx, sums, counts) are folded on the host on first access."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stage = _Stager(device)
        self._parts: list = []  # (offset, f, i) still on the device
        self._done: Optional[dict] = None

    def input(self, x, dtype: torch.dtype) -> torch.Tensor:
        return self._stage.put(x, dtype)

    def add(self, a: torch.Tensor, b: torch.Tensor, offset: int, atol: float, rtol: float) -> None:
        n = a.numel()
        if n != b.numel():
            raise ValueError(f"chunks of {n} and {b.numel()} elements")
        for lo in range(0, n, _SUB):
            hi = min(n, lo + _SUB)
            f, i = chunk_metrics(a[lo:hi], b[lo:hi], float(atol), float(rtol))
            self._parts.append((offset + lo, f, i))
        self._done = None

    def _fold(self) -> dict:
        if self._done is not None:
            return self._done
        out = dict(max_abs=-1.0, max_idx=None, max_rel=0.0, over=0, nan_a=0, nan_b=0, inf_a=0, inf_b=0,
                   sum_abs=0.0, dot=0.0, na=0.0, nb=0.0)
        if self._parts:
            parts = sorted(self._parts, key=lambda p: p[0])
            F = torch.stack([p[1] for p in parts]).cpu().numpy()
            I = torch.stack([p[2] for p in parts]).cpu().numpy()
            for k, key in enumerate(("sum_abs", "dot", "na", "nb")):
                out[key] = float(sum(float(v) for v in F[:, k]))  # in offset order, as kernels._Sums
            for (off, _, _), fr, ir in zip(parts, F, I):
                m, idx = float(fr[4]), off + int(ir[0])
                if m > out["max_abs"]:  # parts in offset order: the first index of the maximum wins
                    out["max_abs"], out["max_idx"] = m, idx
            out["max_rel"] = max(0.0, float(F[:, 5].max()))
            out["over"], out["nan_a"], out["nan_b"], out["inf_a"], out["inf_b"] = (int(v) for v in I[:, 1:].sum(0))
        self._done = out
        return out

    max_abs = property(lambda self: self._fold()["max_abs"])
    max_idx = property(lambda self: self._fold()["max_idx"])
    max_rel = property(lambda self: self._fold()["max_rel"])
    over = property(lambda self: self._fold()["over"])
    nan_a = property(lambda self: self._fold()["nan_a"])
    nan_b = property(lambda self: self._fold()["nan_b"])
    inf_a = property(lambda self: self._fold()["inf_a"])
    inf_b = property(lambda self: self._fold()["inf_b"])
    sum_abs = property(lambda self: self._fold()["sum_abs"])
    dot = property(lambda self: self._fold()["dot"])
    na = property(lambda self: self._fold()["na"])
    nb = property(lambda self: self._fold()["nb"])

    @property
    def cosine(self):
        if self.na > 0 and self.nb > 0:
            return self.dot / math.sqrt(self.na * self.nb)
        return None
