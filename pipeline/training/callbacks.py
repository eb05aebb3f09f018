"""What a GRPO run does besides optimising, as ``transformers`` callbacks.

- :class:`ValidationCallback` runs the external evaluation on held-out tasks every ``val_every`` steps
  (``val/success``, ``val/pass@1``, ``val/completion``, ``val/reward/mean``), and on the starting policy
  at step 0 with ``val_at_start``; warns on the reward-hacking signal (:func:`health_warning`); and with
  ``keep_best_val`` keeps the best validation's adapter, the starting one included.
- :class:`SampleWriter` writes the latest trajectories as JSONL at each logging step, for people to read.
- :class:`EstimatorCheckpoint` saves a stateful advantage estimator (a critic) into every
  checkpoint from ``on_save``, and restores it when a run resumes, so TRL's own checkpointing stays as is.
- :func:`use_namespaced_tensorboard` keeps metric names that carry a namespace (``rollout/reward/mean``)
  as they are in TensorBoard, instead of transformers' ``train/`` prefix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pipeline.envs.base import Task
from pipeline.training.adapters import mean_episode_reward
from pipeline.training.advantages import ESTIMATOR_STATE_FILE
from pipeline.trajectory import Trajectory

if TYPE_CHECKING:  # the trainer is a pipeline.training.grpo_trainer.TurnwiseGRPOTrainer, which imports this module
    from trl import GRPOTrainer

logger = logging.getLogger(__name__)

BEST_FILE = "best_val.json"  # in <output_dir>/best_adapter (keep_best_val): the step and val success it had

FOOTHOLD_GUIDANCE = (
    "RL only amplifies what the policy already does some of the time: when no rollout succeeds, the success part "
    "of the reward is the same for every rollout of a task and GRPO has little to push on. Before spending the "
    "budget: warm-start with SFT on oracle demonstrations (`turnwise sft --output_dir outputs/sft`, then "
    "`turnwise train ... --adapter outputs/sft/adapter`); simplify the tasks (train on single-intent tasks "
    "first, e.g. a filtered tasks .jsonl, or fewer turns to get right); or raise the budget (max_turns, "
    "max_new_tokens, num_generations, temperature) so that some rollouts can succeed.")


def foothold(metrics: dict[str, Any]) -> dict[str, Any]:
    """The foothold check on the starting policy's greedy evaluation (its report's ``metrics``): the numbers it
    records, with a warning and guidance (:data:`FOOTHOLD_GUIDANCE`) when not one val task was solved."""
    m = metrics
    if m["success"] == 0:
        logger.warning("foothold check: the starting policy solved 0 of %d val tasks (greedy; completion %.2f, "
                       "%.1f tool calls per episode, stop reasons %s). %s", m["n_tasks"], m["completion"],
                       m["tool_calls_mean"], m["stop_reasons"], FOOTHOLD_GUIDANCE)
    else:
        logger.info("foothold check: the starting policy solves %.3f of %d val tasks (greedy).", m["success"],
                    m["n_tasks"])
    return {"success": m["success"], "n_tasks": m["n_tasks"], "completion": m["completion"],
            "tool_calls_mean": m["tool_calls_mean"], "stop_reasons": m["stop_reasons"]}


class ValidationCallback(TrainerCallback):
    """Runs the external evaluation on held-out tasks every ``every`` steps; logs ``val/success``,
    ``val/pass@1``, ``val/completion`` and ``val/reward/mean`` (the run's trajectory reward averaged over
    the validation episodes), and warns when training reward rises while validation success stays flat.

    ``reward_fn`` scores the validation episodes; None uses the reward the trainer trains on. With
    ``at_start``, a fresh run (not a resumed one) also validates the starting policy at step 0: the curve
    starts from it, and with ``best_dir`` the starting adapter competes too, so a run whose steps all score
    below it hands on the adapter it started from. That validation is also the run's foothold check
    (:func:`foothold`, kept in ``self.foothold``), unless ``check_foothold`` is off; it comes before the first
    step, so its warning still comes before the budget is spent.
    """

    def __init__(self, trainer: "GRPOTrainer", tasks: Sequence[Task], every: int, max_turns: int,
                 max_new_tokens: int, patience: int = 3, best_dir: Path | None = None,
                 best: dict[str, Any] | None = None, reward_fn: Callable[[Trajectory], Any] | None = None,
                 episodes: dict[str, Any] | None = None, at_start: bool = False, check_foothold: bool = True) -> None:
        self.trainer, self.tasks, self.every, self.at_start = trainer, list(tasks), every, at_start
        self.check_foothold = check_foothold
        self.foothold: dict[str, Any] | None = None  # the step-0 validation's foothold check (at_start)
        self._report_metrics: dict[str, Any] = {}  # the latest validation's full evaluation metrics
        self.episodes = episodes or {}  # how episodes are played (customer, tool_calling), as in training
        self.max_turns, self.max_new_tokens, self.patience = max_turns, max_new_tokens, patience
        self.reward_fn = reward_fn
        self.history: list[tuple[float, float]] = []  # (train reward mean since last validation, val success)
        self._rewards: list[float] = []
        self.last: tuple[int, dict[str, float]] | None = None  # (step, metrics) of the latest validation
        # keep_best_val: where the best validation's adapter goes, and that validation ({"step", "val/success"})
        self.best_dir, self.best = best_dir, best

    def validate(self, step: int | None = None) -> dict[str, float]:
        """The validation metrics of the policy being trained (``step``, when given, names it in the log)."""
        from pipeline.evaluation import evaluate

        from pipeline.training.sharding import generation_model

        with generation_model(self.trainer) as model:  # parameters gathered under ZeRO-3 / FSDP2
            was_training = model.training
            report = evaluate((model, self.trainer.processing_class), self.tasks, max_turns=self.max_turns,
                              max_new_tokens=self.max_new_tokens,
                              label=None if step is None else f"the policy at step {step}", **self.episodes)
            model.train(was_training)
        self._report_metrics = report.metrics
        reward_fn = self.reward_fn or self.trainer.reward.reward_fn
        return {"val/success": report.metrics["success"], "val/pass@1": report.metrics["pass@1"],
                "val/completion": report.metrics["completion"],
                "val/reward/mean": mean_episode_reward(reward_fn, report.trajectories)}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "rollout/reward/mean" in logs:
            self._rewards.append(float(logs["rollout/reward/mean"]))
            if float(logs.get("analysis/zero_adv_groups", 0.0)) > 0.5:
                logger.warning("step %d: %.0f%% of groups have zero advantage (every rollout of a task scored the "
                               "same): no learning signal. Raise num_generations or temperature, or use a denser "
                               "reward.", state.global_step, 100 * float(logs["analysis/zero_adv_groups"]))

    def on_train_begin(self, args, state, control, **kwargs):
        if self.at_start and state.global_step == 0:  # a resumed run's start was validated by its first part
            self._validate_and_keep(0)
            if self.check_foothold:
                self.foothold = foothold(self._report_metrics)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._run(state)

    def final(self) -> dict[str, float]:
        """Val metrics of the trained policy: the last periodic validation's when it ran at the last step."""
        step = self.trainer.state.global_step
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        return self._validate_and_keep(step)

    def _validate_and_keep(self, step: int) -> dict[str, float]:
        metrics = self.validate(step)
        self.last = (step, dict(metrics))
        self._keep_if_best(step, metrics)
        should_log = self.trainer.control.should_log
        self.trainer.log(metrics)  # TRL's log() adds its pending training metrics to the dict it is given
        # transformers' on_log clears should_log: at a step's end that would swallow the step's own training log
        # (loss, grad_norm, learning rate), and the next one would average the loss over two steps
        self.trainer.control.should_log = should_log
        return self.last[1]

    def _run(self, state) -> None:
        metrics = self._validate_and_keep(state.global_step)
        reward = sum(self._rewards) / len(self._rewards) if self._rewards else float("nan")
        self._rewards = []
        self.history.append((reward, metrics["val/success"]))
        warning = health_warning(self.history, self.patience)
        if warning:
            logger.warning("step %d: %s", state.global_step, warning)

    def _keep_if_best(self, step: int, metrics: dict[str, float]) -> None:
        """With keep_best_val: save the adapter when this validation beats every earlier one. It is written
        beside ``best_dir`` with its ``best_val.json`` and then renamed into place, so a kill leaves the
        previous best whole."""
        if self.best_dir is None or (self.best is not None and metrics["val/success"] <= self.best["val/success"]):
            return
        self.best = {"step": step, "val/success": metrics["val/success"], "adapter": str(self.best_dir)}
        staging = self.best_dir.with_name(f".{self.best_dir.name}.tmp")
        if self.trainer.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a killed save left
        self.trainer.save_model(str(staging))  # every process takes part; only the main one writes
        if not self.trainer.args.should_save:
            return
        from pipeline.models import publish_directory
        from pipeline.trajectory import atomic_write_text

        self.trainer.processing_class.save_pretrained(str(staging))
        atomic_write_text(staging / BEST_FILE, json.dumps(self.best, indent=2) + "\n")
        publish_directory(staging, self.best_dir)
        logger.info("step %d: val success %.3f is the best so far; its adapter is in %s", step,
                    metrics["val/success"], self.best_dir)


