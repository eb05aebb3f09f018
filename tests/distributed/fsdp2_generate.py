"""FSDP2's gathering context for rollouts, on CPU (tests/test_distributed.py): each rank saves what it saw.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/distributed/fsdp2_generate.py TINY_MODEL_DIR OUT_DIR
The tiny model's decoder layers and the model are sharded with torch's ``fully_shard`` over gloo (accelerate
does not turn FSDP on for a CPU process group). Inside ``fsdp2_unsharded`` rank r generates 1 + 2r greedy turns
of 3 tokens with the HF backend, a different number of forward passes on each rank, then compares the sharded
model's logits with an unsharded copy's.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from pipeline.models import load_model
from pipeline.rollout.backends.base import GenerationRequest
from pipeline.rollout.backends.hf import HFBackend
from pipeline.training.sharding import fsdp2_unsharded


def main(model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, tokenizer = load_model(model_dir)
    reference, _ = load_model(model_dir)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.eval()
    ids = tokenizer(f"rank {rank} says hello", add_special_tokens=False)["input_ids"]
    turns = 1 + 2 * rank
    with torch.no_grad(), fsdp2_unsharded(model):
        full_inside = not any(isinstance(p, DTensor) for p in model.parameters())
        backend = HFBackend(model, tokenizer, temperature=0.0)
        for _ in range(turns):
            ids = ids + backend.generate([GenerationRequest("episode", ids, 3)])[0].token_ids
        batch = torch.tensor([ids])
        difference = (model(batch).logits - reference(batch).logits).abs().max().item()
    sharded_after = all(isinstance(p, DTensor) for p in model.parameters())
    dist.barrier()
    torch.save({"turns": turns, "max_logit_difference": difference, "full_inside": full_inside,
                "sharded_after": sharded_after}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
