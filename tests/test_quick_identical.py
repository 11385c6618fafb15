"""The identical pair of plain safetensors files decided without torch (ckdiff/compare/quick.py): the same
result as the full comparison, row for row, wherever it answers, and declined wherever anything could
differ. Files here are written by the safetensors package (``safetensors.torch.save_file``)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.compare.quick import identical_safetensors
from ckdiff.formats.readers import open_checkpoint
from ckdiff.golden.models import hf_state, tiny_config


def _full(a, b):
    return compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)), Options())


def _same(a, b):
    quick = identical_safetensors(str(a), str(b))
    assert quick is not None
    full = _full(a, b)
    assert quick.to_dict() == full.to_dict()
    assert quick.equivalent and full.equivalent


@pytest.mark.parametrize("family", ["llama-gqa", "mixtral", "gemma", "qwen2", "qwen3", "falcon-7b", "gpt-oss"])
def test_same_result_as_the_full_comparison_on_each_family(tmp_path, family):
    state = {k: v.contiguous() for k, v in hf_state(tiny_config(family), 0).items()}
    save_file(state, tmp_path / "a.safetensors")
    save_file(state, tmp_path / "b.safetensors", metadata={"format": "pt"})
    _same(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


def test_same_result_on_odd_values_and_layouts(tmp_path):
    """NaN and inf, an empty tensor, a scalar, every floating dtype, and B's tensors in another order."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 3, generator=g)
    x[1, 1], x[2, 0], x[4, 2] = float("nan"), float("inf"), float("-inf")
    st = {"w": x, "h": torch.randn(4, 2, generator=g).half(), "b": torch.randn(6, generator=g).bfloat16(),
          "d": torch.randn(2, 2, generator=g).double(), "e": torch.empty(0, 3), "s": torch.tensor(2.5)}
    save_file(st, tmp_path / "a.safetensors")
    save_file(dict(reversed(list(st.items()))), tmp_path / "b.safetensors")
    _same(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    _same(tmp_path / "a.safetensors", tmp_path / "a.safetensors")


@pytest.mark.parametrize("case", ["one element", "int8 codes", "fp8", "file metadata", "names", "shape"])
def test_declined_where_the_answer_needs_the_full_comparison(tmp_path, case):
    g = torch.Generator().manual_seed(8)
    a = {"w": torch.randn(8, 4, generator=g), "v": torch.randn(4, generator=g)}
    b = {k: v.clone() for k, v in a.items()}
    meta = None
    if case == "one element":
        b["w"][3, 1] += 1e-3
    elif case == "int8 codes":
        a["q"] = b["q"] = torch.randint(-100, 100, (4, 4), generator=g, dtype=torch.int8)
    elif case == "fp8":
        a["w"] = b["w"] = a["w"].to(torch.float8_e4m3fn)
    elif case == "file metadata":
        meta = {"format": "mlx"}
    elif case == "names":
        b["u"] = b.pop("v")
    else:
        b["w"] = b["w"].reshape(4, 8).contiguous()
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors", metadata=meta)
    assert identical_safetensors(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")) is None


def test_invalid_and_special_inputs_are_left_to_the_reader(tmp_path, run_cli):
    import os
    good = tmp_path / "a.safetensors"
    save_file({"w": torch.randn(3, 3)}, good)
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(good.read_bytes()[:-4])  # truncated
    assert identical_safetensors(str(good), str(bad)) is None
    code, _, err = run_cli(good, bad)
    assert code == 2 and "b.safetensors" in err and len(err.strip().splitlines()) == 1
    fifo = tmp_path / "f.safetensors"
    os.mkfifo(fifo)
    assert identical_safetensors(str(good), str(fifo)) is None  # never opened: a FIFO would block


def test_identical_pair_runs_without_torch(tmp_path):
    save_file({"w": torch.randn(16, 16), "b": torch.randn(16).bfloat16()}, tmp_path / "a.safetensors")
    save_file({"w": torch.randn(16, 16), "b": torch.randn(16).bfloat16()}, tmp_path / "c.safetensors")
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes())
    probe = ("import sys, json; from ckdiff.cli import main; code = main(sys.argv[1:]); "
             "print(json.dumps([code, 'torch' in sys.modules, 'numba' in sys.modules]))")
    same = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert json.loads(same.stdout.strip().splitlines()[-1]) == [0, False, False], same.stdout + same.stderr
    assert "EQUIVALENT: 2 tensors (2 equal)" in same.stdout
    differ = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "a.safetensors"),
                             str(tmp_path / "c.safetensors")], capture_output=True, text=True, timeout=120)
    code, torch_loaded, numba_loaded = json.loads(differ.stdout.strip().splitlines()[-1])
    # a differing pair is decided by the torch-free lane (compare/lane.py, tests/test_lane.py): numba's kernels
    assert code == 1 and not torch_loaded and numba_loaded


def test_terminal_output_is_the_full_comparisons(tmp_path, run_cli):
    state = {k: v.contiguous() for k, v in hf_state(tiny_config("llama-gqa"), 1).items()}
    save_file(state, tmp_path / "a.safetensors")
    save_file(state, tmp_path / "b.safetensors")
    quick = run_cli(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    full = run_cli(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--atol", "0")  # declines the quick path
    assert quick[0] == full[0] == 0 and quick[1] == full[1]
