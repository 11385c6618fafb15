"""Sharded comparison over torch.distributed ranks (gloo on CPU): the same result as one process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckdiff.distributed import assign
from ckdiff.golden.emit import emit

ROOT = Path(__file__).resolve().parents[1]


def env(**kw):
    e = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "OMP_NUM_THREADS": "1", "CKDIFF_DIST_TIMEOUT": "60"}
    e.update(kw)
    return e


def ckdiff(*argv, launcher=(), timeout=240, **kw):
    cmd = [*launcher, *(() if launcher else (sys.executable,)), "-m", "ckdiff", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**kw))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A golden HF model and a copy with one layer's q changed and one norm cast."""
    d = tmp_path_factory.mktemp("dist")
    a = emit(d / "a", "llama-gqa", "hf")
    b = d / "b"
    shutil.copytree(a, b)
    from safetensors.torch import load_file, save_file
    f = next(b.glob("*.safetensors"))
    t = load_file(f)
    t["model.layers.1.self_attn.q_proj.weight"][3, 5] += 0.5
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.float64)
    save_file(t, f, metadata={"format": "pt"})
    return a, b


def result(path: Path) -> dict:
    doc = json.loads(path.read_text())
    return doc["result"]


def test_assign_balances_bytes():
    sizes = [100, 1, 50, 50, 3, 99, 2]
    ranks = assign(sizes, 2)
    loads = [sum(s for s, r in zip(sizes, ranks) if r == k) for k in range(2)]
    assert sorted(loads) == [152, 153] and set(ranks) == {0, 1}
    assert assign(sizes, 1) == [0] * len(sizes)


def test_workers_match_single_process(pair, tmp_path):
    a, b = pair
    one = ckdiff(a, b, "--json", tmp_path / "1.json")
    two = ckdiff(a, b, "--json", tmp_path / "2.json", "--workers", "2")
    assert one.returncode == two.returncode == 1, (one.stderr, two.stderr)
    r1, r2 = result(tmp_path / "1.json"), result(tmp_path / "2.json")
    assert r1 == r2
    assert {t["name"]: t["status"] for t in r1["tensors"]}["model.layers.1.self_attn.q_proj.weight"] == "differ"
    assert one.stdout == two.stdout


def test_torchrun_matches_single_process(pair, tmp_path):
    a, b = pair
    one = ckdiff(a, b, "--json", tmp_path / "1.json")
    tr = ckdiff(a, b, "--json", tmp_path / "t.json",
                launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert tr.returncode == one.returncode == 1, tr.stderr[-2000:]
    assert result(tmp_path / "1.json") == result(tmp_path / "t.json")


def test_equal_pair_exit_zero_on_every_rank(pair, tmp_path):
    a, _ = pair
    r = ckdiff(a, a, "-q", "--workers", "2")
    assert r.returncode == 0 and "EQUIVALENT" in r.stdout, r.stderr


def test_bad_input_on_ranks_is_one_line_exit_2(pair, tmp_path):
    a, _ = pair
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = ckdiff(a / "model.safetensors" if (a / "model.safetensors").exists() else a, bad, "--workers", "2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.safetensors" in r.stderr, r.stderr


def test_killed_worker_ends_the_run_promptly(pair):
    a, b = pair
    t = time.monotonic()
    r = ckdiff(a, b, "--workers", "2", CKDIFF_TEST_KILL_RANK="1", timeout=120)
    assert r.returncode == 2 and "rank 1" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert time.monotonic() - t < 60


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("launch", ["workers", "torchrun"])
def test_sharded_conversions_write_the_same_bytes(tmp_path, launch):
    """hf-to-megatron TP=2 PP=2 and megatron-to-hf in 3 shards, from 2 ranks: byte for byte the
    single-process output; rank 0 wrote the markers, every rank its share of the files."""
    src = emit(tmp_path / "hf", "llama-gqa", "hf")
    extra = {"workers": ("--workers", "2"), "torchrun": ()}[launch]
    launcher = () if launch == "workers" else (sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node", "2")
    for tag, more, how in (("1", (), ()), ("2", extra, launcher)):
        r = ckdiff("convert", "hf-to-megatron", "llama2", "--model-path", src, "--out", tmp_path / f"meg{tag}",
                   "--tp", "2", "--pp", "2", *more, launcher=how)
        assert r.returncode == 0, r.stderr[-2000:]
        r = ckdiff("convert", "megatron-to-hf", "--input_dir", tmp_path / f"meg{tag}", "--output_dir",
                   tmp_path / f"back{tag}", "--num_output_shards", "3", *more, launcher=how)
        assert r.returncode == 0, r.stderr[-2000:]
    assert _tree(tmp_path / "meg1") == _tree(tmp_path / "meg2")
    assert _tree(tmp_path / "back1") == _tree(tmp_path / "back2")
    assert len(list((tmp_path / "back2").glob("model-*.safetensors"))) == 3


def test_sharded_conversion_with_a_dead_rank_leaves_no_output(tmp_path):
    src = emit(tmp_path / "hf", "llama-gqa", "hf")
    t = time.monotonic()
    r = ckdiff("convert", "hf-to-megatron", "llama2", "--model-path", src, "--out", tmp_path / "meg", "--tp", "2",
               "--workers", "2", CKDIFF_TEST_KILL_RANK="1", timeout=120)
    assert r.returncode == 2 and "rank 1" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert time.monotonic() - t < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no temporary directory
