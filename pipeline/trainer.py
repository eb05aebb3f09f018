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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from pipeline import advantages as adv
from pipeline.envs import make_env
from pipeline.envs.base import BUDGET_STOPS, STOP_MAX_TOKENS, STOP_MAX_TURNS, Task
from pipeline.rollout import RolloutEngine
from pipeline.rollout.backends import backend_names, build_backend, check_backend_name
from pipeline.rollout.backends.kv_cache import cache_argument, returned_cache, shared_prefix_length
from pipeline.trajectory import Trajectory

logger = logging.getLogger(__name__)

TASK_PREFIX = "turnwise-task:"
EPISODE_ESTIMATORS = ("group_based", "rloo", "grpo_passk")
TURN_ESTIMATORS = ("group_based_per_turn", "monte_carlo", "gae")
VALUE_HEAD_FILE = "value_head.pt"  # in each checkpoint of an advantage=gae run
BEST_FILE = "best_val.json"  # in <output_dir>/best_adapter (keep_best_val): the step and val success it had
MIN_SHARED_PREFIX = 16  # tokens; below this the loss runs TRL's plain forward
RESULT_FILE = "grpo_result.json"  # written last, when the run has finished (turnwise demo --resume skips it)


@dataclass
class RolloutConfig:
    """How episodes are played and credited during training (TRL's ``GRPOConfig`` holds the rest)."""

    max_turns: int = field(default=12, metadata={"help": "Assistant-turn budget per episode."})
    max_new_tokens: int = field(default=96, metadata={"help": "Token budget per assistant turn."})
    max_total_tokens: int = field(default=4096, metadata={"help": "Token budget per episode (prompt included)."})
    advantage: str = field(default="group_based", metadata={
        "help": f"Advantage estimator: {', '.join(EPISODE_ESTIMATORS + TURN_ESTIMATORS)}."})
    gamma: float = field(default=1.0, metadata={"help": "Discount over turns for turn-level estimators."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda over turns (advantage=gae)."})
    value_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the value head (advantage=gae)."})
    value_epochs: int = field(default=4, metadata={
        "help": "Value-head optimiser steps per rollout batch, on that batch's targets (advantage=gae)."})
    passk: int = field(default=2, metadata={"help": "k for the grpo_passk estimator."})
    share_prefix: bool = field(default=True, metadata={
        "help": "In the loss, run the prefix every episode of a batch shares (the system prompt) once instead of "
                "once per episode; same log-probs and gradients. Off with gradient checkpointing or several "
                "processes, where the plain forward runs."})
    backend: str = field(default="hf", metadata={
        "help": f"Generation backend for rollouts, by name: {', '.join(backend_names())} (pipeline.rollout.backends). "
                "Rollouts must come from the model being trained, which hf does; vllm serves a fixed model."})

    def __post_init__(self) -> None:
        check_backend_name(self.backend, "RolloutConfig.backend")
        if self.advantage not in EPISODE_ESTIMATORS + TURN_ESTIMATORS:
            raise ValueError(f"RolloutConfig.advantage={self.advantage!r} is not an estimator; use one of "
                             f"{', '.join(EPISODE_ESTIMATORS + TURN_ESTIMATORS)}.")
        for name in ("max_turns", "max_new_tokens", "max_total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RolloutConfig.{name} must be at least 1, got {getattr(self, name)}.")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"RolloutConfig.gamma must be in [0, 1], got {self.gamma}.")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"RolloutConfig.lam must be in [0, 1], got {self.lam}.")
        if self.value_lr <= 0 or self.value_epochs < 1:
            raise ValueError(f"RolloutConfig.value_lr must be > 0 and value_epochs >= 1, got {self.value_lr} and "
                             f"{self.value_epochs}.")


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
        backend = build_backend(self.config.backend, model, tokenizer, temperature=trainer.args.temperature,
                                top_p=trainer.args.top_p, seed=seeds[0] if seeds else 0)
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
        from transformers.integrations import TensorBoardCallback

        for callback in list(self.callback_handler.callbacks):
            if type(callback) is TensorBoardCallback:  # keep rollout/reward/mean as is, not train/rollout/...
                self.callback_handler.remove_callback(callback)
                self.add_callback(_namespaced_tensorboard_callback())

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

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        """TRL's per-token log-probs, with the prefix every row shares (the system prompt: ~1,700 of a
        customer-service episode's ~2,300 tokens) run once per chunk instead of once per row."""
        shareable = (self.rollout_config.share_prefix and not compute_aux_loss
                     and all(v is None for v in extra.values()) and not self.args.gradient_checkpointing
                     and self.accelerator.num_processes == 1)
        if not shareable:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss, **extra)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start: start + batch_size], attention_mask[start: start + batch_size]
            prompt_width = ids.size(1) - logits_to_keep
            prefix = shared_prefix_length([row[m.bool()].tolist() for row, m in
                                           zip(ids[:, :prompt_width], mask[:, :prompt_width])])
            if prefix < MIN_SHARED_PREFIX:  # nothing worth sharing: TRL's own forward
                lp, ent, _ = super()._get_per_token_logps_and_entropies(model, ids, mask, logits_to_keep,
                                                                       compute_entropy=compute_entropy)
            else:
                with self.accelerator.autocast():
                    lp, ent = shared_prefix_logps(model, ids, mask, logits_to_keep, prefix, compute_entropy)
            logps.append(lp)
            entropies.append(ent)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

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
            elif config.advantage == "gae":
                per_turn = self._gae(trajectories, rewards)
            else:
                per_turn = adv.monte_carlo(rewards, gamma=config.gamma)
        return adv.broadcast_turns(per_turn, spans, width)

    def _gae(self, trajectories: list[Trajectory], rewards: list[list[float]]) -> list[list[float]]:
        """PPO's advantages over turns: a value head on the policy's hidden state at each turn's boundary
        (:class:`~pipeline.advantages.ValueHead`, its own parameters and optimiser, never the policy's),
        GAE(gamma, lambda) with the values before its update, then ``value_epochs`` steps of value loss
        on this batch's lambda-returns. The hidden states come from one no-grad pass of the current policy."""
        config = self.rollout_config
        model = self.accelerator.unwrap_model(self.model)
        hidden, boundaries = boundary_hidden_states(model, trajectories, self.processing_class.pad_token_id or 0)
        if getattr(self, "value_head", None) is None:
            self.value_head = adv.ValueHead(hidden.shape[-1]).to(hidden.device)
            self.value_optimizer = torch.optim.Adam(self.value_head.parameters(), lr=config.value_lr)
        with torch.no_grad():
            values = [v.tolist() for v in self.value_head(hidden, boundaries)]
        per_turn, targets = adv.gae(rewards, values, gamma=config.gamma, lam=config.lam)
        for _ in range(config.value_epochs):
            loss = adv.ValueHead.loss(self.value_head(hidden, boundaries), targets)
            self.value_optimizer.zero_grad()
            loss.backward()
            self.value_optimizer.step()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["value/loss"].append(loss.detach().item())
        self._metrics[mode]["value/mean"].append(sum(map(sum, values)) / max(1, sum(map(len, values))))
        return per_turn

    def _save_checkpoint(self, model, trial) -> None:
        """TRL's checkpoint plus, for advantage=gae, the value head and its optimiser (``value_head.pt``,
        written to a temporary name, synced and renamed), so that ``--resume`` continues the same critic."""
        super()._save_checkpoint(model, trial)
        if getattr(self, "value_head", None) is None or not self.args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        path = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        state = {"hidden_size": self.value_head.proj.in_features, "head": self.value_head.state_dict(),
                 "optimizer": self.value_optimizer.state_dict()}
        tmp = path / f"{VALUE_HEAD_FILE}.tmp"
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint's
        os.replace(tmp, path / VALUE_HEAD_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.rollout_config.advantage != "gae":
            return
        path = Path(resume_from_checkpoint) / VALUE_HEAD_FILE
        if not path.exists():
            logger.warning("%s has no %s: the value head (advantage=gae) starts again from zero.",
                           resume_from_checkpoint, VALUE_HEAD_FILE)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.value_head = adv.ValueHead(state["hidden_size"]).to(self.accelerator.device)
        self.value_head.load_state_dict(state["head"])
        self.value_optimizer = torch.optim.Adam(self.value_head.parameters(), lr=self.rollout_config.value_lr)
        self.value_optimizer.load_state_dict(state["optimizer"])

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


def shared_prefix_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                        prefix: int, compute_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the last ``logits_to_keep`` positions, as TRL's fused LM head
    gives them, computing the first ``prefix`` tokens, which all rows' prompts share, once.

    ``input_ids`` is TRL's layout: left-padded prompts, then right-padded completions; ``prefix`` must be
    shorter than every prompt (`pipeline.rollout.backends.kv_cache.shared_prefix_length` of the prompts' real tokens). The
    prefix goes through the decoder once with a KV cache; the cache is repeated over the rows and every
    row's remainder is run on top of it. Gradients reach the LoRA weights through the cached keys and
    values, so the result and its gradient equal the full forward's (positions differ by each row's left
    padding, which rotary embeddings do not see).
    """
    rows = input_ids.size(0)
    width = input_ids.size(1)
    prompt_width = width - logits_to_keep
    real = attention_mask.bool()
    pads = (~real[:, :prompt_width]).sum(1)  # left padding of each prompt
    prompt_lens = prompt_width - pads
    ends = width - (~real).long().flip(1).cumprod(1).sum(1)  # one past each row's last real token
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.base_model  # the decoder without the LM head; PEFT's LoRA layers sit inside it
    cache = returned_cache(decoder(input_ids=input_ids[0, pads[0]: pads[0] + prefix].unsqueeze(0),
                                   attention_mask=attention_mask.new_ones(1, prefix), use_cache=True))
    cache.batch_repeat_interleave(rows)
    suffix_lens = ends - pads - prefix
    length = int(suffix_lens.max())
    suffix = input_ids.new_zeros(rows, length)
    shift_labels = torch.full_like(suffix, -100)
    mask = attention_mask.new_zeros(rows, prefix + length)
    mask[:, :prefix] = 1
    for i in range(rows):
        n = int(suffix_lens[i])
        suffix[i, :n] = input_ids[i, pads[i] + prefix: ends[i]]
        mask[i, prefix: prefix + n] = 1
        # label position t scores suffix token t + 1; only the completion's tokens are scored
        scored = int(prompt_lens[i]) - prefix - 1
        shift_labels[i, scored: n - 1] = suffix[i, scored + 1: n]
    out = model(input_ids=suffix, attention_mask=mask, shift_labels=shift_labels, fused_lm_head=True,
                **{cache_argument(model): cache})
    # completion token k of row i sits at suffix index prompt_len_i - prefix + k, scored at label index one less
    index = (prompt_lens - prefix - 1).unsqueeze(1) + torch.arange(logits_to_keep, device=input_ids.device)
    valid = index < (suffix_lens - 1).unsqueeze(1)
    index = index.clamp(max=length - 1)

    def gather(values: torch.Tensor) -> torch.Tensor:
        return values.gather(1, index).masked_fill(~valid, 0.0)

    return gather(out.log_probs), gather(out.entropy) if compute_entropy else None


@torch.no_grad()
def boundary_hidden_states(model, trajectories: Sequence[Trajectory], pad_id: int) -> tuple[torch.Tensor, list]:
    """The policy's last hidden state at each assistant turn's boundary (the token before the turn), as
    (B, K, H) with K the most turns in the batch, and per episode the indices ``range(K_i)`` into it."""
    boundaries = adv.ValueHead.boundaries([t.tokens.turn_spans for t in trajectories])
    length = max(b[-1] for b in boundaries) + 1
    ids = torch.full((len(trajectories), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(trajectories):
        seq = t.tokens.input_ids[: boundaries[i][-1] + 1]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, base.base_model_prefix, base)  # the decoder without the LM head (LoRA layers included)
    was_training = model.training
    model.eval()
    hidden = body(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).last_hidden_state
    model.train(was_training)
    out = hidden.new_zeros(len(trajectories), max(map(len, boundaries)), hidden.shape[-1], dtype=torch.float32)
    for i, b in enumerate(boundaries):
        out[i, : len(b)] = hidden[i, b].float()
    return out, [list(range(len(b))) for b in boundaries]


def _namespaced_tensorboard_callback():
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


# -- the training entry point ----------------------------------------------------------------------


class ValidationCallback(TrainerCallback):
    """Runs the external evaluation on held-out tasks every ``every`` steps; logs ``val/success`` and
    ``val/pass@1``, and warns when training reward rises while validation success stays flat."""

    def __init__(self, trainer: "TurnwiseGRPOTrainer", tasks: Sequence[Task], every: int, max_turns: int,
                 max_new_tokens: int, patience: int = 3, best_dir: Path | None = None,
                 best: dict[str, Any] | None = None) -> None:
        self.trainer, self.tasks, self.every = trainer, list(tasks), every
        self.max_turns, self.max_new_tokens, self.patience = max_turns, max_new_tokens, patience
        self.history: list[tuple[float, float]] = []  # (train reward mean since last validation, val success)
        self._rewards: list[float] = []
        self.last: tuple[int, dict[str, float]] | None = None  # (step, metrics) of the latest validation
        # keep_best_val: where the best validation's adapter goes, and that validation ({"step", "val/success"})
        self.best_dir, self.best = best_dir, best

    def validate(self) -> dict[str, float]:
        from pipeline.evaluation import evaluate

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        was_training = model.training
        report = evaluate((model, self.trainer.processing_class), self.tasks, max_turns=self.max_turns,
                          max_new_tokens=self.max_new_tokens)
        model.train(was_training)
        return {"val/success": report.metrics["success"], "val/pass@1": report.metrics["pass@1"],
                "val/completion": report.metrics["completion"]}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "rollout/reward/mean" in logs:
            self._rewards.append(float(logs["rollout/reward/mean"]))
            if float(logs.get("analysis/zero_adv_groups", 0.0)) > 0.5:
                logger.warning("step %d: %.0f%% of groups have zero advantage (every rollout of a task scored the "
                               "same): no learning signal. Raise num_generations or temperature, or use a denser "
                               "reward.", state.global_step, 100 * float(logs["analysis/zero_adv_groups"]))

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._run(state)

    def final(self) -> dict[str, float]:
        """Val metrics of the trained policy: the last periodic validation's when it ran at the last step."""
        step = self.trainer.state.global_step
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        metrics = self.validate()
        self.last = (step, dict(metrics))
        self._keep_if_best(step, metrics)
        self.trainer.log(metrics)  # TRL's log() adds its pending training metrics to the dict it is given
        return self.last[1]

    def _run(self, state) -> None:
        metrics = self.validate()
        self.last = (state.global_step, dict(metrics))
        self._keep_if_best(state.global_step, metrics)
        self.trainer.log(metrics)
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
        import shutil

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
    """Writes a few of the latest trajectories as JSONL at every logging step (``<output_dir>/samples/``),
    and shows the current reward and success on the progress bar."""

    def __init__(self, trainer: "TurnwiseGRPOTrainer", limit: int = 4) -> None:
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


def default_reward(config: str | None = None, tasks: Sequence[Any] = ()) -> Callable[[Trajectory], Any]:
    """The trajectory reward from the ``rewards`` package: ``build_reward`` on a YAML path or shipped name.

    The reward is bound to the training tasks, so scorers that check claims against the sandbox
    database or count a task's required facts use the task, not only what the trajectory shows.
    """
    try:
        from rewards import build_reward
    except ImportError as exc:
        raise RuntimeError("The rewards package does not provide build_reward(); install turnwise fully.") from exc
    return build_reward(config, tasks=list(tasks) or None)


def train(task_args, rollout_config: RolloutConfig, grpo_args, model_args,
          reward_fn: Callable[[Trajectory], Any] | None = None) -> dict[str, Any]:
    """Parse-build-train-save: the whole ``turnwise train`` run. Returns where the outputs are."""
    from transformers.trainer_utils import get_last_checkpoint
    from trl import get_peft_config

    from pipeline.envs import load_tasks
    from pipeline.models import DEFAULT_MODEL, adapter_base_model, load_model

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    start = time.time()
    base = adapter_base_model(task_args.adapter) if task_args.adapter else None
    model_name = model_args.model_name_or_path or base or DEFAULT_MODEL
    model, tokenizer = load_model(model_name)
    train_tasks = load_tasks(task_args.tasks, task_args.train_split)[: task_args.train_limit]
    all_val = load_tasks(task_args.tasks, task_args.val_split)
    val_tasks = all_val[: task_args.val_limit]
    rollout = EpisodeRollout(train_tasks, rollout_config, seed=grpo_args.seed)
    reward = TrajectoryReward(reward_fn or default_reward(task_args.reward_config, train_tasks), rollout)
    grpo_args.max_completion_length = max(grpo_args.max_completion_length or 0, rollout_config.max_total_tokens)
    peft_config = get_peft_config(model_args)
    if task_args.adapter:  # continue training an existing adapter (an SFT warm start): its LoRA config wins
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, task_args.adapter, is_trainable=True)
        peft_config = None
        logger.info("starting from the adapter %s (LoRA r=%d) on %s", task_args.adapter,
                    model.peft_config["default"].r, model_name)
    resumable = task_args.resume and Path(grpo_args.output_dir).is_dir()
    checkpoint = get_last_checkpoint(grpo_args.output_dir) if resumable else None
    foothold = None
    if task_args.foothold_tasks and checkpoint is None:
        foothold = check_foothold(model, tokenizer, all_val[: task_args.foothold_tasks], rollout_config.max_turns,
                                  rollout_config.max_new_tokens)
    trainer = TurnwiseGRPOTrainer(model=model, processing_class=tokenizer, args=grpo_args,
                                  train_dataset=task_dataset(train_tasks), peft_config=peft_config, rollout=rollout,
                                  reward=reward, rollout_config=rollout_config)
    best_dir = Path(grpo_args.output_dir) / "best_adapter" if task_args.keep_best_val else None
    best = None  # a resumed run competes with the best its earlier part kept; a fresh run replaces it
    if best_dir is not None and checkpoint is not None and (best_dir / BEST_FILE).is_file():
        best = json.loads((best_dir / BEST_FILE).read_text())
    validation = ValidationCallback(trainer, val_tasks, task_args.val_every, rollout_config.max_turns,
                                    rollout_config.max_new_tokens, best_dir=best_dir, best=best)
    trainer.add_callback(validation)
    trainer.add_callback(SampleWriter(trainer))
    if task_args.resume and checkpoint is None:
        logger.warning("--resume: no checkpoint in %s; starting from scratch.", grpo_args.output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
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
              "val": final, "steps": trainer.state.global_step, "foothold": foothold,
              "log_history": str(out / "log_history.json"), "wall_time_s": round(time.time() - start, 1)}
    if validation.best is not None:  # keep_best_val: the pipeline goes on with the best validation's adapter
        result.update(adapter=validation.best["adapter"], final_adapter=str(adapter_dir), best_val=validation.best)
    if trainer.args.should_save:
        atomic_write_text(out / RESULT_FILE, json.dumps(result, indent=2, default=str) + "\n")  # last: finished
    return result


