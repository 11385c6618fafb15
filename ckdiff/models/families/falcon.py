"""Falcon: fused QKV, parallel attention and MLP, LayerNorm with biases (7B one norm, 40B two)."""
from __future__ import annotations

from ckdiff.models.family import Act, Block, Family, MegatronModel, Mlp, Norm, register

_FH = "transformer.h.{i}."
FALCON_NAMES = {  # per-layer slots in the order the tiny golden models draw their random weights
    "embed": "transformer.word_embeddings.weight", "norm": "transformer.ln_f.weight",
    "norm_b": "transformer.ln_f.bias",
    "attn_norm": _FH + "input_layernorm.weight", "attn_norm_b": _FH + "input_layernorm.bias",
    "ln_attn": _FH + "ln_attn.weight", "ln_attn_b": _FH + "ln_attn.bias",
    "ln_mlp": _FH + "ln_mlp.weight", "ln_mlp_b": _FH + "ln_mlp.bias",
    "qkv": _FH + "self_attention.query_key_value.weight", "o": _FH + "self_attention.dense.weight",
    "up": _FH + "mlp.dense_h_to_4h.weight", "down": _FH + "mlp.dense_4h_to_h.weight",
}



def _falcon_read(cfg: dict, where: str, strict: bool) -> dict:
    """Falcon's KV head count is spelled by two flags; two architectures are refused when strict."""
    from ckdiff.errors import InputError
    new = bool(cfg.get("new_decoder_architecture", False))
    H = cfg.get("num_attention_heads", cfg.get("n_head"))
    K = (cfg.get("num_kv_heads") or H) if new else (1 if cfg.get("multi_query", True) else H)
    parallel = bool(cfg.get("parallel_attn", True))
    if strict and not parallel:
        raise InputError(where, "falcon with parallel_attn=false is not supported")
    if strict and not new and K != 1:
        raise InputError(where, "falcon with the per-head [n, 3, d] QKV layout is not supported")
    return dict(kv_heads=K, two_norms=new, parallel_attn=parallel)


def _falcon_write(cfg) -> dict:
    return {"new_decoder_architecture": cfg.two_norms, "multi_query": cfg.kv_heads == 1}

FALCON = register(Family(
    "falcon", ("falcon", "refinedweb", "refinedwebmodel", "rw"), "FalconForCausalLM",
    Block(norm=Norm.LAYER, act=Act.GELU, mlp=Mlp.PLAIN, parallel=True, fused_qkv=True), FALCON_NAMES,
    config_keys={"heads": ("num_attention_heads", "n_head"), "layers": ("num_hidden_layers", "n_layer"),
                 "kv_heads": "num_kv_heads", "head_dim": None, "ffn": "ffn_hidden_size",
                 "norm_eps": "layer_norm_epsilon", "sliding_window": None, "rope_scaling": None},
    hf_defaults={"bias": False, "alibi": False, "bos_token_id": 11, "eos_token_id": 11},  # FalconConfig's
    block_keys={"parallel": "parallel_attn"}, hf_read=_falcon_read, hf_write=_falcon_write,
    layouts=frozenset({"hf", "megatron"}), always_tied=True,
    megatron_models=(MegatronModel("falcon", {7: (32, 4544, 71, 1), 40: (60, 8192, 128, 8)}, "tiiuae/falcon-{size}b",
                                   tokenizer_type="FalconTokenizer"),),
    megatron_args={"use_flash_attn": True, "hidden_dropout": 0.0}, megatron_pads_vocab=False))
