"""Tests for pipeline/training/checkpoints.py: `turnwise train --resume` continues from the newest complete
checkpoint, and skips (with a warning that says why) a torn, empty, unmarked or optimizer-less newer one.

One tiny run (tests/training/conftest.py's shrunk settings: 2-layer random Llama, 2 tasks x 2 generations,
2 turns of at most 4 new tokens) writes checkpoint-1 and checkpoint-2; each test damages a copy of it the
way a killed job does, then resumes to step 3. Which checkpoint a resume took shows twice: in
``resumed_from``, and in whether step 2 was played again (its trajectory sample is written anew).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.training.conftest import token_count_reward


def run_train(model_dir: Path, output_dir: Path, steps: int, resume: bool, train_limit: int = 2, seed: int = 42,
              intent_weights: list[str] | None = None) -> dict:
    from trl import GRPOConfig, ModelConfig

    from pipeline.config import TaskArguments
    from pipeline.training import RolloutConfig, train

    task_args = TaskArguments(train_limit=train_limit, val_limit=1, foothold_tasks=0, resume=resume,
                              intent_weights=intent_weights)
    rollout_config = RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=8000)
    model_args = ModelConfig(model_name_or_path=str(model_dir), use_peft=True, lora_r=4, lora_alpha=8,
                             lora_target_modules=["q_proj", "v_proj"])
    grpo_args = GRPOConfig(output_dir=str(output_dir), per_device_train_batch_size=2, num_generations=2,
                           max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                           save_strategy="steps", save_steps=1, beta=0.0, learning_rate=1e-2, seed=seed)
    return train(task_args, rollout_config, grpo_args, model_args, reward_fn=token_count_reward)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run that stopped after step 2 with a checkpoint after each step. Treat it as read-only."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    run_train(tiny_model_dir, output_dir, steps=2, resume=False)
    assert {p.name for p in output_dir.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}
    return output_dir


@pytest.fixture
def run_dir(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, symlinks=True)
    return copy


def resume_to_step_3(model_dir, run_dir, caplog) -> tuple[dict, bool]:
    """Resume the run to step 3; returns the result and whether step 2 was played again."""
    step_2_sample = run_dir / "samples" / "step-000002.jsonl"
    written = step_2_sample.stat().st_mtime_ns
    with caplog.at_level("WARNING"):
        result = run_train(model_dir, run_dir, steps=3, resume=True)
    assert result["steps"] == 3
    return result, step_2_sample.stat().st_mtime_ns != written


def test_a_torn_newest_checkpoint_is_skipped_for_the_intact_one_before_it(tiny_model_dir, run_dir, caplog):
    """A job killed while writing checkpoint-2's weights: resume from checkpoint-1, saying why not 2."""
    weights = run_dir / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result, replayed = resume_to_step_3(tiny_model_dir, run_dir, caplog)
    assert replayed, "step 2 was not played again: the resume did not start from checkpoint-1"
    assert result["resumed_from"] == str(run_dir / "checkpoint-1")
    assert f"not resuming from {run_dir / 'checkpoint-2'}: adapter_model.safetensors is" in caplog.text


def test_an_empty_newest_checkpoint_is_skipped(tiny_model_dir, run_dir, caplog):
    """An interruption right after the directory was made (or an S3 restore that brought only the folder)."""
    (run_dir / "checkpoint-3").mkdir()
    result, replayed = resume_to_step_3(tiny_model_dir, run_dir, caplog)
    assert not replayed and result["resumed_from"] == str(run_dir / "checkpoint-2")
    assert f"not resuming from {run_dir / 'checkpoint-3'}: it has no turnwise_checkpoint.json" in caplog.text


def test_a_checkpoint_without_its_optimizer_state_is_not_resumed_with_a_fresh_optimizer(tiny_model_dir, run_dir,
                                                                                        caplog):
    (run_dir / "checkpoint-2" / "optimizer.pt").unlink()
    result, replayed = resume_to_step_3(tiny_model_dir, run_dir, caplog)
    assert replayed, "step 2 was not played again: the resume did not start from checkpoint-1"
    assert result["resumed_from"] == str(run_dir / "checkpoint-1")
    assert f"not resuming from {run_dir / 'checkpoint-2'}: optimizer.pt is missing" in caplog.text


def test_a_checkpoint_without_its_completion_marker_is_not_resumed(tiny_model_dir, run_dir, caplog):
    """Everything was written but the job stopped before marking checkpoint-2 complete."""
    (run_dir / "checkpoint-2" / "turnwise_checkpoint.json").unlink(missing_ok=True)
    result, replayed = resume_to_step_3(tiny_model_dir, run_dir, caplog)
    assert replayed, "step 2 was not played again: the resume did not start from checkpoint-1"
    assert result["resumed_from"] == str(run_dir / "checkpoint-1")
    assert f"not resuming from {run_dir / 'checkpoint-2'}: it has no turnwise_checkpoint.json" in caplog.text


def test_no_complete_checkpoint_starts_from_scratch_with_a_warning(tiny_model_dir, run_dir, caplog):
    for name in ("checkpoint-1", "checkpoint-2"):
        (run_dir / name / "trainer_state.json").unlink()
    with caplog.at_level("WARNING"):
        result = run_train(tiny_model_dir, run_dir, steps=1, resume=True)
    assert result["resumed_from"] is None and result["steps"] == 1
    assert "--resume: no checkpoint in" in caplog.text and "starting from scratch" in caplog.text


