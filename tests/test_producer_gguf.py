"""GGUF files written by llama.cpp's own ``convert_hf_to_gguf.py`` (llama-cpp-python 0.3.36 sdist,
``vendor/llama.cpp``; .ci/run fetches it), for every family ckdiff declares a GGUF layout for.

Producer: the converter's ``main()`` (tests/producers/gguf_convert.py), on tiny transformers models saved
by ``save_pretrained`` with a sentencepiece tokenizer: Llama, Mistral, Mixtral (4 experts) and Gemma, at
f32, f16, bf16 and q8_0 (the converter's own output types; q4_0/q4_k/q6_k come from llama.cpp's compiled
``llama-quantize``, not from this script, so they are not produced here). Bugs are injected by editing a
converted file's tensor bytes in place (``GGUFReader(..., "r+")``), as a converter with that bug would
have written them.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_equivalent_both_ways
from producers import edit_gguf_tensors, gguf_converted, llama_permute, llama_unpermute, swap_tensors, tiny_llama, \
    tiny_mixtral

FAMILIES = {  # name -> how the tiny HF source is made
    "llama": lambda out: tiny_llama(out),
    "mistral": lambda out: tiny_llama(out, 2, "Mistral", num_attention_heads=6, num_key_value_heads=3, head_dim=16,
                                      intermediate_size=160, vocab_size=120, sliding_window=16),
    "mixtral": lambda out: tiny_mixtral(out, 4),
    "gemma": lambda out: tiny_llama(out, 3, "Gemma", num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                    tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
                                    hidden_activation="gelu_pytorch_tanh"),
}
TYPES = ("f32", "f16", "bf16", "q8_0")


@pytest.fixture(scope="session")
def gguf_files(tmp_path_factory):
    def sources(out):
        items = []
        for fam, make in FAMILIES.items():
            make(out / fam)
            items += [f"{out / fam}:{t}:{out / f'{fam}.{t}.gguf'}" for t in TYPES]
        return items
    return gguf_converted(tmp_path_factory, "gguf", sources)


@pytest.mark.parametrize("fam", FAMILIES)
def test_converter_output_equivalent_with_hf_source(gguf_files, run_cli, fam):
    import gguf
    for t in TYPES:
        f = gguf_files / f"{fam}.{t}.gguf"
        arch = gguf.GGUFReader(str(f)).fields["general.architecture"].contents()
        assert arch == ("gemma" if fam == "gemma" else "llama")
        assert_equivalent_both_ways(run_cli, f, gguf_files / fam, f"{fam} {t}", quant=t == "q8_0")


@pytest.mark.parametrize("fam", ["llama", "mixtral", "gemma"])
def test_logits_agree(gguf_files, run_cli, fam):
    code, out, err = run_cli("logits", gguf_files / f"{fam}.f32.gguf", gguf_files / fam)
    assert code == 0 and out.startswith("EQUIVALENT"), out + err


def test_mistral_sliding_window_is_lost(gguf_files, run_cli):
    """The converter writes Mistral as arch llama, which has no sliding window: with a window (16) shorter
    than the prompts (48) the GGUF computes another function. The weights are all equal; the logits say so."""
    code, out, err = run_cli("logits", gguf_files / "mistral.f32.gguf", gguf_files / "mistral")
    assert code == 1 and out.startswith("DIFFER"), out + err


def test_rotary_not_applied_is_named(gguf_files, run_cli, tmp_path):
    """A converter that forgot to permute q (llama: 8 heads): the HF rows as they are."""
    def edit(t):
        q = t["blk.1.attn_q.weight"]
        q[...] = llama_unpermute(np.array(q), 8)
    bad = edit_gguf_tensors(gguf_files / "llama.f32.gguf", tmp_path / "bad.gguf", edit)
    code, out, err = run_cli(bad, gguf_files / "llama")
    assert code == 1, out + err
    assert "blk.1.attn_q.weight" in out and "rotary" in out, out


def test_wrong_head_count_is_named(gguf_files, run_cli, tmp_path):
    """q permuted with the KV head count (2) instead of the query head count (8). (k permuted with 8 heads
    would be no permutation at all here: 16 rows as 8 heads of 2.)"""
    def edit(t):
        q = t["blk.0.attn_q.weight"]
        q[...] = llama_permute(llama_unpermute(np.array(q), 8), 2)
    bad = edit_gguf_tensors(gguf_files / "llama.f32.gguf", tmp_path / "bad.gguf", edit)
    code, out, err = run_cli(bad, gguf_files / "llama")
    assert code == 1, out + err
    assert "blk.0.attn_q.weight" in out and "rotary permutation with the wrong head count" in out, out


def test_gate_up_swapped_is_named(gguf_files, run_cli, tmp_path):
    bad = edit_gguf_tensors(gguf_files / "mistral.q8_0.gguf", tmp_path / "bad.gguf",
                            swap_tensors("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"))
    code, out, err = run_cli(bad, gguf_files / "mistral")
    assert code == 1, out + err
    assert "blk.0.ffn_gate.weight" in out and "blk.0.ffn_up.weight" in out, out
