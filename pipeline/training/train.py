"""``turnwise train`` as one function, :func:`train`: build, train, save.

It loads the policy and the tasks, measures the starting policy's foothold (:func:`check_foothold`, or the
step-0 validation when there is one: RL only amplifies what the policy already does some of the time),
builds the reward (:func:`default_reward`), the TRL adapters and
:class:`~pipeline.training.grpo_trainer.TurnwiseGRPOTrainer`, adds validation and sample logging, trains
(with ``--resume``, from the newest complete checkpoint, the advantage estimator's state included; see
:mod:`~pipeline.training.checkpoints`), and saves the adapter, the log history and ``grpo_result.json``,
written last so that a finished run can be told from a killed one."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pipeline.envs.base import Task
from pipeline.training.adapters import EpisodeRollout, TrajectoryReward, task_dataset
from pipeline.training.callbacks import BEST_FILE, SampleWriter, ValidationCallback, foothold
from pipeline.training.checkpoints import check_same_draws, draw_record, latest_complete_checkpoint
from pipeline.training.config import RolloutConfig, check_run_config
from pipeline.training.grpo_trainer import TurnwiseGRPOTrainer
from pipeline.trajectory import Trajectory

logger = logging.getLogger(__name__)

RESULT_FILE = "grpo_result.json"  # written last, when the run has finished (turnwise demo --resume skips it)


def default_reward(config: str | None = None, tasks: Sequence[Any] = ()) -> Callable[[Trajectory], Any]:
    """The trajectory reward from the ``rewards`` package: ``build_reward`` on a YAML path or shipped name.

    The reward is bound to ``tasks`` (:func:`train` passes the training and validation tasks), so scorers
    that check claims against the sandbox database or count a task's required facts use the task, not
    only what the trajectory shows.
    """
    try:
        from rewards import build_reward
    except ImportError as exc:
        raise RuntimeError("The rewards package does not provide build_reward(); install turnwise fully.") from exc
    return build_reward(config, tasks=list(tasks) or None)


def train(task_args, rollout_config: RolloutConfig, grpo_args, model_args,
          reward_fn: Callable[[Trajectory], Any] | None = None) -> dict[str, Any]:
    """Parse-build-train-save: the whole ``turnwise train`` run. Returns where the outputs are."""
    from trl import get_peft_config

    from pipeline.envs import load_tasks
    from pipeline.envs.tasks import intent_label, spread_over_intents, weight_intents
    from pipeline.models import DEFAULT_MODEL, adapter_base_model, load_model

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    check_run_config(rollout_config, grpo_args)  # vLLM, GPU and batch layout: fail before the model loads
    start = time.time()
    base = adapter_base_model(task_args.adapter) if task_args.adapter else None
    model_name = model_args.model_name_or_path or base or DEFAULT_MODEL
    # The tasks first: a task file or an intent weighting that cannot work fails before the model loads.
    train_tasks = load_tasks(task_args.tasks, task_args.train_split)[: task_args.train_limit]
    draws = train_tasks  # what the trainer's sampler shuffles: with intent_weights, a task once per unit of weight
    if task_args.intent_weights is not None:
        draws = weight_intents(train_tasks, task_args.intent_weights)
        logger.info("intent_weights %s: training draws from %d rows (%s)", task_args.intent_weights, len(draws),
                    ", ".join(f"{label} {count}" for label, count in
                              sorted(Counter(intent_label(t.intents) for t in draws).items())))
    draw_identity = draw_record([t.id for t in draws], task_args.intent_weights, grpo_args.seed)
    # The newest *complete* checkpoint: a torn, empty or unmarked newer one is skipped with a warning. One
    # trained on another draw list is refused here, before the model loads.
    checkpoint = latest_complete_checkpoint(grpo_args.output_dir) if task_args.resume else None
    if checkpoint is not None:
        check_same_draws(checkpoint, draw_identity)
    model, tokenizer = load_model(model_name)
    all_val = load_tasks(task_args.tasks, task_args.val_split)
    val_tasks = spread_over_intents(all_val, task_args.val_limit)
    rollout = EpisodeRollout(train_tasks, rollout_config, seed=grpo_args.seed)
    # Bound to the validation tasks too, so that val/reward/mean scores them as training scores its own
    # tasks; a training task keeps its own entry.
    known = {t.id for t in train_tasks}
    reward_tasks = list(train_tasks) + [t for t in val_tasks if t.id not in known]
    reward = TrajectoryReward(reward_fn or default_reward(task_args.reward_config, reward_tasks), rollout)
    grpo_args.max_completion_length = max(grpo_args.max_completion_length or 0, rollout_config.max_total_tokens)
    peft_config = get_peft_config(model_args)
    if task_args.adapter:  # continue training an existing adapter (an SFT warm start): its LoRA config wins
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, task_args.adapter, is_trainable=True)
        peft_config = None
        logger.info("starting from the adapter %s (LoRA r=%d) on %s", task_args.adapter,
                    model.peft_config["default"].r, model_name)
    at_start = task_args.val_at_start and bool(task_args.val_every)
    start_check = None  # with at_start, the step-0 validation is the foothold check: the start is measured once
    if task_args.foothold_tasks and checkpoint is None and not at_start:
        start_check = check_foothold(model, tokenizer, spread_over_intents(all_val, task_args.foothold_tasks),
                                     rollout_config.max_turns, rollout_config.max_new_tokens,
                                     episodes=episode_options(rollout_config))
    trainer = TurnwiseGRPOTrainer(model=model, processing_class=tokenizer, args=grpo_args,
                                  train_dataset=task_dataset(draws), peft_config=peft_config, rollout=rollout,
                                  reward=reward, rollout_config=rollout_config)
    best_dir = Path(grpo_args.output_dir) / "best_adapter" if task_args.keep_best_val else None
    best = None  # a resumed run competes with the best its earlier part kept; a fresh run replaces it
    if best_dir is not None and checkpoint is not None and (best_dir / BEST_FILE).is_file():
        best = {**json.loads((best_dir / BEST_FILE).read_text()), "adapter": str(best_dir)}  # also once moved
    validation = ValidationCallback(trainer, val_tasks, task_args.val_every, rollout_config.max_turns,
                                    rollout_config.max_new_tokens, best_dir=best_dir, best=best,
                                    episodes=episode_options(rollout_config), at_start=at_start,
                                    check_foothold=bool(task_args.foothold_tasks))
    trainer.add_callback(validation)
    trainer.add_callback(SampleWriter(trainer))
    if task_args.resume and checkpoint is None:
        logger.warning("--resume: no checkpoint in %s to resume from (a checkpoint counts once it is complete and "
                       "marked); starting from scratch.", grpo_args.output_dir)
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
        trainer.load_estimator_state(checkpoint)  # a critic continues where the checkpoint left it
    trainer.checkpoint_marker.start_clock(start, checkpoint)  # checkpoints record the whole run's time
    trainer.checkpoint_marker.draws = draw_identity  # and what it draws from, which a resume must match
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    final = validation.final()
    adapter_dir = Path(grpo_args.output_dir) / "adapter"
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    if trainer.args.should_save and hasattr(trainer.accelerator.unwrap_model(trainer.model), "peft_config"):
        from pipeline.models import record_adapter_base

        for kept in (adapter_dir, best_dir):
            if kept is not None and kept.is_dir():
                record_adapter_base(kept, model_name)  # the name the user gave (an alias), not the cache path
    from pipeline.trajectory import atomic_write_text

    out = Path(grpo_args.output_dir)
    atomic_write_text(out / "log_history.json", json.dumps(trainer.state.log_history, indent=2))
    result = {"adapter": str(adapter_dir), "output_dir": grpo_args.output_dir, "samples": str(out / "samples"),
              "val": final, "steps": trainer.state.global_step, "foothold": start_check or validation.foothold,
              "log_history": str(out / "log_history.json"), "wall_time_s": round(time.time() - start, 1),
              "wall_time_total_s": trainer.checkpoint_marker.wall_time_s,
              "resumed_from": str(checkpoint) if checkpoint is not None else None}
    if validation.best is not None:  # keep_best_val: the pipeline goes on with the best validation's adapter
        result.update(adapter=validation.best["adapter"], final_adapter=str(adapter_dir), best_val=validation.best)
    if trainer.args.should_save:
        atomic_write_text(out / RESULT_FILE, json.dumps(result, indent=2, default=str) + "\n")  # last: finished
    return result


def episode_options(config: RolloutConfig) -> dict[str, Any]:
    """How training plays episodes, as :func:`pipeline.evaluation.evaluate` takes it: validation plays them alike."""
    return {"customer": config.customer, "tool_calling": config.tool_calling}


def check_foothold(model, tokenizer, tasks: Sequence[Task], max_turns: int, max_new_tokens: int,
                   episodes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The foothold check: the starting policy's greedy success on ``tasks`` (a val sample), with the training
    budgets (and ``episodes``: :func:`episode_options`). Warns, with guidance, when it is 0
    (:func:`~pipeline.training.callbacks.foothold`). Returns the numbers."""
    from pipeline.evaluation import evaluate

    was_training = model.training
    model.eval()
    with torch.no_grad():
        report = evaluate((model, tokenizer), tasks, max_turns=max_turns, max_new_tokens=max_new_tokens,
                          label="starting policy", **(episodes or {}))
    model.train(was_training)
    return foothold(report.metrics)
