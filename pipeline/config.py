"""Typed configuration for ``turnwise train``.

A run is described by four dataclasses: :class:`TaskArguments` (which tasks, validation, reward),
:class:`~pipeline.training.RolloutConfig` (how episodes are played and credited), TRL's ``GRPOConfig``
(optimiser, loss type, ``num_iterations``, ``beta``, checkpoints, ``report_to``) and TRL's ``ModelConfig``
(model and LoRA). YAML recipes go through TRL's ``TrlParser``; command-line flags override the YAML.

A recipe never grants trust to an SOP folder's tools.py: ``trust_tools`` in a recipe, and a recipe ``env:``
block (which TRL's parser copies into the process environment) that sets ``TURNWISE_TRUST_TOOLS``, are
refused before anything else is read (:func:`refuse_recipe_trust`). Trust is the ``--trust-tools`` flag of
one command, for the folders that command's tasks name (:mod:`pipeline.envs.sop.trust`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

TRUST_ENV = "TURNWISE_TRUST_TOOLS"  # as pipeline.envs.sop.trust.TRUST_ENV (not imported: keeps this module light)


@dataclass
class TaskArguments:
    tasks: str | None = field(default=None, metadata={
        "help": "Task set: a domain (NAME, NAME/VARIANT, or NAME:ARGUMENT such as sop:PATH for an SOP task folder), "
                "a directory of <split>.jsonl files or a .jsonl file. Default: the default domain's shipped tasks."})
    env: str | None = field(default=None, metadata={
        "help": "Overrides tasks; the flag `turnwise eval`, audit and score use (--env sop:data/sop/warranty_claims)."})
    trust_tools: bool = field(default=False, metadata={
        "help": "Run the tools.py (Python code) of the SOP folder(s) the tasks name, as it is now, for this run; a "
                "command-line flag only (a recipe cannot set it). Accelerate workers inherit exactly this grant."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training tasks."})
    val_split: str = field(default="val", metadata={"help": "Held-out split for validation."})
    val_limit: int = field(default=16, metadata={"help": "Validation tasks per validation run."})
    val_every: int = field(default=0, metadata={"help": "Validate every N optimiser steps (0: only at the end)."})
    keep_best_val: bool = field(default=False, metadata={
        "help": "Keep the adapter of the validation with the best val success (ties: the earlier) in "
                "<output_dir>/best_adapter and make it the run's result adapter, which the pipeline then evaluates; "
                "the last step's stays in <output_dir>/adapter. Needs val_every."})
    reward_config: str | None = field(default=None, metadata={
        "help": "Reward config: a YAML path or a shipped name (see configs/rewards/); default: the task domain's "
                "default reward (sop for an SOP folder, else default)."})
    resume: bool = field(default=False, metadata={"help": "Resume from the last checkpoint in output_dir."})
    adapter: str | None = field(default=None, metadata={
        "help": "A LoRA adapter directory to start from (say, `turnwise sft`'s <output_dir>/adapter): its weights are "
                "trained further and its LoRA settings replace lora_r etc. model_name_or_path must be its base."})
    foothold_tasks: int = field(default=8, metadata={
        "help": "Before training, measure the starting policy's greedy success on this many val tasks and warn when "
                "it is 0 (RL cannot amplify what never happens). 0 disables the check."})

    def __post_init__(self) -> None:
        if self.foothold_tasks < 0:
            raise ValueError(f"foothold_tasks must be 0 (no check) or a task count, got {self.foothold_tasks}.")
        if self.adapter is not None and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise ValueError(f"adapter={self.adapter!r} is not a LoRA adapter directory (no adapter_config.json). "
                             "Pass the adapter/ directory `turnwise sft` or `turnwise train` wrote.")
        if self.val_limit < 1:
            raise ValueError(f"val_limit must be at least 1, got {self.val_limit}.")
        if self.val_every < 0:
            raise ValueError(f"val_every must be 0 (end only) or a positive step count, got {self.val_every}.")
        if self.keep_best_val and not self.val_every:
            raise ValueError("keep_best_val chooses among periodic validations: set val_every to a step count too.")
        if self.env is not None:  # a flag --env overrides a recipe's tasks
            self.tasks = self.env
        if self.reward_config is None:
            self.reward_config = domain_reward(self.tasks)
        if self.trust_tools:
            # The grant names the folders and their tools.py digests, so that worker processes (which inherit the
            # environment) trust exactly those, and nothing else this process or its children import.
            from pipeline.envs.registry import trust_environment

            os.environ.update(trust_environment(self.tasks))


def domain_reward(tasks: str | None) -> str | None:
    """The default reward config of the domain a task spec names (``None``: a task file, the package default)."""
    from pipeline.envs.registry import domain_of

    domain = domain_of(tasks)
    return domain.default_reward if domain is not None else None


def refuse_recipe_trust(recipe: Any, where: str) -> None:
    """Raise ``ValueError`` when a recipe tries to grant trust to tools.py (see the module docstring)."""
    if not isinstance(recipe, Mapping):
        return
    how = ("Trust is granted per command, for the folder the command names: add --trust-tools to the command line "
           "(`turnwise train --config RECIPE.yaml --trust-tools`), or, for processes you start yourself, export "
           f"{TRUST_ENV}=\"$(turnwise sop trust PATH)\". Read the folder's tools.py first: it runs with your "
           "permissions.")
    if "trust_tools" in recipe:
        raise ValueError(f"{where}: trust_tools is set in the recipe, and a recipe cannot switch on running a "
                         f"folder's tools.py (recipes are shared like data). Remove it. {how}")
    env = recipe.get("env")
    if isinstance(env, Mapping) and any(str(key).strip().upper() == TRUST_ENV for key in env):
        raise ValueError(f"{where}: its env: block sets {TRUST_ENV}, and a recipe cannot switch on running a folder's "
                         f"tools.py (recipes are shared like data). Remove it from env:. {how}")
    for value in recipe.values():  # a pipeline recipe's stage sections
        if isinstance(value, Mapping) and ("trust_tools" in value or "env" in value):
            refuse_recipe_trust(value, where)


def _recipe_in(argv: Sequence[str]) -> None:
    """Refuse trust in the ``--config`` recipe of ``argv`` before TRL's parser applies its ``env:`` block."""
    import yaml

    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        try:
            recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # TRL's parser reports an unreadable recipe itself
        refuse_recipe_trust(recipe, f"recipe {path}")


