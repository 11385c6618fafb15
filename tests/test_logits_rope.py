"""Every rope the config can say, and per-layer sliding windows, against transformers' own models.

Each case writes the tiny llama-gqa (H=8, K=2) as an HF checkpoint whose config.json carries the rope
scaling (or window layout), runs it through transformers (eager attention) and through ckdiff's reference
runtime on the same prompts, longer than the scaling's original length where that matters (dynamic NTK,
longrope's long factors), and compares the logits within float32 rounding. The GGUF and Megatron-Core
spellings are read into the same configuration and checked against the HF one.
"""
from __future__ import annotations

import pytest
import torch

from ckdiff.compare.logits import config_of
from ckdiff.formats.readers import open_checkpoint
from ckdiff.io.writers import write_hf
from ckdiff.golden.models import hf_state, lazy, tiny_config
from ckdiff.runtime.forward import rope_frequencies, run

CFG = tiny_config("llama-gqa")
T = 24  # longer than the original/max length of the dynamic and longrope cases below (16)
HALF = CFG.head_dim // 2

ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0,
             "beta_slow": 1.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 16, "factor": 4.0,
                 "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
                 "long_factor": [1.5 + 0.5 * i for i in range(HALF)]},
}


def _write(path, config: dict):
    path.mkdir()
    write_hf(path, lazy(hf_state(CFG, 0)), config, 1)
    return path


