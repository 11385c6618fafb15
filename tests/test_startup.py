"""Start-up: help pays only for what it prints. ``ckdiff --help`` and ``ckdiff help`` import neither torch
nor numba nor any command module but help's, and still list every registered format."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from ckdiff.cli import main
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "out": out.getvalue(),
                  "modules": sorted(m for m in sys.modules if m.startswith(("torch", "numba", "ckdiff.commands.")))}))
"""


def _fresh(*argv):
    """(exit code, stdout, loaded heavy modules) of ckdiff ARGV in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    return d["code"], d["out"], d["modules"]


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["help"], ["help", "compare"]])
def test_help_imports_neither_torch_nor_numba(argv):
    code, out, modules = _fresh(*argv)
    assert code == 0 and "usage" in out
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "numba")]
    assert not heavy, heavy[:5]
    commands = {m.rsplit(".", 1)[1] for m in modules if m.startswith("ckdiff.commands.")} - {"common", "help"}
    # the overview names every command (their modules are light); `help compare` loads compare alone
    assert commands <= {"compare", "inspect", "logits", "convert", "roundtrip", "golden", "demo", "check", "replay"}, commands


def test_help_lists_the_registered_formats_without_loading_them():
    from ckdiff.formats import registry
    _, out, _ = _fresh("--help")
    for f in registry.formats():
        assert any(line.split()[:1] == [f.name] for line in out.splitlines()), f.name
    assert registry.declared() == [(f.name, f.description) for f in registry.formats()]


def test_comparing_dispatches_to_the_compare_module_alone(tmp_path):
    # a usage error stops before any checkpoint is read: only the compare command was imported
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", PROBE, "--atol", "x", "a", "b"], capture_output=True, text=True,
                       env=env, timeout=120)
    d = json.loads(r.stdout)
    assert d["code"] == 2
    assert [m for m in d["modules"] if m.startswith("ckdiff.commands.")] == ["ckdiff.commands.common",
                                                                              "ckdiff.commands.compare"]


def test_identical_pair_never_loads_the_numba_kernels(tmp_path):
    """Byte-identical tensors are decided by memcmp: numba (its import and cached kernels, ~0.25 s and
    ~60 MB) is loaded only once a chunk differs."""
    import torch
    from safetensors.torch import save_file
    t = {"w": torch.randn(8, 16), "b": torch.randn(5)}
    save_file(t, str(tmp_path / "a.safetensors"))
    save_file({**t, "b": t["b"] + 1}, str(tmp_path / "b.safetensors"))
    code, out, modules = _fresh(*map(str, (tmp_path / "a.safetensors", tmp_path / "a.safetensors", "-q")))
    assert code == 0 and "EQUIVALENT" in out
    assert not [m for m in modules if m.split(".")[0] == "numba"]
    code, out, modules = _fresh(*map(str, (tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-q")))
    assert code == 1 and "DIFFER" in out and "numba" in modules  # the probe can see numba when it is loaded
