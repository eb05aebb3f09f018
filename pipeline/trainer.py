"""Multi-turn GRPO on TRL's ``GRPOTrainer``.

TRL 1.16 lets a ``rollout_func`` own generation and return an ``env_mask``; the loss then counts only
model-sampled tokens. turnwise plugs in there: :class:`EpisodeRollout` plays whole episodes with the
token-level :class:`~pipeline.rollout.RolloutEngine` and returns, per episode, the opening prompt ids,
everything after it as the "completion" (assistant turns *and* environment replies), the sampling
logprobs and the assistant mask. Rewards come from a trajectory-level reward function.

One hook is overridden, ``_generate_and_score_completions``, and only to post-process its output: it
replaces TRL's episode-level advantages with turn-level ones (shape ``(B, T)``, which TRL 1.16's loss
accepts) when a turn-level estimator is chosen, and records rollout metrics. Everything else (clipped
PPO-style losses ``grpo``/``dapo``/``dr_grpo``/``cispo``, ``num_iterations``, KL ``beta``, PEFT,
gradient checkpointing, checkpoints and resume) is TRL's. Written against ``trl==1.16.0`` (pinned).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from trl import GRPOTrainer

from pipeline import advantages as adv
from pipeline.backends import HFBackend
from pipeline.envs import make_env
from pipeline.envs.base import BUDGET_STOPS, STOP_MAX_TOKENS, STOP_MAX_TURNS, Task
from pipeline.rollout import RolloutEngine
from pipeline.trajectory import Trajectory

logger = logging.getLogger(__name__)

TASK_PREFIX = "turnwise-task:"
EPISODE_ESTIMATORS = ("group_based", "rloo", "grpo_passk")
TURN_ESTIMATORS = ("group_based_per_turn", "monte_carlo")


@dataclass
class RolloutConfig:
    """How episodes are played and credited during training (TRL's ``GRPOConfig`` holds the rest)."""

    env: str = field(default="customer_service", metadata={"help": "Environment name or task-set path."})
    max_turns: int = field(default=12, metadata={"help": "Assistant-turn budget per episode."})
    max_new_tokens: int = field(default=96, metadata={"help": "Token budget per assistant turn."})
    max_total_tokens: int = field(default=4096, metadata={"help": "Token budget per episode (prompt included)."})
    advantage: str = field(default="group_based", metadata={
        "help": f"Advantage estimator: {', '.join(EPISODE_ESTIMATORS + TURN_ESTIMATORS)}."})
    gamma: float = field(default=1.0, metadata={"help": "Discount over turns for turn-level estimators."})
    passk: int = field(default=2, metadata={"help": "k for the grpo_passk estimator."})

    def __post_init__(self) -> None:
        if self.advantage not in EPISODE_ESTIMATORS + TURN_ESTIMATORS:
            raise ValueError(f"RolloutConfig.advantage={self.advantage!r} is not an estimator; use one of "
                             f"{', '.join(EPISODE_ESTIMATORS + TURN_ESTIMATORS)}.")
        for name in ("max_turns", "max_new_tokens", "max_total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RolloutConfig.{name} must be at least 1, got {getattr(self, name)}.")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"RolloutConfig.gamma must be in [0, 1], got {self.gamma}.")


