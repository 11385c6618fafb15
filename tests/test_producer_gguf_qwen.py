"""Qwen2, Qwen3 and Qwen3-MoE GGUF files written by llama.cpp's own ``convert_hf_to_gguf.py`` (llama-cpp-python
0.3.36 sdist, ``vendor/llama.cpp``; .ci/run fetches it), compared with their HF sources.

Producer: the converter's ``main()`` (tests/producers/gguf_convert.py) on tiny transformers models saved by
``save_pretrained`` (random weights, norms and q/k/v biases included), at f32, f16, bf16 and q8_0:
- Qwen2 with a tied head (as Qwen2.5-0.5B) and q/k/v biases: arch ``qwen2``, no ``output.weight``;
- Qwen3 (q/k norms, 8 query heads over 2 KV heads, head_dim 16 != hidden / heads): arch ``qwen3``;
- Qwen3-MoE (4 experts, top-2, norm_topk_prob true as Qwen3-30B-A3B): arch ``qwen3moe``, experts stacked in
  ``ffn_{gate,up,down}_exps``, ``qwen3moe.expert_feed_forward_length``.
llama.cpp writes all three with HF's half-split q/k rows (no ``LlamaModel.permute``).

Documented limitation of the producer: llama.cpp's Qwen2MoeModel/Qwen3MoeModel take their vocab only from a
GPT-2 BPE hub tokenizer whose pre-tokenizer hash the converter knows (``get_vocab_base_pre``); an offline tiny
tokenizer has none, so for Qwen3-MoE the vocab is written by the converter's own sentencepiece step (``:spm`` in
gguf_convert.py). Tensors and hyperparameters are the converter's as they are.

What llama.cpp's qwen3moe graph fixes: the top-k expert weights are always renormalised (``build_moe_ffn`` with
``norm_w = true``), so a Qwen3-MoE source with norm_topk_prob false converts to a GGUF that computes another
function; ckdiff reads that from the family's declaration (``gguf_extra``) and says so. Nor does llama.cpp's
qwen2 keep a sliding window (use_sliding_window): the weights agree and the logits differ.

Bugs are injected by editing a converted file's tensor bytes in place (``GGUFReader(..., "r+")``), as a
converter with that bug would have written them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import assert_equivalent_both_ways
from producers import edit_gguf_tensors, gguf_converted, llama_permute, swap_tensors, tiny_llama

_QWEN3_MOE = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                  moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
SOURCES = {  # name -> (how the tiny HF source is made, GGUF arch, the converter's vocab step)
    "qwen2": (lambda out: tiny_llama(out, 4, "Qwen2", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     tie_word_embeddings=True), "qwen2", ""),
    "qwen3": (lambda out: tiny_llama(out, 5, "Qwen3", head_dim=16), "qwen3", ""),
    "qwen3moe": (lambda out: tiny_llama(out, 6, "Qwen3Moe", norm_topk_prob=True, **_QWEN3_MOE), "qwen3moe", ":spm"),
}
NO_NORM = "qwen3moe-no-norm"  # norm_topk_prob false (transformers' default): llama.cpp renormalises anyway
WINDOW = "qwen2-window"  # use_sliding_window from layer 1 on (window 4): llama.cpp's qwen2 has no window
TYPES = ("f32", "f16", "bf16", "q8_0")


@pytest.fixture(scope="session")
def qwen_gguf(tmp_path_factory):
    def sources(out):
        items = []
        for name, (make, _arch, vocab) in SOURCES.items():
            make(out / name)
            items += [f"{out / name}:{t}:{out / f'{name}.{t}.gguf'}{vocab}" for t in TYPES]
        tiny_llama(out / NO_NORM, 6, "Qwen3Moe", norm_topk_prob=False, **_QWEN3_MOE)
        items.append(f"{out / NO_NORM}:f32:{out / f'{NO_NORM}.f32.gguf'}:spm")
        tiny_llama(out / WINDOW, 4, "Qwen2", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   use_sliding_window=True, sliding_window=4, max_window_layers=1)
        items.append(f"{out / WINDOW}:f32:{out / f'{WINDOW}.f32.gguf'}")
        return items
    # keyed by this file too: the sources are made here, not in tests/producers/
    return gguf_converted(tmp_path_factory, "gguf-qwen", sources, Path(__file__).read_text())


@pytest.mark.parametrize("name", SOURCES)
def test_converter_output_equivalent_with_hf_source(qwen_gguf, run_cli, name):
    import gguf
    for t in TYPES:
        f = qwen_gguf / f"{name}.{t}.gguf"
        r = gguf.GGUFReader(str(f))
        assert r.fields["general.architecture"].contents() == SOURCES[name][1]
        names = {x.name for x in r.tensors}
        assert ("output.weight" in names) == (name != "qwen2")  # Qwen2 tied: no output tensor
        assert_equivalent_both_ways(run_cli, f, qwen_gguf / name, f"{name} {t}", quant=t == "q8_0")


@pytest.mark.parametrize("name", SOURCES)
def test_logits_agree(qwen_gguf, run_cli, name):
    code, out, err = run_cli("logits", qwen_gguf / f"{name}.f32.gguf", qwen_gguf / name)
    assert code == 0 and out.startswith("EQUIVALENT"), out + err


def test_qwen3_moe_without_norm_topk_prob_differs(qwen_gguf, run_cli):
    """Weights all equal, but llama.cpp's qwen3moe renormalises the top-k weights and this source does not:
    the config difference is named, and the logits differ."""
    code, out, err = run_cli(qwen_gguf / NO_NORM, qwen_gguf / f"{NO_NORM}.f32.gguf")
    assert code == 1 and out.startswith("DIFFER") and "norm_topk_prob" in out, out + err
    code, out, err = run_cli("logits", qwen_gguf / f"{NO_NORM}.f32.gguf", qwen_gguf / NO_NORM)
    assert code == 1 and out.startswith("DIFFER"), out + err


def test_qwen2_sliding_window_is_lost(qwen_gguf, run_cli):
    """llama.cpp's qwen2 writes and runs no sliding window: with a window (4, from layer 1 on) shorter than the
    prompts the GGUF computes another function. The weights are all equal; the logits say so."""
    code, out, err = run_cli(qwen_gguf / WINDOW, qwen_gguf / f"{WINDOW}.f32.gguf")
    assert code == 0 and out.startswith("EQUIVALENT"), out + err
    code, out, err = run_cli("logits", qwen_gguf / f"{WINDOW}.f32.gguf", qwen_gguf / WINDOW)
    assert code == 1 and out.startswith("DIFFER"), out + err


def test_llama_permute_on_qwen2_is_named(qwen_gguf, run_cli, tmp_path):
    """A converter that treats Qwen2 like llama: q rows (and q bias) of every layer permuted to interleaved
    pairs with the query head count (4), where llama.cpp's qwen2 keeps HF's half-split rows."""
    def edit(t):
        for n in ("blk.{}.attn_q.weight", "blk.{}.attn_q.bias"):
            for i in (0, 1):
                t[n.format(i)][...] = llama_permute(np.array(t[n.format(i)]), 4)
    bad = edit_gguf_tensors(qwen_gguf / "qwen2.f32.gguf", tmp_path / "bad.gguf", edit)
    code, out, err = run_cli(qwen_gguf / "qwen2", bad)
    assert code == 1, out + err
    assert "blk.1.attn_q.weight" in out, out
    assert "rotary permutation: B == P(A), half-split -> interleaved, 4 heads" in out, out


@pytest.mark.parametrize("name,t,gate,up", [
    ("qwen3", "f16", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"),
    ("qwen3moe", "f16", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"),  # the stacked experts
])
def test_gate_up_swapped_is_named(qwen_gguf, run_cli, tmp_path, name, t, gate, up):
    bad = edit_gguf_tensors(qwen_gguf / f"{name}.{t}.gguf", tmp_path / "bad.gguf", swap_tensors(gate, up))
    code, out, err = run_cli(qwen_gguf / name, bad)
    assert code == 1, out + err
    assert f"another tensor: B[{gate}] == A[{up}], a tensor of another kind of the same layer" in out, out
    assert f"another tensor: B[{up}] == A[{gate}]" in out, out


def test_gate_up_swapped_in_q8_0_is_caught(qwen_gguf, run_cli, tmp_path):
    """At Q8_0 the swap is caught (both tensors differ, nothing else does); the another-tensor diagnosis
    compares with a cast's tolerance, not a quantized one, so it does not name the swap there."""
    gate, up = "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"
    bad = edit_gguf_tensors(qwen_gguf / "qwen3.q8_0.gguf", tmp_path / "bad.gguf", swap_tensors(gate, up))
    code, out, err = run_cli(bad, qwen_gguf / "qwen3")
    assert code == 1, out + err
    assert out.startswith("DIFFER: 25 tensors (2 differ,"), out
    assert f"differ  {gate}" in out and f"differ  {up}" in out, out


def test_qwen3_moe_with_dense_layers_has_no_gguf_table():
    """mlp_only_layers: llama.cpp's qwen3moe has no dense FFN tensors (the family declares no GGUF name for
    them), so the table is refused in one line rather than failing on a missing expert tensor."""
    from ckdiff.formats import layouts
    from ckdiff.errors import InputError
    from ckdiff.golden.models import TINY
    with pytest.raises(InputError) as e:
        layouts.hf_to("gguf", TINY["qwen3-moe-dense0"])
    assert "qwen3-moe: layers [0] have a dense MLP, which llama.cpp's qwen3moe has no tensors for" in str(e.value)
    assert "\n" not in str(e.value)
    assert layouts.hf_to("gguf", TINY["qwen3-moe"])  # every layer MoE: the table
