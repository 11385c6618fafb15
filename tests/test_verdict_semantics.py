"""Config semantics in the verdict, the diagnosis budget, and the logit check's agreement with the diff."""
import json
import shutil

import pytest
import torch

from ckdiff.compare.diagnose import _Ctx, diagnose_pair, diagnose_tensor
from ckdiff.compare.diff import Options, compare_checkpoints, compare_tensor
from ckdiff.compare.logits import compare_logits, random_ids
from ckdiff.models.config import canonical_config, compare_configs
from ckdiff.formats.readers import open_checkpoint
from ckdiff.tensor.lazy import Checkpoint, EagerTensor
from ckdiff.tensor.ops import rope_to_interleaved


def _config_edit(src, dst, fn):
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    fn(c)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_function_changing_config_field_makes_the_diff_fail(tiny_hf, tmp_path, run_cli):
    b = _config_edit(tiny_hf(), tmp_path / "b", lambda c: c.update(rope_theta=500000.0))
    code, out, _ = run_cli(tiny_hf(), b)
    assert code == 1 and "rope_theta" in out  # every tensor equal, the function is not


def test_spelling_defaults_and_irrelevant_fields_never_differ(tiny_hf, tmp_path, run_cli):
    def v5(c):
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": c.pop("rope_theta")}
        c["dtype"] = c.pop("torch_dtype")
        c.update(use_cache=False, attention_dropout=0.1, initializer_range=0.02, transformers_version="5.0.0")
        c.pop("hidden_act")  # silu is the llama default
    b = _config_edit(tiny_hf(), tmp_path / "b", v5)
    code, out, _ = run_cli(tiny_hf(), b, "--json", tmp_path / "r.json")
    assert code == 0 and "config" not in out.lower().replace("config.json", "")
    assert json.loads((tmp_path / "r.json").read_text())["result"]["config_diff"] == []


def test_canonical_configs_line_up_across_layouts(tiny_hf, tmp_path):
    from ckdiff.golden.emit import emit
    hf = open_checkpoint(str(tiny_hf("mistral-gqa")))
    meg = open_checkpoint(str(emit(tmp_path / "m", "mistral-gqa", "megatron")))
    js = open_checkpoint(str(emit(tmp_path / "j", "mistral-gqa", "jetstream")))
    cs = [canonical_config(ck.format, ck.config, ck.tensors) for ck in (hf, meg, js)]
    assert cs[0]["sliding_window"] == 16 and cs[0]["rope_theta"] == 1e6 and cs[0]["kv_heads"] == 3
    for c in cs[1:]:
        assert compare_configs(cs[0], c) == ([], [])
    # a v4 rope_scaling spelling equals the v5 one
    a = canonical_config("hf", {**hf.config, "rope_scaling": {"type": "linear", "factor": 2}}, hf.tensors)
    b = canonical_config("hf", {**hf.config, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 1e6}}, hf.tensors)
    assert compare_configs(a, b)[0] == []


def test_config_against_tensors_findings(tiny_hf, tmp_path):
    b = _config_edit(tiny_hf(), tmp_path / "b", lambda c: c.update(tie_word_embeddings=True, vocab_size=90))
    res = compare_checkpoints(open_checkpoint(str(tiny_hf())), open_checkpoint(str(b)))
    assert not res.equivalent
    text = " ".join(res.config_findings)
    assert "tied to the embedding but lm_head.weight differs" in text and "100 rows but the config's vocab size is 90" in text


def test_megatron_padding_from_config_is_a_note(tiny_hf, tmp_path, run_cli):
    from ckdiff.golden.suite import convert
    src = tiny_hf()
    meg = convert("hf-to-megatron", src, tmp_path / "meg", {"tp": 2, "pad": 128})
    code, out, _ = run_cli(src, meg)
    assert code == 0 and "vocab padding from its config stripped" in " ".join(out.split())


class _NoLoad(EagerTensor):
    """A lazy tensor that fails if the diagnosis reads it whole."""

    def load(self):
        raise AssertionError(f"{self.name} loaded whole")

    def rows(self, start, stop):
        return self._t[start:stop]


