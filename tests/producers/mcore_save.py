"""Writes a Megatron-Core ``torch_dist`` checkpoint with megatron-core itself (run once per rank).

Usage (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the caller, as torchrun sets them):
    python mcore_save.py OUT TP HF_DIR:VARIANT...

A ``GPTModel`` built from the local layer spec on gloo/CPU takes the weights of the transformers
Llama model in HF_DIR, mapped as Megatron-Bridge's Llama bridge maps them
(NVIDIA-NeMo/Megatron-Bridge ``src/megatron/bridge/models/llama/llama_bridge.py``: q/k/v merged in
query-group order ``[q x H/K, k, v] x K`` (``QKVMapping``), gate/up into ``linear_fc1`` as
``[gate; up]`` (``GatedMLPMapping``), the rest one to one; no rotary permutation: HF Llama and
Megatron-Core both rotate halves). Each TP rank keeps its own partition of every tensor (Megatron's
``partition_dim``; for ``linear_fc1`` the rank's gate rows then its up rows). The model is saved the way
Megatron-LM's ``save_checkpoint`` does: ``{"args", "checkpoint_version", "iteration", "model"}`` through
``dist_checkpointing.save`` (default torch_dist strategy) into ``iter_0000001/``, then the tracker file.

A Mixtral source (``num_local_experts``) gives a MoE ``GPTModel`` (local spec: ``SequentialMLP``
experts, router from ``block_sparse_moe.gate``; each expert's ``linear_fc1`` = ``[w1; w3]``, ``linear_fc2``
= ``w2``, as Megatron-Bridge's Mixtral bridge maps them).

Each source is saved under ``OUT/<HF_DIR name>-VARIANT``: ``ok``, or a converter bug: ``gate_up_swapped``
(``linear_fc1`` as ``[up; gate]``), ``expert_dropped`` (the model built with one expert fewer).
"""
import argparse
import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# The two CUDA calls megatron-core 0.16.1's torch_dist writer makes unconditionally; without CUDA each
# raises "Torch not compiled with CUDA enabled":
# - FileSystemWriterAsync.preload_tensors (strategies/filesystem_async.py) copies each tensor to the CPU
#   with non_blocking=True, then waits with torch.cuda.synchronize(): CPU tensors have no copy to wait for.
# - save_state_dict_async_finalize (strategies/state_dict_saver.py) puts the "failures occurred" flag it
#   broadcasts on torch.cuda.current_device(): on gloo the flag lives on the CPU.
CUDA_STUBS = {"torch.cuda.synchronize": "preload_tensors waits for D2H copies; CPU tensors have none",
              "torch.cuda.current_device": "the failure flag broadcast over gloo lives on the CPU"}


def main():
    torch.cuda.synchronize = lambda *a, **k: None  # see CUDA_STUBS
    torch.cuda.current_device = lambda: "cpu"
    out, tp = Path(sys.argv[1]), int(sys.argv[2])
    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    for item in sys.argv[3:]:
        hf_dir, variant = item.rsplit(":", 1)
        save_source(Path(hf_dir), out / f"{Path(hf_dir).name}-{variant}", tp, variant)
    torch.distributed.barrier()  # no rank tears gloo down while another still talks
    torch.distributed.destroy_process_group()


