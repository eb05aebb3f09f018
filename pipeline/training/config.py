"""How episodes are played and credited during training: :class:`RolloutConfig`.

TRL's ``GRPOConfig`` holds the optimiser, the loss type, ``num_generations``, ``beta`` and checkpointing;
this dataclass holds what multi-turn training adds to it: the turn and token budgets of an episode (from
:class:`pipeline.budgets.EpisodeBudget`, whose defaults every command shares), and the advantage estimator
with its settings. YAML recipes and flags reach it through :func:`pipeline.config.parse_train_args`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.budgets import EpisodeBudget
from pipeline.rollout.backends import backend_names, check_backend_name
from pipeline.training.advantages import ESTIMATORS, get_estimator


@dataclass
class RolloutConfig(EpisodeBudget):
    """How episodes are played and credited during training (TRL's ``GRPOConfig`` holds the rest)."""

    advantage: str = field(default="group_based", metadata={
        "help": f"Advantage estimator, a registered name: {', '.join(ESTIMATORS)}."})
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
    tool_calling: str = field(default="auto", metadata={
        "help": "How the model calls tools: auto (in its chat template's own format when the template supports tools, "
                "else turnwise's <tool_call> text), native (fail without template support) or text."})
    customer: str | None = field(default=None, metadata={
        "help": "The simulated customer of training and validation episodes: scripted (the domain's default) or "
                "llm:BACKEND, the domain's LLM customer on hf:MODEL, bedrock:MODEL_ID or openai:MODEL@URL."})
    backend: str = field(default="hf", metadata={
        "help": f"Generation backend for rollouts, by name: {', '.join(backend_names())} (pipeline.rollout.backends). "
                "hf generates with the model being trained (CPU or GPU); vllm with TRL's vLLM engine, kept in step "
                "with the trainer's weights (a GPU and the vllm package; set use_vllm: true and vllm_mode too)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        from pipeline.envs.registry import check_customer_spec
        from pipeline.native_tools import check_tool_calling

        check_backend_name(self.backend, "RolloutConfig.backend")
        check_tool_calling(self.tool_calling, "RolloutConfig.tool_calling")
        try:
            check_customer_spec(self.customer)
        except ValueError as exc:
            raise ValueError(f"RolloutConfig.customer: {exc}") from None
        try:
            get_estimator(self.advantage)
        except ValueError as exc:
            raise ValueError(f"RolloutConfig.{exc}") from None
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"RolloutConfig.gamma must be in [0, 1], got {self.gamma}.")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"RolloutConfig.lam must be in [0, 1], got {self.lam}.")
        if self.value_lr <= 0 or self.value_epochs < 1:
            raise ValueError(f"RolloutConfig.value_lr must be > 0 and value_epochs >= 1, got {self.value_lr} and "
                             f"{self.value_epochs}.")


def check_run_config(rollout_config: RolloutConfig, grpo_args, zero_stage: int | None = None,
                     fsdp_version: int | None = None) -> None:
    """What :class:`RolloutConfig` cannot check alone, before the model loads: its agreement with TRL's
    ``GRPOConfig`` on vLLM, with the vllm package and a GPU present (:func:`~pipeline.training.vllm.check_vllm_config`),
    and what a run across processes needs (:func:`~pipeline.training.sharding.check_parallel_config`). Not at
    parse time: a recipe that trains with vLLM on a GPU still parses on the laptop that submits it."""
    from pipeline.training.sharding import check_parallel_config
    from pipeline.training.vllm import check_vllm_config

    check_vllm_config(grpo_args, rollout_config)
    check_parallel_config(grpo_args, rollout_config, zero_stage=zero_stage, fsdp_version=fsdp_version)
