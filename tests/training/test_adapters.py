"""Tests for pipeline/training/adapters.py: the dataset, rollout_func and reward function TRL calls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.envs import load_tasks
from pipeline.training.adapters import TASK_PREFIX, EpisodeRollout, TrajectoryReward, task_dataset
from pipeline.training.config import RolloutConfig


def test_the_dataset_names_tasks_and_the_rollout_finds_them():
    tasks = load_tasks("customer_service", "train")[:2]
    rows = task_dataset(tasks)
    assert [r["task_id"] for r in rows] == [t.id for t in tasks]
    assert rows[1]["prompt"] == [{"role": "user", "content": TASK_PREFIX + tasks[1].id}]
    rollout = EpisodeRollout(tasks, RolloutConfig())
    assert rollout.task_for(rows[1]["prompt"]) is tasks[1]
    with pytest.raises(ValueError, match="does not name a training task; build the dataset with task_dataset"):
        rollout.task_for([{"role": "user", "content": "hello"}])


def test_per_turn_rewards_carry_the_terminal_reward_on_the_last_turn():
    rollout = SimpleNamespace(last=[SimpleNamespace(turns=[1, 2, 3]), SimpleNamespace(turns=[1, 2])])
    breakdown = SimpleNamespace(per_turn=[0.1, 0.0, 0.2], terminal=1.0, total=1.3)
    reward = TrajectoryReward(lambda t: breakdown if len(t.turns) == 3 else 0.5, rollout)
    # a breakdown's total, or the float a plain reward function returns
    assert reward([], [], [], episode=[0, 1]) == [1.3, 0.5]
    assert reward.per_turn(0) == [0.1, 0.0, 1.2]  # 0.2 + terminal 1.0 on the last turn
    assert reward.per_turn(1) == [0.0, 0.5]  # a plain float: all of it on the last turn


def test_a_prompt_longer_than_the_token_budget_is_a_clear_error(tiny_model_dir):
    """An opening that fills max_total_tokens leaves no assistant turn to train on: say which budget to raise."""
    from pipeline.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    tasks = load_tasks("customer_service", "train")[:1]
    rollout = EpisodeRollout(tasks, RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=64))
    accelerator = SimpleNamespace(unwrap_model=lambda m: m,
                                  state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None))  # one process
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=0), processing_class=tokenizer,
                              accelerator=accelerator, model=model, model_wrapped=model,
                              args=SimpleNamespace(temperature=1.0, top_p=1.0, use_vllm=False,
                                                   gradient_checkpointing_kwargs=None))
    with pytest.raises(ValueError, match=r"max_total_tokens=64.*Raise max_total_tokens"):
        rollout([task_dataset(tasks)[0]["prompt"]], trainer)
