"""Re-judge a pipeline run's evaluation under the current environment, without running any model.

    python benchmarks/rejudge.py                         # outputs/cpu_full -> benchmarks/results/learning_rejudged.json

Every logged episode (``<run>/report/trajectories/*.jsonl``: trajectory records, or conversations in any
format ``turnwise score`` reads) is replayed: its assistant messages go, in
order, to a fresh environment on the same task and seed (:func:`rewards.logged.replay`). The simulated
customer and the tools answer as they did, which is checked (a replayed transcript that differs from
the logged one is an error), so only the verdict can change: use it after the success check changes,
to see what the same episodes score under the new one. The paired comparisons are recomputed as the
pipeline computes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, write_result

POLICIES = {"grpo": "SFT_GRPO", "sft": "SFT_only", "base": None, "oracle": "oracle"}


def rejudge(path: Path, tasks: dict, max_turns: int, format: str | None = None) -> tuple[list, int]:
    """The episodes of ``path`` replayed under the current environment, and how many changed verdict.

    ``path`` holds trajectory records or logged conversations in any format turnwise reads
    (:mod:`pipeline.conversations`; ``format`` forces one); a conversation logged without an outcome counts
    as changed when the replay succeeds.
    """
    from rewards.logged import load_conversations, replay

    out, changed = [], 0
    for conversation in load_conversations(path, format=format):
        logged = conversation.trajectory
        texts = [m["content"] for m in logged.messages if m["role"] == "assistant"]
        again = replay(tasks[logged.task_id], texts, seed=logged.seed, max_turns=max_turns)
        if again.messages != logged.messages:
            raise SystemExit(f"{path}: task {logged.task_id} seed {logged.seed} replays to a different transcript; "
                             "the environment changed in more than its verdict, so re-judging cannot be trusted.")
        out.append(again)
        changed += again.outcome.success != logged.outcome.success
    return out, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "outputs" / "cpu_full", help="the pipeline run's output_dir")
    parser.add_argument("--name", default="learning_rejudged", help="result name under benchmarks/results/")
    parser.add_argument("--format", choices=("auto", "turnwise", "openai", "bedrock"), default="auto",
                        help="the trajectory files' conversation format (default: detected per file)")
    args = parser.parse_args()

    from pipeline.envs import load_tasks
    from pipeline.evaluation import compare, evaluate_trajectories

    summary = json.loads((args.run / "summary.json").read_text())
    e = summary["eval"]
    eval_tasks = e.get("tasks") or summary["tasks"]
    tasks = {t.id: t for t in load_tasks(eval_tasks, e["split"])}
    files = {p.stem: p for p in (args.run / "report" / "trajectories").glob("*.jsonl")}
    reports, changed = {}, {}
    for key, stem in POLICIES.items():
        stem = stem or next((s for s in files if s.startswith("base")), None)
        if stem not in files:
            continue
        episodes, changed[key] = rejudge(files[stem], tasks, e["max_turns"], args.format)
        reports[key] = evaluate_trajectories(episodes, list(tasks.values()), label=summary[key]["label"])
    result = {key: {"success": r.metrics["success"], "success_as_logged": summary[key]["success"],
                    "episodes_changed": changed[key], "label": r.label} for key, r in reports.items()}
    for cand, base in (("grpo", "sft"), ("sft", "base")):
        c = compare(reports[cand], reports[base], n_boot=e["bootstrap"], seed=summary["seed"])
        result[f"delta_{cand}_vs_{base}"] = {"mean": c.difference, "ci_low": c.ci_low, "ci_high": c.ci_high,
                                             "significant": c.significant, "n_pairs": c.n_pairs,
                                             "statement": c.statement()}
    result.update(n_tasks=len(tasks), episodes_per_task=e["n"], eval_tasks=eval_tasks,
                  run=str(args.run), machine=summary["machine"])
    path = write_result(args.name, result)
    for key in reports:
        print(f"{result[key]['label']}: success {result[key]['success_as_logged']:.3f} as logged -> "
              f"{result[key]['success']:.3f} re-judged ({result[key]['episodes_changed']} episodes changed)")
    print(f"{path}: {result['delta_grpo_vs_sft']['statement']}")


if __name__ == "__main__":
    main()
