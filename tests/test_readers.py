"""Readers: every layout reads to the same tensors, lazily and with validation."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckdiff.models.config import ModelConfig
from ckdiff.formats.readers import open_checkpoint
from ckdiff.formats.layouts import convert
from ckdiff.io.safetensors import read_safetensors, write_safetensors
from ckdiff.io.writers import write_meta_shards
from ckdiff.golden.models import hf_state, lazy, tiny_config


def test_streaming_writer_matches_safetensors_library(tmp_path):
    state = hf_state(tiny_config("llama-gqa", "bfloat16"), seed=3)
    write_safetensors(tmp_path / "x.safetensors", lazy(state).values())
    back = load_file(tmp_path / "x.safetensors")  # the reference implementation is the oracle
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    ours = read_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(ours[k].load(), state[k]) for k in state)
    t = ours["model.embed_tokens.weight"]
    assert torch.equal(t.rows(7, 19), state["model.embed_tokens.weight"][7:19])


def test_reader_accepts_library_written_file(tmp_path):
    state = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).half()}
    save_file(state, tmp_path / "m.safetensors")
    ours = read_safetensors(tmp_path / "m.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    assert all(torch.equal(ours[k].load(), state[k]) for k in state)


def test_sharded_equals_unsharded(tiny_hf, run_cli):
    one, many = tiny_hf("llama-gqa", shards=1), tiny_hf("llama-gqa", shards=12)
    idx = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) == 12
    code, out, _ = run_cli(one, many)
    assert code == 0, out
    assert "EQUIVALENT" in out


def test_bin_equals_safetensors(tiny_hf, tmp_path, run_cli):
    src = tiny_hf("llama-gqa")
    dst = tmp_path / "bin"
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    torch.save({k: v.load().clone() for k, v in open_checkpoint(str(src)).tensors.items()},
               dst / "pytorch_model.bin")
    assert run_cli(src, dst)[0] == 0
    # single files too
    assert run_cli(src / "model.safetensors", dst / "pytorch_model.bin")[0] == 0


def _meta_dir(tmp_path, name, shards, version=2, dtype="float32"):
    cfg = tiny_config(name, dtype)
    meta = convert(lazy(hf_state(cfg, seed=1)), "hf", "meta", cfg)
    d = tmp_path / f"meta-{name}-{shards}-{version}"
    d.mkdir()
    write_meta_shards(d, meta, cfg.to_meta(), shards, llama_version=version, rope_freqs=True)
    return d


@pytest.mark.parametrize("version", [2, 3])
def test_meta_two_shards_equal_one(tmp_path, run_cli, version):
    one = _meta_dir(tmp_path, "llama-gqa", 1, version)
    two = _meta_dir(tmp_path, "llama-gqa", 2, version)
    ck = open_checkpoint(str(two))
    assert ck.format == "meta"
    assert "rope.freqs" in ck.tensors
    code, out, _ = run_cli(one, two)
    assert code == 0, out


def test_meta_shards_sorted_numerically(tmp_path):
    # 12 shards: lexicographic order would put consolidated.10 before consolidated.2
    cfg = ModelConfig("llama", hidden=48, layers=1, heads=12, kv_heads=12, head_dim=4, ffn=96, vocab=24)
    state = hf_state(cfg, seed=2)
    meta = convert(lazy(state), "hf", "meta", cfg)
    d = tmp_path / "m12"
    d.mkdir()
    assert len(write_meta_shards(d, meta, cfg.to_meta(), 12)) == 12
    ck = open_checkpoint(str(d))
    assert len(ck.meta["files"]) == 12
    assert ck.meta["files"][10].endswith("consolidated.10.pth")
    for k, t in meta.items():
        assert torch.equal(ck.tensors[k].load(), t.load()), k


def test_meta_missing_shard_is_an_error(tmp_path, run_cli):
    d = _meta_dir(tmp_path, "llama-gqa", 2)
    (d / "consolidated.01.pth").rename(d / "consolidated.03.pth")
    code, _, err = run_cli("inspect", d)
    assert code == 2
    assert "consolidated.01.pth is missing" in err


def test_hub_id_resolves_from_local_cache_only(tiny_hf, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tiny_hf("llama-gqa")
    repo = tmp_path / "cache" / "models--acme--tiny-llama"
    snap = repo / "snapshots" / ("c" * 40)
    shutil.copytree(src, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    code, out, err = run_cli("acme/tiny-llama", src, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    code, _, err = run_cli("acme/absent", src, "--cache-dir", tmp_path / "cache")
    assert code == 2 and "not in the local Hugging Face cache" in err


def test_inspect_collapses_layers(tiny_hf, run_cli):
    code, out, _ = run_cli("inspect", tiny_hf("llama-mqa-hd"))
    assert code == 0
    assert "model.layers.{0..2}.self_attn.q_proj.weight" in out
    assert "[96, 64]" in out  # head_dim 24 x 4 heads != hidden 64


def test_unknown_layout_says_what_was_found(tmp_path, run_cli):
    (tmp_path / "notes.txt").write_text("hi")
    code, _, err = run_cli("inspect", tmp_path)
    assert code == 2 and "notes.txt" in err and "unknown checkpoint layout" in err
