"""Evaluation wall time on the test split, batched against one episode at a time.

    python benchmarks/eval_batching.py              # 100 test tasks batched, the first 20 one at a time
    python benchmarks/eval_batching.py --quick      # 16 batched, 4 one at a time

Both passes run ``pipeline.evaluation.evaluate`` in one process on the same loaded model, greedy, with
the default evaluation budgets (20 turns, 128 new tokens a turn). The batched pass generates
``--batch-size`` episodes together through the rollout engine; the sequential pass sets the batch size
to 1, so each episode runs alone with its own KV cache. The sequential pass covers only the first
``--sequential`` tasks, because it is the slow one, so the speed-up compares rates: generated assistant
tokens per second (``speedup``) and episodes per second (``speedup_episodes``). Greedy decoding makes
both passes play the same episodes on the tasks they share; ``agreement`` is the fraction of those
episodes whose success and turn count match.

Keys of the last output line (JSON): ``wall_time_s`` (the batched pass), ``speedup``,
``speedup_episodes`` and ``agreement``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import add_threads_option, machine, set_threads, write_result


def timed(policy, tasks, batch_size: int, args) -> tuple[float, dict]:
    from pipeline.evaluation import evaluate

    start = time.perf_counter()
    report = evaluate(policy, tasks, seed=0, max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                      batch_size=batch_size, progress=True)
    return time.perf_counter() - start, report


def rates(seconds: float, report) -> dict:
    tokens = sum(e["assistant_tokens"] or 0 for e in report.episodes)
    return {"episodes": len(report.episodes), "wall_time_s": round(seconds, 1), "assistant_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2), "episodes_per_s": round(len(report.episodes) / seconds, 4),
            "success": report.metrics["success"], "turns_mean": report.metrics["turns_mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", type=int, default=100, help="test tasks in the batched pass")
    parser.add_argument("--sequential", type=int, default=20, help="of those, how many to run one at a time")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-turns", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    add_threads_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.sequential = 16, 4

    set_threads(args.threads)
    from pipeline.envs import load_tasks
    from pipeline.models import load_model

    tasks = load_tasks("customer_service", "test")[: args.tasks]
    policy = load_model(args.model)
    batched_s, batched = timed(policy, tasks, args.batch_size, args)
    sequential_s, sequential = timed(policy, tasks[: args.sequential], 1, args)

    b, s = rates(batched_s, batched), rates(sequential_s, sequential)
    same = [x["success"] == y["success"] and x["turns"] == y["turns"]
            for x, y in zip(batched.episodes, sequential.episodes)]
    result = {
        "wall_time_s": b["wall_time_s"],
        "speedup": round(b["tokens_per_s"] / s["tokens_per_s"], 2),
        "speedup_episodes": round(b["episodes_per_s"] / s["episodes_per_s"], 2),
        "agreement": round(sum(same) / len(same), 3),
        "batched": {**b, "batch_size": args.batch_size}, "sequential": {**s, "batch_size": 1},
        "metrics": {key: batched.metrics[key] for key in ("success", "completion", "max_turns_rate",
                                                           "max_tokens_rate", "tokens_mean", "tool_calls_mean")},
        "model": args.model, "split": "test", "seed": 0, "decoding": "greedy", "max_turns": args.max_turns,
        "max_new_tokens": args.max_new_tokens, "quick": args.quick, "machine": machine(),
        "command": " ".join(["python benchmarks/eval_batching.py", *sys.argv[1:]]),
    }
    write_result("eval_batching_quick" if args.quick else "eval_batching", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
