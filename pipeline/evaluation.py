"""External evaluation: the yardstick training is judged by.

Evaluation uses only the environment's strict goal check (:class:`~pipeline.envs.base.Outcome`), never
the training reward: this module must not import ``rewards`` (a test enforces it), so a reward that can
be gamed cannot also move the number that says whether training worked.

``evaluate(policy, tasks, k, seed, n=...)`` plays ``n`` episodes per task (default ``n = k``) with
environment seeds ``seed .. seed+n-1``, records one raw result per episode, and aggregates them:

- success, completion (the episode ended properly rather than by a budget) and correctness among the
  completed episodes, kept apart because a policy that ends conversations early is not one that solves
  them;
- pass@j, the chance that at least one of ``j`` trials succeeds, with the unbiased estimator of Chen et
  al. (2021) over the ``n >= j`` samples, and pass^j, the chance that all ``j`` succeed (tau-bench,
  Yao et al., 2024), for ``j`` in :func:`k_values` (1, k, n and the powers of two up to n);
- per-field accuracy and per-check pass rates, turn-budget exhaustion and token truncation rates, mean
  turns and tokens, the tool calls that ran by tool, the calls that failed by error kind and by tool,
  violations by rule and stop reasons;
- the same per intent (``by_intent``): success, completion, the turn-budget rate, and the tool, error,
  violation, stop-reason and check counts, so that a failure confined to one intent shows.

``evaluate_trajectories`` computes the same report from logged trajectories (their outcomes were
recorded when they were played), and :func:`compare` pairs two reports episode by episode for the
side-by-side mode: the paired difference in success with a paired-bootstrap interval, plus the
transcripts on which the two disagree. Human-readable renderings and report files live in
:mod:`pipeline.report` (``render_markdown``, ``save_report``, ``write_report``), which reads this
module's reports; this module never imports it, so the dependency runs one way.

Determinism: the environment is seeded per episode, models decode greedily and scripted policies are
pure functions of the conversation, so a given ``(policy, tasks, k, n, seed)`` always gives the same
report (apart from ``wall_time_s``). With greedy decoding the ``n`` samples of a task differ only
through the seeded environment (the simulated customer's wording, persona draws).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.budgets import MAX_NEW_TOKENS, MAX_TOTAL_TOKENS, MAX_TURNS
from pipeline.envs import make_env
from pipeline.envs.base import STOP_MAX_TOKENS, STOP_MAX_TURNS, Outcome, Task, field_correct
from pipeline.envs.tasks import intent_label
from pipeline.rollout import RolloutEngine, run_policy
from pipeline.rollout.engine import SCHEDULES
from pipeline.templates import ChatTemplate
from pipeline.trajectory import (Trajectory, append_jsonl, atomic_write_text, drop_torn_line, load_jsonl,
                                 recorded_seconds)

logger = logging.getLogger(__name__)

#: Runs with at least this many episodes show a progress bar unless told otherwise.
PROGRESS_MIN_EPISODES = 32

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


def k_values(n: int, k: int = 1) -> list[int]:
    """The ``j`` that pass@j and pass^j are reported for with ``n`` samples per task: 1, k, n, powers of 2.

    >>> k_values(4, 1)
    [1, 2, 4]
    >>> k_values(5, 3)
    [1, 2, 3, 4, 5]
    """
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n samples per task, got k={k}, n={n}; pass n >= k.")
    return sorted({1, k, n} | {2**i for i in range(n.bit_length()) if 2**i <= n})


@dataclass
class EvalReport:
    """The raw per-episode results, the metrics computed from them, and the trajectories they came from.

    ``episodes`` holds one JSON-able record per episode (see :func:`episode_result`); ``metrics`` and
    ``per_task`` are :func:`summarize` of it; ``config`` says what was run (policy label, k, n, seed,
    budgets, source).
    """

    metrics: dict[str, Any]
    per_task: list[dict[str, Any]]
    episodes: list[dict[str, Any]] = field(default_factory=list)
    trajectories: list[Trajectory] = field(repr=False, default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.config.get("policy", "?"))

    @property
    def success_rate(self) -> float:
        return self.metrics["success"]

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "metrics": self.metrics, "per_task": self.per_task, "episodes": self.episodes}

    @classmethod
    def from_dict(cls, row: Any, where: str = "report") -> "EvalReport":
        """A report read back from :meth:`to_dict`, its metrics computed again from its episode records, so
        that a report saved by an earlier version gains the metrics added since (the trajectories are not
        in it). Saved metrics that are not computed from episodes (``wall_time_s``, ``resumed_episodes``)
        are kept. ``where`` names the source in errors."""
        episodes = row.get("episodes") if isinstance(row, dict) else None
        if not isinstance(episodes, list) or not episodes or not all(isinstance(e, dict) for e in episodes):
            raise ValueError(f"{where}: no 'episodes' list of per-episode records to rebuild the report from; "
                             "give a report.json that `turnwise eval --out` wrote.")
        config = row.get("config") if isinstance(row.get("config"), dict) else {}
        try:
            metrics, per_task = summarize(episodes, int(config.get("k", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: an episode record lacks what the metrics need ({type(exc).__name__}: "
                             f"{exc}); give a report.json that `turnwise eval --out` wrote.") from None
        saved = row.get("metrics") if isinstance(row.get("metrics"), dict) else {}
        metrics = {**{k: v for k, v in saved.items() if k not in metrics}, **metrics}
        return cls(metrics=metrics, per_task=per_task, episodes=episodes, config=dict(config))


# ---------------------------------------------------------------------------------------------------
# Per-episode results and their aggregation
# ---------------------------------------------------------------------------------------------------


def episode_result(trajectory: Trajectory, intents: Sequence[str]) -> dict[str, Any]:
    """One episode's raw result: the outcome plus the counts the metrics need, JSON-able.

    ``assistant_tokens`` (sampled tokens) and ``episode_tokens`` (the whole sequence) are ``None`` when
    no model produced the episode. ``fields`` maps each output field to whether it was right;
    ``checks`` splits the strict success into the parts the environment reports.
    """
    o = trajectory.outcome
    turns = trajectory.turns
    if trajectory.tokens is not None:
        assistant_tokens: int | None = sum(trajectory.tokens.assistant_mask)
        episode_tokens: int | None = len(trajectory.tokens.input_ids)
    elif turns and all(t.completion_ids is not None for t in turns):
        assistant_tokens, episode_tokens = sum(len(t.completion_ids or []) for t in turns), None
    else:
        assistant_tokens = episode_tokens = None
    return {
        "task_id": trajectory.task_id,
        "seed": trajectory.seed,
        "intents": list(intents),
        "success": bool(o.success),
        "completed": bool(o.completed),
        "stop_reason": o.stop_reason,
        "turns": len(turns),
        "truncated_turns": sum(bool(t.truncated) for t in turns),
        "assistant_tokens": assistant_tokens,
        "episode_tokens": episode_tokens,
        "tool_calls": dict(Counter(c.get("name", "?") for t in turns for c in t.info.get("tool_calls", []))),
        "tool_errors": dict(Counter(e.get("kind", "error") for t in turns for e in t.info.get("tool_errors", []))),
        "failed_calls": dict(Counter(e.get("name") or "?" for t in turns for e in t.info.get("tool_errors", []))),
        "violations": list(o.violations),
        "fields": {name: field_correct(value) for name, value in o.fields.items()},
        "checks": _checks(o),
    }


def _checks(o: Outcome) -> dict[str, bool]:
    """The parts of the strict goal check an environment reports in ``details`` (each must hold for success)."""
    checks = {}
    if "state_match" in o.details:
        checks["state_match"] = bool(o.details["state_match"])
    if "missing_facts" in o.details:
        checks["facts_told"] = not o.details["missing_facts"]
    checks["no_violations"] = not o.violations
    return checks


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _rule(violation: str) -> str:
    return violation.split("@")[0]


def summarize(episodes: Sequence[dict[str, Any]], k: int = 1) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Aggregate metrics and the per-task table from raw episode results (:func:`episode_result`).

    Tasks appear in the order of their first episode. pass@j and pass^j average the per-task estimates
    over tasks, each task with its own sample count ``n_t``, for ``j`` in ``k_values(min n_t, k)``.
    Ratios with an empty denominator (``correct_given_completed`` with no completed episode, token means
    without token data) are ``None``.
    """
    if not episodes:
        raise ValueError("nothing to summarize: no episodes.")
    by_task: dict[str, list[dict]] = defaultdict(list)
    for e in episodes:
        by_task[e["task_id"]].append(e)
    n = min(len(v) for v in by_task.values())
    ks = k_values(n, k)
    counts = {tid: (len(runs), sum(r["success"] for r in runs)) for tid, runs in by_task.items()}
    all_turns = sum(e["turns"] for e in episodes)

    metrics: dict[str, Any] = {"n_tasks": len(by_task), "n_episodes": len(episodes), "k": k, "n": n, "ks": ks}
    metrics["success"] = _mean([e["success"] for e in episodes])
    for j in ks:
        metrics[f"pass@{j}"] = _mean([pass_at_k(nt, c, j) for nt, c in counts.values()])
    for j in ks:
        metrics[f"pass^{j}"] = _mean([pass_hat_k(nt, c, j) for nt, c in counts.values()])
    completed = [e for e in episodes if e["completed"]]
    tokens = [e["assistant_tokens"] for e in episodes if e["assistant_tokens"] is not None]
    lengths = [e["episode_tokens"] for e in episodes if e["episode_tokens"] is not None]
    metrics.update({
        "completion": _mean([e["completed"] for e in episodes]),
        "correct_given_completed": _mean([e["success"] for e in completed]),
        "max_turns_rate": _mean([e["stop_reason"] == STOP_MAX_TURNS for e in episodes]),
        "max_tokens_rate": _mean([e["stop_reason"] == STOP_MAX_TOKENS for e in episodes]),
        # An episode is truncated when any turn hit the per-turn token cap or the sequence budget ended it.
        "truncation_rate": _mean([e["stop_reason"] == STOP_MAX_TOKENS or e["truncated_turns"] > 0 for e in episodes]),
        "truncated_turns_rate": sum(e["truncated_turns"] for e in episodes) / all_turns if all_turns else None,
        "turns_mean": _mean([e["turns"] for e in episodes]),
        "tokens_mean": _mean(tokens),
        "episode_tokens_mean": _mean(lengths),
        "tool_calls_mean": _mean([sum(e["tool_calls"].values()) for e in episodes]),
        "tool_errors_mean": _mean([sum(e["tool_errors"].values()) for e in episodes]),
        "violation_rate": _mean([bool(e["violations"]) for e in episodes]),
        **_how_they_ended(episodes),
        "field_accuracy": _rates(e["fields"] for e in episodes),
    })
    intents: dict[str, list[dict]] = defaultdict(list)
    for e in episodes:
        intents[intent_label(e["intents"])].append(e)
    metrics["by_intent"] = {
        label: {"n": len(rows), "success": _mean([r["success"] for r in rows]),
                "completion": _mean([r["completed"] for r in rows]), "turns_mean": _mean([r["turns"] for r in rows]),
                "max_turns_rate": _mean([r["stop_reason"] == STOP_MAX_TURNS for r in rows]), **_how_they_ended(rows)}
        for label, rows in sorted(intents.items())
    }
    per_task = [
        {"task_id": tid, "intents": runs[0]["intents"], "n": len(runs), "successes": counts[tid][1],
         "success": counts[tid][1] / len(runs), "seeds": [r["seed"] for r in runs],
         "stop_reasons": [r["stop_reason"] or "none" for r in runs], "turns": [r["turns"] for r in runs],
         "violations": [v for r in runs for v in r["violations"]]}
        for tid, runs in by_task.items()
    ]
    return metrics, per_task


