"""A tiny multi-turn GRPO run for `accelerate launch` (tests/test_distributed.py): each rank saves its weights.

Usage: accelerate launch --multi_gpu --num_processes 2 tests/distributed/grpo_run.py TINY_MODEL_DIR OUT_DIR
Shrunk like tests/training/test_grpo_trainer.py: 2-layer random Llama, 2 tasks x 2 generations (one task per rank),
2 turns of at most 4 new tokens, 2 optimiser steps.
"""

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


def main(model_dir: str, out_dir: str) -> None:
    model, tokenizer = load_model(model_dir)
    tasks = load_tasks("customer_service", "train")[:4]
    config = RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=8000)
    rollout = EpisodeRollout(tasks, config)
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=2, num_generations=2, max_steps=2,
                      learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                      max_completion_length=8000, beta=0.0, temperature=1.0, seed=0)
    trainer = TurnwiseGRPOTrainer(
        model=model, processing_class=tokenizer, args=args, train_dataset=task_dataset(tasks),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        rollout=rollout, reward=TrajectoryReward(token_count_reward, rollout), rollout_config=config)
    rank = trainer.accelerator.process_index
    before = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
              if "lora_" in n}
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
             if "lora_" in n}
    torch.save({"before": before, "after": after, "world_size": trainer.accelerator.num_processes,
                "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None,
                "task_ids": sorted({t.task_id for t in rollout.last}), "steps": trainer.state.global_step},
               Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
