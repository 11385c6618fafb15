"""The readers of torch DCP, Megatron-Core torch_dist, GGUF and FP8 block-scaled safetensors, and coverage. Fixtures are written by the real libraries
(torch.distributed.checkpoint.save in one process; megatron-core's key layout, since megatron-core does
not run on CPU here) during the tests."""
from dataclasses import replace
import io
import json
import pickle
import warnings

import gguf
import pytest
import torch

from ckdiff.compare.diff import compare_checkpoints
from ckdiff.formats import dcp as dcp_mod
from ckdiff.formats.readers import open_checkpoint
from ckdiff.formats.mcore import write_mcore
from ckdiff.errors import InputError
from ckdiff.golden.models import hf_state, tiny_config
from helpers import dcp_save as _dcp_save, write_chunked


# ------------------------------------------------------------------ DCP
def test_dcp_reader_reads_what_torch_saved(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {"a.weight": torch.randn(37, 5, generator=g), "b": torch.randn(9, generator=g).bfloat16(),
             "c": torch.randn(2, 3, 4, generator=g).half(), "note": b"not a tensor"}
    _dcp_save(state, tmp_path / "ck")
    ck = open_checkpoint(str(tmp_path / "ck"))
    assert ck.format == "dcp" and set(ck.tensors) == {"a.weight", "b", "c"}
    assert ck.meta["skipped"] == {"note": "non-tensor (BYTE_IO) item"}
    for k in ("a.weight", "b", "c"):
        assert ck[k].dtype == state[k].dtype and torch.equal(ck[k].load(), state[k])
    assert torch.equal(ck["a.weight"].rows(11, 30), state["a.weight"][11:30])
    # the torch loader agrees (the library is the oracle)
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _load_state_dict_from_keys({"a.weight"}, checkpoint_id=str(tmp_path / "ck"))
    assert torch.equal(ref["a.weight"], ck["a.weight"].load())


def test_dcp_rows_read_only_intersecting_chunks(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 6, generator=g)
    root = write_chunked(tmp_path / "ck", {"w": w}, {"w": [(0, 7), (7, 20), (20, 33), (33, 40)]})
    ck = open_checkpoint(str(root))
    assert ck.format == "dcp" and ck["w"].shape == (40, 6)
    read = []
    real = dcp_mod.read_range
    monkeypatch.setattr(dcp_mod, "read_range", lambda f, o, n, t=(): read.append(o) or real(f, o, n, t))
    assert torch.equal(ck["w"].rows(8, 19), w[8:19])
    assert len(read) == 1  # one chunk (7..20) only
    read.clear()
    assert torch.equal(ck["w"].rows(5, 22), w[5:22]) and len(read) == 3
    assert torch.equal(ck["w"].load(), w)


def test_dcp_metadata_pickle_with_foreign_global_is_refused(tmp_path):
    _dcp_save({"a": torch.randn(3)}, tmp_path / "ck")

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("true",))
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(InputError) as e:
        open_checkpoint(str(tmp_path / "ck"))
    assert ".metadata" in str(e.value) and "refused to unpickle" in str(e.value) and "\n" not in str(e.value)


