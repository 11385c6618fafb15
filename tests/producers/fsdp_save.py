"""Writes a trainer-style DCP checkpoint with torch FSDP2 (run once per rank, env as torchrun sets it).

Usage: python fsdp_save.py HF_DIR OUT

The transformers ``LlamaForCausalLM`` in HF_DIR is loaded, each decoder layer and the whole model are
sharded with ``fully_shard`` (FSDP2) on gloo, one AdamW step is taken (so the optimizer has state), and the
checkpoint is saved the way trainers save it (torchtitan, torchtune and the DCP tutorial alike):
``dcp.save({"model": model_sd, "optimizer": optim_sd, "step": 1})`` with both state dicts from
``torch.distributed.checkpoint.state_dict.get_state_dict``. The step's update is undone on the weights
before the state dict is taken by restoring the loaded values (AdamW with lr=0), so the saved model equals
the HF source.
"""
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402


def main():
    hf_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.distributed.init_process_group("gloo")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # a real step with state, weights unchanged
    ids = torch.arange(12).reshape(2, 6) % model.config.vocab_size
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd, "step": 1}, checkpoint_id=str(out))
    # every rank past the save before any tears gloo down (a rank destroying its group while the other
    # still talks aborts with "terminate called without an active exception")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
