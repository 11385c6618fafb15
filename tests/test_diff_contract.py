"""diff's contract: ``ckdiff A B`` is about A vs B (0 same, 1 differ, 2 trouble).

A finding about a checkpoint that holds equally on both sides is a warning in every output, not a
difference; ``--strict`` makes warnings fail; ``ckdiff A A`` is 0 for every fixture layout.
Fixtures: HF written by write_tiny_hf (safetensors) and by torch.save (.bin); the other layouts by
golden/emit.py (the golden emitter; mcore through torch DCP, GGUF through the gguf package's writer).
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckdiff.models import families
from ckdiff.golden.emit import emit
from ckdiff.golden.models import TINY


def _untied_without_head(src, out, shards=False, binary=False):
    """A copy of an untied HF checkpoint with its lm_head.weight removed (config still says untied)."""
    out.mkdir(parents=True)
    state = load_file(str(src / "model.safetensors"))
    del state["lm_head.weight"]
    (out / "config.json").write_text((src / "config.json").read_text())
    if binary:
        torch.save(state, out / "pytorch_model.bin")
    elif shards:
        names = sorted(state)
        half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for f, keys in half.items():
            save_file({k: state[k] for k in keys}, str(out / f), metadata={"format": "pt"})
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: f for f, keys in half.items() for k in keys}}))
    else:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_a_finding_on_both_sides_is_a_warning_not_a_difference(tiny_hf, tmp_path, run_cli):
    src = tiny_hf()
    one = _untied_without_head(src, tmp_path / "one")
    sharded = _untied_without_head(src, tmp_path / "sharded", shards=True)
    binary = _untied_without_head(src, tmp_path / "bin", binary=True)
    for b in (one, sharded, binary):
        code, out, err = run_cli(one, b, "--trust-pickle", "--json", tmp_path / "r.json",
                                 "--markdown", tmp_path / "r.md", "--html", tmp_path / "r.html")
        assert code == 0, (b, out, err)
        text = " ".join(out.split())
        assert "warning: A and B: config says the output head is untied but there is no lm_head.weight" in text
        doc = json.loads((tmp_path / "r.json").read_text())["result"]
        assert doc["config_findings"] == [] and len(doc["warnings"]) == 1
        assert "untied but there is no lm_head.weight" in (tmp_path / "r.md").read_text()
        assert "id=warnings" in (tmp_path / "r.html").read_text()
        code, out, _ = run_cli(one, b, "--trust-pickle", "--strict", "-q")
        assert code == 1 and "1 warning" in out
    # a finding on one side only is still a difference
    code, out, _ = run_cli(src, one)
    assert code == 1 and "B: config says the output head is untied" in " ".join(out.split())


_LAYOUTS = ("hf", "meta", "jetstream", "megatron", "mcore", "gguf", "gguf-Q8_0")


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_checkpoint_against_itself_is_equivalent_in_every_layout(name, tmp_path, run_cli):
    """``ckdiff A A`` exits 0 for every tiny model in every layout its family declares."""
    declared = families.family(TINY[name].family).layouts
    tried = [lay for lay in _LAYOUTS if lay.partition("-")[0] in declared]
    from ckdiff.errors import InputError
    for lay in tried:
        try:
            p = emit(tmp_path / lay, name, lay)
        except InputError as e:  # llama.cpp's qwen3moe has no dense FFN: Qwen3-MoE's mlp_only_layers in no GGUF
            assert lay.startswith("gguf") and "have a dense MLP, which llama.cpp's qwen3moe has no tensors" in str(e)
            continue
        code, out, err = run_cli(p, p, "--no-diagnose", "-q")
        assert code == 0, (name, lay, out, err)
    assert len(tried) >= min(2, len(declared)), (name, tried)  # HF-only families (DeepSeek, GPT-OSS) have one
