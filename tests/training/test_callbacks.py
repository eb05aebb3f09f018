"""Tests for pipeline/training/callbacks.py: validation metrics, estimator checkpoints, TensorBoard names."""

from __future__ import annotations

import doctest
import logging
from types import SimpleNamespace

import pytest
import torch

from pipeline.training import callbacks
from pipeline.training.callbacks import EstimatorCheckpoint, ValidationCallback


def test_doctests():
    assert doctest.testmod(callbacks).failed == 0


def test_validation_logs_the_mean_reward_of_the_validation_episodes(make_trainer):
    """val/reward/mean is the run's trajectory reward (a breakdown's total) averaged over the validation
    episodes, one per validation task, next to the external evaluation's success metrics."""
    from pipeline.envs import load_tasks

    tasks = load_tasks("customer_service", "val")[:2]
    scored = []

    def reward(trajectory):
        scored.append(trajectory.task_id)
        return SimpleNamespace(total=[1.0, 0.25][len(scored) - 1], per_turn=[], terminal=0.0)

    trainer = make_trainer()
    validation = ValidationCallback(trainer, tasks, every=1, max_turns=2, max_new_tokens=4, reward_fn=reward)
    metrics = validation.validate()
    assert sorted(scored) == sorted(t.id for t in tasks)  # each validation episode scored once
    assert metrics["val/reward/mean"] == (1.0 + 0.25) / 2
    assert set(metrics) == {"val/success", "val/pass@1", "val/completion", "val/reward/mean"}

    # without its own reward_fn it scores with the reward the trainer trains on (here a plain float reward)
    trainer.reward.reward_fn = lambda trajectory: 0.5 if trajectory.task_id == tasks[0].id else 0.0
    default = ValidationCallback(trainer, tasks, every=1, max_turns=2, max_new_tokens=4).validate()
    assert default["val/reward/mean"] == (0.5 + 0.0) / 2


def test_validation_logs_its_metrics_during_training(make_trainer, caplog):
    from pipeline.envs import load_tasks

    trainer = make_trainer(max_steps=1)
    trainer.reward.reward_fn = lambda trajectory: 0.75  # training and validation episodes all score 0.75
    trainer.add_callback(ValidationCallback(trainer, load_tasks("customer_service", "val")[:1], every=1, max_turns=2,
                                            max_new_tokens=4))
    with caplog.at_level(logging.INFO, logger="pipeline.evaluation"):
        trainer.train()
    validated = [h for h in trainer.state.log_history if "val/success" in h]
    assert len(validated) == 1 and validated[0]["val/reward/mean"] == 0.75 and validated[0]["step"] == 1
    assert "evaluated the policy at step 1 on 1 tasks" in caplog.text  # the policy trained, not its base's path


def test_a_validated_step_keeps_its_training_log(make_trainer):
    """The validation logs its own metrics at the steps it runs; the step's training log (loss, grad_norm,
    learning rate) is still written at each of them, not folded into the next logged step."""
    from pipeline.envs import load_tasks

    trainer = make_trainer(max_steps=3)
    trainer.add_callback(ValidationCallback(trainer, load_tasks("customer_service", "val")[:1], every=2, max_turns=2,
                                            max_new_tokens=4))
    trainer.train()
    history = trainer.state.log_history
    assert [h["step"] for h in history if "val/success" in h] == [2]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    assert all("grad_norm" in h and "learning_rate" in h for h in history if "loss" in h)


def test_validation_at_start_validates_the_starting_policy_once(make_trainer, caplog):
    """at_start: step 0 of the val curve is the starting policy's. It stays out of the reward-hacking
    history (no training reward precedes it), and a resumed run (global_step > 0) does not repeat it. It is
    the foothold check too: the untrained tiny model solves nothing, which is warned about before step 1."""
    from pipeline.envs import load_tasks

    trainer = make_trainer(max_steps=1)
    trainer.reward.reward_fn = lambda trajectory: 0.75
    validation = ValidationCallback(trainer, load_tasks("customer_service", "val")[:2], every=1, max_turns=2,
                                    max_new_tokens=4, at_start=True)
    trainer.add_callback(validation)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "val/success" in h] == [0, 1]
    assert len(validation.history) == 1 and validation.last[0] == 1
    assert validation.foothold["success"] == 0.0 and validation.foothold["n_tasks"] == 2
    assert validation.foothold["stop_reasons"] == {"max_turns": 2}
    [warning] = [r.getMessage() for r in caplog.records if "foothold check" in r.getMessage()]
    assert "solved 0 of 2 val tasks" in warning and "turnwise sft" in warning
    validation.on_train_begin(trainer.args, SimpleNamespace(global_step=1), None)  # as a resumed run begins
    assert [h["step"] for h in trainer.state.log_history if "val/success" in h] == [0, 1]


