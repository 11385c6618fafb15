"""Reference runtimes vs transformers, correct conversions green, injected bugs red."""
import pytest
import torch

from ckdiff.compare.logits import compare_logits, config_of
from ckdiff.formats.readers import open_checkpoint
from ckdiff.tensor.ops import rope_to_half, rope_to_interleaved
from ckdiff.io.safetensors import read_safetensors, write_safetensors
from ckdiff.golden.emit import emit
from ckdiff.golden.models import TINY, lazy, tiny_config
from ckdiff.runtime.forward import run
from helpers import convert

FAMILIES = ["llama-gqa", "llama-spec", "llama-mha-tied", "llama-mqa-hd", "mistral-gqa", "falcon-7b", "falcon-40b",
            "gemma", "mixtral"]


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_runtime_agrees_with_transformers(tiny_hf, name):
    transformers = pytest.importorskip("transformers")
    path = tiny_hf(name)
    m = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(0, TINY[name].vocab, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(ids, output_hidden_states=True)
    ck = open_checkpoint(str(path))
    ours = run(ck, config_of(ck), ids)
    # float32 rounding, relative to each tensor's scale (Gemma's residual stream is ~sqrt(D) larger)
    scale = lambda t: 1e-5 * float(t.abs().max())  # noqa: E731
    torch.testing.assert_close(ours.logits, ref.logits, rtol=1e-4, atol=scale(ref.logits))
    # hidden states after each layer (transformers' last entry is after the final norm)
    for i, h in enumerate(ours.hidden[:-1]):
        torch.testing.assert_close(h, ref.hidden_states[i + 1], rtol=1e-4, atol=scale(ref.hidden_states[i + 1]))


def _layouts(name, tmp_path, dtype="float32"):
    out = {"hf": emit(tmp_path / "hf", name, "hf", dtype)}
    cfg = tiny_config(name)
    if cfg.family in ("gemma", "mixtral"):
        out["jetstream"] = emit(tmp_path / "js", name, "jetstream", dtype)
        return out
    out["megatron"] = emit(tmp_path / "meg", name, "megatron", dtype)
    tp = 2 if cfg.kv_heads % 2 == 0 else 1
    out["megatron-tp-pp"] = emit(tmp_path / "meg2", name, "megatron", dtype, tp=tp, pp=2)
    if cfg.family == "llama":
        out["meta"] = emit(tmp_path / "meta", name, "meta", dtype, shards=2 if cfg.kv_heads % 2 == 0 else 1)
        out["jetstream"] = emit(tmp_path / "js", name, "jetstream", dtype)
    return out


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-gqa", "falcon-40b", "falcon-7b", "gemma", "mixtral"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_layout_agrees(tmp_path, name, dtype):
    """Weights in ``dtype``; computed in float32, and also in ``dtype`` except for MoE, whose discrete
    top-k routing turns 16-bit rounding differences between runtimes into different experts."""
    lay = _layouts(name, tmp_path, dtype)
    hf = open_checkpoint(str(lay.pop("hf")))
    computes = ["float32"] + ([dtype] if dtype != "float32" and tiny_config(name).family != "mixtral" else [])
    for layout, path in lay.items():
        for compute in computes:
            r = compare_logits(hf, open_checkpoint(str(path)), dtype=compute)
            assert r.equivalent, (layout, compute, r.max_kl, r.threshold)
            assert r.top1_agreement == 1.0 if compute == "float32" else r.top1_agreement > 0.95


def _mutate_js(src, dst, fn):
    import shutil
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    st = {k: v.load().clone() for k, v in read_safetensors(f).items()}
    fn(st)
    f.unlink()
    write_safetensors(f, lazy(st).values())
    return dst


def _bugs(cfg):
    H, K, hd, L = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.layers
    wq, wk, wv = "layers.{}.attention.wq.weight", "layers.{}.attention.wk.weight", "layers.{}.attention.wv.weight"

    def each(fn):
        def apply(st):
            for i in range(L):
                fn(st, i)
        return apply

    def skip_rope(st, i):
        st[wq.format(i)] = rope_to_half(st[wq.format(i)], H, hd)
        st[wk.format(i)] = rope_to_half(st[wk.format(i)], K, hd)

    def k_with_h(st, i):
        st[wk.format(i)] = rope_to_interleaved(rope_to_half(st[wk.format(i)], K, hd), H, K * hd // H)

    def q_with_k(st, i):
        st[wq.format(i)] = rope_to_interleaved(rope_to_half(st[wq.format(i)], H, hd), K, H * hd // K)

    def gate_up(st, i):
        a, b = f"layers.{i}.feed_forward.w1.weight", f"layers.{i}.feed_forward.w3.weight"
        st[a], st[b] = st[b], st[a]

    def k_v(st, i):
        st[wk.format(i)], st[wv.format(i)] = st[wv.format(i)], st[wk.format(i)]

    def transpose_wo(st, i):
        st[f"layers.{i}.attention.wo.weight"] = st[f"layers.{i}.attention.wo.weight"].T.contiguous()

    def swap_layers(st):
        for k in [k for k in st if k.startswith("layers.0.")]:
            o = k.replace("layers.0.", "layers.1.", 1)
            st[k], st[o] = st[o], st[k]

    def norm(st):
        st["layers.1.ffn_norm.weight"] = st["layers.1.ffn_norm.weight"] * 1.01

    return {"rope skipped": each(skip_rope), "k permuted with H": each(k_with_h), "q permuted with K": each(q_with_k),
            "gate/up swapped": each(gate_up), "k/v swapped": each(k_v), "wo transposed": each(transpose_wo),
            "two layers swapped": swap_layers, "norm x 1.01": norm}


@pytest.mark.parametrize("bug", list(_bugs(tiny_config("llama-gqa"))))
def test_injected_bug_turns_logits_red(tiny_hf, tmp_path, bug):
    cfg = tiny_config("llama-gqa")
    assert cfg.heads // cfg.kv_heads != cfg.kv_heads and cfg.q_rows == cfg.hidden  # H/K != K; wo square
    good = emit(tmp_path / "js", "llama-gqa", "jetstream")
    bad = _mutate_js(good, tmp_path / "bad", _bugs(cfg)[bug])
    hf = open_checkpoint(str(tiny_hf("llama-gqa")))
    assert compare_logits(hf, open_checkpoint(str(good))).equivalent
    r = compare_logits(hf, open_checkpoint(str(bad)))
    assert not r.equivalent, (bug, r.max_kl)
    if bug == "two layers swapped":
        assert r.first_divergent_layer == 0


def test_rotary_bug_is_invisible_at_position_zero(tiny_hf, tmp_path):
    """Why prompts must be longer than one token: a skipped permutation leaves position 0 exact."""
    cfg = tiny_config("llama-gqa")
    bad = _mutate_js(emit(tmp_path / "js", "llama-gqa", "jetstream"), tmp_path / "bad", _bugs(cfg)["rope skipped"])
    hf, b = open_checkpoint(str(tiny_hf("llama-gqa"))), open_checkpoint(str(bad))
    ids = torch.randint(0, cfg.vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    la, lb = run(hf, config_of(hf), ids).logits, run(b, config_of(b), ids).logits
    assert torch.allclose(la[:, 0], lb[:, 0], atol=1e-5)
    assert (la[:, 5:] - lb[:, 5:]).abs().max() > 1e-2


def test_megatron_gate_up_bug_red(tmp_path):
    hf = open_checkpoint(str(emit(tmp_path / "hf", "llama-gqa", "hf")))
    meg = emit(tmp_path / "meg", "llama-gqa", "megatron")
    f = meg / "release/mp_rank_00/model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    tr = obj["model"]["language_model"]["transformer"]
    for i in range(2):
        w = tr[f"layers.{i}.mlp.dense_h_to_4h.weight"]
        tr[f"layers.{i}.mlp.dense_h_to_4h.weight"] = torch.cat([w[96:], w[:96]])
    torch.save(obj, f)
    assert not compare_logits(hf, open_checkpoint(str(meg))).equivalent


def test_cli_logits_json_and_exit_codes(tiny_hf, tmp_path, run_cli):
    import json
    convert("to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", tiny_hf("llama-gqa"),
            "--output_checkpoint_dir", tmp_path / "js")
    code, out, _ = run_cli("logits", tiny_hf("llama-gqa"), tmp_path / "js", "--json", tmp_path / "l.json",
                           "--length", 33, "--batch", 2)
    assert code == 0 and "EQUIVALENT" in out
    d = json.loads((tmp_path / "l.json").read_text())
    assert d["kind"] == "logits" and d["result"]["length"] == 33 and d["result"]["top1_agreement"] == 1.0
    code, _, err = run_cli("logits", tiny_hf("llama-gqa"), tmp_path / "js", "--length", 1)
    assert code == 2 and "1-token" in err
    code, _, _ = run_cli("logits", tiny_hf("llama-gqa"), tiny_hf("llama-gqa", seed=1))
    assert code == 1


def test_quantized_vs_float_uses_its_own_threshold(tiny_hf, tmp_path):
    convert("to-jetstream", "--model_name", "llama-2", "--input_checkpoint_dir", tiny_hf("llama-gqa"),
            "--output_checkpoint_dir", tmp_path / "q", "--quantize_weights", "--quantize_type", "int8_per_channel")
    hf, q = open_checkpoint(str(tiny_hf("llama-gqa"))), open_checkpoint(str(tmp_path / "q"))
    r = compare_logits(hf, q)
    assert r.equivalent and r.max_kl > 1e-4 and r.noise_floor["max_kl"] > 1e-4  # quantization noise, not a bug
    bad = _mutate_js(tmp_path / "q", tmp_path / "bad", lambda st: st.update({
        "layers.0.attention.wk.weight": st["layers.0.attention.wv.weight"],
        "layers.0.attention.wk.weight_scaler": st["layers.0.attention.wv.weight_scaler"]}))
    assert not compare_logits(hf, open_checkpoint(str(bad))).equivalent
