"""Megatron-Core ``torch_dist`` checkpoints written by megatron-core itself (the version .ci/run pins).

Producer: megatron-core's ``dist_checkpointing.save`` (default torch_dist strategy) of a ``GPTModel``
(local layer spec: dense, GQA 8 heads / 2 query groups, SwiGLU, RMSNorm) on gloo/CPU, laid out as
Megatron-LM's training loop saves it (tracker file, ``iter_0000001/``, ``common.pt`` with the args,
``metadata.json``); world size 1 and TP=2 (two ranks). The weights are those of a tiny transformers
``LlamaForCausalLM`` (the HF source every file is compared with), mapped as Megatron-Bridge's Llama
bridge maps them (tests/producers/mcore_save.py). CUDA calls stubbed in the builder, each because
megatron-core 0.16.1's writer makes it unconditionally (mcore_save.CUDA_STUBS):
``torch.cuda.synchronize`` (waits for device-to-host copies of tensors already on the CPU) and
``torch.cuda.current_device`` (the device of the failure flag it broadcasts; on gloo, the CPU).

MoE: a ``GPTModel`` with 4 experts (local spec: ``SequentialMLP``, top-2 router) from a tiny transformers
``MixtralForCausalLM``, at world size 1. megatron-core 0.16.1 writes its experts as
``decoder.layers.<i>.mlp.experts.experts.linear_fc1.weight`` (an expert axis) and its pre-MLP norm under
``mlp.linear_fc1.layer_norm_weight``; both are read here.
"""
from __future__ import annotations

import io
import pickle
import shutil

import pytest
import torch

from producers import HERE, cached, launch_together, tiny_llama, tiny_mixtral, version

MCORE = version("megatron-core")


@pytest.fixture(scope="session")
def mcore(tmp_path_factory):
    """HF sources ("hf", "moe-hf") and the save roots megatron-core wrote from them: 1 and 2 (TP), "moe",
    and the injected bugs "gate_up_swapped" (TP=2) and "expert_dropped" (MoE)."""
    def build(out):
        tiny_llama(out / "llama")
        tiny_mixtral(out / "mixtral")
        ll, mx = out / "llama", out / "mixtral"
        script = HERE / "mcore_save.py"
        launch_together((script, 1, out, 1, f"{ll}:ok", f"{mx}:ok", f"{mx}:expert_dropped"),
                        (script, 2, out, 2, f"{ll}:tp2", f"{ll}:gate_up_swapped"))
    root = cached(tmp_path_factory, "mcore", build, MCORE, torch.__version__)
    return {"hf": root / "llama", "moe-hf": root / "mixtral", 1: root / "llama-ok", 2: root / "llama-tp2",
            "gate_up_swapped": root / "llama-gate_up_swapped", "moe": root / "mixtral-ok",
            "expert_dropped": root / "mixtral-expert_dropped"}


def test_writer_is_megatron_core(mcore):
    it = mcore[2] / "iter_0000001"
    assert (mcore[2] / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert {"common.pt", "metadata.json", ".metadata"} <= {p.name for p in it.iterdir()}
    assert sorted(p.name for p in it.glob("*.distcp")) == ["__0_0.distcp", "__0_1.distcp", "__1_0.distcp",
                                                           "__1_1.distcp"]
    md = pickle.loads((it / ".metadata").read_bytes())  # trusted here: written by the fixture just now
    assert md.all_local_plans, "megatron-core keeps the save plans on the metadata: the case the reader must take"


@pytest.mark.parametrize("tp", [1, 2])
def test_equivalent_with_hf_source(mcore, run_cli, tp):
    code, out, err = run_cli(mcore[tp], mcore["hf"])
    assert code == 0, out + err
    assert out.startswith("EQUIVALENT: 15 tensors (15 equal)"), out
    assert "vocab padding rows 100.." in out and "_extra_state entries skipped" in out


@pytest.mark.parametrize("tp", [1, 2])
def test_logits_agree(mcore, run_cli, tp):
    code, out, err = run_cli("logits", mcore[tp], mcore["hf"])
    assert code == 0, out + err
    assert out.startswith("EQUIVALENT") and "top-1 agreement 1.0000" in out, out


def test_moe_equivalent_with_hf_source(mcore, run_cli):
    for a, b in ((mcore["moe"], mcore["moe-hf"]), (mcore["moe-hf"], mcore["moe"])):
        code, out, err = run_cli(a, b)
        assert code == 0, out + err
        assert out.startswith("EQUIVALENT"), out
    code, out, err = run_cli("logits", mcore["moe"], mcore["moe-hf"])
    assert code == 0 and out.startswith("EQUIVALENT"), out + err


def test_expert_dropped_is_named(mcore, run_cli):
    code, out, err = run_cli(mcore["expert_dropped"], mcore["moe-hf"])
    assert code == 1, out + err
    assert "config experts: A=3 B=4" in out, out
    assert "only-b  decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight" in out, out


def test_gate_up_swapped_is_named(mcore, run_cli):
    code, out, err = run_cli(mcore["gate_up_swapped"], mcore["hf"])
    assert code == 1, out + err
    assert out.startswith("DIFFER"), out
    assert "linear_fc1.weight" in out and "halves swapped" in out, out


def _rewrite_metadata(it, edit):
    md = pickle.loads((it / ".metadata").read_bytes())
    edit(md)
    (it / ".metadata").write_bytes(pickle.dumps(md))


def test_shard_skipped_is_named(mcore, run_cli, tmp_path):
    """A converter that skipped TP rank 1's shard of linear_proj but rebuilt the index: the chunk list and
    storage index lack it, and the volumes no longer add up."""
    root = tmp_path / "skipped"
    shutil.copytree(mcore[2], root)
    key = "decoder.layers.self_attention.linear_proj.weight"

    def drop(md):
        smd = md.state_dict_metadata[key]
        gone = smd.chunks.pop()
        md.storage_data = {i: v for i, v in md.storage_data.items()
                           if not (i.fqn == key and tuple(i.offset) == tuple(gone.offsets))}
    _rewrite_metadata(root / "iter_0000001", drop)
    code, out, err = run_cli(root, mcore["hf"])
    assert code == 2, out + err
    assert key in err and "overlapping or missing chunks" in err, err


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_plan_with_reduce_payload_is_refused(mcore, run_cli, tmp_path):
    """The save plans are read as data: a plan whose pickle calls anything is refused, naming it."""
    root = tmp_path / "hostile"
    shutil.copytree(mcore[1], root)

    def poison(md):
        md.all_local_plans[0].planner_data["x"] = _Payload()
    _rewrite_metadata(root / "iter_0000001", poison)
    code, out, err = run_cli(root, mcore["hf"])
    assert code == 2, out + err
    assert "refused to unpickle" in err and "system" in err, err