def test_every_saved_checkpoint_is_marked_with_what_it_holds(finished_run):
    """The marker lists every file of the checkpoint with its size, and is written last (it is complete)."""
    import json

    from pipeline.training.checkpoints import checkpoint_files, checkpoint_problem

    for step in (1, 2):
        checkpoint = finished_run / f"checkpoint-{step}"
        record = json.loads((checkpoint / "turnwise_checkpoint.json").read_text())
        assert record["step"] == step and record["files"] == checkpoint_files(checkpoint)
        assert {"trainer_state.json", "optimizer.pt", "adapter_model.safetensors"} <= set(record["files"])
        assert checkpoint_problem(checkpoint) is None
        assert not list(checkpoint.glob("*.tmp"))


def test_a_resume_that_would_draw_other_tasks_is_refused_before_the_model_loads(finished_run, run_dir,
                                                                              tiny_model_dir, monkeypatch):
    """A resume skips the batches the checkpoint's steps drew from the shuffled draw list; with another list
    (other tasks, limit, intent weights) or another shuffle (seed) the rest of the run would draw other tasks
    than planned. Each marker records the list, and a resume that differs is refused, naming what changed."""
    import json

    import pipeline.models
    from pipeline.envs import load_tasks
    from pipeline.envs.tasks import intent_label

    record = json.loads((finished_run / "checkpoint-2" / "turnwise_checkpoint.json").read_text())["draws"]
    assert record["rows"] == 2 and record["seed"] == 42 and record["intent_weights"] is None

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the resume was refused")

    monkeypatch.setattr(pipeline.models, "load_model", no_model)
    labels = [intent_label(t.intents) for t in load_tasks(None, "train")[:2]]
    doubled = 2 + labels.count(labels[0])  # the first task's intent drawn twice as often
    refusals = {
        "3 rows, no intent_weights, seed 42": dict(train_limit=3),
        f"{doubled} rows, intent_weights {labels[0]}=2, seed 42": dict(intent_weights=[f"{labels[0]}=2"]),
        "2 rows, no intent_weights, seed 7": dict(seed=7),
    }
    for now, change in refusals.items():
        with pytest.raises(ValueError) as refused:
            run_train(tiny_model_dir, run_dir, steps=3, resume=True, **change)
        message = str(refused.value)
        assert f"--resume: {run_dir / 'checkpoint-2'} was trained drawing from 2 rows, no intent_weights, seed 42, " \
               f"but this run draws from {now}." in message
        assert "or train into a new --output_dir" in message


def test_draw_records_compare_the_list_and_its_shuffle_not_how_the_flags_were_spelled(tmp_path):
    """Weights that change nothing pass; the same count and settings over other task ids is refused as such; a
    checkpoint from a turnwise that recorded no draws passes."""
    from pipeline.training.checkpoints import check_same_draws, draw_record, write_marker

    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    write_marker(checkpoint, 1, draws=draw_record(["a", "b"], None, 0))
    check_same_draws(checkpoint, draw_record(["a", "b"], {"cancel": 1}, 0))
    check_same_draws(checkpoint, draw_record(["a", "b"], {}, 0))
    with pytest.raises(ValueError, match=r"from 2 rows, no intent_weights, seed 0 as this run does, but from other "
                                         r"tasks \(their ids differ"):
        check_same_draws(checkpoint, draw_record(["a", "c"], None, 0))
    with pytest.raises(ValueError, match="but this run draws from 3 rows, intent_weights a=2, seed 0"):
        check_same_draws(checkpoint, draw_record(["a", "a", "b"], {"a": 2}, 0))
    write_marker(checkpoint, 1)  # no draw record
    check_same_draws(checkpoint, draw_record(["z"], None, 5))


def test_the_container_resumes_only_when_a_complete_checkpoint_exists(finished_run, tmp_path):
    """sagemaker_entry/train.py adds --resume for a complete checkpoint, and not for a torn or empty one alone."""
    from sagemaker_entry.environment import SageMakerEnv
    from sagemaker_entry.train import container_options

    checkpoints = tmp_path / "checkpoints"
    sm = SageMakerEnv(model_dir=tmp_path / "model", output_data_dir=tmp_path / "output" / "data",
                      checkpoint_dir=checkpoints)
    (checkpoints / "checkpoint-4").mkdir(parents=True)  # empty: a spot interruption right after mkdir
    assert "--resume" not in container_options([], sm)
    shutil.copytree(finished_run / "checkpoint-2", checkpoints / "checkpoint-2")
    options = container_options([], sm)
    assert options[options.index("--resume") + 1] == "true"


def test_the_marker_stays_the_last_callback_so_it_marks_after_every_other_save(make_trainer):
    """The gae critic's value_head.pt is written from on_save; the marker must run after it, and after any
    callback added later, or a checkpoint could be marked before it is complete."""
    from transformers import TrainerCallback

    trainer = make_trainer(advantage="gae")
    trainer.add_callback(TrainerCallback())
    callbacks = trainer.callback_handler.callbacks
    assert callbacks[-1] is trainer.checkpoint_marker
    assert callbacks.index(trainer.estimator_checkpoint) < callbacks.index(trainer.checkpoint_marker)