def _how_they_ended(episodes: Sequence[dict[str, Any]]) -> dict[str, dict]:
    """The counts that say how episodes went wrong: the tool calls that ran, by tool; the calls that came back
    as errors, by kind (``tool_errors``) and by the tool they named (``failed_calls``: a made-up name for an
    unknown tool); violations by rule; stop reasons; and the rate of each success check. The whole report has
    them, and so does each intent, where they show a failure that the totals hide (a tool one intent needs and
    the policy never calls)."""
    counts = {
        "tool_calls": _total(e["tool_calls"] for e in episodes),
        "tool_errors": _total(e["tool_errors"] for e in episodes),
        "violations": dict(sorted(Counter(_rule(v) for e in episodes for v in e["violations"]).items())),
        "stop_reasons": dict(sorted(Counter(e["stop_reason"] or "none" for e in episodes).items())),
        "checks": _rates(e["checks"] for e in episodes),
    }
    if all("failed_calls" in e for e in episodes):  # records saved before it was kept have no such count
        counts["failed_calls"] = _total(e["failed_calls"] for e in episodes)
    return counts


def _total(counters) -> dict[str, int]:
    total: Counter = Counter()
    for c in counters:
        total.update(c)
    return dict(sorted(total.items()))


def _rates(records) -> dict[str, float]:
    """For dicts of name -> bool: the fraction true per name, over the records that have that name."""
    seen: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        for name, ok in record.items():
            seen[name].append(bool(ok))
    return {name: sum(v) / len(v) for name, v in sorted(seen.items())}


