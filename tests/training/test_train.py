"""Tests for pipeline/training/train.py: the whole `turnwise train` run on a tiny model, and the reward it
builds (a shipped name or a YAML path, bound to the tasks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.envs import load_tasks, make_env, oracle_policy
from pipeline.rollout import run_policy
from pipeline.training import RolloutConfig, default_reward
from pipeline.training.checkpoints import MARKER


def token_count_reward(trajectory) -> float:
    return sum(sum(turn.completion_ids) for turn in trajectory.turns) % 7 / 7.0



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


def validated_steps(result):
    """The steps a finished train() run validated at, from its log_history.json."""
    import json

    history = json.loads(Path(result["log_history"]).read_text())
    return [h["step"] for h in history if "val/success" in h]


def test_train_entry_point_validates_writes_samples_and_saves_the_adapter(tiny_model_dir, tmp_path, caplog):
    """``train()`` runs the whole loop: validation through pipeline.evaluation, trajectory samples as
    JSONL at each logging step, and a saved adapter; ``resume`` continues from the last checkpoint."""
    import json

    from trl import GRPOConfig, ModelConfig

    from pipeline.config import TaskArguments
    from pipeline.training import train

    # --resume on a fresh output directory starts from scratch (a pipeline run resumes every stage this way)
    task_args = TaskArguments(train_limit=2, val_limit=2, val_every=1, resume=True)
    tmp_path = tmp_path / "run"
    rollout_config = RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=8000)
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_alpha=8,
                             lora_target_modules=["q_proj", "v_proj"])

    def grpo_args(steps):
        return GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=steps,
                          logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="steps", save_steps=1, beta=0.0,
                          learning_rate=1e-2)

    with caplog.at_level("WARNING", logger="pipeline.training"):
        result = train(task_args, rollout_config, grpo_args(2), model_args, reward_fn=token_count_reward)
    assert "--resume: no checkpoint in" in caplog.text
    assert result["steps"] == 2 and set(result["val"]) == {"val/success", "val/pass@1", "val/completion", "val/reward/mean"}
    samples = sorted((tmp_path / "samples").glob("step-*.jsonl"))
    assert [p.name for p in samples] == ["step-000001.jsonl", "step-000002.jsonl"]
    record = json.loads(samples[0].read_text().splitlines()[0])
    assert record["task_id"] and record["tokens"]["assistant_mask"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    history = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert any("val/success" in h for h in history)  # validation ran during training (val_every=1)
    assert all(isinstance(h["val/reward/mean"], float) for h in history if "val/success" in h)
    assert any("rollout/turns/mean" in h and "analysis/zero_adv_groups" in h for h in history)
    # step 0 is the starting policy (val_at_start); val_every=1 validated step 2 already: the final val is that
    # one, not a second evaluation
    assert validated_steps(result) == [0, 1, 2]
    assert (tmp_path / "grpo_result.json").is_file()
    # The step-0 validation is the foothold check (its 2 val tasks, not foothold_tasks=8 more): measured once.
    assert result["foothold"]["n_tasks"] == 2 and result["foothold"]["success"] == 0.0
    assert sum("foothold check: the starting policy solved 0 of 2 val tasks" in r.getMessage()
               for r in caplog.records) == 1

    again = train(task_args, rollout_config, grpo_args(3), model_args, reward_fn=token_count_reward)
    assert again["steps"] == 3
    assert validated_steps(again) == [0, 1, 2, 3]  # the resume did not redo step 0
    assert again["foothold"] is None  # nor the foothold check
    assert (tmp_path / "samples" / "step-000003.jsonl").exists()


def test_keep_best_val_returns_the_best_validations_adapter_and_a_resume_keeps_competing(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    """keep_best_val: the adapter of the validation with the best val success (ties: the earlier) is kept in
    best_adapter/ with its step, and is the run's result adapter; the last step's stays in adapter/. The
    starting adapter is validated at step 0 and competes: when no step beats it, it is the result. A
    resumed run starts from the kept best and does not validate its start again; a fresh run in the same
    directory replaces it."""
    import json

    from safetensors.torch import load_file
    from trl import GRPOConfig, ModelConfig

    from pipeline.config import TaskArguments
    from pipeline.training import ValidationCallback, train
    from pipeline.training.callbacks import BEST_FILE

    # steps 0-3; a resumed step 4; a fresh run's steps 0-1 from the last adapter; steps 1-2 without val_at_start
    scores = iter([0.5, 0.25, 0.75, 0.75, 0.5, 0.5, 0.5, 0.25, 0.5])

    def validate(self, step=None):
        return {"val/success": next(scores), "val/pass@1": 0.0, "val/completion": 0.0,
                "val/reward/mean": 0.0}

    monkeypatch.setattr(ValidationCallback, "validate", validate)
    rollout_config = RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=8000)
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_alpha=8,
                             lora_target_modules=["q_proj", "v_proj"])

    def run(steps, resume, adapter=None, val_at_start=True):
        grpo_args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                               max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                               save_strategy="steps", save_steps=1, beta=0.0, learning_rate=1e-2)
        task_args = TaskArguments(train_limit=2, val_limit=1, val_every=1, keep_best_val=True, foothold_tasks=0,
                                  resume=resume, adapter=adapter, val_at_start=val_at_start)
        return train(task_args, rollout_config, grpo_args, model_args, reward_fn=token_count_reward)

    def weights(directory):
        return load_file(str(directory / "adapter_model.safetensors"))

    result = run(3, resume=False)
    assert validated_steps(result) == [0, 1, 2, 3]  # read now: the next run in tmp_path rewrites the file
    best = tmp_path / "best_adapter"
    assert result["adapter"] == str(best) and result["final_adapter"] == str(tmp_path / "adapter")
    assert result["best_val"] == {"step": 2, "val/success": 0.75, "adapter": str(best)}
    assert json.loads((best / BEST_FILE).read_text()) == result["best_val"]
    kept, step_2, last = weights(best), weights(tmp_path / "checkpoint-2"), weights(tmp_path / "adapter")
    assert kept.keys() == step_2.keys() and all(torch.equal(kept[k], step_2[k]) for k in kept)
    assert any(not torch.equal(kept[k], last[k]) for k in kept)
    assert json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert not list(tmp_path.glob(".best_adapter*"))  # no staging left behind

    # As if the run's directory had been moved here (another disk, a sync to another path) before the resume:
    # the kept best is the one in the directory resumed, whatever path its best_val.json was written under.
    elsewhere = tmp_path.parent / f"{tmp_path.name}-before-the-move" / "best_adapter"
    (best / BEST_FILE).write_text(json.dumps({**result["best_val"], "adapter": str(elsewhere)}))
    resumed = run(4, resume=True)  # step 4 validates 0.5: the step-2 adapter stays the best
    assert resumed["best_val"]["step"] == 2 and all(torch.equal(kept[k], v) for k, v in weights(best).items())
    assert resumed["adapter"] == resumed["best_val"]["adapter"] == str(best)

    assert validated_steps(resumed) == [0, 1, 2, 3, 4]  # the resume did not validate its start again

    # A fresh run in the same directory does not compete with the old best. It starts from the last adapter,
    # whose step-0 validation (0.5) no step beats (0.5 ties): the kept adapter is the one it started from.
    start = tmp_path.parent / f"{tmp_path.name}-start"
    shutil.copytree(tmp_path / "adapter", start)
    fresh = run(1, resume=False, adapter=str(start))
    assert fresh["best_val"] == {"step": 0, "val/success": 0.5, "adapter": str(best)}
    started, trained = weights(start), weights(tmp_path / "adapter")
    assert all(torch.equal(started[k], v) for k, v in weights(best).items())
    assert any(not torch.equal(started[k], trained[k]) for k in started)  # step 1 did change the adapter

    # Without val_at_start the trained steps compete among themselves, as before: step 2's 0.5 beats step 1's 0.25
    without = run(2, resume=False, val_at_start=False)
    assert validated_steps(without) == [1, 2] and without["best_val"]["step"] == 2
    assert next(scores, None) is None  # every validation ran, and no other


def test_intent_weights_decide_which_tasks_training_draws(tiny_model_dir, tmp_path, caplog):
    """Every group of a run whose weights leave one intent is a task of that intent, and the log gives the mix."""
    from trl import GRPOConfig, ModelConfig

    from pipeline.config import TaskArguments
    from pipeline.envs.tasks import intent_label
    from pipeline.training import train

    first = load_tasks("customer_service", "train")[:12]
    others = sorted({intent_label(t.intents) for t in first} - {"refund_denied"})
    wanted = {t.id for t in first if intent_label(t.intents) == "refund_denied"}
    assert others and 0 < len(wanted) < len(first)
    task_args = TaskArguments(train_limit=12, val_limit=1, foothold_tasks=0,
                              intent_weights=["refund_denied=2", *(f"{name}=0" for name in others)])
    grpo_args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=3,
                           logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no", beta=0.0)
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_alpha=8,
                             lora_target_modules=["q_proj", "v_proj"])
    with caplog.at_level("INFO", logger="pipeline.training"):
        train(task_args, RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=8000), grpo_args, model_args,
              reward_fn=token_count_reward)
    drawn = [json.loads(line)["task_id"] for path in sorted((tmp_path / "samples").glob("step-*.jsonl"))
             for line in path.read_text().splitlines()]
    assert len(drawn) == 3 and set(drawn) <= wanted  # one episode of each step's one group
    assert f"training draws from {2 * len(wanted)} rows (refund_denied {2 * len(wanted)})" in caplog.text


def test_keep_best_val_needs_periodic_validation():
    from pipeline.config import TaskArguments

    with pytest.raises(ValueError, match="keep_best_val chooses among periodic validations: set val_every"):
        TaskArguments(keep_best_val=True)


def test_train_resumes_the_critic_and_binds_the_reward_to_the_validation_tasks(tiny_model_dir, tmp_path,
                                                                                monkeypatch, caplog):
    """With --resume, train() restores a stateful estimator (the gae value head) from the checkpoint it
    resumes; the reward it builds knows the validation tasks too, so val/reward/mean scores them fully."""
    import importlib

    from trl import GRPOConfig, ModelConfig

    from pipeline.config import TaskArguments
    from pipeline.training.advantages import GAE

    train_module = importlib.import_module("pipeline.training.train")
    bound = []
    monkeypatch.setattr(train_module, "default_reward",
                        lambda config=None, tasks=(): bound.append([t.id for t in tasks]) or token_count_reward)
    restored = []
    load_state_dict = GAE.load_state_dict
    monkeypatch.setattr(GAE, "load_state_dict",
                        lambda self, state: restored.append(state["hidden_size"]) or load_state_dict(self, state))
    task_args = TaskArguments(train_limit=2, val_limit=2, foothold_tasks=0, resume=True)
    rollout_config = RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=8000, advantage="gae")
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_alpha=8,
                             lora_target_modules=["q_proj", "v_proj"])

    def run(steps):
        grpo_args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                               max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                               save_strategy="steps", save_steps=1, beta=0.0, learning_rate=1e-2)
        return train_module.train(task_args, rollout_config, grpo_args, model_args)

    first = run(1)
    assert (tmp_path / "checkpoint-1" / "value_head.pt").is_file() and restored == []
    assert first["wall_time_total_s"] == pytest.approx(first["wall_time_s"], abs=0.2)  # one part: the same time
    # The first part of a long run: its checkpoint's marker says it had run 1,000 s.
    marker = tmp_path / "checkpoint-1" / MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "wall_time_s": 1000.0}))
    with caplog.at_level("WARNING"):
        second = run(2)
    assert second["steps"] == 2 and second["wall_time_s"] < 1000
    assert second["wall_time_total_s"] == pytest.approx(1000 + second["wall_time_s"], abs=0.2)
    assert json.loads((tmp_path / "checkpoint-2" / MARKER).read_text())["wall_time_s"] > 1000  # carried on
    assert restored == [16]  # the tiny model's hidden size: the head saved at step 1 was loaded
    assert "starts again from scratch" not in caplog.text
    train_ids = [t.id for t in load_tasks("customer_service", "train")[:2]]
    val_ids = [t.id for t in load_tasks("customer_service", "val")[:2]]
    assert bound[0] == train_ids + [v for v in val_ids if v not in train_ids] and set(val_ids) <= set(bound[0])