def test_dcp_missing_chunk_is_one_line(tmp_path):
    w = torch.randn(10, 4)
    root = write_chunked(tmp_path / "ck", {"w": w}, {"w": [(0, 4), (4, 10)]})
    md = pickle.loads((root / ".metadata").read_bytes())
    md.state_dict_metadata["w"].chunks.pop()
    (root / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(InputError, match="chunks hold 16 elements"):
        open_checkpoint(str(root))


# ------------------------------------------------------------------ Megatron-Core torch_dist
@pytest.mark.parametrize("model,stacked,common", [("llama-gqa", True, "dcp"), ("llama-gqa", False, "common.pt"),
                                                  ("mixtral", True, "dcp"), ("llama-mha-tied", True, "dcp")])
def test_mcore_maps_and_compares_with_hf(tmp_path, tiny_hf, run_cli, model, stacked, common):
    cfg = tiny_config(model)
    root = write_mcore(tmp_path / "mc", hf_state(cfg), cfg, stacked=stacked, common=common)
    hf = tiny_hf(model)
    ck = open_checkpoint(str(root))
    assert ck.format == "mcore" and ck.config["num_layers"] == cfg.layers
    assert any("_extra_state" in k for k in ck.meta["skipped"])
    res = compare_checkpoints(open_checkpoint(str(hf)), ck)
    assert res.equivalent, (res.counts(), res.notes)
    assert any("vocab padding" in n for n in res.notes)
    cov = res.coverage["B"]
    assert not cov["unaccounted"] and not res.coverage["A"]["unaccounted"]
    assert any("_extra_state" in k for k in cov["dropped"])
    assert cov["consumed_by_rules"] == len(ck.tensors)
    code, out, _ = run_cli(hf, root)
    assert code == 0, out
    code, out, _ = run_cli(root, hf)  # the other direction maps HF into the mcore layout
    assert code == 0, out


def test_mcore_interleaved_rotary_from_args(tmp_path, tiny_hf):
    cfg = tiny_config("llama-gqa")
    cfg = replace(cfg, rotary_rows="interleaved")
    root = write_mcore(tmp_path / "mc", hf_state(cfg), cfg)
    assert open_checkpoint(str(root)).config["rotary_interleaved"] is True
    assert compare_checkpoints(open_checkpoint(str(tiny_hf("llama-gqa"))), open_checkpoint(str(root))).equivalent
    # the same rows read as rotate_half are wrong: q/k differ
    cfg2 = tiny_config("llama-gqa")
    wrong = write_mcore(tmp_path / "mc2", hf_state(cfg), cfg2)
    res = compare_checkpoints(open_checkpoint(str(tiny_hf("llama-gqa"))), open_checkpoint(str(wrong)))
    assert res.equivalent  # control: same weights written rotate_half are fine
    t = open_checkpoint(str(root))
    t.config["rotary_interleaved"] = False  # a reader that ignored the flag
    bad = compare_checkpoints(open_checkpoint(str(tiny_hf("llama-gqa"))), t)
    assert not bad.equivalent
    assert {r.name for r in bad.tensors if r.status == "differ"} >= {"model.layers.0.self_attn.q_proj.weight",
                                                                      "model.layers.0.self_attn.k_proj.weight"}


def test_mcore_wrong_qkv_group_order_is_caught(tmp_path, tiny_hf):
    cfg = tiny_config("llama-gqa")
    state = hf_state(cfg)
    k = "model.layers.1.self_attn.k_proj.weight"
    state[k] = state[k].reshape(cfg.kv_heads, -1, cfg.hidden).flip(0).reshape(-1, cfg.hidden)  # kv groups swapped
    root = write_mcore(tmp_path / "mc", state, cfg)
    res = compare_checkpoints(open_checkpoint(str(tiny_hf("llama-gqa"))), open_checkpoint(str(root)))
    assert [r.name for r in res.tensors if not r.ok] == [k]


def test_mcore_dropped_expert_fails(tmp_path, tiny_hf):
    """The 'MoE experts silently dropped' class: a converter that wrote one expert fewer."""
    from dataclasses import replace
    cfg = tiny_config("mixtral")
    fewer = replace(cfg, experts=cfg.experts - 1)
    state = {k: v for k, v in hf_state(cfg).items() if f"experts.{cfg.experts - 1}." not in k}
    state = {k: (v[:-1] if k.endswith("gate.weight") else v) for k, v in state.items()}
    root = write_mcore(tmp_path / "mc", state, fewer, common="common.pt")
    # its own args agree with what it holds: the comparison with the source must fail, naming the expert
    res = compare_checkpoints(open_checkpoint(str(tiny_hf("mixtral"))), open_checkpoint(str(root)))
    assert not res.equivalent
    assert any(r.status == "only-a" and f"experts.{cfg.experts - 1}." in r.name for r in res.tensors)
    # args claiming all experts over a tensor that lacks one: refused with one line
    from ckdiff.formats.mcore import to_args
    args = to_args(cfg, 128)
    torch.save({"args": args, "iteration": 10}, root / "iter_0000010" / "common.pt")
    with pytest.raises(InputError, match="expert axis"):
        open_checkpoint(str(root))


def test_coverage_flags_a_tensor_consumed_twice(tmp_path, tiny_hf, monkeypatch):
    from ckdiff.formats import mcore
    from ckdiff.tensor.table import R
    cfg = tiny_config("llama-gqa")
    root = write_mcore(tmp_path / "mc", hf_state(cfg), cfg)
    real = mcore.hf_to_mcore

    def buggy(c):  # a table that reads the final norm twice (and so could hide a dropped tensor)
        rules = real(c)
        return rules + [R("model.norm.weight", "decoder.final_layernorm.weight")]
    monkeypatch.setattr(mcore, "hf_to_mcore", buggy)
    res = compare_checkpoints(open_checkpoint(str(root)), open_checkpoint(str(tiny_hf("llama-gqa"))))
    assert not res.equivalent
    assert any("consumed by 2 rules" in u for u in res.coverage["B"]["unaccounted"])
    assert any(n.startswith("coverage:") for n in res.notes)


def test_mcore_common_state_with_foreign_code_is_refused(tmp_path):
    cfg = tiny_config("llama-gqa")
    root = write_mcore(tmp_path / "mc", hf_state(cfg), cfg, common="common.pt")

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("true",))
    torch.save({"args": Evil()}, root / "iter_0000010" / "common.pt")
    with pytest.raises(InputError, match="refused to unpickle the common state"):
        open_checkpoint(str(root))


