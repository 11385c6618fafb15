"""The reference runtime composed from a family's declaration alone: a toy llama with q/k/v biases
(the toy family of test_family_toy_e2e.py) runs in the HF layout (checked against transformers' Qwen2, which is exactly
that model) and in the Megatron-LLM layout (weights laid out here by index loops from the spec)."""
import dataclasses

import pytest
import torch

from ckdiff.models import families
from ckdiff.models.config import ModelConfig
from ckdiff.tensor.lazy import Checkpoint
from ckdiff.models.families import LLAMA_NAMES, Block, Family
from ckdiff.golden.models import lazy
from ckdiff.runtime.forward import run

_L = "model.layers.{i}."
TOY = Family("toy-qkv-bias", ("toy_qkv_bias",), "ToyQkvBiasForCausalLM", Block(qkv_bias=True),
             {**LLAMA_NAMES, "q_b": _L + "self_attn.q_proj.bias", "k_b": _L + "self_attn.k_proj.bias",
              "v_b": _L + "self_attn.v_proj.bias"},
             layouts=frozenset({"hf", "megatron"}))

CFG = ModelConfig(family=TOY.name, hidden=64, layers=2, heads=8, kv_heads=2, head_dim=8, ffn=96, vocab=61,
                  norm_eps=1e-6, rope_theta=10000.0, tied=False)


@pytest.fixture
def toy():
    families.register(TOY)
    try:
        yield TOY
    finally:  # families.py has no unregister: undo register() by hand
        families.FAMILIES.pop(TOY.name, None)
        for mt in TOY.hf_model_types:
            families._BY_MODEL_TYPE.pop(mt, None)


