"""Multi-turn GRPO on TRL's ``GRPOTrainer``: :class:`TurnwiseGRPOTrainer`.

TRL plays the episodes through :class:`~pipeline.training.adapters.EpisodeRollout` (its ``rollout_func``),
scores them with :class:`~pipeline.training.adapters.TrajectoryReward`, and computes the clipped
PPO-style loss (``grpo``/``dapo``/``dr_grpo``/``cispo``), ``num_iterations``, KL ``beta``, PEFT,
gradient checkpointing, checkpoints and resume. This subclass adds what multi-turn credit and a cheap loss
need, through two private hooks and ``compute_loss``, each pinned to its ``trl==1.16.0`` signature by a test
(:data:`TRL_HOOKS`):

- ``_generate_and_score_completions``, post-processed only: the registered advantage estimator
  (``RolloutConfig.advantage``, see :mod:`pipeline.training.advantages`) replaces TRL's episode-level
  advantages with per-turn ones written onto each turn's tokens (shape ``(B, T)``, which TRL 1.16's loss
  accepts), unless its registration keeps TRL's own; and the rollout metrics are recorded.
- ``_get_per_token_logps_and_entropies``: the loss's forward runs the prefix every row shares (the
  system prompt) once, and the LM head only at the positions the loss trains, in chunks
  (:func:`~pipeline.training.shared_prefix.shared_prefix_logps`, :mod:`~pipeline.training.lm_head`); same
  log-probs and gradients as TRL's at those positions. ``compute_loss`` tells it which positions those are
  (the assistant tokens: TRL's completion mask times its tool mask).

A stateful estimator (a critic) is saved into each checkpoint by a callback's ``on_save`` and restored
with :meth:`TurnwiseGRPOTrainer.load_estimator_state`; metrics reach TRL's logging through one method,
:meth:`TurnwiseGRPOTrainer._record_metrics`.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from trl import GRPOTrainer
from trl.distributed import DistributedBackend

from pipeline.rollout.backends.kv_cache import shared_prefix_length
from pipeline.envs.base import BUDGET_STOPS, STOP_MAX_TOKENS, STOP_MAX_TURNS
from pipeline.training.adapters import EpisodeRollout, TrajectoryReward, episode_total
from pipeline.training.advantages import AdvantageInput, broadcast_turns, build_estimator, get_estimator, has_state
from pipeline.training.callbacks import EstimatorCheckpoint, use_namespaced_tensorboard
from pipeline.training.checkpoints import CheckpointMarker
from pipeline.training.config import RolloutConfig, check_run_config
from pipeline.training.lm_head import has_plain_head
from pipeline.training.shared_prefix import MIN_SHARED_PREFIX, shared_prefix_logps
from pipeline.training.value_head import boundary_hidden_states
from pipeline.trajectory import Trajectory

logger = logging.getLogger(__name__)

#: The GRPOTrainer methods overridden here (every private one, and compute_loss), with the signatures
#: (trl==1.16.0) they were written for.
TRL_HOOKS = {
    "compute_loss": "(self, model, inputs, return_outputs=False, num_items_in_batch=None)",
    "_generate_and_score_completions": "(self, inputs: list[dict[str, torch.Tensor | typing.Any]]) -> "
                                       "dict[str, torch.Tensor | typing.Any]",
    "_get_per_token_logps_and_entropies": "(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, "
                                          "compute_entropy=False, compute_aux_loss=False, pixel_values=None, "
                                          "image_grid_thw=None, num_images=None, pixel_attention_mask=None, "
                                          "spatial_shapes=None, num_tiles=None, image_sizes=None, token_type_ids=None, "
                                          "mm_token_type_ids=None, image_position_ids=None) -> "
                                          "tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]",
}


class TurnwiseGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with multi-turn rollouts, registered advantage estimators and rollout metrics."""

    def __init__(self, *args, rollout: EpisodeRollout, reward: TrajectoryReward, rollout_config: RolloutConfig,
                 **kwargs) -> None:
        if kwargs.get("args") is not None:  # before TRL builds its vLLM engine or wraps the model
            check_run_config(rollout_config, kwargs["args"])
        super().__init__(*args, rollout_func=rollout, reward_funcs=[reward], **kwargs)
        topology = DistributedBackend(self.accelerator)  # the launch as accelerate set it up
        check_run_config(rollout_config, self.args, zero_stage=topology.zero_stage, fsdp_version=topology.fsdp_version)
        self.rollout, self.reward, self.rollout_config = rollout, reward, rollout_config
        self.estimator_registration = get_estimator(rollout_config.advantage)
        self.estimator = build_estimator(rollout_config.advantage)
        self.estimator_checkpoint: EstimatorCheckpoint | None = None
        if has_state(self.estimator):
            self.estimator_checkpoint = EstimatorCheckpoint(self.estimator, rollout_config.advantage)
            self.add_callback(self.estimator_checkpoint)
        use_namespaced_tensorboard(self)
        self.checkpoint_marker = CheckpointMarker(self)  # marks each checkpoint complete once all else is written
        self.add_callback(self.checkpoint_marker)

    def add_callback(self, callback) -> None:
        """transformers' ``add_callback``, keeping the checkpoint marker the last callback, so that a checkpoint is
        marked complete only after every other ``on_save`` has written into it."""
        super().add_callback(callback)
        marker = getattr(self, "checkpoint_marker", None)
        if marker is not None and callback is not marker:
            self.callback_handler.callbacks.remove(marker)
            self.callback_handler.callbacks.append(marker)

    def load_estimator_state(self, checkpoint: str | Path) -> bool:
        """Restore a stateful estimator (a critic) from ``checkpoint`` before ``train(resume_from_checkpoint=...)``;
        False when the estimator has no state or the checkpoint holds none for it."""
        if self.estimator_checkpoint is None:
            return False
        loaded = self.estimator_checkpoint.load(checkpoint)
        check_model = getattr(self.estimator, "check_model", None)
        if loaded and callable(check_model):  # a critic for another model fails now, not inside the first batch
            check_model(self.accelerator.unwrap_model(self.model),
                        source=str(Path(checkpoint) / self.estimator_checkpoint.filename))
        return loaded

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        trajectories = self.rollout.last
        mode = "train" if self.model.training else "eval"
        group_ids = [t.task_id for t in trajectories]
        metrics: list[tuple[str, float]] = []
        if not self.estimator_registration.trl_advantages:
            batch = self.advantage_input(trajectories, group_ids, log_metric=lambda name, value: metrics.append(
                (name, float(value))))
            advantages = broadcast_turns(self.estimator(batch), batch.turn_spans, output["completion_ids"].shape[1])
            output["advantages"] = advantages.to(output["advantages"].device)
        metrics += rollout_metrics(trajectories, self.reward.breakdowns, group_ids)
        self._record_metrics(mode, metrics)
        return output

    def advantage_input(self, trajectories: Sequence[Trajectory], group_ids: Sequence[str],
                        log_metric: Callable[[str, float], None] = lambda name, value: None) -> AdvantageInput:
        """The estimator's view of the latest rollout batch: rewards from the reward's breakdowns, turn spans
        relative to the completion, the run's settings, and the policy's hidden states on demand."""
        config = self.rollout_config
        starts = [t.tokens.turn_spans[0][0] for t in trajectories]
        spans = [[(s - start, e - start) for s, e in t.tokens.turn_spans] for t, start in zip(trajectories, starts)]
        model = self.accelerator.unwrap_model(self.model)
        pad_id = self.processing_class.pad_token_id or 0
        hidden_states = functools.cache(lambda: boundary_hidden_states(model, trajectories, pad_id))
        return AdvantageInput(
            turn_rewards=[self.reward.per_turn(i) for i in range(len(trajectories))],
            group_ids=list(group_ids), totals=[episode_total(b) for b in self.reward.breakdowns],
            successes=[t.outcome.success for t in trajectories], turn_spans=spans, gamma=config.gamma, lam=config.lam,
            passk=config.passk, scale_rewards=self.scale_rewards, value_lr=config.value_lr,
            value_epochs=config.value_epochs, hidden_states=hidden_states, log_metric=log_metric,
            all_reduce=self._sum_over_processes if self.accelerator.num_processes > 1 else None)

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every process (the same on each): what a critic's gradients are averaged with."""
        return self.accelerator.reduce(tensor, reduction="sum")

    def _record_metrics(self, mode: str, metrics: Iterable[tuple[str, float]]) -> None:
        """The one place turnwise writes TRL's per-mode metric buffer (``self._metrics``): each value joins
        TRL's own, and ``log()`` averages them over the logging step."""
        for name, value in metrics:
            self._metrics[mode][name].append(value)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss, with the positions it trains (completion and tool masks: the assistant tokens) made known
        to the log-prob forward below, which projects only those through the LM head."""
        mask = inputs["completion_mask"]
        self._scored_positions = mask * inputs["tool_mask"] if "tool_mask" in inputs else mask
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._scored_positions = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        """TRL's per-token log-probs and entropies, with the LM head run only at the positions the loss trains
        (every completion token outside ``compute_loss``), in chunks, and the prefix every row shares (the
        system prompt: ~1,700 of a customer-service episode's ~2,300 tokens) run once per chunk of rows
        instead of once per row. Same values and gradients at those positions; 0 elsewhere, where the loss
        masks them out. TRL's own forward runs for what this does not cover: several processes (its wrapper
        syncs the gradients), sharded parameters (DeepSpeed, FSDP), MoE aux losses, multimodal inputs, or an
        adapter on the LM head."""
        if (compute_aux_loss or any(v is not None for v in extra.values()) or self.accelerator.num_processes > 1
                or self.is_deepspeed_enabled or self.is_fsdp_enabled or not has_plain_head(model)):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss, **extra)
        scored = getattr(self, "_scored_positions", None)
        if scored is not None and scored.shape != (input_ids.size(0), logits_to_keep):
            scored = None
        share = self.rollout_config.share_prefix and not self.args.gradient_checkpointing
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start: start + batch_size], attention_mask[start: start + batch_size]
            prompt_width = ids.size(1) - logits_to_keep
            prefix = shared_prefix_length([row[m.bool()].tolist() for row, m in
                                           zip(ids[:, :prompt_width], mask[:, :prompt_width])]) if share else 0
            with self.accelerator.autocast():
                lp, ent = shared_prefix_logps(
                    model, ids, mask, logits_to_keep, prefix if prefix >= MIN_SHARED_PREFIX else 0, compute_entropy,
                    scored=None if scored is None else scored[start: start + batch_size], temperature=self.temperature)
            logps.append(lp)
            entropies.append(ent)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def sample_trajectories(self, limit: int = 16) -> list[str]:
        """JSON lines of the latest rollout batch, for the trajectory sample log: the first episode of each run of
        episodes of one task (TRL lays a group's episodes side by side), so every task the batch drew shows, up
        to ``limit`` of them."""
        last = self.rollout.last
        firsts = [t for i, t in enumerate(last) if i == 0 or last[i - 1].task_id != t.task_id]
        return [json.dumps(t.to_dict()) for t in firsts[:limit]]


def rollout_metrics(trajectories: Sequence[Trajectory], breakdowns: Sequence[Any],
                    group_ids: Sequence[str]) -> list[tuple[str, float]]:
    """The rollout batch's metrics, as ``(name, value)`` pairs in logging order.

    ``rollout/reward/mean``, ``rollout/reward/zero_frac``, ``rollout/reward/valid_mean`` (over completed
    episodes), ``analysis/zero_adv_groups`` (groups whose episodes all scored the same), ``rollout/turns/mean``,
    ``rollout/tokens/response_max``, ``rollout/truncated_frac``, ``rollout/max_turns_frac``,
    ``rollout/completion``, ``rollout/success``, and one ``rewards/<component>`` value per episode.
    """
    totals = [episode_total(b) for b in breakdowns]
    n = max(1, len(trajectories))
    completed = [t for t in trajectories if t.outcome.completed]
    groups: dict[str, list[float]] = {}
    for g, r in zip(group_ids, totals):
        groups.setdefault(g, []).append(r)
    metrics = [
        ("rollout/reward/mean", sum(totals) / n),
        ("rollout/reward/zero_frac", sum(t == 0.0 for t in totals) / n),
        ("rollout/reward/valid_mean",
         sum(r for r, t in zip(totals, trajectories) if t.outcome.completed) / max(1, len(completed))),
        ("analysis/zero_adv_groups", sum(max(v) - min(v) < 1e-8 for v in groups.values()) / max(1, len(groups))),
        ("rollout/turns/mean", sum(len(t.turns) for t in trajectories) / n),
        ("rollout/tokens/response_max", max(sum(t.tokens.assistant_mask) for t in trajectories)),
        ("rollout/truncated_frac",
         sum(t.outcome.stop_reason == STOP_MAX_TOKENS or any(x.truncated for x in t.turns) for t in trajectories) / n),
        ("rollout/max_turns_frac", sum(t.outcome.stop_reason == STOP_MAX_TURNS for t in trajectories) / n),
        ("rollout/completion", sum(t.outcome.stop_reason not in BUDGET_STOPS for t in trajectories) / n),
        ("rollout/success", sum(t.outcome.success for t in trajectories) / n),
    ]
    for b in breakdowns:
        for name, value in (getattr(b, "components", None) or {}).items():
            value = value if isinstance(value, (int, float)) else sum(value) if value else 0.0
            metrics.append((f"rewards/{name}", float(value)))
    return metrics
