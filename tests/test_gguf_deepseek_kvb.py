"""deepseek2 GGUF files from before llama.cpp split MLA's ``kv_b_proj`` (format ``gguf-kvb``): one
``blk.N.attn_kv_b.weight`` a layer (HF ``kv_b_proj`` as it is), no ``attn_k_b`` / ``attn_v_b``, no
``attention.key_length_mla`` / ``value_length_mla``; ``key_length`` nope + rope, ``value_length`` v_head_dim,
``head_count_kv`` the head count (llama.cpp runs such a file as MHA: ``src/models/deepseek2.cpp``).

Producer: llama.cpp's converter today cannot write the old layout. The old-layout file is therefore written by
gguf-py's own ``GGUFWriter`` (the ``gguf`` package), taking the current converter's output for the same tiny
transformers DeepSeek-V3 as the template (llama.cpp ``convert_hf_to_gguf.py``, llama-cpp-python 0.3.36 sdist,
driven by tests/producers/gguf_convert.py) and rewriting only what differs: ``attn_k_b`` / ``attn_v_b`` replaced
by ``attn_kv_b`` (the HF ``kv_b_proj`` as saved by transformers), ``key_length_mla`` / ``value_length_mla`` left
out, ``key_length`` / ``value_length`` / ``head_count_kv`` set to the MHA values. Every other key and tensor is
the converter's, byte for byte. The model: the DeepSeek-V3 of tests/test_producer_gguf_deepseek_gptoss.py (4
heads, q LoRA 24, kv LoRA 16, nope 8, rope 4, v 8, 8 experts in 2 groups, layer 0 dense, random weights).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from producers import edit_gguf_tensors, gguf_converted, tiny_llama
from test_producer_gguf_deepseek_gptoss import _DS, _random_buffers, _set

H, NOPE, ROPE, V, KV = 4, 8, 4, 8, 16


def write_old_layout(template: Path, hf: Path, out: Path, meta=None, keep=()) -> Path:
    """The old converter's file for ``hf``, from the current converter's ``template``: see the module docstring.
    ``meta`` overrides keys (None: left out); ``keep``: keys of the template kept as they are (hostile files)."""
    import gguf
    import torch
    from safetensors.torch import load_file
    st = load_file(str(hf / "model.safetensors"))
    r = gguf.GGUFReader(str(template))
    w = gguf.GGUFWriter(str(out), "deepseek2")
    a = "deepseek2.attention."
    new = {a + "head_count_kv": H, a + "key_length": NOPE + ROPE, a + "value_length": V,
           a + "key_length_mla": None, a + "value_length_mla": None}
    new = {k: v for k, v in new.items() if k not in keep}
    new.update(meta or {})
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":  # the writer's own
            continue
        if k in new:
            if new[k] is not None:
                w.add_key_value(k, new[k], f.types[0])
            continue
        vt = f.types[0]
        w.add_key_value(k, f.contents(), vt, f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name.endswith("attn_v_b.weight"):
            continue
        if t.name.endswith("attn_k_b.weight"):
            i = t.name.split(".")[1]
            kv_b = st[f"model.layers.{i}.self_attn.kv_b_proj.weight"].to(torch.float32).numpy()
            w.add_tensor(f"blk.{i}.attn_kv_b.weight", kv_b)  # [H * (nope + v), kv_lora_rank], as HF saves it
            continue
        assert t.tensor_type.name in ("F32", "F16"), t.tensor_type  # the template is converted at f32
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="session")
def kvb_gguf(tmp_path_factory):
    def sources(out):
        tiny_llama(out / "ds", 7, "DeepseekV3", **_DS)
        _random_buffers(out / "ds", 0)
        _set(out / "ds", scoring_func="sigmoid")
        return [f"{out / 'ds'}:f32:{out / 'ds.f32.gguf'}:spm"]
    return gguf_converted(tmp_path_factory, "gguf-kvb", sources, Path(__file__).read_text(),
                          then=lambda out: write_old_layout(out / "ds.f32.gguf", out / "ds", out / "ds.kvb.gguf"))


def test_the_fixture_has_the_old_layout(kvb_gguf):
    import gguf
    r = gguf.GGUFReader(str(kvb_gguf / "ds.kvb.gguf"))
    names = {t.name: t.shape.tolist() for t in r.tensors}
    assert names["blk.1.attn_kv_b.weight"] == [KV, H * (NOPE + V)]  # GGUF's reversed dims
    assert not any("attn_k_b" in n or "attn_v_b" in n for n in names)
    f = {k: v.contents() for k, v in r.fields.items() if not isinstance(v.contents(), list)}
    assert "deepseek2.attention.key_length_mla" not in f and f["deepseek2.attention.key_length"] == NOPE + ROPE
    assert f["deepseek2.attention.head_count_kv"] == H and f["deepseek2.attention.value_length"] == V


def test_read_as_its_own_layout_with_the_hf_config(kvb_gguf):
    from ckdiff.formats.readers import open_checkpoint
    from ckdiff.models.config import canonical_config
    old, new, hf = (open_checkpoint(str(kvb_gguf / n)) for n in ("ds.kvb.gguf", "ds.f32.gguf", "ds"))
    assert (old.format, new.format) == ("gguf-kvb", "gguf")
    c = [canonical_config(x.format, x.config, x.tensors) for x in (old, new, hf)]
    assert c[0] == c[1], {k: (c[0].get(k), c[1].get(k)) for k in set(c[0]) | set(c[1]) if c[0].get(k) != c[1].get(k)}
    for k in ("qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "head_dim", "heads", "kv_heads"):
        assert c[0][k] == c[2][k], k


def test_against_the_hf_source(kvb_gguf, run_cli):
    old, hf = kvb_gguf / "ds.kvb.gguf", kvb_gguf / "ds"
    for a, b in ((old, hf), (hf, old)):  # the verdict does not depend on the order
        code, out, err = run_cli(a, b)
        assert code == 0 and out.startswith("EQUIVALENT"), out + err


def test_against_the_new_layout(kvb_gguf, run_cli):
    """Tensor-wise: kv_b_proj read from attn_kv_b equals kv_b_proj fused back from attn_k_b / attn_v_b."""
    from ckdiff.formats import registry
    from ckdiff.formats.layouts import convert_formats
    from ckdiff.formats.readers import open_checkpoint
    from ckdiff.models.config import model_config
    old, new = kvb_gguf / "ds.kvb.gguf", kvb_gguf / "ds.f32.gguf"
    for a, b in ((old, new), (new, old)):
        code, out, err = run_cli(a, b)
        assert code == 0 and out.startswith("EQUIVALENT"), out + err
    hf = {}
    for p in (old, new):
        ck = open_checkpoint(str(p))
        hf[p] = convert_formats(ck.tensors, registry.lookup(ck.format), registry.get("hf"), model_config(ck), ck.path)
    for i in (0, 1):
        k = f"model.layers.{i}.self_attn.kv_b_proj.weight"
        assert hf[old][k].load().equal(hf[new][k].load()), k
    assert sorted(hf[old]) == sorted(hf[new])


def test_logits_agree(kvb_gguf, run_cli):
    code, out, err = run_cli("logits", kvb_gguf / "ds.kvb.gguf", kvb_gguf / "ds")
    assert code == 0 and out.startswith("EQUIVALENT"), out + err


def test_k_and_v_swapped_in_attn_kv_b_is_named(kvb_gguf, run_cli, tmp_path):
    """An old-converter bug: each head's kv_b rows [v | k_nope] instead of [k_nope | v] (nope = v = 8 rows here, so
    a row permutation: named as one, the rows a head starts with being its v rows 8..15). Compared in the GGUF
    layout, so the family's own MLA diagnoses, which read HF names, do not apply."""
    def edit(t):
        kv_b = t["blk.1.attn_kv_b.weight"]
        h = np.array(kv_b).reshape(H, NOPE + V, KV)
        kv_b[...] = np.concatenate([h[:, NOPE:], h[:, :NOPE]], axis=1).reshape(H * (NOPE + V), KV)
    bad = edit_gguf_tensors(kvb_gguf / "ds.kvb.gguf", tmp_path / "bad.gguf", edit)
    code, out, err = run_cli(bad, kvb_gguf / "ds")
    assert code == 1 and out.startswith("DIFFER"), out + err
    table = out.split("mismatching tensors", 1)[-1]  # not the paths, which hold the test's name
    assert "blk.1.attn_kv_b.weight" in table and "rows permuted" in table, out
    assert "from [8, 9, 10, 11, 12, 13, 14, 15]" in " ".join(table.split()), out