# ---------------------------------------------------------------------------------------------------
# Running policies
# ---------------------------------------------------------------------------------------------------


def evaluate(
    policy: Any,
    tasks: Sequence[Task],
    k: int = 1,
    seed: int = 0,
    *,
    n: int | None = None,
    max_turns: int = MAX_TURNS,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_total_tokens: int = MAX_TOTAL_TOKENS,
    batch_size: int = 16,
    progress: bool | None = None,
    label: str | None = None,
    customer: str | None = None,
    tool_calling: str = "auto",
    schedule: str = "continuous",
    journal: "EpisodeJournal | Path | str | None" = None,
    resume: bool = False,
) -> EvalReport:
    """Play ``n`` episodes per task (default ``n = k``; seeds ``seed .. seed+n-1``) and report strict success.

    ``policy`` is a model (a name such as ``"smollm2-135m"``, a path, a hub id, or a loaded
    ``(model, tokenizer)`` pair), a :class:`RolloutEngine`, or a factory ``task -> (messages -> str)``
    such as ``oracle_policy``. Models are decoded greedily, batched across ``batch_size`` live episodes,
    with per-episode KV caches reused across turns; with ``schedule="continuous"`` a finished episode's
    slot goes to the next waiting one at once, with ``"static"`` episodes run in chunks of ``batch_size``,
    each until its longest episode ends (the same episodes, more slowly: kept for comparison). ``k`` is the
    headline pass@k / pass^k; every ``j`` in :func:`k_values` is reported too. ``progress`` shows a progress bar (``None``: on runs of
    at least ``PROGRESS_MIN_EPISODES`` episodes, when stderr is a terminal). ``customer`` names the simulated
    customer (``scripted``, or ``llm:BACKEND`` for the domain's LLM customer; default: the domain's). A model
    calls tools in its chat template's own format when the template has one (``tool_calling="auto"``; or
    ``"native"``, ``"text"``).

    ``journal`` (an :class:`EpisodeJournal` or its path) saves each episode as it ends. With ``resume``, the
    episodes a journal of the same run already holds are not played again: a killed evaluation continues where
    it stopped, and its report covers every episode (``config["resumed_episodes"]`` says how many came from the
    journal; ``wall_time_s`` is this part's time, ``wall_time_total_s`` the whole run's).
    """
    n = k if n is None else n
    k_values(n, k)  # fail fast on a bad k/n
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks to evaluate.")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not a rollout schedule; use one of {', '.join(SCHEDULES)}.")
    label = label or _label(policy)
    episodes = [(task, seed + i) for task in tasks for i in range(n)]
    saved: dict[tuple[str, int, int], Trajectory] = {}
    if journal is not None:
        journal = journal if isinstance(journal, EpisodeJournal) else EpisodeJournal(journal)
        identity = {"policy": label, "tasks": [t.id for t in tasks], "n": n, "seed": seed, "max_turns": max_turns,
                    "max_new_tokens": max_new_tokens, "max_total_tokens": max_total_tokens, "customer": customer,
                    "tool_calling": tool_calling}
        if isinstance(policy, (str, Path)) and Path(policy).is_dir():
            identity["weights"] = weights_fingerprint(Path(policy))  # a directory retrained in place is another model
        finished = journal.open(identity, resume=resume)
        saved = dict(zip(_occurrence_keys((t.task_id, t.seed) for t in finished), finished))
    keys = _occurrence_keys((task.id, s) for task, s in episodes)
    todo = [i for i, key in enumerate(keys) if key not in saved]
    named = isinstance(policy, (str, Path))  # a model by name: loaded only when an episode is left to play
    engine = None if named and not todo else _as_engine(policy, max_new_tokens, max_total_tokens, batch_size,
                                                         tool_calling)
    scripted = engine is None and not named
    env_factory = lambda task: make_env(task, max_turns=max_turns, customer=customer)  # noqa: E731
    start = time.time()
    with _progress(len(episodes), progress) as advance:
        advance(len(episodes) - len(todo))
        played: list[Trajectory] = []
        if engine is not None and todo:
            done = [0]

            def on_turn(active: int, finished: int) -> None:
                advance(finished - done[0])
                done[0] = finished

            on_episode = None if journal is None else (lambda _, trajectory: journal.append(trajectory))
            played = engine.run(env_factory, [episodes[i][0] for i in todo], [episodes[i][1] for i in todo],
                                on_turn=on_turn, schedule=schedule, on_episode=on_episode)
        elif scripted:  # a scripted policy plays episode by episode
            for i in todo:
                task, s = episodes[i]
                played.append(run_policy(env_factory(task), task, policy(task), seed=s))
                if journal is not None:
                    journal.append(played[-1])
                advance(1)
    new = dict(zip((keys[i] for i in todo), played))
    trajectories = [saved[key] if key in saved else new[key] for key in keys]
    report = _report(trajectories, tasks, k)
    report.metrics["wall_time_s"] = round(time.time() - start, 2)
    report.config = {"policy": label, "source": "scripted" if scripted else "model", "k": k, "n": n,
                     "seed": seed, "max_turns": max_turns, "max_new_tokens": max_new_tokens,
                     "max_total_tokens": max_total_tokens}
    if customer is not None:
        report.config["customer"] = customer
    if not scripted:
        template = engine.template if engine is not None else _template(policy, tool_calling)
        report.config["tool_calling"] = template.tool_format.name
        report.config["schedule"] = schedule
    if saved:
        report.config["resumed_episodes"] = len(saved)
        report.metrics["wall_time_total_s"] = round(journal.earlier_s + report.metrics["wall_time_s"], 2)
    logger.info("evaluated %s on %d tasks x %d: success %.3f", label, len(tasks), n, report.metrics["success"])
    return report


