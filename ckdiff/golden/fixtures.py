"""Expected layouts, written down from the specs: the golden side's own facts.

Literal tables only (no imports from the converters): key names, split rules, shapes and rank layouts
copied by hand from the original tools' layouts: epfLLM/Megatron-LLM ``weights_conversion/hf_to_megatron.py``
at 806a833 ("MLF" below), Meta's ``consolidated.NN.pth`` as transformers' ``convert_llama_weights_to_hf.py``
(01cc9cd) reads it and AI-Hypercomputer/jetstream-pytorch ``convert_checkpoints.py`` at f32f9c6 ("MJF"). The golden emitter (golden/emit.py)
builds every expected checkpoint from these tables and the family declarations' *HF* names (the model's
definition); the converters keep their own tables in formats/layouts.py and formats/megatron_llm.py.
A wrong key or split on either side therefore shows up as a golden diff instead of cancelling out.

Conventions: ``{i}`` is a layer index (stage-local inside a Megatron rank file), ``{attn}`` the
attention prefix (``attention`` legacy / ``self_attention`` native, MLF section 4). A bias slot ``X_b``
that is not listed takes the key of slot ``X`` with its final ``weight`` replaced by ``bias`` (how both
HF and Megatron name biases), and the row operation and split of ``X``.
"""
from __future__ import annotations

# ------------------------------------------------------------------ Meta / JetStream (MJF sections 1, 4, 7)
META_NAMES = {  # canonical slot -> Meta / JetStream key (MJF section 1: Meta names = JetStream names)
    "embed": "tok_embeddings.weight", "norm": "norm.weight", "head": "output.weight",
    "attn_norm": "layers.{i}.attention_norm.weight", "mlp_norm": "layers.{i}.ffn_norm.weight",
    "q": "layers.{i}.attention.wq.weight", "k": "layers.{i}.attention.wk.weight",
    "v": "layers.{i}.attention.wv.weight", "o": "layers.{i}.attention.wo.weight",
    "gate": "layers.{i}.feed_forward.w1.weight", "up": "layers.{i}.feed_forward.w3.weight",
    "down": "layers.{i}.feed_forward.w2.weight",
}
JETSTREAM_GEMMA_NAMES = {  # MJF section 7, Gemma: renamed only, embedder tied, no q/k permutation
    "embed": "embedder.weight", "norm": "norm.weight",
    "attn_norm": "layers.{i}.input_layernorm.weight", "mlp_norm": "layers.{i}.post_attention_layernorm.weight",
    "q": "layers.{i}.self_attn.wq.weight", "k": "layers.{i}.self_attn.wk.weight",
    "v": "layers.{i}.self_attn.wv.weight", "o": "layers.{i}.self_attn.o_proj.weight",
    "gate": "layers.{i}.mlp.gate_proj.weight", "up": "layers.{i}.mlp.up_proj.weight",
    "down": "layers.{i}.mlp.down_proj.weight",
}
JETSTREAM_MOE = {  # MJF section 7, Mixtral: router renamed; HF experts' w{n} stacked on a new axis 0
    "router": "layers.{i}.block_sparse_moe.gate.weight",
    "expert": "layers.{i}.block_sparse_moe.cond_ffn.w{n}",  # no ".weight" suffix; n: 1 gate, 2 down, 3 up
}
# Meta multi-shard merge (MJF section 4): concat axis per key; None = replicated in every shard
META_SHARD_AXIS = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
    "output.weight": 0, "attention_norm.weight": None, "ffn_norm.weight": None, "norm.weight": None,
}
META_EMBED_AXIS = {1: 1, 2: 1, 3: 0}  # tok_embeddings: hidden axis for Llama-1/2, vocab axis for Llama-3
META_PERMUTED = {"llama": True, "mixtral": True, "gemma": False}  # q/k rows interleaved (MJF sections 2, 7)

# ------------------------------------------------------------------ Megatron-LLM (MLF sections 3-12)
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"  # "release" or an iteration, no newline (section 3)
MEGATRON_RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0  # section 4: always write 3.0
# section 4: containers of the two naming forms
MEGATRON_FORMS = {
    "legacy": {"layers": "transformer", "attn": "attention"},       # what hf_to_megatron writes
    "native": {"layers": "encoder", "attn": "self_attention"},      # what Megatron itself writes
}
# sections 6.1 / 6.2: canonical slot -> key inside the layer container (stage-local "layers.{i}.")
MEGATRON_LAYER = {
    "attn_norm": "input_layernorm.weight", "attn_norm_b": "input_layernorm.bias",
    "ln_attn": "input_layernorm.weight", "ln_attn_b": "input_layernorm.bias",      # Falcon-40B style
    "ln_mlp": "mlp_layernorm.weight", "ln_mlp_b": "mlp_layernorm.bias",            # Falcon-40B style
    "mlp_norm": "post_attention_layernorm.weight",
    "qkv": "{attn}.query_key_value.weight",  # fused in group order (section 7)
    "o": "{attn}.dense.weight",
    "glu": "mlp.dense_h_to_4h.weight",       # rows [up; gate] (section 9)
    "up": "mlp.dense_h_to_4h.weight",        # plain (GELU) MLP: copied (section 6.2)
    "down": "mlp.dense_4h_to_h.weight",
}
MEGATRON_FUSED = {"qkv": ("q", "k", "v"), "glu": ("up", "gate")}  # fused slot -> its canonical parts, in order
MEGATRON_FINAL = {"norm": "final_layernorm.weight", "norm_b": "final_layernorm.bias"}  # last stage, in container
# section 10: TP split per Megatron tensor: "rows" (ColumnParallel, dim 0), "cols" (RowParallel, dim 1),
# "halves" (GLU dense_h_to_4h: each half split by rows), None (replicated). A bias follows its weight when
# the weight is split by rows (or halves) and is replicated when the weight is split by columns.
MEGATRON_TP = {
    "word_embeddings": "rows", "lm_head": "rows", "word_embeddings_for_head": "rows",
    "query_key_value": "rows", "dense": "cols", "dense_h_to_4h": "rows", "dense_h_to_4h/glu": "halves",
    "dense_4h_to_h": "cols", "input_layernorm": None, "post_attention_layernorm": None,
    "mlp_layernorm": None, "final_layernorm": None,
}
# section 11: padded = smallest multiple of (divisor * TP) >= true vocab; padding rows copy row R-1.
# ckdiff pads only when asked, or with divisor 128 when TP does not divide the rows (README, Megatron).
DEFAULT_DIVISOR = 128