def test_validation_at_start_without_the_foothold_check(make_trainer, caplog):
    from pipeline.envs import load_tasks

    trainer = make_trainer(max_steps=1)
    trainer.reward.reward_fn = lambda trajectory: 0.75
    validation = ValidationCallback(trainer, load_tasks("customer_service", "val")[:1], every=1, max_turns=2,
                                    max_new_tokens=4, at_start=True, check_foothold=False)
    trainer.add_callback(validation)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "val/success" in h] == [0, 1]
    assert validation.foothold is None and "foothold check" not in caplog.text


class Unnamed:
    """A stateful estimator: counts the batches it saw. It names no state file."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, batch):
        self.count += 1
        return [[0.0] * len(r) for r in batch.turn_rewards]

    def state_dict(self):
        return {"count": torch.tensor(self.count)} if self.count else None

    def load_state_dict(self, state):
        self.count = int(state["count"])


class Counter(Unnamed):
    state_file = "counter.pt"


def save_event(tmp_path, step, should_save=True):
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=should_save)
    return args, SimpleNamespace(global_step=step), SimpleNamespace()


def test_estimator_state_goes_into_the_checkpoint_trl_just_wrote(tmp_path):
    counter = Counter()
    checkpoint = EstimatorCheckpoint(counter, "counter")
    (tmp_path / "checkpoint-3").mkdir()
    checkpoint.on_save(*save_event(tmp_path, 3))
    assert not (tmp_path / "checkpoint-3" / "counter.pt").exists()  # nothing learned yet: nothing to save
    counter.count = 5
    checkpoint.on_save(*save_event(tmp_path, 3, should_save=False))  # not the main process: it does not write
    assert not (tmp_path / "checkpoint-3" / "counter.pt").exists()
    checkpoint.on_save(*save_event(tmp_path, 3))
    assert [p.name for p in (tmp_path / "checkpoint-3").iterdir()] == ["counter.pt"]  # no temporary file left
    assert int(torch.load(tmp_path / "checkpoint-3" / "counter.pt", weights_only=True)["count"]) == 5
    checkpoint.on_save(*save_event(tmp_path, 4))  # TRL wrote no checkpoint-4 (say, save_strategy=no)
    assert not (tmp_path / "checkpoint-4").exists()

    restored = Counter()
    assert EstimatorCheckpoint(restored, "counter").load(tmp_path / "checkpoint-3") and restored.count == 5


def test_a_stateful_estimators_file_name_defaults_and_a_missing_file_warns(tmp_path, caplog):
    unnamed = Unnamed()
    unnamed.count = 2
    (tmp_path / "checkpoint-1").mkdir()
    EstimatorCheckpoint(unnamed, "unnamed").on_save(*save_event(tmp_path, 1))
    assert (tmp_path / "checkpoint-1" / "estimator_state.pt").is_file()
    with caplog.at_level(logging.WARNING):
        assert not EstimatorCheckpoint(Counter(), "counter").load(tmp_path / "checkpoint-1")
    assert "has no counter.pt: the counter estimator's state starts again from scratch" in caplog.text


def test_resuming_without_the_estimators_state_warns(tmp_path, caplog):
    checkpoint = EstimatorCheckpoint(Counter(), "counter")
    with caplog.at_level(logging.WARNING):
        checkpoint.on_train_begin(None, SimpleNamespace(global_step=0), None)  # a fresh run: nothing to restore
        assert caplog.text == ""
        checkpoint.on_train_begin(None, SimpleNamespace(global_step=2), None)
    assert "resuming at step 2 without the counter estimator's state" in caplog.text
    assert "trainer.load_estimator_state(checkpoint)" in caplog.text


def test_metrics_reach_tensorboard_under_their_namespaced_names(make_trainer, tmp_path):
    """report_to=tensorboard writes rollout/... and analysis/... scalars under those exact tags (not under
    transformers' train/ prefix)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(max_steps=1, report_to=["tensorboard"])
    trainer.train()
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for name in ("rollout/reward/mean", "rollout/turns/mean", "analysis/zero_adv_groups", "rollout/completion"):
        assert name in tags, (name, sorted(tags))
    assert "train/loss" in tags  # un-namespaced metrics keep transformers' prefix


def test_the_sample_log_shows_every_task_the_step_drew(make_trainer, tmp_path):
    """Two groups a step (2 tasks x 2 generations, accumulated over 2 micro-batches): the step's sample file holds
    one episode of each group, so both tasks the step drew show, each once."""
    import json

    from pipeline.training.callbacks import SampleWriter

    trainer = make_trainer(output_dir=tmp_path, gradient_accumulation_steps=2, max_steps=1)
    trainer.add_callback(SampleWriter(trainer))
    trainer.train()
    played = [t.task_id for t in trainer.rollout.last]
    assert len(played) == 4 and played[0] == played[1] != played[2] == played[3]
    lines = (tmp_path / "samples" / "step-000001.jsonl").read_text().splitlines()
    assert [json.loads(line)["task_id"] for line in lines] == [played[0], played[2]]
    assert all(json.loads(line)["turns"] for line in lines)