def _occurrence_keys(pairs) -> list[tuple[str, int, int]]:
    """``(task id, seed, i)`` for each ``(task id, seed)``: its ``i``-th occurrence, so a repeated pair keeps each."""
    seen: Counter = Counter()
    keys = []
    for pair in pairs:
        keys.append((*pair, seen[pair]))
        seen[pair] += 1
    return keys


class EpisodeJournal:
    """One policy's finished episodes, saved as each ends, so that a killed evaluation resumes.

    ``path`` holds one trajectory per line (the format of ``trajectories.jsonl``, so ``turnwise eval
    --trajectories`` reads a journal too). Each line is appended and forced to disk when its episode ends; a
    kill can tear only the line being written, and a resume drops it (that episode is played again).
    ``path.with_suffix(".json")`` records which run the episodes belong to (the policy, tasks, seeds and
    budgets, and for a model directory its :func:`weights_fingerprint`), and a resume with different ones is
    refused: the report would mix two runs. It also records, as each episode is saved, how long the run has
    played so far (``wall_time_s``, every part from its start to its last saved episode): :attr:`earlier_s` is
    what the parts before a resume took.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.identity_path = self.path.with_suffix(".json")
        self.identity: dict[str, Any] = {}
        self.earlier_s = 0.0  # the wall time of the parts before this one, as they recorded it
        self.started = time.time()

    def open(self, identity: dict[str, Any], *, resume: bool) -> list[Trajectory]:
        """Start saving episodes of the run ``identity`` describes; with ``resume``, return those already saved.

        Without ``resume`` (or with nothing saved) the journal starts empty.
        """
        self.identity, self.started, self.earlier_s = dict(identity), time.time(), 0.0
        if resume and self.path.is_file() and self.identity_path.is_file():
            self.earlier_s = self._check(identity)
            if drop_torn_line(self.path):
                logger.warning("%s: its last episode was cut off by the interruption; it is played again.", self.path)
            finished = load_jsonl(self.path)
            logger.info("resuming from %s: %d episodes already played", self.path, len(finished))
            return finished
        if resume:
            logger.warning("--resume: no saved episodes in %s; the evaluation starts from the beginning.", self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "")
        atomic_write_text(self.identity_path, json.dumps(identity, indent=1) + "\n")
        return []

    @property
    def wall_time_s(self) -> float:
        """The run's wall time so far, the parts before a resume included."""
        return self.earlier_s + time.time() - self.started

    def append(self, trajectory: Trajectory) -> None:
        append_jsonl(trajectory, self.path)
        atomic_write_text(self.identity_path,
                          json.dumps({**self.identity, "wall_time_s": round(self.wall_time_s, 1)}, indent=1) + "\n")

    def _check(self, identity: dict[str, Any]) -> float:
        """Refuse a resume with a different ``identity``; return the wall time the earlier parts recorded."""
        try:
            saved = json.loads(self.identity_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{self.identity_path}: cannot read which run the saved episodes belong to ({exc}); "
                             "rerun without --resume to start over.") from None
        for name, value in identity.items():
            before = saved.get(name) if isinstance(saved, dict) else None
            if before == value:
                continue
            if name == "weights":
                raise ValueError(f"{self.identity_path}: the weights in {identity['policy']} are not those the saved "
                                 f"episodes were played with (sha256 {before} then, {value} now); rerun without "
                                 "--resume to start over with these weights, or resume with the weights that saved "
                                 "them.")
            was, now = f"{name} {before!r}", repr(value)
            if name == "tasks" and isinstance(before, list):
                i = next((i for i, (a, b) in enumerate(zip(before, value)) if a != b), min(len(before), len(value)))
                was, now = (f"{len(ids)} tasks (task {i + 1}: {ids[i] if i < len(ids) else 'none'})"
                            for ids in (before, value))
            raise ValueError(f"{self.identity_path}: the saved episodes were played with {was}, this run asks for "
                             f"{now}; resume with the options of the run that saved them, or rerun without --resume "
                             "to start over.")
        return recorded_seconds(saved.get("wall_time_s"))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def weights_fingerprint(directory: Path) -> str:
    """The sha256 (first 16 hex digits) of a model directory's weight files, names and bytes: what a journal
    records so that a resume plays the same weights, whatever the directory is called."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def evaluate_trajectories(
    trajectories: Sequence[Trajectory], tasks: Sequence[Task] | None = None, k: int = 1, label: str = "logged"
) -> EvalReport:
    """The report for logged trajectories, from the outcomes recorded when they were played (no model).

    Intents come from the task with the same id in ``tasks`` when there is one, else from the
    trajectory's ``metadata["intents"]``, else ``["unknown"]``. The number of samples per task is
    however many episodes of it were logged; pass@j is reported for ``j`` up to the smallest count.
    """
    trajectories = list(trajectories)
    if not trajectories:
        raise ValueError("no trajectories to evaluate.")
    report = _report(trajectories, tasks or [], k)
    known = {t.id for t in tasks or []}
    unmatched = sorted({t.task_id for t in trajectories} - known)
    if tasks and unmatched:
        logger.warning("%d logged task ids are not in the task set (intent 'unknown' unless the log says): %s",
                       len(unmatched), ", ".join(unmatched[:5]))
    report.config = {"policy": label, "source": "logged", "k": k, "n": report.metrics["n"],
                     "seeds": sorted({t.seed for t in trajectories})}
    return report


def _report(trajectories: Sequence[Trajectory], tasks: Sequence[Task], k: int) -> EvalReport:
    intents = {task.id: task.intents for task in tasks}
    episodes = [
        episode_result(t, intents.get(t.task_id) or t.metadata.get("intents") or ["unknown"]) for t in trajectories
    ]
    metrics, per_task = summarize(episodes, k)
    return EvalReport(metrics=metrics, per_task=per_task, episodes=episodes, trajectories=list(trajectories))


def _label(policy: Any) -> str:
    if isinstance(policy, (str, Path)):
        return str(policy)
    if isinstance(policy, tuple) and len(policy) == 2:
        return str(getattr(getattr(policy[0], "config", None), "_name_or_path", "") or type(policy[0]).__name__)
    return getattr(policy, "__name__", type(policy).__name__)


def _template(policy: str | Path, tool_calling: str) -> ChatTemplate:
    """The chat template a named model plays in, from its tokenizer alone: a fully resumed evaluation loads no
    weights."""
    from pipeline.models import load_policy_tokenizer

    return ChatTemplate(load_policy_tokenizer(str(policy)), tool_calling)


def _as_engine(policy: Any, max_new_tokens: int, max_total_tokens: int, batch_size: int,
               tool_calling: str = "auto") -> RolloutEngine | None:
    """A greedy rollout engine for a model policy; ``None`` for a factory of scripted policies."""
    if isinstance(policy, RolloutEngine):
        return policy
    if isinstance(policy, (str, Path)):
        from pipeline.models import load_model

        policy = load_model(str(policy))
    if isinstance(policy, tuple) and len(policy) == 2:
        from pipeline.rollout.backends import build_backend

        model, tokenizer = policy
        return RolloutEngine(build_backend("hf", model, tokenizer, temperature=0.0), tokenizer,
                             max_new_tokens=max_new_tokens, max_total_tokens=max_total_tokens, batch_size=batch_size,
                             tool_calling=tool_calling)
    if callable(policy):
        return None
    raise TypeError(f"Cannot evaluate {policy!r}: pass a model name or path, a (model, tokenizer) pair, a "
                    "RolloutEngine, or a factory task -> policy such as oracle_policy.")


class _progress:
    """A tqdm bar on stderr as a context manager yielding ``advance(n)``; a no-op when disabled. When stderr
    is not a terminal (a log file, a SageMaker job) and the bar was not forced, progress goes to the log
    instead, about every tenth of the run."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        self.total, self.enabled, self.bar = total, enabled, None
        self.done, self.start = 0, time.time()

    def __enter__(self) -> Callable[[int], None]:
        if self.enabled is False or (self.enabled is None and self.total < PROGRESS_MIN_EPISODES):
            return lambda n: None
        if self.enabled is None and not sys.stderr.isatty():
            return self._log
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc="episodes", unit="ep", disable=False)
        return self.bar.update

    def _log(self, n: int) -> None:
        step = max(1, self.total // 10)
        before, self.done = self.done, self.done + n
        if n and (self.done // step > before // step or self.done == self.total):
            logger.info("episodes %d/%d (%.0f s)", self.done, self.total, time.time() - self.start)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------
# Side by side
# ---------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """``candidate`` against ``base`` on the episodes both played (same task, same seed).

    ``difference`` is the candidate's success rate minus the base's on those paired episodes;
    ``ci_low``/``ci_high`` is its paired-bootstrap interval at ``confidence``. The four counts split the
    pairs by who succeeded. ``by_intent`` repeats the paired difference and its interval for each intent
    label (:func:`~pipeline.envs.tasks.intent_label`), resampling that intent's tasks only, so a gain on
    one intent is not read as a gain on all. ``disagreeing`` holds the ``(candidate, base)`` episode records
    where exactly one succeeded, and ``disagreements`` their trajectories, the transcripts to read for reward
    hacking, when both reports carry them (a report rebuilt from ``report.json`` has only the records).
    """

    candidate: str
    base: str
    n_pairs: int
    n_tasks: int
    candidate_success: float
    base_success: float
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    n_boot: int
    seed: int
    both_pass: int
    candidate_only: int
    base_only: int
    both_fail: int
    by_intent: dict[str, dict[str, Any]] = field(default_factory=dict)
    disagreements: list[tuple[Trajectory, Trajectory]] = field(default_factory=list, repr=False)
    disagreeing: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list, repr=False)

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero."""
        return self.ci_low > 0 or self.ci_high < 0

    def statement(self) -> str:
        """The result in one plain sentence."""
        pct = round(self.confidence * 100)
        verdict = ("significant: the interval excludes 0, so " + ("the candidate is better" if self.difference > 0
                                                                     else "the candidate is worse")
                   if self.significant else "not significant: the interval includes 0")
        return (f"{self.candidate} vs {self.base}: success {self.candidate_success:.3f} vs {self.base_success:.3f}, "
                f"paired difference {self.difference:+.3f} ({pct}% CI {self.ci_low:+.3f} to {self.ci_high:+.3f}, "
                f"{self.n_pairs} paired episodes on {self.n_tasks} tasks); {verdict}.")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if k not in ("disagreements", "disagreeing")}
        d["significant"] = self.significant
        d["statement"] = self.statement()
        d["disagreements"] = [{"task_id": c["task_id"], "seed": c["seed"], "candidate_success": c["success"],
                               "base_success": b["success"]} for c, b in self.disagreeing]
        return d


def compare(candidate: EvalReport, base: EvalReport, *, n_boot: int = 10_000, confidence: float = 0.95,
            seed: int = 0) -> Comparison:
    """Pair two reports' episodes by ``(task_id, seed)`` and bootstrap the difference in success.

    The bootstrap resamples tasks, not episodes, with replacement (a cluster bootstrap): the ``n``
    episodes of one task are correlated, and resampling them independently would make the interval too
    narrow. With one episode per task the two are the same. The generator is seeded by ``seed``, so the
    interval is reproducible. If a key repeats in a log, its i-th occurrences are paired.
    """
    import numpy as np

    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a whole number of bootstrap resamples, at least 1, got {n_boot!r}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (0.95 for a 95% interval), got {confidence!r}.")

    def keyed(items: Sequence[Any], key: Callable[[Any], tuple[str, int]]) -> dict[tuple[str, int, int], Any]:
        return dict(zip(_occurrence_keys(map(key, items)), items))

    # Paired by the episode records, which a report rebuilt from its report.json has too.
    cand, ref = (keyed(r.episodes, lambda e: (e["task_id"], e["seed"])) for r in (candidate, base))
    keys = [key for key in cand if key in ref]
    if not keys:
        raise ValueError(f"{candidate.label} and {base.label} share no episode (same task id and seed); run both "
                         "on the same tasks with the same seed.")
    pairs = [(cand[key], ref[key]) for key in keys]
    rng = np.random.default_rng(seed)
    overall = _paired_bootstrap(pairs, rng, n_boot, confidence)
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    for c, b in pairs:
        groups[intent_label(c["intents"] or ["unknown"])].append((c, b))
    by_intent = {label: _paired_bootstrap(groups[label], rng, n_boot, confidence) for label in sorted(groups)}
    wins = Counter((c["success"], b["success"]) for c, b in pairs)
    split = [key for key in keys if cand[key]["success"] != ref[key]["success"]]
    played = [keyed(r.trajectories, lambda t: (t.task_id, t.seed)) for r in (candidate, base)
              if len(r.trajectories) == len(r.episodes)]
    return Comparison(
        candidate=candidate.label, base=base.label, **overall, confidence=confidence, n_boot=n_boot, seed=seed,
        both_pass=wins[(True, True)], candidate_only=wins[(True, False)], base_only=wins[(False, True)],
        both_fail=wins[(False, False)], by_intent=by_intent,
        disagreements=[(played[0][key], played[1][key]) for key in split] if len(played) == 2 else [],
        disagreeing=[(cand[key], ref[key]) for key in split],
    )


def _paired_bootstrap(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]], rng: Any, n_boot: int,
                      confidence: float) -> dict[str, Any]:
    """The paired difference in success over ``pairs`` and its percentile interval from ``n_boot`` resamples
    of whole tasks drawn with ``rng`` (see :func:`compare`), with both success rates and the counts."""
    import numpy as np

    tasks = list(dict.fromkeys(c["task_id"] for c, _ in pairs))
    index = {tid: i for i, tid in enumerate(tasks)}
    diff_sum, count = np.zeros(len(tasks)), np.zeros(len(tasks))
    for c, b in pairs:
        diff_sum[index[c["task_id"]]] += int(c["success"]) - int(b["success"])
        count[index[c["task_id"]]] += 1
    boot = np.empty(n_boot)
    for lo in range(0, n_boot, 1000):  # in chunks: memory stays at 1000 x n_tasks
        draw = rng.integers(0, len(tasks), size=(min(1000, n_boot - lo), len(tasks)))
        boot[lo : lo + len(draw)] = diff_sum[draw].sum(axis=1) / count[draw].sum(axis=1)
    # Percentile interval, rounded outwards to resampled values (never interpolated between two of them).
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, alpha / 2, method="lower"), np.quantile(boot, 1 - alpha / 2, method="higher")
    return {"n_pairs": len(pairs), "n_tasks": len(tasks),
            "candidate_success": sum(c["success"] for c, _ in pairs) / len(pairs),
            "base_success": sum(b["success"] for _, b in pairs) / len(pairs),
            "difference": float(diff_sum.sum() / count.sum()), "ci_low": float(low), "ci_high": float(high)}
