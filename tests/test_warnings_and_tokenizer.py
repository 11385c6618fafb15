"""No process-wide state: warnings are silenced only around the call that warns, and only that
warning; the exported tokenizer means what the tokenizer library would have saved."""
import json
import warnings

import pytest
import torch

from ckdiff.io.safetensors import read_safetensors, write_safetensors
from ckdiff.tensor.lazy import EagerTensor
from helpers import train_spm


def test_safetensors_reads_raise_no_warning(tmp_path):
    # the reader maps files ACCESS_COPY (writable, as torch.frombuffer wants): no note to silence per view
    t = torch.randn(6, 3)
    write_safetensors(tmp_path / "a.safetensors", [EagerTensor("w", t)], {"format": "pt"})
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        w = read_safetensors(tmp_path / "a.safetensors")["w"]
        got, row = w.load(), w.rows(2, 4)
    assert [str(x.message) for x in seen] == []
    assert torch.equal(got, t) and torch.equal(row, t[2:4]) and warnings.filters == before


def test_mcore_writer_silences_only_the_single_process_note(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from ckdiff.formats.mcore import write_mcore
    from ckdiff.golden.models import hf_state, tiny_config
    cfg = tiny_config("llama-gqa")
    real = dcp.save

    def save(*a, **kw):
        warnings.warn("unrelated save trouble", UserWarning)
        return real(*a, **kw)
    monkeypatch.setattr(dcp, "save", save)
    with pytest.warns(UserWarning) as seen:
        write_mcore(tmp_path / "mc", hf_state(cfg), cfg)
    msgs = [str(w.message) for w in seen]
    assert "unrelated save trouble" in msgs
    assert not any(m.startswith("torch.distributed is disabled") for m in msgs)


def test_dcp_reads_emit_no_warnings(tmp_path):
    """The chunk reader never goes through torch's deprecated typed storages: no warning to hide."""
    from ckdiff.formats.readers import open_checkpoint
    from ckdiff.formats.mcore import write_mcore
    from ckdiff.golden.models import hf_state, tiny_config
    cfg = tiny_config("llama-gqa")
    root = write_mcore(tmp_path / "mc", hf_state(cfg), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck = open_checkpoint(str(root))
        for t in ck.tensors.values():
            t.load()


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    words = ["rotary", "shard", "vocab", "merge", "split", "tensor", "rank", "pad", "strip", "glu", "half"]
    return train_spm(tmp_path_factory.mktemp("spm"), words, 1, 9, 150, 48).parent


def test_exported_tokenizer_means_what_the_library_builds(tmp_path, spm_dir):
    """The hand-written tokenizer_config.json loads to the tokenizer transformers builds from the same
    SentencePiece model with the same added and special tokens (ids, specials, encodings)."""
    transformers = pytest.importorskip("transformers")
    from ckdiff.convert.tokenizer import MEGATRON_SPECIALS, export_tokenizer
    out = tmp_path / "out"
    out.mkdir()
    info = export_tokenizer(spm_dir / "tokenizer.model", out, 64, ["<extra_0>", "<extra_1>"], ["pad=<EOD>"])
    ours = transformers.AutoTokenizer.from_pretrained(out)
    lib = transformers.LlamaTokenizer.from_pretrained(spm_dir, legacy=True, add_bos_token=True, add_eos_token=False)
    added = MEGATRON_SPECIALS + ["<extra_0>", "<extra_1>"]
    lib.add_tokens([transformers.AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    lib.cls_token, lib.sep_token, lib.mask_token, lib.pad_token = "<CLS>", "<SEP>", "<MASK>", "<EOD>"
    assert info["added"] == added
    assert ours.convert_tokens_to_ids(added) == lib.convert_tokens_to_ids(added) == list(range(48, 55))
    for attr in ("bos_token", "eos_token", "unk_token", "cls_token", "sep_token", "mask_token", "pad_token"):
        assert getattr(ours, attr) == getattr(lib, attr), attr
    for text in ("rotary shard vocab", "merge<EOD>split <extra_1> tensor", "glu half pad strip rank"):
        assert ours(text).input_ids == lib(text).input_ids, text
        assert ours(text).input_ids[0] == ours.bos_token_id
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "LlamaTokenizer" and written["pad_token"] == "<EOD>"