def test_one_element_and_overflow_named_without_loading():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 48, generator=g)
    b = a.clone()
    b[5, 9] += 1.0
    r = compare_tensor("w", EagerTensor("w", a), EagerTensor("w", b), Options())
    ck = Checkpoint("A", "file", {}, {}, {})
    notes = diagnose_tensor(r, _NoLoad("w", a), _NoLoad("w", b), _Ctx(ck, ck, {}))
    assert notes == [f"one element changed at [5, 9], isolated: {a[5, 9]:.3g} -> {b[5, 9]:.3g}"]
    b = a.clone()
    b[3, 4], b[40, 1] = float("inf"), float("-inf")
    r = compare_tensor("w", EagerTensor("w", a), EagerTensor("w", b), Options())
    notes = diagnose_tensor(r, _NoLoad("w", a), _NoLoad("w", b), _Ctx(ck, ck, {}))
    assert len(notes) == 1 and notes[0].startswith("overflow: 2 element(s) are +-Inf in B") and "scaled" not in notes[0]


def test_noise_is_skipped_with_a_note_and_structure_is_named():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 32, generator=g)
    b = a + torch.randn(a.shape, generator=g) * 1e-4
    r = compare_tensor("w", EagerTensor("w", a), EagerTensor("w", b), Options())
    ck = Checkpoint("A", "file", {}, {}, {})
    assert diagnose_tensor(r, EagerTensor("w", a), EagerTensor("w", b), _Ctx(ck, ck, {})) == []
    assert r.note.startswith("diagnosis skipped:") and "(noise, cosine 0.99999" in r.note
    # GQA rows: k with K=2 of H=8, permuted with the query head count
    q = torch.randn(16, 32, generator=g)
    assert any("rotary permutation" in d for d in diagnose_pair("k", q, rope_to_interleaved(q, 2, 8),
                                                                {"num_attention_heads": 8, "num_key_value_heads": 2}))
    assert diagnose_pair("o", a[:32], a[:32].T.contiguous()) == ["transposed: B == A^T"]


def test_logit_floor_follows_the_weights_precision(tiny_hf):
    """A float32 vs bf16 pair is judged against the floor of a bf16 cast of the float32 side."""
    a, b = open_checkpoint(str(tiny_hf())), open_checkpoint(str(tiny_hf("llama-gqa", "bfloat16")))
    res = compare_logits(a, b, batch=2, length=34)
    assert res.equivalent and res.noise_floor["encoding"] == "bfloat16" and res.noise_floor["applied_to"] == "A"
    assert res.noise_floor["max_kl"] > 0 and res.threshold > res.noise_floor["max_kl"]


def test_prompts_start_with_bos_and_hold_the_special_ids():
    ids = random_ids(100, 3, 40, 0, bos=1, special=(2, 0))
    assert (ids[:, 0] == 1).all()
    for row in ids:
        assert 2 in row[1:].tolist() and 0 in row[1:].tolist()
    from ckdiff.errors import UsageError
    with pytest.raises(UsageError):
        compare_logits(None, None, length=1)


def test_roundtrip_names_a_bug_only_the_tensor_diff_sees(tiny_hf, tmp_path):
    """A norm x 1.00001 stays under the float32 limits: the logit report says the diff saw it."""
    from ckdiff.compare.logits import cross_check_notes
    from safetensors.torch import load_file, save_file
    src = tiny_hf("llama-gqa")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    f = next(bad.glob("*.safetensors"))
    t = load_file(f)
    t["model.layers.0.input_layernorm.weight"] = t["model.layers.0.input_layernorm.weight"] * 1.00001
    save_file(t, f, metadata={"format": "pt"})
    a, b = open_checkpoint(str(src)), open_checkpoint(str(bad))
    diff = compare_checkpoints(a, b, Options())
    lr = compare_logits(a, b, batch=2, length=16)
    assert not diff.equivalent and lr.equivalent
    cross_check_notes(diff, lr)
    assert any("seen by the tensor diff only" in n and "input_layernorm" in n for n in lr.notes)
    # and the other way round: equal tensors, logits that differ
    clean = compare_checkpoints(a, a, Options())
    lr_bad = compare_logits(a, b, batch=2, length=16, threshold=1e-30)
    assert clean.equivalent and not lr_bad.equivalent
    cross_check_notes(clean, lr_bad)
    assert any("seen by the logit check only" in n for n in clean.notes)
