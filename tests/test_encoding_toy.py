"""An encoding declared in this file alone is read, compared in scale units and diagnosed.

The toy encoding: int8 codes ``<w>.qcodes`` with one float32 scale per row ``<w>.qscale``
(``value = code * scale[row]``, scale = amax / 127, round to nearest). Nothing in ckdiff knows it: the test
subclasses the block-scaled protocol (``tensor/blockscaled.py``), registers a view and relies on the one
comparator, the one kernel and the scale diagnosis. Fixtures: the tiny HF model (random weights, GQA) and
the toy encoding written by this file's own quantizer (the encoding exists nowhere else)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ckdiff.compare.diff import Options, compare_checkpoints
from ckdiff.errors import InputError
from ckdiff.formats import registry
from ckdiff.formats.readers import open_checkpoint
from ckdiff.golden.models import hf_state, tiny_config
from ckdiff.tensor.blockscaled import BlockScaled, Scaled, fold

CODES, SCALE = ".qcodes", ".qscale"


def toy_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = x.float().abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(x.float() / s[:, None]).clamp(-127, 127).to(torch.int8), s


class ToyRows(BlockScaled):
    def __init__(self, name, codes, scale):
        super().__init__(name, codes.shape, codes.origin, "toy int8 per row", 0.51, (codes.name, scale.name))
        if tuple(scale.shape) != (codes.shape[0],):
            raise InputError(codes.origin, f"{scale.name}: {list(scale.shape)} is not one scale per row of {name}")
        self.codes, self.scale = codes, scale

    def scaled(self, start, stop):
        return Scaled(self.codes.rows(start, stop), self.scale.rows(start, stop).float()[:, None], (1, self.shape[1]))

    def raw(self, start, stop):
        return torch.cat([self.codes.rows(start, stop).view(torch.uint8).flatten(),
                          self.scale.rows(start, stop).view(torch.uint8).flatten()])

    def reference(self, x):
        codes, s = toy_quantize(x)
        return Scaled(codes, s[:, None], (1, self.shape[1]))


def toy_view(ck):
    names = [k[: -len(CODES)] for k in ck.tensors if k.endswith(CODES) and k[: -len(CODES)] + SCALE in ck.tensors]
    if not names:
        return ck
    views = {n: ToyRows(n, ck.tensors[n + CODES], ck.tensors[n + SCALE]) for n in names}
    return fold(ck, views, "toy int8 per row", f"{len(views)} toy-encoded weights")


@pytest.fixture
def toy_encoding(monkeypatch):
    registry.encodings()  # the built-in encodings first, then the toy one beside them
    monkeypatch.setitem(registry._REG.encodings, "toy", registry.Encoding("toy", "toy int8 per row", toy_view))


def write_toy(out, state, cfg, mutate=None):
    out.mkdir()
    enc = {}
    for k, v in state.items():
        if v.dim() == 2 and "proj" in k:
            codes, s = toy_quantize(v)
            if mutate:
                codes, s = mutate(k, codes, s)
            enc[k + CODES], enc[k + SCALE] = codes, s
        else:
            enc[k] = v
    save_file(enc, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_hf()))
    return out


def test_toy_encoding_is_read_as_logical_views(tmp_path, tiny_hf, toy_encoding):
    cfg = tiny_config("llama-gqa")
    assert 1 < cfg.kv_heads < cfg.heads
    toy = open_checkpoint(str(write_toy(tmp_path / "toy", hf_state(cfg), cfg)))
    q = toy.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, ToyRows) and not any(k.endswith((CODES, SCALE)) for k in toy.tensors)
    ref = hf_state(cfg)["model.layers.0.self_attn.q_proj.weight"]
    assert (q.dequantized() - ref).abs().max() <= 0.51 * (ref.abs().amax(1) / 127).max()


def test_toy_encoding_compares_in_scale_units_both_ways(tmp_path, tiny_hf, toy_encoding):
    cfg = tiny_config("llama-gqa")
    toy, hf = write_toy(tmp_path / "toy", hf_state(cfg), cfg), tiny_hf("llama-gqa")
    ab = compare_checkpoints(open_checkpoint(str(toy)), open_checkpoint(str(hf)))
    ba = compare_checkpoints(open_checkpoint(str(hf)), open_checkpoint(str(toy)))
    assert ab.equivalent and ba.equivalent, (ab.counts(), ba.counts())
    assert ab.counts().get("quant", 0) == ba.counts().get("quant", 0) > 0
    same = compare_checkpoints(open_checkpoint(str(toy)), open_checkpoint(str(toy)))
    assert same.equivalent and set(same.counts()) == {"equal"}


@pytest.mark.parametrize("bug,kind", [
    ("scale-doubled", "scale-multiplied"),
    ("scale-zeroed", "scale-zeroed"),
    ("scale-reciprocal", "scale-reciprocal"),
])
def test_toy_encoding_scale_bugs_are_named(tmp_path, tiny_hf, toy_encoding, bug, kind):
    cfg = tiny_config("llama-gqa")
    target = "model.layers.1.mlp.down_proj.weight"

    def mutate(k, codes, s):
        if k != target:
            return codes, s
        s = s.clone()
        if bug == "scale-doubled":
            s[3:9] *= 2
        elif bug == "scale-zeroed":
            s[5] = 0
        else:
            s = 1 / s
        return codes, s
    toy = write_toy(tmp_path / "toy", hf_state(cfg), cfg, mutate)
    res = compare_checkpoints(open_checkpoint(str(tiny_hf("llama-gqa"))), open_checkpoint(str(toy)),
                              Options(diagnose=True))
    assert not res.equivalent
    bad = [r for r in res.tensors if r.status.value not in ("equal", "close", "cast", "quant")]
    assert [r.name for r in bad] == [target]
    assert kind in [f["kind"] for f in bad[0].findings], bad[0].findings
