"""The learning result: does SFT followed by GRPO beat SFT alone on held-out test tasks?

    turnwise demo --config configs/cpu_full.yaml      # hours on CPU; add --resume after a kill
    python benchmarks/learning.py                     # -> benchmarks/results/learning.json (+ learning_report/)
    python benchmarks/learning.py --run DIR --name NAME --against benchmarks/results/learning.json
                                                      # a re-run, with its stage times over the committed ones

Reads the pipeline run's ``summary.json`` (base, SFT-only and SFT+GRPO evaluated on the same tasks and
seeds, paired-bootstrap intervals over tasks) and writes the numbers, the SFT val curve, the GRPO run's
health signals, the wall time and the machine. The evaluation report (markdown, JSON, HTML) is copied
beside it; the per-episode transcripts stay in the run's ``report/trajectories.jsonl``. With ``--against``,
``stage_time_ratio`` holds each stage's time over that result's (below 1: faster now).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import RESULTS, ROOT, write_result

KEEP = ("base", "sft", "grpo", "oracle")


def learning_result(summary: dict) -> dict:
    """The learning.json fields from a pipeline summary; fails naming what the run did not produce."""
    missing = [key for key in ("base", "sft", "grpo", "delta_grpo_vs_sft") if key not in summary]
    if missing:
        raise SystemExit(f"summary {summary.get('paths', {}).get('summary', '')} lacks {', '.join(missing)}: the "
                         "recipe must run the sft and grpo stages and evaluate the base model (eval.base: true).")
    delta = summary["delta_grpo_vs_sft"]
    wall = summary.get("wall_time_total_s", summary["wall_time_s"])
    result = {key: summary[key] for key in KEEP if key in summary}
    result.update({
        "delta_grpo_vs_sft": {k: delta[k] for k in ("mean", "ci_low", "ci_high", "significant", "n_pairs")},
        "delta_sft_vs_base": {k: v for k, v in summary.get("delta_sft_vs_base", {}).items() if k != "statement"},
        "statement": delta["statement"],
        "meets_10_points": delta["mean"] >= 0.10 and delta["ci_low"] > 0,
        "n_tasks": summary["n_tasks"],
        "episodes_per_task": summary["eval"]["n"],
        "split": summary["eval"]["split"],
        "eval_tasks": summary["eval"].get("tasks") or summary.get("tasks"),
        "wall_time_s": wall,
        "stage_times_s": {**summary.get("reused_stage_times_s", {}), **summary["stage_times_s"]},
        "sft_val_curve": summary.get("sft_val_curve"),
        "grpo_signals": summary.get("grpo_signals"),
        "foothold": (summary.get("grpo_result") or {}).get("foothold"),
        "recipe": summary["recipe"],
        "model": summary["model"],
        "machine": summary["machine"],
    })
    return result


def stage_time_ratio(result: dict, before: dict, path: Path) -> dict:
    """Each stage's time in ``result`` over its time in ``before`` (another learning result), for the stages
    both ran."""
    now, then = result["stage_times_s"], before.get("stage_times_s", {})
    ratio = {stage: round(now[stage] / then[stage], 3) for stage in now if then.get(stage)}
    if not ratio:
        raise SystemExit(f"{path} has no stage_times_s in common with this run's ({', '.join(now)}).")
    return {"stage_time_ratio": ratio, "stage_times_before_s": {stage: then[stage] for stage in ratio},
            "wall_time_ratio": round(result["wall_time_s"] / before["wall_time_s"], 3),
            "against": str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "outputs" / "cpu_full",
                        help="output_dir of the pipeline run (holds summary.json and report/)")
    parser.add_argument("--name", default="learning", help="result name under benchmarks/results/")
    parser.add_argument("--against", type=Path, default=None,
                        help="an earlier learning result (JSON) to compare this run's stage times with")
    args = parser.parse_args()
    summary_path = args.run / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"{summary_path} does not exist: run `turnwise demo --config configs/cpu_full.yaml` first "
                         "(or pass --run with the recipe's output_dir).")
    result = learning_result(json.loads(summary_path.read_text()))
    report_dir = RESULTS / f"{args.name}_report"
    report_dir.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "report.json", "report.html"):
        if (args.run / "report" / name).is_file():
            shutil.copyfile(args.run / "report" / name, report_dir / name)
    result["report"] = str(report_dir.relative_to(ROOT))
    if args.against:
        result.update(stage_time_ratio(result, json.loads(args.against.read_text()), args.against))
    path = write_result(args.name, result)
    print(f"{path}: {result['statement']}")


if __name__ == "__main__":
    main()
