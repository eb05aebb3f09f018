"""Baseline: the untrained embedded model on the customer-service test split.

    python benchmarks/baseline.py --tasks 50          # writes benchmarks/results/baseline_embedded.json

This is the number training has to move. The model decodes greedily with the same turn and token
budgets evaluation uses by default.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    import os

    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main() -> None:
    from pipeline.envs import load_tasks
    from pipeline.evaluation import evaluate
    from pipeline.report import save_report
    from pipeline.trajectory import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--max-turns", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "baseline_embedded.json")
    args = parser.parse_args()
    tasks = load_tasks("customer_service", "test")[: args.tasks]
    start = time.time()
    report = evaluate(args.model, tasks, seed=0, max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                      progress=True)
    m = report.metrics
    result = {
        "model": args.model, "split": "test", "n_tasks": len(tasks), "seed": 0, "decoding": "greedy",
        "max_turns": args.max_turns, "max_new_tokens": args.max_new_tokens,
        "success": m["success"], "completion": m["completion"], "max_turns_rate": m["max_turns_rate"],
        "turns_mean": m["turns_mean"], "tool_calls_mean": m["tool_calls_mean"],
        "tool_errors_mean": m["tool_errors_mean"], "stop_reasons": m["stop_reasons"], "violations": m["violations"],
        "by_intent": m["by_intent"], "wall_time_s": round(time.time() - start, 1), "machine": machine(),
        "command": f"python benchmarks/baseline.py --tasks {args.tasks}",
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    save_report(report, args.out.parent / "baseline_embedded_report")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
