"""``turnwise score FILE.jsonl``: offline reward breakdowns of logged conversations (`rewards.logged`).

Options: :class:`ScoreArguments` and `pipeline.cli.options.TaskSetArguments`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cli.options import TaskSetArguments

HELP = "score logged conversations offline with a reward"
DESCRIPTION = ("Score chat-format conversations (one JSON object per line: messages, optional task_id, seed, outcome; "
               "in turnwise's format, OpenAI chat or Bedrock Converse) with a reward config. With a known task id the strict outcome comes from replaying the assistant "
               "messages in the task's sandbox. A rule-only reward needs no model.")
EPILOG = """example:
  turnwise score data/logged/sop_warranty_claims.jsonl --env sop:data/sop/warranty_claims --per-turn"""


@dataclass
class ScoreArguments:
    """Which reward scores the conversations, and what is printed and written."""

    reward: str | None = field(default=None, metadata={
        "help": "Reward config: a YAML path or a shipped name (default: the task set's domain's, e.g. sop for an SOP "
                "folder, else default)."})
    per_turn: bool = field(default=False, metadata={"help": "Also print per-turn rewards and reasons."})
    out: Path | None = field(default=None, metadata={"help": "Write the breakdowns and summary as JSON to this file."})
    format: str = field(default="auto", metadata={
        "help": "The file's conversation format: auto (detected from the file), turnwise, openai or bedrock."})

    def __post_init__(self) -> None:
        from pipeline.conversations import check_format

        check_format(self.format)


def register(subparsers) -> None:
    subparsers.add_parser("score", add_help=False, help=HELP).set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from pipeline.cli.options import writable_file
    from pipeline.cli.options import trusted
    from pipeline.config import parse_options
    from pipeline.trajectory import atomic_write_text
    from rewards.logged import load_conversations, score_conversations

    options, task_set, where = parse_options(
        (ScoreArguments, TaskSetArguments), args.options, prog="turnwise score", description=DESCRIPTION, epilog=EPILOG,
        positionals=[("file", {"type": Path, "metavar": "FILE.jsonl",
                               "help": "JSONL of conversations (or of trajectory records): turnwise's format, "
                                       "OpenAI chat or Bedrock Converse"})])
    if options.out is not None:
        writable_file(options.out, "--out")
    with trusted(task_set):
        reward, by_id = reward_and_tasks(options.reward, task_set.env)
        conversations = load_conversations(where.file, by_id, format=options.format)
        if not conversations:
            raise ValueError(f"{where.file} holds no conversations.")
        fmt = conversations[0].trajectory.metadata.get("format", "turnwise")
        report = score_conversations(reward, conversations, source=f"{where.file} (format {fmt})")
    print(report.to_text(per_turn=options.per_turn))
    for row in report.rows:
        for warning in row["warnings"]:
            print(f"warning: line {row['line']}: {warning}", file=sys.stderr)
    if options.out:
        atomic_write_text(options.out, json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"breakdowns: {options.out}")
    return 0


def reward_and_tasks(reward: str | None, env: str | None):
    """The reward (bound to the domain's tasks when they load) and the tasks by id.

    The domain's default reward applies unless one is named (an SOP folder's is configs/rewards/sop.yaml).
    """
    from pipeline.config import domain_reward
    from pipeline.envs import load_tasks
    from rewards import build_reward

    if reward is None:
        reward = domain_reward(env)
    tasks = load_tasks(env)  # a task set that does not load is an error, never "every outcome unknown"
    return build_reward(reward, tasks=tasks), {t.id: t for t in tasks}
