"""``turnwise audit``: the reward's pre-training checklist on baseline rollouts (`rewards.audit`).

Options: :class:`AuditArguments` (rollouts, with the shared episode budgets), `rewards.audit.AuditConfig`
(the checks' thresholds), `pipeline.cli.options.TaskSetArguments` and `pipeline.cli.options.EpisodeArguments`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pipeline.budgets import EpisodeBudget, check_count
from pipeline.cli.options import EpisodeArguments, TaskSetArguments

HELP = "check a reward on baseline rollouts before training on it"
DESCRIPTION = ("Run the reward audit: range, scorer errors, per-task variance, high-reward strict failures, format "
               "leniency, per-component statistics (and, with --hacks, the scripted hacking policies). Writes audit.md "
               "and audit.json; exits 1 when a check fails.")
EPILOG = """examples:
  turnwise audit --policy noisy_oracle --split test --limit 30 --k 4 --hacks
  turnwise audit --model smollm2-135m --limit 10 --k 4 --max-turns 8 --out runs/audit_base"""


@dataclass
class AuditArguments(EpisodeBudget):
    """Which rollouts the reward is audited on (one of --policy, --model, --logged; default: noisy_oracle)."""

    one_of: ClassVar[tuple[str, ...]] = ("policy", "model", "logged")

    reward: str | None = field(default=None, metadata={
        "help": "Reward config: a YAML path or a shipped name (default: the task set's domain's, e.g. sop for an SOP "
                "folder, else default)."})
    policy: str | None = field(default=None, metadata={
        "help": "Scripted policy: oracle, noisy_oracle or a hack name (default: noisy_oracle)."})
    model: str | None = field(default=None, metadata={
        "help": "Model alias, local directory or hub id (sampled rollouts)."})
    logged: Path | None = field(default=None, metadata={
        "help": "JSONL of trajectories or chat conversations (turnwise's format, OpenAI chat or Bedrock Converse)."})
    format: str = field(default="auto", metadata={
        "help": "With --logged: the file's conversation format: auto (detected), turnwise, openai or bedrock."})
    split: str = field(default="test", metadata={"help": "Split to roll out on: train, val or test."})
    limit: int = field(default=30, metadata={"help": "Roll out on the first N tasks."})
    k: int = field(default=4, metadata={"help": "Rollouts per task (seeds seed..seed+k-1)."})
    seed: int = field(default=0, metadata={"help": "First environment seed (and the model's sampling seed)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for --model (0: greedy)."})
    out: Path = field(default=Path("runs/audit"), metadata={"help": "Directory for audit.md and audit.json."})

    def __post_init__(self) -> None:
        from pipeline.conversations import check_format

        super().__post_init__()
        check_count(self.limit, "--limit")
        check_count(self.k, "--k")
        check_format(self.format)
        if self.temperature < 0:
            raise ValueError(f"--temperature must be at least 0 (0 samples greedily), got {self.temperature}.")


def register(subparsers) -> None:
    subparsers.add_parser("audit", add_help=False, help=HELP).set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.cli.options import writable_dir
    from pipeline.cli.options import trusted
    from pipeline.config import parse_options
    from rewards.audit import AuditConfig

    options, config, task_set, episodes = parse_options(
        (AuditArguments, AuditConfig, TaskSetArguments, EpisodeArguments), args.options, prog="turnwise audit",
        description=DESCRIPTION, epilog=EPILOG,
        aliases={"--tasks": "split", "--max-zero-variance": "max_zero_variance_frac",
                 "--max_zero_variance": "max_zero_variance_frac", "--probe-tasks": "leniency_tasks",
                 "--probe_tasks": "leniency_tasks"})
    writable_dir(options.out, "--out")
    with trusted(task_set):
        return run_audit(options, config, task_set, episodes)


def run_audit(options: AuditArguments, config, task_set: TaskSetArguments, episodes: EpisodeArguments) -> int:
    from pipeline.cli.score import reward_and_tasks
    from pipeline.envs import load_tasks
    from rewards.audit import audit, model_rollouts, scripted_rollouts
    from rewards.logged import load_conversations

    reward, by_id = reward_and_tasks(options.reward, task_set.env)
    split = load_tasks(task_set.env, options.split)
    if options.logged is not None:
        trajectories = [c.trajectory for c in load_conversations(options.logged, by_id, format=options.format)]
        source = str(options.logged)
    elif options.model is not None:
        trajectories = model_rollouts(options.model, split[: options.limit], k=options.k, seed=options.seed,
                                      temperature=options.temperature, max_turns=options.max_turns,
                                      max_new_tokens=options.max_new_tokens, max_total_tokens=options.max_total_tokens,
                                      customer=episodes.customer, tool_calling=episodes.tool_calling)
        source = (f"{options.model} (T={options.temperature}), {min(options.limit, len(split))} {options.split} tasks "
                  f"x {options.k}")
    else:
        policy = options.policy or "noisy_oracle"
        trajectories = scripted_rollouts(policy, split[: options.limit], k=options.k, seed=options.seed,
                                         max_turns=options.max_turns, customer=episodes.customer)
        source = f"{policy}, {min(options.limit, len(split))} {options.split} tasks x {options.k} seeds"
    report = audit(reward, trajectories, split, config, source=source)
    paths = report.save(options.out)
    print(report.to_text())
    print(f"report: {paths['markdown']}  json: {paths['json']}")
    return 0 if report.passed else 1
