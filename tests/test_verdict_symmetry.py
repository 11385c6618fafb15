"""verdict(A, B) == verdict(B, A) over every ordered pair of the formats ckdiff reads, with the statuses
mirrored (only-a <-> only-b): encodings are logical views at read time, so which side is A never decides what
a table, coverage or the diagnosis sees.

Fixtures, one tiny GQA Llama (random weights) written once per module: HF safetensors, HF ``.bin`` and DCP by
torch itself (``torch.save``, ``torch.distributed.checkpoint.save``); GGUF F32 and Q8_0 by the gguf package's
writer and quantizer; Meta, JetStream, Megatron-LLM and Megatron-Core-layout DCP by ckdiff's writers
(golden/emit.py); JetStream int8 by ckdiff's converter; FP8 with 128x128 block scales by DeepSeek-V3's
``weight_quant`` rule (formats/fp8.py ``fp8_quantize``; no tool on CPU writes that layout)."""
from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch

from ckdiff.compare.diff import compare_checkpoints
from ckdiff.formats.readers import open_checkpoint
from ckdiff.golden.emit import emit
from selftest.catalogue import _fp8
from ckdiff.golden.suite import convert

FORMATS = ["hf", "hf-bin", "meta", "megatron", "jetstream", "jetstream-int8", "dcp", "mcore", "gguf-F32",
           "gguf-Q8_0", "fp8"]
MODEL = "llama-gqa"
MIRROR = {"only-a": "only-b", "only-b": "only-a"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("sym")
    hf = emit(d / "hf", MODEL, "hf")
    out = {"hf": hf}
    state = {k: t.load() for k, t in open_checkpoint(str(hf)).tensors.items()}
    (d / "hf-bin").mkdir()
    (d / "hf-bin" / "config.json").write_text((hf / "config.json").read_text())
    torch.save(state, d / "hf-bin" / "pytorch_model.bin")
    out["hf-bin"] = d / "hf-bin"
    for f in ("meta", "megatron", "jetstream", "mcore", "gguf-F32", "gguf-Q8_0"):
        out[f] = emit(d / f, MODEL, f)
    out["jetstream-int8"] = convert("to-jetstream", hf, d / "js8", {"quantize": "int8_per_channel"})
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(d / "dcp"), no_dist=True, planner=DefaultSavePlanner())
    out["dcp"] = d / "dcp"
    out["fp8"] = _fp8(lambda st, k: None)(hf, d / "fp8")
    assert json.loads((out["fp8"] / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    return out


def _statuses(res, mirror=False) -> set:
    return {MIRROR.get(t.status, t.status) if mirror else str(t.status) for t in res.tensors}


@pytest.mark.parametrize("fa,fb", list(itertools.combinations_with_replacement(FORMATS, 2)))
def test_verdict_does_not_depend_on_argument_order(paths, fa, fb):
    ab = compare_checkpoints(open_checkpoint(str(paths[fa])), open_checkpoint(str(paths[fb])))
    ba = compare_checkpoints(open_checkpoint(str(paths[fb])), open_checkpoint(str(paths[fa])))
    assert ab.verdict() == ba.verdict(), (ab.counts(), ba.counts(), ab.notes, ba.notes)
    assert _statuses(ab) == _statuses(ba, mirror=True), (ab.counts(), ba.counts())
    if fa == fb:
        assert ab.equivalent, [(t.name, t.status) for t in ab.tensors if not t.ok]


def test_encoded_formats_agree_with_every_float_layout(paths):
    """The case of the issue: FP8 against Megatron-LLM was EQUIVALENT one way and DIFFER (15 only-a, 21
    only-b) the other; every encoding now meets every float layout as the logical model it is."""
    for enc in ("fp8", "gguf-Q8_0", "jetstream-int8"):
        for flt in ("hf", "megatron", "meta", "mcore", "gguf-F32"):
            for a, b in ((enc, flt), (flt, enc)):
                res = compare_checkpoints(open_checkpoint(str(paths[a])), open_checkpoint(str(paths[b])))
                assert res.equivalent, (a, b, res.counts(), [(t.name, t.status, t.note) for t in res.tensors
                                                             if not t.ok][:3], res.notes)
