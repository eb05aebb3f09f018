"""Reward scorers for multi-turn trajectories, kept independent of the trainer's internals.

``build_reward(config=None, tasks=None)`` returns a :class:`~rewards.composite.RewardFunction`; calling
it on a :class:`~pipeline.trajectory.Trajectory` gives a :class:`~rewards.base.RewardBreakdown`
(``per_turn``, ``terminal``, ``total``, ``components``). See :mod:`rewards.composite` for how scorers
combine, :mod:`rewards.rules` and :mod:`rewards.outcome` for the scorers, and :mod:`rewards.audit`
for the checks to run before training on a reward. A scorer of your own that a reward config names by
import path is declared with :func:`declare_scorer` (see :mod:`pipeline.plugins`).
"""

from pipeline.plugins import declare_scorer
from rewards.base import EpisodeScorer, RewardBreakdown, RewardValueError, Score, TurnScorer
from rewards.composite import RewardConfig, RewardConfigError, RewardFunction, ScorerConfig, build_reward

__all__ = ["EpisodeScorer", "RewardBreakdown", "RewardConfig", "RewardConfigError", "RewardFunction",
           "RewardValueError", "Score", "ScorerConfig", "TurnScorer", "build_reward", "declare_scorer"]
