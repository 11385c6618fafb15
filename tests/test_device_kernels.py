"""The torch metrics (compare/kernels_torch.py, run by ``--device cuda``) against the numba kernels.

No GPU here: the same torch code runs on the CPU (``Options(device="cpu")``) and must give the numba path's
statuses, counts, maxima and their indices exactly, and its sums to rounding. Pairs: one element changed,
every element changed, a cast, a permutation of rows, NaN/Inf/-0.0 placed at random, every supported dtype,
chunk sizes that put boundaries anywhere, in memory and over safetensors files (written by ckdiff's own
safetensors writer; the tests of that writer check it against the safetensors library).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckdiff.compare.diff import Options, compare_tensor
from ckdiff.tensor.lazy import EagerTensor
from ckdiff.io.safetensors import read_safetensors, write_safetensors

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.int16, torch.int32, torch.uint8, torch.bool]
SPECIAL = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-40, 1e-310]
EXACT = ("status", "bit_exact", "max_abs", "max_abs_index", "n_over_tol", "nan_a", "nan_b", "inf_a", "inf_b",
         "max_rel", "atol", "rtol", "tol_source", "note")


def _rand(dtype, n, g, scale=1.0):
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, (n,), generator=g).to(dtype)


@st.composite
def cases(draw):
    da = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10**6)))
    cols = draw(st.sampled_from([1, 5, 64]))
    rows = draw(st.integers(2, 90))
    n = rows * cols
    a = _rand(da, n, g, draw(st.sampled_from([1e-3, 1.0, 300.0])))
    if da.is_floating_point:
        for pos, v in draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIAL)), max_size=5)):
            a[pos % n] = v
    kind = draw(st.sampled_from(["one", "all", "cast", "permuted", "same"]))
    b = a.clone()
    if kind == "one":
        b[draw(st.integers(0, n - 1))] = draw(st.sampled_from([1, 0, -2] + ([math.nan, math.inf] if da.is_floating_point else [])))
    elif kind == "all":
        b = _rand(da, n, g)
    elif kind == "cast" and da.is_floating_point:
        b = a.to(draw(st.sampled_from([t for t in (torch.float32, torch.bfloat16, torch.float16) if t != da])))
    elif kind == "permuted":
        b = a.reshape(rows, cols)[torch.randperm(rows, generator=g)].reshape(-1)
    shape = (rows, cols) if cols > 1 else (n,)
    tol = draw(st.sampled_from([(None, None), (0.0, 0.0), (1e-5, 1e-3)]))
    chunk = draw(st.sampled_from([8, 96, 1000, 1 << 20]))
    return a.reshape(shape), b.reshape(shape), tol, chunk


def _same(r, t):
    for f in EXACT:
        x, y = getattr(r, f), getattr(t, f)
        assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), (f, x, y)
    for f in ("mean_abs", "cosine", "norm_a", "norm_b"):
        x, y = getattr(r, f), getattr(t, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert y == pytest.approx(x, rel=1e-9, abs=1e-300, nan_ok=True), f


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_torch_metrics_match_the_numba_kernels(tmp_path_factory, case):
    a, b, (atol, rtol), chunk = case
    numba_opts = Options(atol=atol, rtol=rtol, chunk_bytes=chunk)
    torch_opts = Options(atol=atol, rtol=rtol, chunk_bytes=chunk, device="cpu")
    r = compare_tensor("t", EagerTensor("t", a), EagerTensor("t", b), numba_opts)
    t = compare_tensor("t", EagerTensor("t", a), EagerTensor("t", b), torch_opts)
    _same(r, t)
    # file-backed sides: raw bytes over mapped windows, staged by the torch path itself
    d = tmp_path_factory.mktemp("st")
    write_safetensors(d / "a.safetensors", [EagerTensor("t", a)])
    write_safetensors(d / "b.safetensors", [EagerTensor("t", b)])
    fa, fb = read_safetensors(d / "a.safetensors")["t"], read_safetensors(d / "b.safetensors")["t"]
    _same(r, compare_tensor("t", fa, fb, torch_opts))


def test_the_comparison_can_fail():
    # not vacuous: the torch path finds a one-element change at its index and a permutation of rows
    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 5, generator=g).to(torch.bfloat16)
    b = a.clone()
    b[20, 3] += 1.0
    r = compare_tensor("t", EagerTensor("t", a), EagerTensor("t", b), Options(chunk_bytes=64, device="cpu"))
    assert r.status == "differ" and r.max_abs_index == [20, 3] and r.n_over_tol == 1
    p = compare_tensor("t", EagerTensor("t", a), EagerTensor("t", a[torch.randperm(37, generator=g)]),
                       Options(device="cpu"))
    assert p.status == "differ" and p.n_over_tol > 0 and p.cosine < 0.5


def test_device_cuda_without_cuda_is_one_line_exit_2(tmp_path, capsys):
    from ckdiff.cli import main
    write_safetensors(tmp_path / "a.safetensors", [EagerTensor("w", torch.randn(4, 3))])
    if torch.cuda.is_available():  # with a GPU the run itself is the check: the verdict of the pair
        assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "--device", "cuda", "-q"]) == 0
        return
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda" in err[0] and "no CUDA device" in err[0], err
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "--device", "gpu0"]) == 2


def test_logits_on_an_explicit_device_give_the_same_result(tiny_hf):
    # the forward passes with the weights and ids placed on a named device (the CPU here) run the same code
    # as the default; a GPU run goes through exactly these placements
    from ckdiff.compare.logits import compare_logits
    from ckdiff.formats.readers import open_checkpoint
    a = open_checkpoint(str(tiny_hf("llama-gqa", "bfloat16", seed=1)))
    b = open_checkpoint(str(tiny_hf("llama-gqa", "bfloat16", seed=2)))  # other random weights: must differ
    run = dict(batch=2, length=12, seed=5, dtype="float32")
    base, dev = compare_logits(a, b, **run), compare_logits(a, b, **run, device="cpu")
    assert not base.equivalent and dev.equivalent == base.equivalent
    assert dev.to_dict() == base.to_dict()


def test_logits_device_cuda_without_cuda_is_one_line_exit_2(tiny_hf, capsys):
    from ckdiff.cli import main
    p = str(tiny_hf("llama-gqa", "bfloat16", seed=1))
    if torch.cuda.is_available():
        assert main(["logits", p, p, "--device", "cuda", "-q", "--length", "8", "--batch", "1"]) == 0
        return
    assert main(["logits", p, p, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0], err