def _logits_both(path):
    transformers = pytest.importorskip("transformers")
    m = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(0, CFG.vocab, (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m(ids).logits
    ck = open_checkpoint(str(path))
    return run(ck, config_of(ck), ids).logits, ref


def _close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_type_matches_transformers(tmp_path, kind):
    config = CFG.to_hf()
    config.update(max_position_embeddings=16, rope_scaling=ROPES[kind])
    ours, ref = _logits_both(_write(tmp_path / kind, config))
    _close(ours, ref)
    plain = CFG.to_hf()
    plain.update(max_position_embeddings=16)
    base, _ = _logits_both(_write(tmp_path / "plain", plain))
    assert (base - ours).abs().max() > 1e-2  # the scaling changes the function at this length


def test_inverse_frequencies_equal_transformers_rope_functions():
    """The frequencies and attention factor themselves, for every type, at a short and a long prompt."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from dataclasses import replace
    for kind, sc in ROPES.items():
        hf = LlamaConfig(hidden_size=CFG.hidden, num_attention_heads=CFG.heads, head_dim=CFG.head_dim,
                         max_position_embeddings=16, rope_scaling=dict(sc))
        for t in (8, T):
            want, att = ROPE_INIT_FUNCTIONS[kind](hf, "cpu", seq_len=t if kind in ("dynamic", "longrope") else None)
            got, gatt = rope_frequencies(replace(CFG, max_pos=16, rope_scaling=dict(sc)), t)
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-6, atol=0)
            assert gatt == pytest.approx(att, rel=1e-6), kind


def test_gguf_rope_freqs_and_scaling_are_read(tmp_path):
    """A Llama-3.1-style GGUF (GGUFWriter, as llama.cpp's converter lays it out: ``rope_freqs.weight`` holds
    the llama3 per-frequency divisors) runs like the HF llama3 config; ``rope.scaling.type linear``
    reads as linear scaling."""
    import math

    import gguf
    from ckdiff.formats.gguf import write_gguf
    sc = ROPES["llama3"]
    config = CFG.to_hf()
    config.update(max_position_embeddings=16, rope_scaling=sc)
    ours_hf, ref = _logits_both(_write(tmp_path / "hf", config))
    # llama.cpp convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors): 1 for high frequencies, factor
    # for low ones, 1 / ((1 - smooth) / factor + smooth) in between
    base = 1.0 / (CFG.rope_theta ** (torch.arange(0, CFG.head_dim, 2, dtype=torch.float64) / CFG.head_dim))
    factors = []
    for f in base.tolist():
        wavelen = 2 * math.pi / f
        lo_w, hi_w = 16 / sc["low_freq_factor"], 16 / sc["high_freq_factor"]
        if wavelen < hi_w:
            factors.append(1.0)
        elif wavelen > lo_w:
            factors.append(sc["factor"])
        else:
            smooth = (16 / wavelen - sc["low_freq_factor"]) / (sc["high_freq_factor"] - sc["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / sc["factor"] + smooth))
    path = write_gguf(tmp_path / "m.gguf", hf_state(CFG, 0), CFG, "F32")
    w = gguf.GGUFWriter(str(tmp_path / "r.gguf"), "llama")  # the same file plus rope_freqs.weight
    src = gguf.GGUFReader(str(path))
    w.add_block_count(CFG.layers)
    w.add_embedding_length(CFG.hidden)
    w.add_feed_forward_length(CFG.ffn)
    w.add_head_count(CFG.heads)
    w.add_head_count_kv(CFG.kv_heads)
    w.add_key_length(CFG.head_dim)
    w.add_value_length(CFG.head_dim)
    w.add_layer_norm_rms_eps(CFG.norm_eps)
    w.add_rope_freq_base(CFG.rope_theta)
    w.add_context_length(16)
    w.add_vocab_size(CFG.vocab)
    for t in src.tensors:
        w.add_tensor(t.name, t.data.copy())
    w.add_tensor("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = open_checkpoint(str(tmp_path / "r.gguf"))
    assert "rope_freqs.weight" in ck.tensors
    ids = torch.randint(0, CFG.vocab, (2, T), generator=torch.Generator().manual_seed(4))
    _close(run(ck, config_of(ck), ids).logits, ref)
    from ckdiff.formats.gguf import config_from_gguf
    lin = config_from_gguf({"llama.embedding_length": 64, "llama.block_count": 2, "llama.attention.head_count": 8,
                            "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}, {})
    assert lin.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_megatron_core_interpolation_and_window_read_as_hf_would():
    from ckdiff.formats.mcore import _rope_and_window_args, _window, rope_scaling_of
    from ckdiff.errors import InputError
    assert rope_scaling_of({"rotary_seq_len_interpolation_factor": 4}, "args") == {"rope_type": "linear",
                                                                                  "factor": 4.0}
    # window_size (left, 0): the left keys and the query itself; every 2nd layer (1-based) full attention
    assert _window({"window_size": (3, 0), "window_attn_skip_freq": 2}, 4, "args") == \
        {"sliding_window": 4, "sliding_layers": (0, 2)}
    assert _window({"window_size": [7, 0], "window_attn_skip_freq": [1, 0, 0, 1]}, 4, "args") == \
        {"sliding_window": 8, "sliding_layers": (0, 3)}
    for bad in ({"window_size": (3, 2)}, {"window_size": "3,0"}, {"window_size": (3, 0), "window_attn_skip_freq": 0}):
        with pytest.raises(InputError):
            _window(bad, 4, "args")
    with pytest.raises(InputError):
        rope_scaling_of({"rotary_seq_len_interpolation_factor": -1}, "args")
    # the writer says the same window back: HF's window counts the query's own key, Megatron-Core's left does not
    from ckdiff.golden.models import TINY
    from dataclasses import replace
    cfg = replace(TINY["llama-gqa"], sliding_window=4, sliding_layers=(0,))
    args = _rope_and_window_args(cfg)
    assert _window(args, cfg.layers, "args") == {"sliding_window": 4, "sliding_layers": (0,)}


def test_sliding_window_per_layer_matches_transformers(tmp_path):
    """Ministral's ``layer_types`` (sliding in layer 0 only, window 4) and Mistral's window on every layer."""
    config = CFG.to_hf()
    config.update(model_type="ministral", architectures=["MinistralForCausalLM"], sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"])
    ours, ref = _logits_both(_write(tmp_path / "ministral", config))
    _close(ours, ref)
    assert config_of(open_checkpoint(str(tmp_path / "ministral"))).sliding_layers == (0,)
    everywhere = dict(config, layer_types=["sliding_attention", "sliding_attention"])
    both, _ = _logits_both(_write(tmp_path / "both", everywhere))
    assert (both - ours).abs().max() > 1e-3  # the second layer's window shows
