"""``turnwise demo [--config RECIPE.yaml]``: the whole pipeline from one recipe, implemented in `pipeline.demo`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cli.options import ThreadArguments

HELP = "run the whole pipeline: prepare the model, SFT, GRPO, evaluate (default: the ~14-minute CPU demo)"
DESCRIPTION = ("Prepare the model, warm-start it by SFT on oracle demonstrations, train it with multi-turn GRPO, then "
               "evaluate base, SFT-only and SFT+GRPO on the same held-out tasks and seeds (paired-bootstrap intervals) "
               "and write the report. Stages and budgets come from a pipeline recipe (pipeline.demo).")
EPILOG = """examples:
  turnwise demo                                  # configs/demo.yaml: one intent, ~14 min on 2 CPU cores
  turnwise demo --config configs/cpu_full.yaml    # GRPO against SFT on one intent (~1 hour on CPU)
  turnwise demo --config configs/cpu_full.yaml --resume   # after a kill: skip the finished stages"""


@dataclass
class DemoArguments:
    """The pipeline recipe, and the shared keys a flag may override."""

    recipe: Path | None = field(default=None, metadata={
        "help": "Pipeline recipe (default: configs/demo.yaml).", "aliases": ["--config"]})
    model: str | None = field(default=None, metadata={
        "help": "Override the recipe's model: alias, local directory or hub id."})
    seed: int | None = field(default=None, metadata={
        "help": "Override the recipe's seed (tasks, sampling, training)."})
    output_dir: Path | None = field(default=None, metadata={"help": "Override the recipe's output_dir."})
    customer: str | None = field(default=None, metadata={
        "help": "Override the recipe's customer: scripted or llm:BACKEND (llm:hf:MODEL, llm:bedrock:MODEL_ID, "
                "llm:openai:MODEL@URL), for every stage."})
    resume: bool = field(default=False, metadata={
        "help": "Reuse the stages a killed run finished (sft/sft_result.json, grpo/grpo_result.json) and continue SFT "
                "or GRPO from its last checkpoint; the evaluation always runs again."})


def register(subparsers) -> None:
    subparsers.add_parser("demo", add_help=False, help=HELP).set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pipeline import demo
    from pipeline.cli.options import writable_dir
    from pipeline.config import parse_options

    options, threads = parse_options((DemoArguments, ThreadArguments), args.options, prog="turnwise demo",
                                     description=DESCRIPTION, epilog=EPILOG, recipe_flag=False)
    threads.apply()
    recipe = options.recipe or demo.DEMO_RECIPE
    if options.output_dir is not None:
        writable_dir(options.output_dir, "--output-dir")
    summary = demo.run(recipe, output_dir=options.output_dir, model=options.model, seed=options.seed,
                       resume=options.resume, customer=options.customer)
    print()
    print(f"turnwise demo finished in {summary['wall_time_s']:.0f} s ({recipe}; stages "
          + ", ".join(f"{k} {v:.0f} s" for k, v in summary["stage_times_s"].items()) + ")")
    if summary.get("description"):
        print(summary["description"])
    tasks = summary.get("eval_tasks") or "the default domain"
    print(f"held-out success on {summary['n_tasks']} {summary['eval']['split']} tasks of {tasks} (same tasks and "
          f"seeds):")
    for key in ("base", "sft", "grpo", "oracle"):
        if key in summary:
            m = summary[key]
            print(f"  {m['label']:>24}: success {m['success']:.3f}  completion {m['completion']:.3f}  "
                  f"turns {m['turns_mean']:.1f}  tool calls {m['tool_calls_mean']:.1f}")
    for name in ("grpo_vs_sft", "sft_vs_base", "grpo_vs_base"):
        if f"delta_{name}" in summary:
            print(f"  {summary[f'delta_{name}']['statement']}")
    paths = summary["paths"]
    print(f"report: {summary['report']['html'] or summary['report']['markdown']}")
    if summary["report"].get("training_curves"):
        print(f"  training curves (PNG): {summary['report']['training_curves']}")
    for key, label in (("grpo_adapter", "adapter (SFT+GRPO)"), ("sft_adapter", "adapter (SFT only)")):
        if key in paths:
            print(f"{label}: {paths[key]}")
    print(f"logs: {paths['log']}")
    for key, label in (("sft_val_curve", "SFT val curve"), ("sft_logs", "SFT log history"),
                       ("grpo_logs", "GRPO log history"), ("grpo_samples", "GRPO trajectory samples")):
        if key in paths:
            print(f"  {label}: {paths[key]}")
    print(f"summary: {paths['summary']}")
    return 0
