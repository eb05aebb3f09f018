"""Typed configuration for ``turnwise train``.

A run is described by four dataclasses: :class:`TaskArguments` (which tasks, validation, reward),
:class:`~pipeline.trainer.RolloutConfig` (how episodes are played and credited), TRL's ``GRPOConfig``
(optimiser, loss type, ``num_iterations``, ``beta``, checkpoints, ``report_to``) and TRL's ``ModelConfig``
(model and LoRA). YAML recipes go through TRL's ``TrlParser``; command-line flags override the YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class TaskArguments:
    tasks: str = field(default="customer_service", metadata={"help": "Task set: a domain name, directory or .jsonl."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training tasks."})
    val_split: str = field(default="val", metadata={"help": "Held-out split for validation."})
    val_limit: int = field(default=16, metadata={"help": "Validation tasks per validation run."})
    val_every: int = field(default=0, metadata={"help": "Validate every N optimiser steps (0: only at the end)."})
    reward_config: str | None = field(default=None, metadata={
        "help": "Reward YAML (see configs/rewards/); default: the package's default reward."})
    resume: bool = field(default=False, metadata={"help": "Resume from the last checkpoint in output_dir."})

    def __post_init__(self) -> None:
        if self.val_limit < 1:
            raise ValueError(f"val_limit must be at least 1, got {self.val_limit}.")
        if self.val_every < 0:
            raise ValueError(f"val_every must be 0 (end only) or a positive step count, got {self.val_every}.")


def parse_train_args(argv: Sequence[str] | None = None):
    """``(TaskArguments, RolloutConfig, GRPOConfig, ModelConfig)`` from ``--config FILE.yaml`` and flags."""
    from trl import GRPOConfig, ModelConfig, TrlParser

    from pipeline.trainer import RolloutConfig

    parser = TrlParser((TaskArguments, RolloutConfig, GRPOConfig, ModelConfig), prog="turnwise train")
    return parser.parse_args_and_config(list(argv) if argv is not None else None)