def _hf_state(cfg: ModelConfig, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    D, F, V, q, kv = cfg.hidden, cfg.ffn, cfg.vocab, cfg.q_rows, cfg.kv_rows
    shapes = {"embed": (V, D), "head": (V, D), "norm": (D,), "attn_norm": (D,), "mlp_norm": (D,),
              "q": (q, D), "k": (kv, D), "v": (kv, D), "o": (D, q), "gate": (F, D), "up": (F, D), "down": (D, F),
              "q_b": (q,), "k_b": (kv,), "v_b": (kv,)}
    st = {}
    for slot, key in TOY.hf_names.items():
        for i in (range(cfg.layers) if "{i}" in key else [None]):
            shape = shapes[slot]
            if slot.endswith("norm"):
                t = 1.0 + 0.2 * torch.randn(shape, generator=g)
            elif slot.endswith("_b"):
                t = 0.5 * torch.randn(shape, generator=g)  # large enough that a lost or misplaced bias shows
            else:
                t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
            st[key.format(i=i)] = t
    return st


def _ids(cfg):
    return torch.randint(0, cfg.vocab, (2, 11), generator=torch.Generator().manual_seed(5))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_toy_hf_layout_agrees_with_transformers_qwen2(toy):
    transformers = pytest.importorskip("transformers")
    st = _hf_state(CFG)
    qc = transformers.Qwen2Config(
        vocab_size=CFG.vocab, hidden_size=CFG.hidden, intermediate_size=CFG.ffn, num_hidden_layers=CFG.layers,
        num_attention_heads=CFG.heads, num_key_value_heads=CFG.kv_heads, rms_norm_eps=CFG.norm_eps,
        rope_theta=CFG.rope_theta, tie_word_embeddings=False, use_sliding_window=False,
        attn_implementation="eager")
    m = transformers.Qwen2ForCausalLM(qc).eval()
    missing, unexpected = m.load_state_dict(st, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    ids = _ids(CFG)
    with torch.no_grad():
        ref = m(ids, output_hidden_states=True)
    ours = run(Checkpoint("toy-hf", "hf", lazy(st)), CFG, ids)
    _close(ours.logits, ref.logits)
    for i, h in enumerate(ours.hidden[:-1]):
        _close(h, ref.hidden_states[i + 1])
    # the biases take part: the same weights without them give other logits
    nob = run(Checkpoint("toy-hf", "hf", lazy({k: v for k, v in st.items() if not k.endswith(".bias")})),
              dataclasses.replace(CFG, family="llama"), ids)
    assert (nob.logits - ref.logits).abs().max() > 1e-2


def _megatron_state(st: dict, cfg: ModelConfig, permute_bias: bool = True) -> dict:
    """Megatron-LLM tensors written from Megatron-LLM's hf_to_megatron.py layout (fused qkv per query group,
    [gate; up], the vocab padding) by index loops."""
    H, K, d, F = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ffn
    r = H // K

    def P(block):  # section 8: Megatron_row[2i + j] = HF_row[j * (d/2) + i], one head at a time
        out = torch.empty_like(block)
        for i in range(d // 2):
            for j in range(2):
                out[2 * i + j] = block[j * (d // 2) + i]
        return out

    pb = P if permute_bias else (lambda t: t)
    E = "language_model.encoder."
    out = {"language_model.embedding.word_embeddings.weight": st["model.embed_tokens.weight"],
           E + "final_layernorm.weight": st["model.norm.weight"],
           "language_model.lm_head": st["lm_head.weight"]}
    for i in range(cfg.layers):
        hf = lambda s: st[f"model.layers.{i}.{s}"]  # noqa: E731
        q, k, v = hf("self_attn.q_proj.weight"), hf("self_attn.k_proj.weight"), hf("self_attn.v_proj.weight")
        qb, kb, vb = hf("self_attn.q_proj.bias"), hf("self_attn.k_proj.bias"), hf("self_attn.v_proj.bias")
        w_rows, b_rows = [], []
        for g in range(K):  # section 7: K groups of [P(q) x r, P(k), v]
            for h in range(g * r, g * r + r):
                w_rows.append(P(q[h * d:(h + 1) * d]))
                b_rows.append(pb(qb[h * d:(h + 1) * d]))
            w_rows.append(P(k[g * d:(g + 1) * d]))
            b_rows.append(pb(kb[g * d:(g + 1) * d]))
            w_rows.append(v[g * d:(g + 1) * d])
            b_rows.append(vb[g * d:(g + 1) * d])
        up, gate = hf("mlp.up_proj.weight"), hf("mlp.gate_proj.weight")
        glu = torch.empty(2 * F, cfg.hidden)
        for row in range(F):  # section 9: rows [up; gate]
            glu[row] = up[row]
            glu[F + row] = gate[row]
        p = f"{E}layers.{i}."
        out.update({p + "input_layernorm.weight": hf("input_layernorm.weight"),
                    p + "self_attention.query_key_value.weight": torch.cat(w_rows),
                    p + "self_attention.query_key_value.bias": torch.cat(b_rows),
                    p + "self_attention.dense.weight": hf("self_attn.o_proj.weight"),
                    p + "post_attention_layernorm.weight": hf("post_attention_layernorm.weight"),
                    p + "mlp.dense_h_to_4h.weight": glu,
                    p + "mlp.dense_4h_to_h.weight": hf("mlp.down_proj.weight")})
    return out


def test_toy_megatron_layout_agrees_with_hf_layout(toy):
    st = _hf_state(CFG, seed=1)
    ids = _ids(CFG)
    ref = run(Checkpoint("toy-hf", "hf", lazy(st)), CFG, ids)
    meg = run(Checkpoint("toy-meg", "megatron", lazy(_megatron_state(st, CFG))), CFG, ids)
    _close(meg.logits, ref.logits)
    for a, b in zip(meg.hidden, ref.hidden):
        _close(a, b)
    # the fused bias is read in the grouped, rotary-permuted row order: left in HF row order, it differs
    bad = run(Checkpoint("toy-meg", "megatron", lazy(_megatron_state(st, CFG, permute_bias=False))), CFG, ids)
    assert (bad.logits - ref.logits).abs().max() > 1e-2


def test_a_block_the_layout_cannot_store_is_one_clear_error(toy):
    from ckdiff.errors import InputError
    st = _megatron_state(_hf_state(CFG), CFG)
    moe = dataclasses.replace(CFG, family="mixtral", experts=2, experts_per_tok=1)
    with pytest.raises(InputError, match="megatron layout stores no 'router' tensor"):
        run(Checkpoint("toy-meg", "megatron", lazy(st)), moe, _ids(CFG))
