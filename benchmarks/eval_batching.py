"""Evaluation wall time on the test split: continuous batching against static chunks, in one run.

    python benchmarks/eval_batching.py              # 100 test tasks, batch 16; the first 20 one at a time
    python benchmarks/eval_batching.py --quick      # 24 test tasks, batch 8, 48 new tokens; no one-at-a-time pass

Every pass runs ``pipeline.evaluation.evaluate`` in one process on the same loaded model, greedy, with the
default evaluation budgets (20 turns, 128 new tokens a turn) unless told otherwise:

- continuous: ``schedule="continuous"``, ``--batch-size`` episodes live; when one ends, the next waiting
  episode takes its slot at the next turn;
- static: ``schedule="static"``, chunks of ``--batch-size`` episodes, each chunk until its longest
  episode ends (evaluation's scheduling before continuous batching);
- sequential (``--sequential`` > 0): the first ``--sequential`` tasks one at a time (batch size 1).

The two schedules play the same episodes; ``agreement`` is the fraction of episodes whose transcripts
(messages and token ids) are identical between them.

Keys of the last output line (JSON): ``continuous_over_static`` (static wall time / continuous wall time,
same tasks), ``wall_time_s`` (the continuous pass), ``agreement``, and with a sequential pass ``speedup``
and ``speedup_episodes`` (continuous assistant tokens/s and episodes/s over the sequential pass's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import add_threads_option, machine, set_threads, write_result


def timed(policy, tasks, batch_size: int, schedule: str, args) -> tuple[float, dict]:
    from pipeline.evaluation import evaluate

    start = time.perf_counter()
    report = evaluate(policy, tasks, seed=0, max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                      batch_size=batch_size, progress=True, schedule=schedule)
    return time.perf_counter() - start, report


def rates(seconds: float, report) -> dict:
    tokens = sum(e["assistant_tokens"] or 0 for e in report.episodes)
    return {"episodes": len(report.episodes), "wall_time_s": round(seconds, 1), "assistant_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2), "episodes_per_s": round(len(report.episodes) / seconds, 4),
            "success": report.metrics["success"], "turns_mean": report.metrics["turns_mean"],
            "turns_max": max(e["turns"] for e in report.episodes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", type=int, default=100, help="test tasks in the continuous and static passes")
    parser.add_argument("--sequential", type=int, default=20, help="of those, how many to run one at a time (0: none)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-turns", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    add_threads_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.batch_size, args.max_new_tokens, args.sequential = 24, 8, 48, 0

    set_threads(args.threads)
    from pipeline.envs import load_tasks
    from pipeline.models import load_model

    tasks = load_tasks("customer_service", "test")[: args.tasks]
    policy = load_model(args.model)
    from pipeline.evaluation import evaluate

    evaluate(policy, tasks[:1], max_turns=1, max_new_tokens=2, progress=False)  # warm-up, untimed
    continuous_s, continuous = timed(policy, tasks, args.batch_size, "continuous", args)
    static_s, static = timed(policy, tasks, args.batch_size, "static", args)
    c, s = rates(continuous_s, continuous), rates(static_s, static)
    same = [a.messages == b.messages and a.tokens.input_ids == b.tokens.input_ids
            for a, b in zip(continuous.trajectories, static.trajectories)]
    result = {
        "continuous_over_static": round(static_s / continuous_s, 3),
        "wall_time_s": c["wall_time_s"],
        "agreement": round(sum(same) / len(same), 3),
        "continuous": {**c, "batch_size": args.batch_size}, "static": {**s, "batch_size": args.batch_size},
    }
    if args.sequential:
        sequential_s, sequential = timed(policy, tasks[: args.sequential], 1, "static", args)
        q = rates(sequential_s, sequential)
        result.update({"speedup": round(c["tokens_per_s"] / q["tokens_per_s"], 2),
                       "speedup_episodes": round(c["episodes_per_s"] / q["episodes_per_s"], 2),
                       "sequential": {**q, "batch_size": 1}})
    result.update({
        "metrics": {key: continuous.metrics[key] for key in ("success", "completion", "max_turns_rate",
                                                              "max_tokens_rate", "tokens_mean", "tool_calls_mean")},
        "model": args.model, "split": "test", "seed": 0, "decoding": "greedy", "max_turns": args.max_turns,
        "max_new_tokens": args.max_new_tokens, "quick": args.quick, "machine": machine(),
        "command": " ".join(["python benchmarks/eval_batching.py", *sys.argv[1:]]),
    })
    write_result("eval_batching_quick" if args.quick else "eval_batching", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
