"""The README's main job on the embedded default model.

Today it prepares the embedded model, then evaluates the scripted oracle (what "solved" looks like)
and the untrained model (the number training has to move) on the customer-service test split, and
writes both reports. Training joins this pipeline when the trainer lands.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Shrunk so the demo finishes in a few minutes on a 2-core CPU: the model runs on a sample of the
#: test split with a short turn budget; the oracle runs on all of it.
DEMO_MODEL_TASKS = 8
DEMO_MAX_TURNS = 8
DEMO_MAX_NEW_TOKENS = 96


def run(model: str, seed: int = 0, output_dir: Path | None = None, model_tasks: int = DEMO_MODEL_TASKS) -> dict[str, Any]:
    from pipeline.envs import load_tasks, oracle_policy
    from pipeline.evaluation import evaluate
    from pipeline.models import DEFAULT_MODEL, prepare_embedded_model

    start = time.time()
    out = Path(output_dir or "outputs/demo")
    if model == DEFAULT_MODEL:
        prepare_embedded_model()
    tasks = load_tasks("customer_service", "test")
    oracle = evaluate(oracle_policy, tasks, seed=seed)
    oracle.config["policy"] = "oracle"
    logger.info("oracle: success %.3f on %d test tasks", oracle.success_rate, len(tasks))
    sample = tasks[:: max(1, len(tasks) // model_tasks)][:model_tasks]
    untrained = evaluate(model, sample, seed=seed, max_turns=DEMO_MAX_TURNS, max_new_tokens=DEMO_MAX_NEW_TOKENS,
                         progress=True)
    paths = {"oracle": oracle.save(out / "oracle"), "model": untrained.save(out / "model")}
    return {
        "oracle": oracle.metrics, "model": untrained.metrics, "model_name": model,
        "reports": {name: str(p["markdown"]) for name, p in paths.items()},
        "wall_time_s": round(time.time() - start, 1),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.model, seed=args.seed, output_dir=args.output_dir)
