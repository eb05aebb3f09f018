"""External evaluation: the yardstick training is judged by.

Evaluation uses only the environment's strict goal check (``Outcome``), never the training reward:
this module must not import ``rewards`` (a test enforces it), so a reward that can be gamed cannot
also move the number that says whether training worked.

``evaluate(policy, tasks, k, seed)`` runs ``k`` episodes per task (seeds ``seed .. seed+k-1``) and
returns an :class:`EvalReport` with the raw per-episode results and the aggregate metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.envs import make_env
from pipeline.envs.base import STOP_MAX_TOKENS, STOP_MAX_TURNS, Task
from pipeline.rollout import RolloutEngine, run_policy
from pipeline.trajectory import Trajectory, atomic_write_text

logger = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` successes (Chen et al., 2021): ``1 - C(n-c,k)/C(n,k)``.

    >>> pass_at_k(4, 1, 2)
    0.5
    """
    if k > n:
        raise ValueError(f"pass@k needs n >= k samples, got n={n}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_hat_k(n: int, c: int, k: int) -> float:
    """pass^k, the chance that ``k`` trials drawn from ``n`` all succeed (tau-bench): ``C(c,k)/C(n,k)``.

    >>> pass_hat_k(4, 2, 2)
    0.16666666666666666
    """
    if k > n:
        raise ValueError(f"pass^k needs n >= k samples, got n={n}, k={k}")
    return math.comb(c, k) / math.comb(n, k)


@dataclass
class EvalReport:
    """Metrics plus the raw per-episode results they were computed from."""

    metrics: dict[str, Any]
    per_task: list[dict[str, Any]]
    trajectories: list[Trajectory] = field(repr=False, default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return self.metrics["success"]

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "metrics": self.metrics, "per_task": self.per_task}

    def save(self, out_dir: Path | str) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and ``trajectories.jsonl`` atomically."""
        from pipeline.trajectory import save_jsonl

        out = Path(out_dir)
        paths = {"json": out / "report.json", "markdown": out / "report.md", "trajectories": out / "trajectories.jsonl"}
        atomic_write_text(paths["json"], json.dumps(self.to_dict(), indent=2) + "\n")
        atomic_write_text(paths["markdown"], self.to_markdown())
        save_jsonl(self.trajectories, paths["trajectories"])
        return paths

    def to_markdown(self) -> str:
        m = self.metrics
        lines = [f"# Evaluation: {self.config.get('policy', '?')}", "",
                 f"{m['n_tasks']} tasks x k={m['k']} ({m['n_episodes']} episodes), seed {self.config.get('seed')}", "",
                 "| metric | value |", "| --- | --- |"]
        for key in ("success", f"pass@{m['k']}", f"pass^{m['k']}", "completion", "correct_given_completed",
                    "max_turns_rate", "truncation_rate", "turns_mean", "tokens_mean", "tool_calls_mean", "tool_errors_mean"):
            value = m.get(key)
            lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
        lines += ["", "## By intent", "", "| intent | episodes | success |", "| --- | --- | --- |"]
        for intent, row in sorted(m["by_intent"].items()):
            lines.append(f"| {intent} | {row['n']} | {row['success']:.3f} |")
        if m["violations"]:
            lines += ["", "## Violations by rule", "", "| rule | count |", "| --- | --- |"]
            lines += [f"| {rule} | {n} |" for rule, n in sorted(m["violations"].items())]
        lines += ["", "## Per task", "", "| task | intents | successes | stop reasons |", "| --- | --- | --- | --- |"]
        for row in self.per_task:
            lines.append(f"| {row['task_id']} | {'+'.join(row['intents'])} | {row['successes']}/{row['n']} | "
                         f"{', '.join(row['stop_reasons'])} |")
        return "\n".join(lines) + "\n"


def summarize(trajectories: Sequence[Trajectory], tasks: Sequence[Task], k: int) -> tuple[dict, list[dict]]:
    """Aggregate metrics and the per-task table from finished episodes."""
    by_task: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajectories:
        by_task[t.task_id].append(t)
    n = len(trajectories)
    outcomes = [t.outcome for t in trajectories]
    completed = [o for o in outcomes if o.completed]
    truncated = [t for t in trajectories if t.outcome.stop_reason == STOP_MAX_TOKENS or any(x.truncated for x in t.turns)]
    tool_calls = [sum(len(x.info.get("tool_calls", [])) for x in t.turns) for t in trajectories]
    tool_errors = [sum(len(x.info.get("tool_errors", [])) for x in t.turns) for t in trajectories]
    violations = Counter(v.split("@")[0] for o in outcomes for v in o.violations)
    intents: dict[str, list[bool]] = defaultdict(list)
    per_task, at_k, hat_k = [], [], []
    for task in tasks:
        runs = by_task[task.id]
        c = sum(r.outcome.success for r in runs)
        label = task.intents[0] if len(task.intents) == 1 else "multi"
        intents[label] += [r.outcome.success for r in runs]
        at_k.append(pass_at_k(len(runs), c, k))
        hat_k.append(pass_hat_k(len(runs), c, k))
        per_task.append({"task_id": task.id, "intents": task.intents, "n": len(runs), "successes": c,
                         "stop_reasons": [r.outcome.stop_reason or "none" for r in runs],
                         "turns": [r.num_turns for r in runs], "violations": [v for r in runs for v in r.outcome.violations]})
    fields: dict[str, list[bool]] = defaultdict(list)
    for o in outcomes:
        for name, ok in o.fields.items():
            fields[name].append(bool(ok))
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    metrics = {
        "n_tasks": len(tasks), "k": k, "n_episodes": n,
        "success": mean([o.success for o in outcomes]),
        f"pass@{k}": mean(at_k), f"pass^{k}": mean(hat_k),
        "completion": mean([o.completed for o in outcomes]),
        "correct_given_completed": mean([o.success for o in completed]),
        "max_turns_rate": mean([o.stop_reason == STOP_MAX_TURNS for o in outcomes]),
        "truncation_rate": len(truncated) / n if n else 0.0,
        "turns_mean": mean([t.num_turns for t in trajectories]),
        "tool_calls_mean": mean(tool_calls), "tool_errors_mean": mean(tool_errors),
        "tokens_mean": mean([sum(t.tokens.assistant_mask) for t in trajectories if t.tokens is not None]),
        "violations": dict(violations),
        "stop_reasons": dict(Counter(o.stop_reason or "none" for o in outcomes)),
        "by_intent": {i: {"n": len(v), "success": mean(v)} for i, v in intents.items()},
        "field_accuracy": {name: mean(v) for name, v in fields.items()},
    }
    return metrics, per_task


def evaluate(
    policy: Any,
    tasks: Sequence[Task],
    k: int = 1,
    seed: int = 0,
    *,
    max_turns: int = 20,
    max_new_tokens: int = 128,
    max_total_tokens: int = 8192,
    batch_size: int = 16,
    progress: bool = False,
) -> EvalReport:
    """Run ``k`` episodes per task and report strict-success metrics.

    ``policy`` is a model (a name such as ``"smollm2-135m"``, a path, a hub id, or a loaded
    ``(model, tokenizer)`` pair), a :class:`RolloutEngine`, or a factory ``task -> (messages -> str)``
    such as ``oracle_policy``. Models are decoded greedily, batched across every live episode, with
    per-episode KV caches reused across turns.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    tasks = list(tasks)
    label = policy if isinstance(policy, str) else getattr(policy, "__name__", type(policy).__name__)
    engine = _as_engine(policy, max_new_tokens, max_total_tokens, batch_size)
    start = time.time()
    episodes = [(task, seed + i) for i in range(k) for task in tasks]
    bar = _progress(len(episodes), progress)
    env_factory = lambda task: make_env(task, max_turns=max_turns)  # noqa: E731
    if engine is not None:
        trajectories = []
        for lo in range(0, len(episodes), batch_size):
            chunk = episodes[lo : lo + batch_size]
            trajectories += engine.run(env_factory, [t for t, _ in chunk], [s for _, s in chunk])
            bar(len(chunk))
    else:
        trajectories = []
        for task, s in episodes:
            trajectories.append(run_policy(env_factory(task), task, policy(task), seed=s))
            bar(1)
    metrics, per_task = summarize(trajectories, tasks, k)
    metrics["wall_time_s"] = round(time.time() - start, 2)
    config = {"policy": str(label), "k": k, "seed": seed, "max_turns": max_turns, "max_new_tokens": max_new_tokens,
              "max_total_tokens": max_total_tokens}
    logger.info("evaluated %s on %d tasks: success %.3f", label, len(tasks), metrics["success"])
    return EvalReport(metrics=metrics, per_task=per_task, trajectories=trajectories, config=config)


def _as_engine(policy: Any, max_new_tokens: int, max_total_tokens: int, batch_size: int) -> RolloutEngine | None:
    """A greedy rollout engine for a model policy; ``None`` for a factory of scripted policies."""
    if isinstance(policy, RolloutEngine):
        return policy
    if isinstance(policy, (str, Path)):
        from pipeline.models import load_model

        policy = load_model(str(policy))
    if isinstance(policy, tuple) and len(policy) == 2:
        from pipeline.backends import HFBackend

        model, tokenizer = policy
        return RolloutEngine(HFBackend(model, tokenizer, temperature=0.0), tokenizer, max_new_tokens=max_new_tokens,
                             max_total_tokens=max_total_tokens, batch_size=batch_size)
    if callable(policy):
        return None
    raise TypeError(f"Cannot evaluate {policy!r}: pass a model name or path, a (model, tokenizer) pair, a "
                    "RolloutEngine, or a factory task -> policy such as oracle_policy.")


def _progress(total: int, enabled: bool) -> Callable[[int], None]:
    if not enabled:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="episodes", unit="ep")
    return bar.update
