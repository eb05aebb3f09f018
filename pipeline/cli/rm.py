"""``turnwise rm train``: train the learned reward model on preference pairs (`rewards.model`).

Options: `rewards.model.RMTrainConfig` and :class:`MetricsArguments`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

TRAIN = ("Train a Bradley-Terry reward model on {chosen, rejected} conversation pairs (data/preferences/, built by "
         "data/preferences/prepare.py), then report its pairwise accuracy on the held-out pairs. Saves "
         "OUTPUT_DIR/final (use it as params.model of the reward_model scorer) and OUTPUT_DIR/metrics.json.")
EPILOG = """example:
  turnwise rm train --limit 96 --eval-limit 60 --output-dir runs/rm"""


@dataclass
class MetricsArguments:
    out: Path | None = field(default=None, metadata={"help": "Also write the metrics JSON to this file."})


def register(subparsers) -> None:
    parser = subparsers.add_parser("rm", help="train the learned reward model",
                                   description="The learned reward model: a sequence classifier scored by "
                                   "rewards.model.RewardModelScorer.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("train", add_help=False, help="train a reward model with TRL's RewardTrainer on preference "
                       "pairs (CPU)").set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from pipeline.cli.options import writable_dir, writable_file
    from pipeline.config import parse_options
    from pipeline.trajectory import atomic_write_text
    from rewards.model import RMTrainConfig, train_reward_model

    config, metrics_out = parse_options((RMTrainConfig, MetricsArguments), args.options, prog="turnwise rm train",
                                        description=TRAIN, epilog=EPILOG)
    writable_dir(config.output_dir, "--output-dir")
    if metrics_out.out is not None:
        writable_file(metrics_out.out, "--out")
    metrics = train_reward_model(config)
    held_out, before = metrics["held_out"], metrics["held_out_before"]
    print(f"trained on {metrics['train_pairs']} pairs, {metrics['steps']} steps, {metrics['wall_time_s']:.0f} s "
          f"(train loss {metrics['train_loss']:.3f})")
    if held_out:
        untrained = f" (untrained: {before['accuracy']:.3f})" if before else ""
        print(f"held-out pairwise accuracy: {held_out['accuracy']:.3f} on {held_out['pairs']} pairs{untrained}; "
              f"mean margin {held_out['mean_margin']:.3f}")
        for kind, accuracy in held_out["by_corruption"].items():
            print(f"  {kind:>22}: {accuracy:.3f}")
    print(f"model: {metrics['model_dir']}")
    if metrics_out.out:
        atomic_write_text(metrics_out.out, json.dumps(metrics, indent=2) + "\n")
        print(f"metrics: {metrics_out.out}")
    return 0