def health_warning(history: Sequence[tuple[float, float]], patience: int = 3, min_rise: float = 0.05,
                   flat: float = 0.02) -> str | None:
    """The reward-hacking signal: training reward rose over the last ``patience`` validations while
    validation success moved by less than ``flat``.

    >>> health_warning([(0.1, 0.2), (0.3, 0.2), (0.5, 0.21)])
    'training reward rose by 0.40 over the last 3 validations while val/success stayed flat (0.20 -> 0.21): likely reward hacking. Read the transcripts where reward is high and success is false; run `turnwise audit`.'
    >>> health_warning([(0.1, 0.2), (0.3, 0.3), (0.5, 0.4)]) is None
    True
    """
    if len(history) < patience:
        return None
    window = history[-patience:]
    rise = window[-1][0] - window[0][0]
    moved = abs(window[-1][1] - window[0][1])
    if rise >= min_rise and moved < flat:
        return (f"training reward rose by {rise:.2f} over the last {patience} validations while val/success stayed "
                f"flat ({window[0][1]:.2f} -> {window[-1][1]:.2f}): likely reward hacking. Read the transcripts where "
                "reward is high and success is false; run `turnwise audit`.")
    return None


class SampleWriter(TrainerCallback):
    """Writes one trajectory of each group of the latest rollout batch (every task it drew, up to ``limit``) as
    JSONL at every logging step (``<output_dir>/samples/``), and shows the current reward and success on the
    progress bar."""

    def __init__(self, trainer: "GRPOTrainer", limit: int = 16) -> None:
        self.trainer, self.limit = trainer, limit

    def on_log(self, args, state, control, logs=None, **kwargs):
        from pipeline.trajectory import atomic_write_text

        if not state.is_world_process_zero or not self.trainer.rollout.last:
            return
        lines = self.trainer.sample_trajectories(self.limit)
        atomic_write_text(Path(args.output_dir) / "samples" / f"step-{state.global_step:06d}.jsonl",
                          "\n".join(lines) + "\n")
        if logs and "rollout/reward/mean" in logs:
            for callback in self.trainer.callback_handler.callbacks:
                bar = getattr(callback, "training_bar", None)
                if bar is not None:
                    bar.set_postfix(reward=f"{float(logs['rollout/reward/mean']):.3f}",
                                    success=f"{float(logs.get('rollout/success', 0.0)):.2f}")