def save_source(hf_dir, out, tp, variant):
    rank = torch.distributed.get_rank()
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from safetensors.torch import load_file

    hc = json.loads((hf_dir / "config.json").read_text())
    hf = load_file(str(hf_dir / "model.safetensors"))
    D, L, H, K = hc["hidden_size"], hc["num_hidden_layers"], hc["num_attention_heads"], hc["num_key_value_heads"]
    d, Fh, V = hc.get("head_dim") or D // H, hc["intermediate_size"], hc["vocab_size"]
    E, topk = hc.get("num_local_experts") or 0, hc.get("num_experts_per_tok") or 0
    theta = int((hc.get("rope_parameters") or {}).get("rope_theta") or hc.get("rope_theta") or 10000)
    Vp = -(-V // (128 * tp)) * 128 * tp  # Megatron-LM pads to make_vocab_size_divisible_by * TP

    def build(experts):
        moe = dict(num_moe_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=Fh) if experts else {}
        cfg = TransformerConfig(num_layers=L, hidden_size=D, num_attention_heads=H, num_query_groups=K,
                                kv_channels=d, ffn_hidden_size=Fh, gated_linear_unit=True, activation_func=F.silu,
                                normalization="RMSNorm", layernorm_epsilon=hc["rms_norm_eps"], add_bias_linear=False,
                                bias_activation_fusion=False, tensor_model_parallel_size=tp,
                                use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0,
                                attention_dropout=0.0, **moe)
        return GPTModel(cfg, get_gpt_layer_local_spec(num_experts=experts or None, normalization="RMSNorm"),
                        vocab_size=Vp, max_sequence_length=hc["max_position_embeddings"],
                        position_embedding_type="rope", rotary_base=theta,
                        share_embeddings_and_output_weights=bool(hc.get("tie_word_embeddings")))

    def pad(w):
        return torch.cat([w, torch.zeros(Vp - V, w.shape[1])])

    full = {"embedding.word_embeddings.weight": pad(hf["model.embed_tokens.weight"]),
            "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf and not hc.get("tie_word_embeddings"):
        full["output_layer.weight"] = pad(hf["lm_head.weight"])
    glu = {}
    for i in range(L):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        r = H // K
        full[m + "self_attention.linear_qkv.weight"] = torch.cat(
            [torch.cat([q[g * r * d:(g + 1) * r * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]) for g in range(K)])
        full[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        full[m + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        full[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        if E:  # Mixtral: router = gate, each expert's linear_fc1 = [w1 (gate); w3 (up)], linear_fc2 = w2
            full[m + "mlp.router.weight"] = hf[p + "block_sparse_moe.gate.weight"]
            for e in range(E):
                x, y = f"{p}block_sparse_moe.experts.{e}.", f"{m}mlp.experts.local_experts.{e}."
                glu[y + "linear_fc1.weight"] = (hf[x + "w1.weight"], hf[x + "w3.weight"])
                full[y + "linear_fc2.weight"] = hf[x + "w2.weight"]
        else:
            glu[m + "mlp.linear_fc1.weight"] = (hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"])
            full[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
    # expert_dropped: a converter that built the model with one expert fewer than the source has
    experts = E - 1 if variant == "expert_dropped" else E
    model = build(experts)
    load(model, full, glu, tp, swap=variant == "gate_up_swapped")
    a = args(hc, full, D, L, H, K, d, Fh, V, Vp, theta, tp)
    if experts:
        a.num_experts, a.moe_router_topk, a.moe_ffn_hidden_size = experts, topk, Fh
    save(model, a, out, rank)


def load(model, full, glu, tp, swap):
    from megatron.core import parallel_state
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("_extra_state"):
                continue
            if name.endswith("mlp.router.weight") and prm.shape[0] < full[name].shape[0]:
                w = full[name][:prm.shape[0]]  # expert_dropped: the router keeps the experts built
            elif name in glu:  # this rank's gate rows, then its up rows
                a, b = glu[name][::-1] if swap else glu[name]
                r = parallel_state.get_tensor_model_parallel_rank()
                w = torch.cat([a.chunk(tp)[r], b.chunk(tp)[r]])
            else:
                w = full[name]
                if getattr(prm, "tensor_model_parallel", False):
                    w = w.chunk(tp, dim=prm.partition_dim)[parallel_state.get_tensor_model_parallel_rank()]
            if tuple(w.shape) != tuple(prm.shape):
                raise SystemExit(f"{name}: mapped {tuple(w.shape)}, parameter {tuple(prm.shape)}")
            prm.copy_(w)


def args(hc, full, D, L, H, K, d, Fh, V, Vp, theta, tp):
    return argparse.Namespace(  # the Megatron-LM argument names (megatron/training/arguments.py)
        num_layers=L, hidden_size=D, ffn_hidden_size=Fh, num_attention_heads=H, group_query_attention=K != H,
        num_query_groups=K, kv_channels=d, vocab_size=V, padded_vocab_size=Vp, make_vocab_size_divisible_by=128,
        untie_embeddings_and_output_weights="output_layer.weight" in full, swiglu=True, normalization="RMSNorm",
        norm_epsilon=hc["rms_norm_eps"], position_embedding_type="rope", rotary_base=theta, rotary_interleaved=False,
        max_position_embeddings=hc["max_position_embeddings"], tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1, add_bias_linear=False, params_dtype=torch.float32,
        transformer_impl="local", ckpt_format="torch_dist", iteration=1)


def save(model, args, out_root, rank):
    from megatron.core import dist_checkpointing
    it = out_root / "iter_0000001"
    if rank == 0:
        it.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state = {"args": args, "checkpoint_version": 3.0, "iteration": 1, "model": model.sharded_state_dict()}
    dist_checkpointing.save(state, str(it))
    torch.distributed.barrier()
    if rank == 0:
        (out_root / "latest_checkpointed_iteration.txt").write_text("1")


if __name__ == "__main__":
    main()