def task_dataset(tasks: Sequence[Task]):
    """One row per task. The prompt carries only the task id: the environment builds the real opening."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": TASK_PREFIX + t.id}], "task_id": t.id}
                              for t in tasks])


class EpisodeRollout:
    """TRL ``rollout_func``: plays one episode per prompt with the current policy.

    TRL hands over the per-process prompts with each task already repeated ``num_generations`` times;
    all copies of a task share one seed, so the group's differences come from the policy alone.
    """

    def __init__(self, tasks: Sequence[Task], config: RolloutConfig, seed: int = 0) -> None:
        self.tasks = {t.id: t for t in tasks}
        self.config = config
        self.seed = seed
        self.last: list[Trajectory] = []
        self.calls = 0  # rollout batches played by this process

    def task_for(self, prompt: list[dict]) -> Task:
        text = prompt[-1]["content"]
        if not text.startswith(TASK_PREFIX) or text[len(TASK_PREFIX):] not in self.tasks:
            raise ValueError(f"Prompt {text[:60]!r} does not name a training task; build the dataset with task_dataset().")
        return self.tasks[text[len(TASK_PREFIX):]]

    def __call__(self, prompts: list[list[dict]], trainer: GRPOTrainer) -> dict[str, Any]:
        tasks = [self.task_for(p) for p in prompts]
        self.calls += 1
        step = trainer.state.global_step
        seeds = [self.seed * 1_000_003 + step * 7919 + hash_id(t.id) % 7919 for t in tasks]
        model = trainer.accelerator.unwrap_model(trainer.model)
        tokenizer = trainer.processing_class
        backend = HFBackend(model, tokenizer, temperature=trainer.args.temperature, top_p=trainer.args.top_p,
                            seed=seeds[0] if seeds else 0)
        engine = RolloutEngine(backend, tokenizer, max_new_tokens=self.config.max_new_tokens,
                               max_total_tokens=self.config.max_total_tokens, batch_size=max(1, len(tasks)))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            trajectories = engine.run(lambda t: make_env(t, max_turns=self.config.max_turns), tasks, seeds)
        model.train(was_training)
        self.last = trajectories
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": [],
                                "episode": []}
        for i, traj in enumerate(trajectories):
            data = traj.tokens
            start = data.turn_spans[0][0]
            out["prompt_ids"].append(data.input_ids[:start])
            out["completion_ids"].append(data.input_ids[start:])
            out["logprobs"].append(data.logprobs[start:])
            out["env_mask"].append(data.assistant_mask[start:])
            out["episode"].append(i)
        return out


def hash_id(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


class TrajectoryReward:
    """Adapts a trajectory reward (``rewards.build_reward()`` or any ``Trajectory -> float``) to TRL.

    TRL calls reward functions with completions; this one looks the episodes up in the rollout that
    produced them and keeps each breakdown, so the trainer can credit per-turn rewards and log components.
    """

    __name__ = "turnwise"

    def __init__(self, reward_fn: Callable[[Trajectory], Any], rollout: EpisodeRollout) -> None:
        self.reward_fn = reward_fn
        self.rollout = rollout
        self.breakdowns: list[Any] = []

    def __call__(self, prompts, completions, completion_ids, episode: list[int], **kwargs) -> list[float]:
        self.breakdowns = [self.reward_fn(self.rollout.last[i]) for i in episode]
        return [float(getattr(b, "total", b)) for b in self.breakdowns]

    def per_turn(self, index: int) -> list[float]:
        """Per-turn rewards with the terminal reward on the last turn (for turn-level estimators)."""
        b = self.breakdowns[index]
        turns = len(self.rollout.last[index].turns)
        per_turn = list(getattr(b, "per_turn", None) or [0.0] * turns)
        if not hasattr(b, "per_turn"):
            per_turn[-1] += float(b)
        else:
            per_turn[-1] += float(getattr(b, "terminal", 0.0))
        return per_turn


class TurnwiseGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with multi-turn rollouts, token-level advantages and rollout metrics."""

    def __init__(self, *args, rollout: EpisodeRollout, reward: TrajectoryReward, rollout_config: RolloutConfig,
                 **kwargs) -> None:
        super().__init__(*args, rollout_func=rollout, reward_funcs=[reward], **kwargs)
        self.rollout, self.reward, self.rollout_config = rollout, reward, rollout_config

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        trajectories = self.rollout.last
        mode = "train" if self.model.training else "eval"
        config = self.rollout_config
        group_ids = [t.task_id for t in trajectories]
        if config.advantage != "group_based":
            output["advantages"] = self._token_advantages(trajectories, group_ids, output).to(output["advantages"].device)
        self._log_rollouts(mode, trajectories, group_ids)
        return output

    def _token_advantages(self, trajectories: list[Trajectory], group_ids: list[str], output: dict) -> torch.Tensor:
        config = self.rollout_config
        width = output["completion_ids"].shape[1]
        starts = [t.tokens.turn_spans[0][0] for t in trajectories]
        spans = [[(s - start, e - start) for s, e in t.tokens.turn_spans] for t, start in zip(trajectories, starts)]
        if config.advantage in EPISODE_ESTIMATORS:
            totals = torch.tensor([float(getattr(b, "total", b)) for b in self.reward.breakdowns])
            if config.advantage == "rloo":
                per_episode = adv.rloo(totals, group_ids)
            else:
                per_episode = adv.grpo_passk(torch.tensor([t.outcome.success for t in trajectories]), group_ids,
                                             k=config.passk)
            per_turn = [[float(a)] * len(s) for a, s in zip(per_episode, spans)]
        else:
            rewards = [self.reward.per_turn(i) for i in range(len(trajectories))]
            if config.advantage == "group_based_per_turn":
                per_turn = adv.group_based_per_turn(rewards, group_ids, gamma=config.gamma,
                                                    scale=self.scale_rewards != "none")
            else:
                per_turn = adv.monte_carlo(rewards, gamma=config.gamma)
        return adv.broadcast_turns(per_turn, spans, width)

    def _log_rollouts(self, mode: str, trajectories: list[Trajectory], group_ids: list[str]) -> None:
        metrics = self._metrics[mode]
        totals = [float(getattr(b, "total", b)) for b in self.reward.breakdowns]
        n = max(1, len(trajectories))
        metrics["rollout/reward/mean"].append(sum(totals) / n)
        metrics["rollout/reward/zero_frac"].append(sum(t == 0.0 for t in totals) / n)
        completed = [t for t in trajectories if t.outcome.completed]
        metrics["rollout/reward/valid_mean"].append(
            sum(r for r, t in zip(totals, trajectories) if t.outcome.completed) / max(1, len(completed)))
        groups: dict[str, list[float]] = {}
        for g, r in zip(group_ids, totals):
            groups.setdefault(g, []).append(r)
        metrics["analysis/zero_adv_groups"].append(
            sum(max(v) - min(v) < 1e-8 for v in groups.values()) / max(1, len(groups)))
        metrics["rollout/turns/mean"].append(sum(len(t.turns) for t in trajectories) / n)
        metrics["rollout/tokens/response_max"].append(max(sum(t.tokens.assistant_mask) for t in trajectories))
        metrics["rollout/truncated_frac"].append(
            sum(t.outcome.stop_reason == STOP_MAX_TOKENS or any(x.truncated for x in t.turns) for t in trajectories) / n)
        metrics["rollout/max_turns_frac"].append(sum(t.outcome.stop_reason == STOP_MAX_TURNS for t in trajectories) / n)
        metrics["rollout/completion"].append(sum(t.outcome.stop_reason not in BUDGET_STOPS for t in trajectories) / n)
        metrics["rollout/success"].append(sum(t.outcome.success for t in trajectories) / n)
        for b in self.reward.breakdowns:
            for name, value in (getattr(b, "components", None) or {}).items():
                value = value if isinstance(value, (int, float)) else sum(value) if value else 0.0
                metrics[f"rewards/{name}"].append(float(value))

    def sample_trajectories(self, limit: int = 4) -> list[str]:
        """JSON lines of the latest rollouts, for the trajectory sample log."""
        return [json.dumps(t.to_dict()) for t in self.rollout.last[:limit]]