# section 5: the args Namespace hf_to_megatron writes, per model kind, and the fields every model gets
MEGATRON_ARGS_ALL = dict(iteration="release", bias_gelu_fusion=False, bias_droput_fusion=False,
                         position_embedding_type="rotary")
MEGATRON_ARGS_LLAMA = dict(parallel_attn=False, glu_activation="swiglu", use_rms_norm=True,
                           tokenizer_type="SentencePieceTokenizer")
MEGATRON_ARGS_FALCON = dict(parallel_attn=True, use_flash_attn=True, hidden_dropout=0.0,
                            tokenizer_type="FalconTokenizer", tie_embed_logits=True)
# what ckdiff records beyond the original (README "Megatron-LLM"): read back when present
MEGATRON_ARGS_CKDIFF = ("true_vocab_size", "kv_channels", "rope_theta", "layernorm_epsilon", "params_dtype",
                        "ckdiff_model", "ckdiff_rotary")

# ------------------------------------------------------------------ spec examples, verbatim
# MLF section 7: toy H=64, n=4, n_kv=2, d=16, F=128, V=100; TP=1 QKV rows, 16 per block
SPEC_TOY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=100, layers=2)
SPEC_QKV_BLOCKS = ["P(q0)", "P(q1)", "P(k0)", "v0", "P(q2)", "P(q3)", "P(k1)", "v1"]
# MLF section 8, d = 16: Megatron row r holds HF row SPEC_ROPE_ROWS[r]
SPEC_ROPE_ROWS = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
# MLF section 10: the toy at TP=2, PP=2, vocab padded to 256: (rank dir) -> {legacy key: shape}
_T = "language_model.transformer.layers.0."
SPEC_TOY_TP2_PP2 = {
    "mp_rank_{t:02d}_000": {"language_model.embedding.word_embeddings.weight": [128, 64],
                            _T + "input_layernorm.weight": [64], _T + "attention.query_key_value.weight": [64, 64],
                            _T + "attention.dense.weight": [64, 32],
                            _T + "post_attention_layernorm.weight": [64],
                            _T + "mlp.dense_h_to_4h.weight": [128, 64], _T + "mlp.dense_4h_to_h.weight": [64, 64]},
    "mp_rank_{t:02d}_001": {_T + "input_layernorm.weight": [64], _T + "attention.query_key_value.weight": [64, 64],
                            _T + "attention.dense.weight": [64, 32],
                            _T + "post_attention_layernorm.weight": [64],
                            _T + "mlp.dense_h_to_4h.weight": [128, 64], _T + "mlp.dense_4h_to_h.weight": [64, 64],
                            "language_model.transformer.final_layernorm.weight": [64],
                            "language_model.lm_head": [128, 64]},
}

# ------------------------------------------------------------------ HF names, as the specs list them
# (the golden reads a model's HF names from its family declaration; these pin the declarations to the
# original tools: MLF / MJF for Llama, MLF for Falcon, MJF for Mixtral)
SPEC_HF_NAMES = {
    "llama": {
        "embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight",
        "attn_norm": "model.layers.{i}.input_layernorm.weight",
        "q": "model.layers.{i}.self_attn.q_proj.weight", "k": "model.layers.{i}.self_attn.k_proj.weight",
        "v": "model.layers.{i}.self_attn.v_proj.weight", "o": "model.layers.{i}.self_attn.o_proj.weight",
        "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "gate": "model.layers.{i}.mlp.gate_proj.weight", "up": "model.layers.{i}.mlp.up_proj.weight",
        "down": "model.layers.{i}.mlp.down_proj.weight"},
    "falcon": {
        "embed": "transformer.word_embeddings.weight", "norm": "transformer.ln_f.weight",
        "norm_b": "transformer.ln_f.bias",
        "qkv": "transformer.h.{i}.self_attention.query_key_value.weight",
        "o": "transformer.h.{i}.self_attention.dense.weight",
        "up": "transformer.h.{i}.mlp.dense_h_to_4h.weight", "down": "transformer.h.{i}.mlp.dense_4h_to_h.weight",
        "attn_norm": "transformer.h.{i}.input_layernorm.weight", "attn_norm_b": "transformer.h.{i}.input_layernorm.bias",
        "ln_attn": "transformer.h.{i}.ln_attn.weight", "ln_attn_b": "transformer.h.{i}.ln_attn.bias",
        "ln_mlp": "transformer.h.{i}.ln_mlp.weight", "ln_mlp_b": "transformer.h.{i}.ln_mlp.bias"},
    "mixtral_experts": {
        "router": "model.layers.{i}.block_sparse_moe.gate.weight",
        "expert": "model.layers.{i}.block_sparse_moe.experts.{e}.w{n}.weight"},
}