class EstimatorCheckpoint(TrainerCallback):
    """Keeps a stateful advantage estimator in the run's checkpoints.

    ``on_save`` writes ``estimator.state_dict()`` into the checkpoint TRL has just written
    (``checkpoint-N/<state_file>``, the estimator's ``state_file`` or ``estimator_state.pt``): to a temporary
    name, synced, then renamed, so a checkpoint never holds half a file. :meth:`load` restores it from a
    checkpoint before training resumes; a resumed run that did not restore it is warned about, because
    its critic starts again from scratch.
    """

    def __init__(self, estimator: Any, name: str) -> None:
        self.estimator, self.name = estimator, name
        self.restored_from: str | None = None

    @property
    def filename(self) -> str:
        return getattr(self.estimator, "state_file", ESTIMATOR_STATE_FILE)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        estimator_state = self.estimator.state_dict()
        if estimator_state is None or not checkpoint.is_dir():
            return
        tmp = checkpoint / f"{self.filename}.tmp"
        with tmp.open("wb") as f:
            torch.save(estimator_state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint's
        os.replace(tmp, checkpoint / self.filename)

    def load(self, checkpoint: str | Path) -> bool:
        """Restore the estimator from ``checkpoint``; False (with a warning) when it holds no state for it."""
        path = Path(checkpoint) / self.filename
        if not path.exists():
            logger.warning("%s has no %s: the %s estimator's state starts again from scratch.", checkpoint,
                           self.filename, self.name)
            return False
        try:
            self.estimator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # torch's unpickler and the estimator's own checks raise many types
            reason = (str(exc).strip().splitlines() or [""])[0][:200]  # torch's advice to unpickle anyway is left out
            raise ValueError(f"{path} is not a {self.name} estimator state ({type(exc).__name__}: {reason}); delete "
                             f"{checkpoint} to resume from an earlier checkpoint.") from exc
        self.restored_from = str(checkpoint)
        return True

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and self.restored_from is None:
            logger.warning("resuming at step %d without the %s estimator's state: its critic starts again from "
                           "scratch. Call trainer.load_estimator_state(checkpoint) before trainer.train(...) (turnwise "
                           "train does).", state.global_step, self.name)


def use_namespaced_tensorboard(trainer) -> None:
    """Replace transformers' TensorBoard callback on ``trainer`` with one that keeps namespaced names."""
    from transformers.integrations import TensorBoardCallback

    for callback in list(trainer.callback_handler.callbacks):
        if type(callback) is TensorBoardCallback:  # keep rollout/reward/mean as is, not train/rollout/...
            trainer.callback_handler.remove_callback(callback)
            trainer.add_callback(namespaced_tensorboard_callback())


def namespaced_tensorboard_callback():
    """A TensorBoard callback that files ``rollout/reward/mean`` under that tag, not ``train/rollout/...``."""
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import rewrite_logs

    class NamespacedTensorBoardCallback(TensorBoardCallback):
        """TensorBoard logging that keeps metric names that already carry a namespace (``rollout/reward/mean``,
        ``val/success``) as they are; transformers' own callback files every training metric under ``train/``."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if self.tb_writer is None:
                self._init_summary_writer(args)
            if self.tb_writer is None:
                return
            for key, value in logs.items():
                tag = key if "/" in key and not key.startswith(("eval_", "test_")) else next(iter(rewrite_logs({key: 0})))
                if isinstance(value, (int, float)):
                    self.tb_writer.add_scalar(tag, value, state.global_step)
            self.tb_writer.flush()

    return NamespacedTensorBoardCallback()
