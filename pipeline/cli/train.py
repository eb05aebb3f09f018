"""``turnwise train [--config RECIPE.yaml] [--option value ...]``: multi-turn GRPO (flags override the recipe).

Options: turnwise's `pipeline.config.TaskArguments` and `pipeline.training.RolloutConfig`, TRL's
``GRPOConfig`` and ``ModelConfig`` (`pipeline.config.parse_train_args`, which the SageMaker entry point
reads too), and `pipeline.cli.options.ThreadArguments`.
"""

from __future__ import annotations

import argparse

HELP = "train a LoRA adapter with multi-turn GRPO"
DESCRIPTION = ("Multi-turn GRPO with TRL. Options are those of turnwise's TaskArguments and RolloutConfig, TRL's "
               "GRPOConfig and ModelConfig, and --threads; give them in a YAML recipe (--config) and/or as flags, "
               "which override the recipe.")
USAGE = "turnwise train [--config FILE.yaml] [--option value ...]"
EPILOG = """examples:
  turnwise train --config configs/grpo_cpu_quick.yaml
  turnwise train --config configs/grpo_cpu_quick.yaml --max-turns 4 --learning-rate 1e-5 --threads 2"""


def register(subparsers) -> None:
    subparsers.add_parser("train", add_help=False, help=HELP).set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.cli.options import ThreadArguments
    from pipeline.config import parse_train_args
    from pipeline.training import train

    task_args, rollout_config, grpo_args, model_args, threads = parse_train_args(
        args.options, extra=(ThreadArguments,), description=DESCRIPTION, epilog=EPILOG, usage=USAGE)
    threads.apply()
    result = train(task_args, rollout_config, grpo_args, model_args)
    print(f"trained {result['steps']} steps; val success {result['val']['val/success']:.3f}")
    if result.get("foothold"):
        f = result["foothold"]
        print(f"  foothold (before training): success {f['success']:.3f} on {f['n_tasks']} val tasks"
              f"{'  <- no foothold: see the warning above' if f['success'] == 0 else ''}")
    print(f"  adapter: {result['adapter']}")
    print(f"  logs and checkpoints: {result['output_dir']}")
    print(f"  trajectory samples: {result['samples']}")
    return 0
