"""A tiny multi-turn GRPO run for `accelerate launch` (tests/test_distributed.py): each rank saves its weights.

Usage: accelerate launch (--multi_gpu | --config_file CONFIG) --num_processes 2 tests/distributed/grpo_run.py
       TINY_MODEL_DIR OUT_DIR [ADVANTAGE]
Shrunk like tests/training/conftest.py: 2-layer random Llama, 2 tasks x 2 generations (one task per rank), at most
4 new tokens per turn, 2 optimiser steps. Rank r plays up to 2 + r turns, so the ranks' rollouts run different
numbers of forward passes: under ZeRO-3 that works only when generation runs with the parameters gathered.
On CPU, accelerate enables DeepSpeed only without use_cpu, and then needs the gloo backend named.
"""

import contextlib
import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from trl import GRPOConfig

from pipeline.envs import load_tasks
from pipeline.models import load_model
from pipeline.training import EpisodeRollout, RolloutConfig, TrajectoryReward, TurnwiseGRPOTrainer, task_dataset


def token_count_reward(trajectory) -> float:
    return sum(sum(turn.completion_ids) for turn in trajectory.turns) % 7 / 7.0


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    gathered = contextlib.nullcontext()
    if trainer.is_deepspeed_enabled:  # ZeRO-3 keeps shards: read the whole tensors
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(params.values()))
    with gathered:
        return {n: p.detach().clone() for n, p in params.items()}


def main(model_dir: str, out_dir: str, advantage: str = "group_based") -> None:
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    rank = int(os.environ.get("RANK", "0"))
    model, tokenizer = load_model(model_dir)
    tasks = load_tasks("customer_service", "train")[:4]
    config = RolloutConfig(max_turns=2 + rank, max_new_tokens=4, max_total_tokens=8000, advantage=advantage)
    rollout = EpisodeRollout(tasks, config)
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=2, num_generations=2, max_steps=2,
                      learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=not deepspeed, bf16=False,
                      save_strategy="no", max_completion_length=8000, beta=0.0, temperature=1.0, seed=0,
                      ddp_backend="gloo" if deepspeed else None)
    trainer = TurnwiseGRPOTrainer(
        model=model, processing_class=tokenizer, args=args, train_dataset=task_dataset(tasks),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        rollout=rollout, reward=TrajectoryReward(token_count_reward, rollout), rollout_config=config)
    before = lora_weights(trainer)
    trainer.train()
    after = lora_weights(trainer)
    head = getattr(trainer.estimator, "head", None)
    torch.save({"before": before, "after": after, "world_size": trainer.accelerator.num_processes,
                "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None,
                "distributed_type": str(trainer.accelerator.distributed_type),
                "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if deepspeed else 0,
                "turns": sorted({len(t.turns) for t in rollout.last}),
                "value_head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()} if head else None,
                "task_ids": sorted({t.task_id for t in rollout.last}), "steps": trainer.state.global_step},
               Path(out_dir) / f"rank{trainer.accelerator.process_index}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
