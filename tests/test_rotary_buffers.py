"""Derived rotary buffers (Meta's rope.freqs, HF's rotary_emb.inv_freq) are derived on both sides: one
converter keeping the buffer and another deriving it is no difference; a stored buffer is checked against
the frequencies its config implies.

The Meta release is written with torch's own zip format (write_meta_shards, rope.freqs as Meta's release
files carry it); the original JetStream converter keeps every key of its source, which the test does by
adding the release's rope.freqs to ckdiff's JetStream output through safetensors' save_file."""
import json

import torch
from safetensors.torch import load_file, save_file

from ckdiff.io.writers import atomic_dir, write_meta_shards
from ckdiff.golden import emit as E
from ckdiff.golden.models import lazy


def _meta_release(out, theta=None):
    cfg = E.tiny_config("llama-gqa")
    params = cfg.to_meta()
    with atomic_dir(out, overwrite=True) as t:
        write_meta_shards(t, lazy(E.meta_state(cfg, E.hf_state(cfg, 0))), params, 2, rope_freqs=True)
    return out, cfg


def _with_freqs(src_js, out, freqs):
    out.mkdir()
    state = load_file(str(src_js / "model.safetensors"))
    state["rope.freqs"] = freqs
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "params.json").write_text((src_js / "params.json").read_text())
    return out


def test_meta_to_jetstream_buffer_kept_by_one_converter_is_no_difference(tmp_path, run_cli):
    meta, cfg = _meta_release(tmp_path / "meta")
    ours = tmp_path / "ours"
    code, _, err = run_cli("convert", "to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", meta,
                           "--output_checkpoint_dir", ours)
    assert code == 0, err
    hd = cfg.head_dim
    right = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    original = _with_freqs(ours, tmp_path / "original", right)
    for a, b in ((original, ours), (ours, original)):
        code, out, _ = run_cli(a, b)
        text = " ".join(out.split())
        assert code == 0 and "only-" not in text and "left out rope.freqs" in text, text
    # a stale buffer (frequencies of another theta) is named, in diff and in check
    stale = _with_freqs(ours, tmp_path / "stale", 1.0 / (500000.0 ** (torch.arange(0, hd, 2).float() / hd)))
    code, out, _ = run_cli(ours, stale)
    assert code == 1 and "rope.freqs differs from the frequencies its config implies" in " ".join(out.split())
    code, out, _ = run_cli("check", stale)
    assert code == 1 and "rope.freqs" in out
    assert run_cli("check", original)[0] == 0
