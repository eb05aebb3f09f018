"""``turnwise sft [--config FILE.yaml] [--option value ...]``: the SFT warm start (`pipeline.sft`).

Options: `pipeline.sft.SFTArguments`, TRL's ``SFTConfig`` and ``ModelConfig`` over turnwise's defaults
(`pipeline.sft.parse_sft_args`), and `pipeline.cli.options.ThreadArguments`.
"""

from __future__ import annotations

import argparse

HELP = "warm-start a LoRA adapter by SFT on oracle demonstrations or your own transcripts"
DESCRIPTION = ("Generate oracle demonstrations from the train split (or read your own transcripts with --demos FILE, "
               "in turnwise's format, OpenAI chat or Bedrock Converse; --drop-violations leaves out those that break "
               "the SOP), fine-tune a LoRA adapter on their assistant tokens "
               "with TRL's SFTTrainer, evaluate val success after every epoch and stop when it stops improving. Writes "
               "OUTPUT_DIR/adapter (start `turnwise train --adapter` from it), val_curve.json, log_history.json and "
               "demonstrations.jsonl. Options are those of pipeline.sft.SFTArguments, TRL's SFTConfig and "
               "ModelConfig, and --threads.")
USAGE = "turnwise sft [--config FILE.yaml] [--option value ...]"
EPILOG = """examples:
  turnwise sft --num_demos 64 --num_train_epochs 4 --output_dir outputs/sft
  turnwise sft --demos logs/agents.jsonl --drop-violations --output_dir outputs/sft"""


def register(subparsers) -> None:
    subparsers.add_parser("sft", add_help=False, help=HELP).set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.cli.options import ThreadArguments
    from pipeline.sft import parse_sft_args, run_sft

    sft_args, sft_config, model_args, threads = parse_sft_args(
        args.options, extra=(ThreadArguments,), description=DESCRIPTION, epilog=EPILOG, usage=USAGE)
    threads.apply()
    result = run_sft(sft_args, sft_config, model_args)
    best = result["best_val_success"]
    source = result.get("demos_source", "oracle")
    what = "oracle demonstrations" if source == "oracle" else f"transcripts from {source}"
    print(f"SFT on {result['demos']} {what} ({result['assistant_tokens']} assistant tokens trained of "
          f"{result['tokens']}; {result.get('tool_calling', 'text')} tool calling), epochs evaluated {result['epochs']}, "
          f"{result['wall_time_s']:.0f} s")
    screening = result.get("screening")
    if screening is not None:
        print(f"  read {screening['transcripts']} transcripts ({screening['format']} format): {screening['kept']} kept, "
              f"{screening['unchecked']} not checked (task unknown)")
        violating = screening["violating"]
        if violating:
            dropped = not violating[0]["kept"]
            print(f"  {len(violating)} broke the SOP "
                  f"({'left out' if dropped else 'kept; --drop-violations leaves them out'}):")
        for row in violating:
            print(f"    line {row['line']:>3}  {row['task_id'] or '-':<12} {', '.join(row['violations'])}")
    if best is not None:
        print(f"  best val success {best:.3f} at epoch {result['best_epoch']}"
              f"{' (stopped early)' if result['stopped_early'] else ''}")
    print(f"  adapter: {result['adapter']}")
    print(f"  val curve: {result['val_curve']}")
    print(f"  logs: {result['log_history']}")
    return 0
