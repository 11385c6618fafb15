"""Compare reads file-backed tensors through maps of the page cache (safetensors windows)."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckdiff.compare.diff import Options, compare_tensor
from ckdiff.tensor.lazy import EagerTensor
from ckdiff.io.safetensors import SafetensorsFile
from ckdiff.errors import InputError


def _pair(tmp_path, a, b):
    save_file({"w": a}, tmp_path / "a.safetensors")
    save_file({"w": b}, tmp_path / "b.safetensors")
    return (SafetensorsFile(tmp_path / "a.safetensors").tensors()["w"],
            SafetensorsFile(tmp_path / "b.safetensors").tensors()["w"])


@pytest.mark.parametrize("chunk", [64, 4096, 1 << 20])
def test_windows_give_the_metrics_of_the_tensors(tmp_path, chunk):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 129, generator=g).to(torch.bfloat16)
    b = a.clone()
    b[20:] = (a[20:].float() * (1 + 1e-2 * torch.randn(17, 129, generator=g))).to(torch.bfloat16)
    ta, tb = _pair(tmp_path, a, b)
    opts = Options(chunk_bytes=chunk)
    got = compare_tensor("w", ta, tb, opts)
    ref = compare_tensor("w", EagerTensor("w", a), EagerTensor("w", b), opts)
    assert got.status == ref.status == "differ"
    assert (got.max_abs, got.max_abs_index, got.n_over_tol, got.cosine) == \
        (ref.max_abs, ref.max_abs_index, ref.n_over_tol, ref.cosine)
    assert got.max_abs_index[0] >= 20
    assert abs(got.mean_abs - ref.mean_abs) <= 1e-12 * max(1.0, ref.mean_abs)
    same = compare_tensor("w", ta, ta, opts)
    assert same.status == "equal" and same.bit_exact


def test_window_is_the_file_bytes_at_any_offset(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3 * 4096 + 77, dtype=np.uint8)
    save_file({"x": torch.from_numpy(data.copy())}, tmp_path / "x.safetensors")
    f = SafetensorsFile(tmp_path / "x.safetensors")
    for off, n in [(0, 1), (1, 4096), (4095, 4098), (5000, 3 * 4096 + 77 - 5000), (7, 0)]:
        assert np.array_equal(f.window(off, n), data[off:off + n])


def test_a_file_that_shrinks_while_read_is_one_clear_error(tmp_path):
    a = torch.randn(256, 256)
    ta, tb = _pair(tmp_path, a, a + 1)
    with open(tmp_path / "b.safetensors", "r+b") as fh:
        fh.truncate(4096)
    with pytest.raises(InputError, match="shrank"):
        compare_tensor("w", ta, tb, Options())


def test_a_file_system_that_cannot_map_is_read_instead(tmp_path, monkeypatch):
    import mmap as mmap_mod

    from ckdiff.io import safetensors as safetensors_io

    def refuse(*a, **k):
        raise OSError(19, "No such device")
    data = np.random.default_rng(1).integers(0, 256, 10000, dtype=np.uint8)
    save_file({"x": torch.from_numpy(data.copy())}, tmp_path / "x.safetensors")
    f = SafetensorsFile(tmp_path / "x.safetensors")
    monkeypatch.setattr(safetensors_io.mmap, "mmap", refuse)
    assert safetensors_io.mmap is mmap_mod
    assert np.array_equal(f.window(123, 5000), data[123:5123])


@pytest.mark.parametrize("where", [0, (6 << 20) - 1, 3 << 20, (3 << 20) + 1])
def test_byte_check_in_two_halves_finds_a_difference_anywhere(where):
    from ckdiff.compare.kernels import bytes_equal as _equal
    a = np.random.default_rng(2).integers(0, 256, 6 << 20, dtype=np.uint8)
    b = a.copy()
    assert _equal(a, b)
    b[where] ^= 1
    assert not _equal(a, b) and not _equal(b, a)