def parse_train_args(argv: Sequence[str] | None = None):
    """``(TaskArguments, RolloutConfig, GRPOConfig, ModelConfig)`` from ``--config FILE.yaml`` and flags."""
    import sys

    from trl import GRPOConfig, ModelConfig, TrlParser

    from pipeline.training import RolloutConfig

    _recipe_in(sys.argv[1:] if argv is None else argv)
    parser = TrlParser((TaskArguments, RolloutConfig, GRPOConfig, ModelConfig), prog="turnwise train")
    parser.set_defaults(bf16=hardware_bf16())  # a recipe or --bf16 still overrides it
    return parser.parse_args_and_config(list(argv) if argv is not None else None)


def hardware_bf16() -> bool:
    """Whether bf16 suits this machine: a CUDA GPU with bf16 support.

    TRL turns bf16 on by default. On a CPU without native bf16 that runs matmuls about 40x slower than
    float32, so turnwise's default follows the hardware instead.
    """
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def parse_recipe(types: tuple, argv: Sequence[str] | None = None, config: dict | None = None,
                 defaults: dict | None = None, prog: str | None = None):
    """Parse dataclasses ``types`` from ``defaults``, then a recipe, then flags (each overriding the one before).

    The recipe is the mapping ``config`` (say, one stage's section of a pipeline recipe) or a ``--config
    FILE.yaml`` in ``argv``. A key that no dataclass knows fails with the key named.
    """
    from trl import TrlParser

    refuse_recipe_trust(config, "the recipe")
    _recipe_in(argv or [])
    parser = TrlParser(types, prog=prog)
    for layer, where in ((defaults, "turnwise defaults"), (config, "the recipe")):
        if layer:
            unknown = parser.set_defaults_with_config(**layer)
            if unknown:
                raise ValueError(f"Unknown option(s) in {where}: {', '.join(unknown[::2])}. Check the spelling; "
                                 f"`{prog or 'turnwise'} --help` lists the options.")
    return parser.parse_args_and_config(list(argv) if argv is not None else [])