@pytest.mark.parametrize("meta,keep,want", [
    ({"deepseek2.attention.head_count_kv": 1}, (), "'deepseek2.attention.head_count_kv': expected the head count (4)"),
    ({}, ("deepseek2.attention.key_length_mla", "deepseek2.attention.value_length_mla"), "holds attn_kv_b"),
    ({"deepseek2.attention.key_length": ROPE}, (), "'deepseek2.attention.key_length': expected more than"),
])
def test_contradicting_metadata_is_one_line(kvb_gguf, run_cli, tmp_path, meta, keep, want):
    bad = write_old_layout(kvb_gguf / "ds.f32.gguf", kvb_gguf / "ds", tmp_path / "bad.gguf", meta, keep)
    code, out, err = run_cli(bad, kvb_gguf / "ds")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "bad.gguf" in lines[0] and want in lines[0], out + err


def test_split_layout_without_the_mla_lengths_is_refused(kvb_gguf, run_cli, tmp_path):
    """attn_k_b / attn_v_b (the converter's file) with the MLA lengths taken out: llama.cpp cannot run it."""
    import gguf
    r = gguf.GGUFReader(str(kvb_gguf / "ds.f32.gguf"))
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "deepseek2")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k.endswith("_mla"):
            continue
        vt = f.types[0]
        w.add_key_value(k, f.contents(), vt, f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, out, err = run_cli(tmp_path / "bad.gguf", kvb_gguf / "ds")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "lacks deepseek2.attention.key_length_mla" in lines[0], out + err
