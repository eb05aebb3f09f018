"""Multi-turn GRPO training on TRL: the ``turnwise train`` stage.

- :mod:`~pipeline.training.config`: :class:`RolloutConfig`, the episode budgets and the advantage estimator.
- :mod:`~pipeline.training.adapters`: what TRL's ``GRPOTrainer`` calls: :func:`task_dataset`,
  :class:`EpisodeRollout` (its ``rollout_func``) and :class:`TrajectoryReward` (its reward function).
- :mod:`~pipeline.training.advantages`: the estimator registry (:func:`register_estimator`,
  :data:`ESTIMATORS`) and the estimators, one signature for all.
- :mod:`~pipeline.training.grpo_trainer`: :class:`TurnwiseGRPOTrainer`, TRL's trainer with per-turn
  advantages and rollout metrics.
- :mod:`~pipeline.training.shared_prefix` and :mod:`~pipeline.training.value_head`: the loss's
  shared-prefix forward and the ``gae`` critic.
- :mod:`~pipeline.training.callbacks`: validation, trajectory samples, estimator checkpoints, TensorBoard.
- :mod:`~pipeline.training.train`: :func:`train`, the whole run.

Written against ``trl==1.16.0`` (pinned); the private TRL methods it overrides are listed, with their
signatures, in :data:`~pipeline.training.grpo_trainer.TRL_HOOKS`.
"""

from pipeline.training.adapters import EpisodeRollout, TrajectoryReward, task_dataset
from pipeline.training.advantages import (
    ESTIMATORS,
    AdvantageInput,
    Estimator,
    broadcast_turns,
    build_estimator,
    get_estimator,
    register_estimator,
)
from pipeline.training.callbacks import (
    FOOTHOLD_GUIDANCE,
    EstimatorCheckpoint,
    SampleWriter,
    ValidationCallback,
    health_warning,
)
from pipeline.training.config import RolloutConfig
from pipeline.training.grpo_trainer import TurnwiseGRPOTrainer
from pipeline.training.shared_prefix import shared_prefix_logps
from pipeline.training.train import RESULT_FILE, check_foothold, default_reward, train
from pipeline.training.value_head import ValueHead, boundary_hidden_states

__all__ = [
    "ESTIMATORS",
    "FOOTHOLD_GUIDANCE",
    "RESULT_FILE",
    "AdvantageInput",
    "Estimator",
    "EpisodeRollout",
    "EstimatorCheckpoint",
    "RolloutConfig",
    "SampleWriter",
    "TrajectoryReward",
    "TurnwiseGRPOTrainer",
    "ValidationCallback",
    "ValueHead",
    "boundary_hidden_states",
    "broadcast_turns",
    "build_estimator",
    "check_foothold",
    "default_reward",
    "get_estimator",
    "health_warning",
    "register_estimator",
    "shared_prefix_logps",
    "task_dataset",
    "train",
]
