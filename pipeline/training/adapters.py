"""What TRL's ``GRPOTrainer`` needs from turnwise: a dataset, a ``rollout_func`` and a reward function.

TRL 1.16 lets a ``rollout_func`` own generation and return an ``env_mask``; the loss then counts only
model-sampled tokens. :class:`EpisodeRollout` plays whole episodes with the token-level
:class:`~pipeline.rollout.RolloutEngine` and returns, per episode, the opening prompt ids, everything
after it as the "completion" (assistant turns *and* environment replies), the sampling logprobs and the
assistant mask. It generates with the training model (the ``hf`` backend, parameters gathered under
ZeRO-3/FSDP2: :mod:`~pipeline.training.sharding`) or, with ``use_vllm``, with TRL's vLLM engine, whose
logprobs then feed TRL's importance-sampling correction (:mod:`~pipeline.training.vllm`). :class:`TrajectoryReward` scores the episodes with a trajectory-level reward and keeps
each breakdown, so the trainer can credit per-turn rewards and log the reward's components. The dataset
(:func:`task_dataset`) only names tasks: the environment builds each episode's real opening.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import torch

from pipeline.envs import make_env
from pipeline.envs.base import Task
from pipeline.rollout import RolloutEngine
from pipeline.rollout.backends import build_backend
from pipeline.training.config import RolloutConfig
from pipeline.training.sharding import generation_model
from pipeline.trajectory import Trajectory

TASK_PREFIX = "turnwise-task:"


def task_dataset(tasks: Sequence[Task]):
    """One row per task. The prompt carries only the task id: the environment builds the real opening."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": TASK_PREFIX + t.id}], "task_id": t.id}
                              for t in tasks])


def hash_id(text: str) -> int:
    """A stable 32-bit hash of a task id (Python's ``hash`` changes per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


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

    def __call__(self, prompts: list[list[dict]], trainer) -> dict[str, Any]:
        tasks = [self.task_for(p) for p in prompts]
        self.calls += 1
        step = trainer.state.global_step
        seeds = [self.seed * 1_000_003 + step * 7919 + hash_id(t.id) % 7919 for t in tasks]
        if getattr(trainer.args, "use_vllm", False):
            # TRL synced this step's weights into its engine before calling us (pipeline.training.vllm)
            from pipeline.training.vllm import engine_backend, rollout_phase

            with rollout_phase(trainer):
                trajectories = self.play(engine_backend(trainer, seeds[0] if seeds else 0), trainer, tasks, seeds)
        else:
            # under ZeRO-3 or FSDP2 the parameters stay gathered for the whole rollout (pipeline.training.sharding)
            with generation_model(trainer) as model:
                backend = build_backend(self.config.backend, model, trainer.processing_class,
                                        temperature=trainer.args.temperature, top_p=trainer.args.top_p,
                                        seed=seeds[0] if seeds else 0)
                was_training = model.training
                model.eval()
                with torch.no_grad():
                    trajectories = self.play(backend, trainer, tasks, seeds)
                model.train(was_training)
        self.last = trajectories
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": [],
                                "episode": []}
        for i, traj in enumerate(trajectories):
            data = traj.tokens
            if not data.turn_spans:  # the opening messages alone filled the token budget
                raise ValueError(
                    f"Task {tasks[i].id!r}: its opening messages are {len(data.input_ids)} tokens, which leaves no room "
                    f"for an assistant turn within max_total_tokens={self.config.max_total_tokens}. Raise "
                    "max_total_tokens (and max_completion_length with it), or shorten the system prompt.")
            start = data.turn_spans[0][0]
            out["prompt_ids"].append(data.input_ids[:start])
            out["completion_ids"].append(data.input_ids[start:])
            out["logprobs"].append(data.logprobs[start:])
            out["env_mask"].append(data.assistant_mask[start:])
            out["episode"].append(i)
        return out


    def play(self, backend, trainer, tasks: Sequence[Task], seeds: Sequence[int]) -> list[Trajectory]:
        """Play one episode per task on ``backend``, every live episode's turn in one backend call."""
        engine = RolloutEngine(backend, trainer.processing_class, max_new_tokens=self.config.max_new_tokens,
                               max_total_tokens=self.config.max_total_tokens, batch_size=max(1, len(tasks)),
                               tool_calling=self.config.tool_calling)
        return engine.run(lambda t: make_env(t, max_turns=self.config.max_turns, customer=self.config.customer),
                          tasks, seeds)


def episode_total(breakdown: Any) -> float:
    """The episode reward ``R``: a breakdown's ``total``, or the float a plain reward function returned."""
    return float(getattr(breakdown, "total", breakdown))


def mean_episode_reward(reward_fn: Callable[[Trajectory], Any], trajectories: Sequence[Trajectory]) -> float:
    """The mean episode reward of ``trajectories`` under ``reward_fn`` (NaN for none): a validation's reward."""
    totals = [episode_total(reward_fn(t)) for t in trajectories]
    return sum(totals) / len(totals) if totals else float("nan")


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
        return [episode_total(b) for b in self.breakdowns]

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
