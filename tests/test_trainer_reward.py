"""The reward `turnwise train` builds: a shipped name or a YAML path, bound to the training tasks."""

import pytest

from pipeline.envs import load_tasks, make_env, oracle_policy
from pipeline.rollout import run_policy
from pipeline.trainer import default_reward


@pytest.mark.parametrize("config", [None, "default", "configs/rewards/default.yaml"])
def test_train_reward_accepts_names_and_paths_and_binds_the_tasks(config):
    tasks = load_tasks("customer_service", "test")[:3]
    reward = default_reward(config, tasks)
    assert set(reward.tasks) == {t.id for t in tasks}
    task = tasks[2]
    breakdown = reward(run_policy(make_env(task), task, oracle_policy(task)))
    assert breakdown.failed == {} and breakdown.total == pytest.approx(0.888, abs=1e-3)


def test_sop_reward_by_shipped_name_scores_the_oracle_near_one():
    task = load_tasks("sop:data/sop/warranty_claims", "test")[0]
    reward = default_reward("sop", [task])
    breakdown = reward(run_policy(make_env(task), task, oracle_policy(task)))
    assert breakdown.failed == {} and breakdown.total > 0.95
    assert "field_accuracy" in breakdown.components


def test_unknown_reward_name_is_refused_with_the_choices():
    with pytest.raises(FileNotFoundError, match="nonexistent not found; shipped configs are in .*configs/rewards"):
        default_reward("nonexistent")


def test_a_prompt_longer_than_the_token_budget_is_a_clear_error(tiny_model_dir):
    """An opening that fills max_total_tokens leaves no assistant turn to train on: say which budget to raise."""
    from types import SimpleNamespace

    from pipeline.models import load_model
    from pipeline.trainer import EpisodeRollout, RolloutConfig, task_dataset

    model, tokenizer = load_model(str(tiny_model_dir))
    tasks = load_tasks("customer_service", "train")[:1]
    rollout = EpisodeRollout(tasks, RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=64))
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=0), processing_class=tokenizer,
                              accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=model,
                              args=SimpleNamespace(temperature=1.0, top_p=1.0))
    with pytest.raises(ValueError, match=r"max_total_tokens=64.*Raise max_total_tokens"):
        rollout([task_dataset(tasks)[0]["prompt"]], trainer)