FOOTHOLD_GUIDANCE = (
    "RL only amplifies what the policy already does some of the time: when no rollout succeeds, the success part "
    "of the reward is the same for every rollout of a task and GRPO has little to push on. Before spending the "
    "budget: warm-start with SFT on oracle demonstrations (`turnwise sft --output_dir outputs/sft`, then "
    "`turnwise train ... --adapter outputs/sft/adapter`); simplify the tasks (train on single-intent tasks "
    "first, e.g. a filtered tasks .jsonl, or fewer turns to get right); or raise the budget (max_turns, "
    "max_new_tokens, num_generations, temperature) so that some rollouts can succeed.")


def check_foothold(model, tokenizer, tasks: Sequence[Task], max_turns: int, max_new_tokens: int) -> dict[str, Any]:
    """The foothold check: the starting policy's greedy success on ``tasks`` (a val sample), with the training
    budgets. Warns, with guidance (:data:`FOOTHOLD_GUIDANCE`), when it is 0. Returns the numbers."""
    from pipeline.evaluation import evaluate

    was_training = model.training
    model.eval()
    with torch.no_grad():
        report = evaluate((model, tokenizer), tasks, max_turns=max_turns, max_new_tokens=max_new_tokens,
                          label="starting policy")
    model.train(was_training)
    m = report.metrics
    result = {"success": m["success"], "n_tasks": m["n_tasks"], "completion": m["completion"],
              "tool_calls_mean": m["tool_calls_mean"], "stop_reasons": m["stop_reasons"]}
    if m["success"] == 0:
        logger.warning("foothold check: the starting policy solved 0 of %d val tasks (greedy; completion %.2f, "
                       "%.1f tool calls per episode, stop reasons %s). %s", m["n_tasks"], m["completion"],
                       m["tool_calls_mean"], m["stop_reasons"], FOOTHOLD_GUIDANCE)
    else:
        logger.info("foothold check: the starting policy solves %.3f of %d val tasks (greedy).", m["success"],
                    m["n_tasks"])
    return result
