"""A tiny multi-turn GRPO trainer for the tests of pipeline/training/.

Shrunk settings, each on purpose: a 2-layer random Llama (logic, not quality), 4 tasks, 2 generations
per task, 2 assistant turns of at most 6 new tokens, 2 optimiser steps. The reward is an arbitrary
function of the sampled ids, so groups differ and advantages are non-zero even for a random model.
"""

from __future__ import annotations

import pytest


def token_count_reward(trajectory) -> float:
    """An arbitrary but deterministic reward of the sampled ids: in [0, 1), different across a group."""
    return sum(sum(turn.completion_ids) for turn in trajectory.turns) % 7 / 7.0


@pytest.fixture
def make_trainer(tiny_model_dir, tmp_path):
    """``make_trainer(advantage="group_based", share_prefix=True, output_dir=None, reward=token_count_reward,
    backend="hf", **grpo_overrides)``: a TurnwiseGRPOTrainer on the tiny model, 4 training tasks, LoRA r=4."""
    from peft import LoraConfig
    from trl import GRPOConfig

    from pipeline.envs import load_tasks
    from pipeline.models import load_model
    from pipeline.training import EpisodeRollout, RolloutConfig, TrajectoryReward, TurnwiseGRPOTrainer, task_dataset

    def make(advantage="group_based", share_prefix=True, output_dir=None, reward=token_count_reward, backend="hf",
             **overrides):
        model, tokenizer = load_model(str(tiny_model_dir))
        tasks = load_tasks("customer_service", "train")[:4]
        config = RolloutConfig(max_turns=2, max_new_tokens=6, max_total_tokens=8000, advantage=advantage,
                               share_prefix=share_prefix, backend=backend)
        rollout = EpisodeRollout(tasks, config)
        settings = dict(
            output_dir=str(output_dir or tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=2,
            learning_rate=5e-2,  # large, so two steps visibly move the LoRA weights
            logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no", max_completion_length=8000,
            beta=0.0, temperature=1.0, seed=0,
        )
        args = GRPOConfig(**{**settings, **overrides})
        return TurnwiseGRPOTrainer(
            model=model, processing_class=tokenizer, args=args, train_dataset=task_dataset(tasks),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            rollout=rollout, reward=TrajectoryReward(reward, rollout), rollout_config=config,
        )

    return make


def rollout_rows(trainer, indices):
    """Dataset rows as TRL hands them to ``_generate_and_score_completions``."""
    return [{"prompt": row["prompt"], "task_id": row["task_id"]} for row in trainer.train_dataset.select(indices)]


@pytest.fixture
def rows():
    return rollout_rows