def test_mcore_metadata_json_names_backend(tmp_path):
    cfg = tiny_config("llama-gqa")
    root = write_mcore(tmp_path / "mc", hf_state(cfg), cfg)
    assert json.loads((root / "iter_0000010" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert open_checkpoint(str(root / "iter_0000010")).format == "mcore"
    (root / "iter_0000010" / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    assert open_checkpoint(str(root / "iter_0000010")).format == "dcp"  # plain DCP then


# ------------------------------------------------------------------ GGUF


def _write_hf(path, state, cfg):
    from ckdiff.io.writers import write_hf
    from ckdiff.golden.models import lazy
    path.mkdir(parents=True)
    write_hf(path, lazy(state), cfg.to_hf(), 1)
    return path


@pytest.mark.parametrize("model,qtype", [("llama-gqa", "F16"), ("llama-gqa", "Q8_0"), ("llama-gqa", "Q4_0"),
                                         ("llama-mha-tied", "BF16"), ("mixtral", "Q8_0")])
def test_gguf_written_by_the_package_compares_with_hf(tmp_path, tiny_hf, run_cli, model, qtype):
    from ckdiff.formats.gguf import write_gguf
    cfg = tiny_config(model)
    path = write_gguf(tmp_path / "m.gguf", hf_state(cfg), cfg, qtype)
    ck = open_checkpoint(str(path))
    assert ck.format == "gguf" and "blk.1.attn_k.weight" in ck.tensors
    assert ("output.weight" in ck.tensors) == (not cfg.tied)
    # rows are dequantized by the package: the package's whole-tensor dequantization is the oracle
    from gguf import GGUFReader
    rt = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight")
    ref = torch.from_numpy(gguf.quants.dequantize(rt.data, rt.tensor_type).astype("float32"))
    assert torch.equal(ck["blk.0.attn_q.weight"].rows(3, 40).float(), ref[3:40])
    res = compare_checkpoints(open_checkpoint(str(tiny_hf(model))), ck)
    assert res.equivalent, [(r.name, r.status, r.note) for r in res.tensors if not r.ok]
    if qtype in ("Q8_0", "Q4_0"):
        q = next(r for r in res.tensors if r.name == "blk.0.attn_q.weight")
        assert q.status == "quant" and qtype in q.tol_source
    assert not res.coverage["A"]["unaccounted"] and not res.coverage["B"]["unaccounted"]
    code, out, _ = run_cli(tiny_hf(model), path)
    assert code == 0, out
    # two quantized files compare codes and scales exactly
    same = compare_checkpoints(ck, open_checkpoint(str(path)))
    assert same.equivalent and all(r.status == "equal" for r in same.tensors)


def test_gguf_k_permuted_with_query_heads_is_caught(tmp_path, tiny_hf, monkeypatch):
    """llama.cpp's permute(k, n_head, n_head) bug (k must use the KV head count)."""
    from dataclasses import dataclass

    from ckdiff.formats import gguf as gguf_io
    from ckdiff.tensor.ops import Op

    @dataclass(frozen=True)
    class WrongK(Op):  # llama.cpp's reshape with n = H on k's K*d rows
        heads: int
        rowwise = True

        def __call__(self, xs):
            w = xs[0]
            return [w.reshape(self.heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)]

        def reverse(self):
            return self
    cfg = tiny_config("llama-gqa")
    real = gguf_io.hf_to_gguf

    def buggy(c):
        return [r if r.dst != ("blk.{i}.attn_k.weight",) else type(r)(r.src, r.dst, WrongK(c.heads)) for r in real(c)]
    monkeypatch.setattr(gguf_io, "hf_to_gguf", buggy)
    path = gguf_io.write_gguf(tmp_path / "m.gguf", hf_state(cfg), cfg, "Q8_0")
    monkeypatch.setattr(gguf_io, "hf_to_gguf", real)
    res = compare_checkpoints(open_checkpoint(str(tiny_hf("llama-gqa"))), open_checkpoint(str(path)))
    assert {r.name for r in res.tensors if not r.ok} == {f"blk.{i}.attn_k.weight" for i in range(cfg.layers)}


def _random_kquant_gguf(path, cfg, qtype, seed=0):
    """A GGUF whose 2-D weights are random valid ``qtype`` blocks (the gguf package has no K-quant
    quantizer): random codes and sub-scales, finite positive fp16 super-block scales."""
    import numpy as np
    from ckdiff.formats.gguf import hf_to_gguf
    from ckdiff.tensor.lazy import EagerTensor
    from ckdiff.tensor.table import apply
    rng = np.random.default_rng(seed)
    shapes = {k: tuple(v.shape) for k, v in apply({k: EagerTensor(k, v) for k, v in hf_state(cfg).items()},
                                                   hf_to_gguf(cfg), cfg.layers).items()}
    bs, size = {"Q4_K": (256, 144), "Q6_K": (256, 210)}[qtype]
    w = gguf.GGUFWriter(str(path), "llama")
    for f, v in (("block_count", cfg.layers), ("embedding_length", cfg.hidden), ("feed_forward_length", cfg.ffn),
                 ("head_count", cfg.heads), ("head_count_kv", cfg.kv_heads), ("key_length", cfg.head_dim)):
        getattr(w, f"add_{f}")(v)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_context_length(cfg.max_pos)
    for k, s in shapes.items():
        if len(s) == 1:
            w.add_tensor(k, (1 + 0.1 * rng.standard_normal(s)).astype(np.float32))
            continue
        blocks = rng.integers(0, 256, size=(s[0] * s[1] // bs, size), dtype=np.uint8)
        d = (rng.uniform(1e-3, 4e-3, size=(blocks.shape[0], 1))).astype(np.float16).view(np.uint8)
        if qtype == "Q4_K":
            blocks[:, 0:2] = d
            blocks[:, 2:4] = (rng.uniform(1e-3, 4e-3, size=(blocks.shape[0], 1))).astype(np.float16).view(np.uint8)
        else:
            blocks[:, 208:210] = d
        w.add_tensor(k, blocks.reshape(s[0], -1), raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_gguf_kquants_judged_in_units_of_their_sub_block_scale(tmp_path, qtype):
    from ckdiff.models.config import model_config
    from ckdiff.formats.layouts import convert
    cfg = tiny_config("llama-blockwise")
    path = _random_kquant_gguf(tmp_path / "k.gguf", cfg, qtype)
    ck = open_checkpoint(str(path))
    g = torch.Generator().manual_seed(5)
    hf = {}
    for k, t in convert(ck.tensors, "gguf", "hf", model_config(ck)).items():  # un-permuted, dequantized
        hf[k] = t.load().float().clone()
    # the float source: dequantized values plus rounding noise within 0.45 of each element's scale
    for k_g, t in ck.tensors.items():
        if hasattr(t, "units"):
            pass
    qk = "blk.1.attn_q.weight"
    u = ck[qk].units(0, ck[qk].shape[0])
    assert u.shape == ck[qk].shape and bool((u >= 0).all()) and u.unique().numel() > 10
    cfg_hf = model_config(ck)
    src = _write_hf(tmp_path / "hf", hf, cfg_hf)
    res = compare_checkpoints(open_checkpoint(str(src)), ck)
    assert res.equivalent, [(r.name, r.status, r.note) for r in res.tensors if not r.ok]
    noisy = dict(hf)
    key = "model.layers.1.mlp.down_proj.weight"
    unit = ck["blk.1.ffn_down.weight"].units(0, cfg.hidden)
    noisy[key] = hf[key] + (torch.rand(hf[key].shape, generator=g) - 0.5) * 0.9 * unit
    ok = compare_checkpoints(open_checkpoint(str(_write_hf(tmp_path / "hf2", noisy, cfg_hf))), ck)
    assert ok.equivalent
    bad = dict(hf)
    bad[key] = hf[key].clone()
    i, j = 7, 100
    bad[key][i, j] += 3 * float(unit[i, j]) + 1e-6
    res = compare_checkpoints(open_checkpoint(str(_write_hf(tmp_path / "hf3", bad, cfg_hf))), ck)
    r = next(r for r in res.tensors if r.name == "blk.1.ffn_down.weight")
    assert r.status == "differ" and r.n_over_tol == 1 and r.max_abs_index == [i, j]


# ------------------------------------------------------------------ FP8 block-scaled
def _fp8_quantize(x: torch.Tensor, block=128):
    """DeepSeek-style: per 128x128 block s = amax / 448, codes = x / s rounded to float8_e4m3fn."""
    M, N = x.shape
    gm, gn = -(-M // block), -(-N // block)
    s = torch.zeros(gm, gn)
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    for i in range(gm):
        for j in range(gn):
            blk = x[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s[i, j] = blk.abs().max().clamp_min(1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def _write_fp8(path, state, cfg, mutate=None):
    from ckdiff.io.writers import write_hf
    from ckdiff.golden.models import lazy
    out = {}
    for k, v in state.items():
        if v.dim() == 2 and "embed" not in k and "lm_head" not in k:
            q, s = _fp8_quantize(v)
            out[k], out[k + "_scale_inv"] = q, s
        else:
            out[k] = v
    if mutate:
        mutate(out)
    hfcfg = cfg.to_hf()
    hfcfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [128, 128]}
    path.mkdir(parents=True)
    write_hf(path, lazy(out), hfcfg, 1)
    return path


def test_fp8_block_scaled_compares_with_bf16_in_scale_units(tmp_path):
    cfg = tiny_config("llama-blockwise", "bfloat16")
    cfg.ffn = 704  # not a multiple of 128: partial last block column/row
    state = hf_state(cfg, seed=4)
    src = _write_hf(tmp_path / "bf16", state, cfg)
    fp8 = _write_fp8(tmp_path / "fp8", state, cfg)
    res = compare_checkpoints(open_checkpoint(str(src)), open_checkpoint(str(fp8)))
    assert res.equivalent, [(r.name, r.status, r.note) for r in res.tensors if not r.ok]
    q = next(r for r in res.tensors if r.name == "model.layers.0.mlp.down_proj.weight")
    assert q.status == "quant" and "float8_e4m3fn" in q.tol_source
    assert any("folded into" in why for why in res.coverage["B"]["dropped"].values())
    assert not res.coverage["B"]["unaccounted"]
    # two FP8 checkpoints: codes and scales compared exactly
    same = compare_checkpoints(open_checkpoint(str(fp8)), open_checkpoint(str(fp8)))
    assert same.equivalent and all(r.status == "equal" for r in same.tensors)


@pytest.mark.parametrize("bug", ["scale_block", "scale_transposed", "code"])
def test_fp8_mutations_are_caught(tmp_path, bug):
    cfg = tiny_config("llama-blockwise", "bfloat16")
    state = hf_state(cfg, seed=4)
    key = "model.layers.1.self_attn.q_proj.weight"

    def mutate(out):
        if bug == "scale_block":
            out[key + "_scale_inv"][1, 0] *= 2
        elif bug == "scale_transposed":
            out[key + "_scale_inv"] = out[key + "_scale_inv"].T.contiguous()
        else:
            codes = out[key].view(torch.uint8).clone()
            codes[5, 9] ^= 0x08
            out[key] = codes.view(torch.float8_e4m3fn)
    src = _write_hf(tmp_path / "bf16", state, cfg)
    fp8 = _write_fp8(tmp_path / "fp8", state, cfg, mutate)
    res = compare_checkpoints(open_checkpoint(str(src)), open_checkpoint(str(fp8)))
    assert [r.name for r in res.tensors if not r.ok] == [key]


def test_fp8_codes_read_as_e5m2_or_as_integers_are_named_both_ways(tmp_path):
    """A float side a converter writes from the FP8 file with the e4m3 bytes decoded as e5m2 (computed here: the
    bytes viewed as float8_e5m2 times their 128x128 block scales; NaN and inf where the e4m3 exponent is all ones)
    or cast as integers 0..255 (ml-explore/mlx-lm PR #1192's ``weight.astype(bfloat16)`` on uint8 FP8 bytes), and
    the right reading by the same writer: EQUIVALENT both ways; each misreading named in both orders."""
    from ckdiff.io.writers import write_hf
    from ckdiff.golden.models import lazy
    cfg = tiny_config("llama-blockwise", "bfloat16")
    state = hf_state(cfg, seed=4)
    fp8 = _write_fp8(tmp_path / "fp8", state, cfg)
    st = {k: t.load() for k, t in open_checkpoint(str(fp8), stored=True).tensors.items()}
    encoded = sorted(k for k in st if k + "_scale_inv" in st)
    floats = {}
    for how in ("e4m3fn", "e5m2", "uint8"):
        out = {k: v for k, v in st.items() if not k.endswith("_scale_inv")}
        for k in encoded:
            s = st[k + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
            s = s[:st[k].shape[0], :st[k].shape[1]]
            out[k] = (st[k].view(torch.uint8 if how == "uint8" else getattr(torch, f"float8_{how}")).float()
                      * s).to(torch.bfloat16)
        floats[how] = tmp_path / how
        floats[how].mkdir()
        write_hf(floats[how], lazy(out), cfg.to_hf(), 1)
    for a, b in ((fp8, floats["e4m3fn"]), (floats["e4m3fn"], fp8)):
        res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)))
        assert res.equivalent, [(r.name, r.status) for r in res.tensors if not r.ok]
    for how, read in (("e5m2", "FP8 e5m2"), ("uint8", "uint8, each byte an unsigned integer")):
        for a, b in ((fp8, floats[how]), (floats[how], fp8)):
            res = compare_checkpoints(open_checkpoint(str(a)), open_checkpoint(str(b)))
            wrong = [r for r in res.tensors if not r.ok]
            assert not res.equivalent and sorted(r.name for r in wrong) == encoded
            for r in wrong:
                assert r.findings == [{"kind": "codes-of-another-encoding", "encoding": "float8_e4m3fn block 128x128",
                                       "codes": "FP8 e4m3", "read": read, "shape": ""}], (r.name, r.diagnosis)


# ------------------------------------------------------------------ mutation self-test and golden entries
def test_format_mutations_are_all_caught_and_named(tmp_path):
    from selftest.catalogue import run_format_mutations
    outcomes, baseline = run_format_mutations(tmp_path)
    assert baseline and not any(b.caught for b in baseline), [(b.converter, b.details) for b in baseline]
    missed = [(o.mutation, o.details) for o in outcomes if not (o.caught and o.named)]
    assert not missed


def test_golden_emitter_writes_the_new_layouts(tmp_path):
    from ckdiff.golden.emit import emit
    gold = emit(tmp_path / "hf", "llama-gqa", "hf")
    for layout in ("mcore", "gguf-Q4_0"):
        out = emit(tmp_path / layout, "llama-gqa", layout)
        ck = open_checkpoint(str(out))
        assert ck.format == layout.split("-")[0]
        assert compare_checkpoints(open_checkpoint(str(gold)), ck).equivalent


def test_logits_run_mcore_and_gguf_through_the_hf_convention(tmp_path, run_cli):
    from ckdiff.golden.emit import emit
    gold = emit(tmp_path / "hf", "llama-gqa", "hf")
    code, out, _ = run_cli("logits", gold, emit(tmp_path / "mc", "llama-gqa", "mcore"), "--length", 8)
    assert code == 0, out
    code, out, _ = run_cli("logits", gold, emit(tmp_path / "g", "llama-gqa", "gguf-F32"), "--length", 8)
    assert code == 0, out
    cfg = tiny_config("llama-gqa")
    st = hf_state(cfg)
    st["model.layers.1.mlp.down_proj.weight"] = st["model.layers.1.mlp.down_proj.weight"] * 1.5
    from ckdiff.formats.gguf import write_gguf
    bad = write_gguf(tmp_path / "bad.gguf", st, cfg, "F32")
    code, out, _ = run_cli("logits", gold, bad, "--length", 8)
    assert code == 1


def test_dcp_reads_only_the_bytes_of_the_rows_asked_for(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 30, 8, generator=g)  # a layer-stacked tensor in one chunk
    root = write_chunked(tmp_path / "ck", {"w": w}, {"w": [(0, 4)]})
    ck = open_checkpoint(str(root))
    sizes = []
    real = dcp_mod.read_range
    monkeypatch.setattr(dcp_mod, "read_range", lambda f, o, n, t=(): sizes.append(n) or real(f, o, n, t))
    from ckdiff.formats.dcp import SubTensor
    layer = SubTensor("w2", ck["w"], (2,))
    assert torch.equal(layer.rows(5, 9), w[2, 5:9])
    assert sizes == [4 * 8 * 4]  # rows 5..8 of layer 2 only
    # a chunk whose storage is column-major is read in place too: the span of the rows asked for
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)
    t = torch.randn(6, 5, generator=g)
    d = tmp_path / "nc"
    d.mkdir()
    buf = io.BytesIO()
    torch.save(t.T.contiguous().T, buf)  # column-major storage
    (d / "__0_0.distcp").write_bytes(buf.getvalue())
    md = Metadata(state_dict_metadata={"t": TensorStorageMetadata(TensorProperties(dtype=t.dtype), t.shape,
                                                                  [ChunkStorageMetadata(torch.Size([0, 0]), t.shape)])},
                  storage_data={MetadataIndex("t", torch.Size([0, 0]), 0): _StorageInfo("__0_0.distcp", 0, len(buf.getvalue()))})
    (d / ".metadata").write_bytes(pickle.dumps(md))
    ck2 = open_checkpoint(str(d))
    sizes.clear()
    assert torch.equal(ck2["t"].rows(1, 4), t[1:4]) and ck2["t"].chunks[0].raw[1] == (1, 6)
    assert sizes == [(3 + 4 * 6 - 1 + 1) * 4]  # rows 1..3 of a column-major 6x5: elements 1 to 3 + 4*6


@pytest.mark.parametrize("what", ["truncated-gguf", "truncated-distcp", "evil-archive"])
def test_bad_new_format_inputs_are_one_line_exit_2(tmp_path, run_cli, what):
    from ckdiff.formats.gguf import write_gguf
    cfg = tiny_config("llama-gqa")
    if what == "truncated-gguf":
        p = write_gguf(tmp_path / "m.gguf", hf_state(cfg), cfg, "Q8_0")
        p.write_bytes(p.read_bytes()[:5000])
    elif what == "truncated-distcp":
        _dcp_save({"a": torch.randn(50, 50)}, tmp_path / "ck")
        f = tmp_path / "ck" / "__0_0.distcp"
        f.write_bytes(f.read_bytes()[:3000])
        p = tmp_path / "ck"
    else:  # a chunk archive whose data.pkl calls a function
        class Evil:
            def __reduce__(self):
                import os
                return (os.system, ("true",))
        p = tmp_path / "ck"
        write_chunked(p, {"a": torch.randn(4, 3)}, {"a": [(0, 4)]})
        buf = io.BytesIO()
        torch.save(Evil(), buf)
        md = pickle.loads((p / ".metadata").read_bytes())
        (p / "__0_0.distcp").write_bytes(buf.getvalue())
        for info in md.storage_data.values():
            info.length = len(buf.getvalue())
        (p / ".metadata").write_bytes(pickle.dumps(md))
    code, out, err = run_cli("inspect", p) if what != "evil-archive" else run_cli(p, p)
    assert code == 2 and err.count("\n") == 1 and str(p.name) in err, (code, out, err)


def test_mcore_grouped_gemm_expert_names_are_read_per_expert(tmp_path, tiny_hf):
    """Experts saved one tensor each as ``linear_fc1.weight<e>`` (TE grouped-GEMM parameter names)."""
    import re

    from ckdiff.formats.mcore import COMMON_KEY, to_args
    cfg = tiny_config("mixtral")
    base = open_checkpoint(str(write_mcore(tmp_path / "mc", hf_state(cfg), cfg, stacked=False)))
    state = {}
    for k, t in base.tensors.items():
        m = re.match(r"^(decoder\.layers\.\d+\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12])\.weight$", k)
        state[f"{m.group(1)}.{m.group(3)}.weight{m.group(2)}" if m else k] = t.load().clone()
    assert sum("weight3" in k for k in state) == 2 * cfg.layers
    state[COMMON_KEY] = [{"args": to_args(cfg, cfg.vocab), "iteration": 1}]
    it = tmp_path / "grouped"
    _dcp_save(state, it, flatten=False)
    (it / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    ck = open_checkpoint(str(it))
    assert ck.format == "mcore" and set(ck.tensors) == set(base.tensors)
    assert compare_checkpoints(open_checkpoint(str(tiny_hf("mixtral"))), ck).equivalent
