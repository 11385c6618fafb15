"""A trainer's DCP checkpoint written by torch FSDP2 itself (torch as installed, 2 ranks on gloo).

Producer: ``fully_shard`` on each decoder layer and the whole transformers ``LlamaForCausalLM``, one
AdamW step, then ``dcp.save({"model": ..., "optimizer": ..., "step": 1})`` with both state dicts from
``get_state_dict`` (tests/producers/fsdp_save.py), as trainers save. Compared with its HF source (the
model saved by transformers' ``save_pretrained``).
"""
from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from producers import HERE, cached, launch, tiny_llama


@pytest.fixture(scope="session")
def fsdp(tmp_path_factory):
    def build(out):
        tiny_llama(out / "hf", seed=1)
        launch(HERE / "fsdp_save.py", 2, out / "hf", out / "dcp")
    root = cached(tmp_path_factory, "fsdp", build, torch.__version__)
    return root / "dcp", root / "hf"


def test_written_by_fsdp2(fsdp):
    md = pickle.loads((fsdp[0] / ".metadata").read_bytes())  # trusted: written by the fixture just now
    tops = {k.split(".", 1)[0] for k in md.state_dict_metadata}
    assert tops == {"model", "optimizer", "step"}
    q = md.state_dict_metadata["model.model.layers.0.self_attn.q_proj.weight"]
    assert len(q.chunks) == 2, "FSDP2 shards every parameter on dim 0 across the 2 ranks"


def test_model_subtree_found_by_itself(fsdp, run_cli):
    code, out, err = run_cli(*fsdp)
    assert code == 0, out + err
    assert out.startswith("EQUIVALENT: 21 tensors (21 equal)"), out
    assert "read the sub-tree 'model.'" in out and "skipped: optimizer (75 entries), step (1 entry)" in out, out


def test_prefix_flag(fsdp, run_cli):
    code, out, err = run_cli(fsdp[1], fsdp[0], "--prefix-b", "model.")
    assert code == 0 and out.startswith("EQUIVALENT: 21 tensors"), out + err
    code, out, err = run_cli(*fsdp, "--prefix", "module.")
    assert code == 2 and "no tensor is named 'module.'" in err and "top-level names: model, optimizer" in err, err


def test_logits_refused_without_config(fsdp, run_cli):
    # the DCP side has no model config: ckdiff logits refuses it by name rather than guessing one
    code, out, err = run_cli("logits", *fsdp)
    assert code == 2 and "config" in err, out + err


def test_shard_skipped_is_named(fsdp, run_cli, tmp_path):
    """Rank 1's shard of one tensor dropped from the index: the volumes no longer add up."""
    bad = tmp_path / "dcp"
    shutil.copytree(fsdp[0], bad)
    md = pickle.loads((bad / ".metadata").read_bytes())
    key = "model.model.layers.1.mlp.down_proj.weight"
    gone = md.state_dict_metadata[key].chunks.pop()
    md.storage_data = {i: v for i, v in md.storage_data.items()
                       if not (i.fqn == key and tuple(i.offset) == tuple(gone.offsets))}
    (bad / ".metadata").write_bytes(pickle.dumps(md))
    code, out, err = run_cli(bad, fsdp[1])
    assert code == 2 and key in err and "overlapping or missing chunks" in err, out + err
