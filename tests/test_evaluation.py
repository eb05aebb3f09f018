"""Tests for pipeline/evaluation.py: independence from rewards, every metric on a hand-built set, the
scripted and model paths, determinism, logged trajectories and the paired comparison."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipeline.envs import Outcome, Task, load_tasks, oracle_policy
from pipeline.envs.base import BUDGET_STOPS
from pipeline.evaluation import (
    EpisodeJournal,
    EvalReport,
    compare,
    evaluate,
    evaluate_trajectories,
    k_values,
    pass_at_k,
    pass_hat_k,
)
from pipeline.trajectory import TokenData, Trajectory, Turn, load_jsonl, save_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
APPROX = dict(rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# Acceptance 1: evaluation never imports rewards
# ---------------------------------------------------------------------------------------------------


def test_evaluation_never_imports_rewards_at_run_time(tmp_path: Path) -> None:
    """Import and *run* evaluation and its reports in a fresh interpreter whose `rewards` is a trap.

    The trap package shadows the real one and leaves a marker file if anything imports it, so an import
    hidden inside a function body, or one wrapped in try/except, is caught as well as a top-level one.
    """
    trap = tmp_path / "trap" / "rewards"
    trap.mkdir(parents=True)
    marker = tmp_path / "imported"
    (trap / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('rewards was imported')\n")
    code = f"""
import importlib.util, sys
from pipeline.envs import load_tasks, oracle_policy
from pipeline.evaluation import compare, evaluate, evaluate_trajectories
from pipeline.report import render_markdown, render_text
tasks = load_tasks("customer_service", "val")[:3]
a = evaluate(oracle_policy, tasks, k=1, n=2, label="a")
b = evaluate_trajectories(a.trajectories, tasks, label="b")
c = compare(a, b, n_boot=100)
render_markdown([a, b], c); render_text([a, b], c)
if importlib.util.find_spec("matplotlib") is not None:
    from pipeline.report import write_report
    write_report({str(tmp_path / "out")!r}, [a, b], c, rewards={{"a": [1.0] * 6}})
print(sorted(m for m in sys.modules if m == "rewards" or m.startswith("rewards.")))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(trap.parent), str(REPO_ROOT)])}
    # cwd: `python -c` puts the working directory first on sys.path, ahead of the trap.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert not marker.exists()


@pytest.mark.parametrize("module", ["pipeline/evaluation.py", "pipeline/report.py"])
def test_evaluation_source_has_no_rewards_import(module: str) -> None:
    """No import statement anywhere in the module (function bodies included) names `rewards`, nor does any
    dynamic import by string."""
    tree = ast.parse((REPO_ROOT / module).read_text())
    named = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            named.append(node.module or "")
            if node.level == 0 and node.module == "pipeline":
                named += [alias.name for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__"
        ):
            named += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    assert named, "the scan found no imports at all; it is broken"
    assert not [name for name in named if name.split(".")[0] == "rewards"]


# ---------------------------------------------------------------------------------------------------
# Acceptance 2: every metric on a small set computed by hand
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("c", "k", "at", "hat"),
    [
        # n = 4 samples; pass@k = 1 - C(4-c, k)/C(4, k), pass^k = C(c, k)/C(4, k).
        (0, 1, 0.0, 0.0), (0, 2, 0.0, 0.0), (0, 4, 0.0, 0.0),
        (1, 1, 0.25, 0.25), (1, 2, 1 - 3 / 6, 0.0), (1, 4, 1.0, 0.0),
        (2, 1, 0.5, 0.5), (2, 2, 1 - 1 / 6, 1 / 6), (2, 4, 1.0, 0.0),
        (3, 1, 0.75, 0.75), (3, 2, 1.0, 3 / 6), (3, 4, 1.0, 0.0),
        (4, 1, 1.0, 1.0), (4, 2, 1.0, 1.0), (4, 4, 1.0, 1.0),
    ],
)
def test_pass_at_k_and_pass_hat_k_for_n_4(c: int, k: int, at: float, hat: float) -> None:
    assert pass_at_k(4, c, k) == pytest.approx(at, **APPROX)
    assert pass_hat_k(4, c, k) == pytest.approx(hat, **APPROX)


def test_pass_at_k_needs_n_at_least_k() -> None:
    with pytest.raises(ValueError, match="n >= k"):
        pass_at_k(2, 1, 4)
    with pytest.raises(ValueError, match="n >= k"):
        pass_hat_k(2, 1, 4)


def test_k_values_cover_1_k_n_and_powers_of_two() -> None:
    assert k_values(1) == [1]
    assert k_values(4) == [1, 2, 4]
    assert k_values(4, 3) == [1, 2, 3, 4]
    assert k_values(10, 3) == [1, 2, 3, 4, 8, 10]
    with pytest.raises(ValueError, match="n >= k"):
        k_values(2, 3)


def _episode(task_id: str, seed: int, success: bool, stop: str = "resolved", turns: int = 2, *, calls=(), errors=(),
             violations=(), truncated: int = 0, fields=None, state_match=None) -> Trajectory:
    """A hand-made trajectory: `turns` assistant turns of 5 sampled tokens each in a 100 + 20*turns sequence;
    tool calls and errors on the first turn; the first `truncated` turns hit the per-turn token cap."""
    info = [{} for _ in range(turns)]
    if turns:
        info[0] = {"tool_calls": [{"name": n, "arguments": {}} for n in calls],
                   "tool_errors": [{"kind": k, "name": "refund_items", "message": "no"} for k in errors]}
    length = 100 + 20 * turns
    mask = [1] * (5 * turns) + [0] * (length - 5 * turns)
    tokens = TokenData(input_ids=[0] * length, assistant_mask=mask, logprobs=[0.0] * length, turn_spans=[])
    state_match = success if state_match is None else state_match
    outcome = Outcome(success=success, completed=stop not in BUDGET_STOPS, stop_reason=stop,
                      violations=list(violations), fields=fields or {},
                      details={"state_match": state_match, "missing_facts": [] if state_match else ["a fact"]})
    return Trajectory(task_id=task_id, messages=[], seed=seed, outcome=outcome, tokens=tokens,
                      turns=[Turn(index=i, assistant="", env_messages=[], info=info[i], truncated=i < truncated)
                             for i in range(turns)])


HAND_TASKS = [
    Task("a", "customer_service", "test", ["cancel"], {}),
    Task("b", "customer_service", "test", ["cancel"], {}),
    Task("c", "customer_service", "test", ["refund"], {}),
    Task("d", "customer_service", "test", ["refund", "status"], {}),
]


def hand_set() -> list[Trajectory]:
    """4 tasks x 4 seeds with c = 0, 1, 2, 4 successes (16 episodes, 41 turns)."""
    return [
        # a (cancel): c = 0
        _episode("a", 0, False, "max_turns", 4),
        _episode("a", 1, False, "max_turns", 4),
        _episode("a", 2, False, "user_left", 2),
        _episode("a", 3, False, "max_tokens", 3, truncated=1),
        # b (cancel): c = 1; b1 reaches the right end state and says everything, but breaks two rules
        _episode("b", 0, True, "resolved", 3, calls=["verify_identity", "cancel_order"]),
        _episode("b", 1, False, "resolved", 3, state_match=True,
                 violations=["confirm_before_change@2", "identity_verification@0"]),
        _episode("b", 2, False, "user_left", 2),
        _episode("b", 3, False, "user_left", 2),
        # c (refund): c = 2
        _episode("c", 0, True, calls=["verify_identity", "refund_items"]),
        _episode("c", 1, True, calls=["verify_identity", "refund_items"]),
        _episode("c", 2, False, calls=["verify_identity"], errors=["rejected"], truncated=1),
        _episode("c", 3, False, "max_turns", 4, violations=["confirm_before_change@1"]),
        # d (refund + status: "multi"): c = 4; output fields, `amount` right on even seeds only
        *[_episode("d", s, True, calls=["verify_identity", "get_order"],
                   fields={"order_id": True, "amount": {"correct": s % 2 == 0}}) for s in range(4)],
    ]


def test_every_metric_on_a_hand_computed_set() -> None:
    report = evaluate_trajectories(hand_set(), HAND_TASKS, k=2, label="hand")
    m = report.metrics
    assert (m["n_tasks"], m["n_episodes"], m["n"], m["k"], m["ks"]) == (4, 16, 4, 2, [1, 2, 4])
    expected = {
        "success": 7 / 16,
        # per task (c = 0, 1, 2, 4 of 4), averaged over the 4 tasks:
        "pass@1": (0 + 1 / 4 + 2 / 4 + 1) / 4,  # = success rate
        "pass@2": (0 + (1 - 3 / 6) + (1 - 1 / 6) + 1) / 4,  # 7/12
        "pass@4": (0 + 1 + 1 + 1) / 4,
        "pass^1": 7 / 16,
        "pass^2": (0 + 0 + 1 / 6 + 1) / 4,  # 7/24
        "pass^4": (0 + 0 + 0 + 1) / 4,
        "completion": 12 / 16,  # a0, a1, c3 ran out of turns, a3 out of tokens
        "correct_given_completed": 7 / 12,
        "max_turns_rate": 3 / 16,
        "max_tokens_rate": 1 / 16,
        "truncation_rate": 2 / 16,  # a3 (token budget and a capped turn), c2 (a capped turn)
        "truncated_turns_rate": 2 / 41,
        "turns_mean": 41 / 16,
        "tokens_mean": 5 * 41 / 16,
        "episode_tokens_mean": 100 + 20 * 41 / 16,
        "tool_calls_mean": 15 / 16,
        "tool_errors_mean": 1 / 16,
        "violation_rate": 2 / 16,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, **APPROX), key
    assert m["tool_calls"] == {"cancel_order": 1, "get_order": 4, "refund_items": 2, "verify_identity": 8}
    assert m["tool_errors"] == {"rejected": 1}
    assert m["failed_calls"] == {"refund_items": 1}  # the rejected call, by the tool it named
    assert m["violations"] == {"confirm_before_change": 2, "identity_verification": 1}
    assert m["stop_reasons"] == {"max_tokens": 1, "max_turns": 3, "resolved": 9, "user_left": 3}
    assert m["field_accuracy"] == {"amount": 0.5, "order_id": 1.0}  # over the 4 episodes that have fields
    assert m["checks"] == {"facts_told": 8 / 16, "no_violations": 14 / 16, "state_match": 8 / 16}
    assert m["by_intent"] == {
        "cancel": {"n": 8, "success": 1 / 8, "completion": 5 / 8, "turns_mean": 23 / 8, "max_turns_rate": 2 / 8,
                   "tool_calls": {"cancel_order": 1, "verify_identity": 1}, "tool_errors": {}, "failed_calls": {},
                   "violations": {"confirm_before_change": 1, "identity_verification": 1},
                   "stop_reasons": {"max_tokens": 1, "max_turns": 2, "resolved": 2, "user_left": 3},
                   "checks": {"facts_told": 2 / 8, "no_violations": 7 / 8, "state_match": 2 / 8}},
        "refund": {"n": 4, "success": 2 / 4, "completion": 3 / 4, "turns_mean": 10 / 4, "max_turns_rate": 1 / 4,
                   "tool_calls": {"refund_items": 2, "verify_identity": 3}, "tool_errors": {"rejected": 1},
                   "failed_calls": {"refund_items": 1},
                   "violations": {"confirm_before_change": 1}, "stop_reasons": {"max_turns": 1, "resolved": 3},
                   "checks": {"facts_told": 2 / 4, "no_violations": 3 / 4, "state_match": 2 / 4}},
        "multi": {"n": 4, "success": 1.0, "completion": 1.0, "turns_mean": 2.0, "max_turns_rate": 0.0,
                  "tool_calls": {"get_order": 4, "verify_identity": 4}, "tool_errors": {}, "failed_calls": {},
                  "violations": {},
                  "stop_reasons": {"resolved": 4},
                  "checks": {"facts_told": 1.0, "no_violations": 1.0, "state_match": 1.0}},
    }
    # The per-intent counts add up to the report's.
    for key in ("tool_calls", "tool_errors", "failed_calls", "violations", "stop_reasons"):
        assert sum((Counter(row[key]) for row in m["by_intent"].values()), Counter()) == Counter(m[key]), key
    assert [(r["task_id"], r["successes"], r["n"]) for r in report.per_task] == [
        ("a", 0, 4), ("b", 1, 4), ("c", 2, 4), ("d", 4, 4)]
    assert report.per_task[0]["stop_reasons"] == ["max_turns", "max_turns", "user_left", "max_tokens"]
    assert report.per_task[1]["violations"] == ["confirm_before_change@2", "identity_verification@0"]
    assert len(report.episodes) == 16 and report.episodes[4]["tool_calls"] == {"verify_identity": 1, "cancel_order": 1}


def test_a_saved_report_is_rebuilt_from_its_episode_records() -> None:
    """A report.json written before a metric existed gains it: the metrics are computed again from the episodes."""
    report = evaluate_trajectories(hand_set(), HAND_TASKS, k=2, label="hand")
    saved = json.loads(json.dumps(report.to_dict()))
    for row in saved["metrics"]["by_intent"].values():
        del row["tool_calls"], row["stop_reasons"]
    saved["metrics"].update(wall_time_s=12.5, success=0.99)  # a fact of the run is kept; a metric is recomputed
    again = EvalReport.from_dict(saved, where="old/report.json")
    assert again.metrics == {**report.metrics, "wall_time_s": 12.5} and again.per_task == report.per_task
    for episode in saved["episodes"]:  # saved before failed calls were counted: no count, rather than a zero
        del episode["failed_calls"]
    assert "failed_calls" not in EvalReport.from_dict(saved).metrics["by_intent"]["refund"]
    assert again.label == "hand" and again.metrics["by_intent"]["refund"]["tool_errors"] == {"rejected": 1}
    with pytest.raises(ValueError, match=r"old/report.json: no 'episodes' list"):
        EvalReport.from_dict({"config": {}, "metrics": saved["metrics"]}, where="old/report.json")
    del saved["episodes"][3]["turns"]
    with pytest.raises(ValueError, match=r"old/report.json: an episode record lacks .*KeyError: 'turns'"):
        EvalReport.from_dict(saved, where="old/report.json")


def test_undefined_ratios_are_none_not_zero() -> None:
    """No completed episode and no token data: a 0 would read as 'always wrong', which is not what happened."""
    runs = [_episode("a", s, False, "max_turns", 1) for s in range(2)]
    for t in runs:
        t.tokens = None
    m = evaluate_trajectories(runs, HAND_TASKS).metrics
    assert m["correct_given_completed"] is None
    assert m["tokens_mean"] is None and m["episode_tokens_mean"] is None
    assert m["completion"] == 0.0 and m["success"] == 0.0


def test_logged_trajectories_keep_intents_from_the_task_set_or_their_metadata(tmp_path: Path) -> None:
    runs = hand_set()
    runs[0].metadata["intents"] = ["exchange"]  # ignored: the task set knows task a
    path = tmp_path / "logged.jsonl"
    save_jsonl(runs, path)
    loaded = evaluate_trajectories(load_jsonl(path), HAND_TASKS, k=2)
    assert loaded.metrics == evaluate_trajectories(runs, HAND_TASKS, k=2).metrics
    assert loaded.config["source"] == "logged" and loaded.config["seeds"] == [0, 1, 2, 3]

    alone = evaluate_trajectories(load_jsonl(path)[:4])  # no task set: the log's own intents, else "unknown"
    shown = ("n", "success", "completion", "turns_mean", "stop_reasons")
    assert {label: {key: row[key] for key in shown} for label, row in alone.metrics["by_intent"].items()} == {
        "exchange": {"n": 1, "success": 0.0, "completion": 0.0, "turns_mean": 4.0, "stop_reasons": {"max_turns": 1}},
        "unknown": {"n": 3, "success": 0.0, "completion": 1 / 3, "turns_mean": 3.0,
                    "stop_reasons": {"max_tokens": 1, "max_turns": 1, "user_left": 1}},
    }


def test_uneven_logs_report_pass_at_j_up_to_the_smallest_count() -> None:
    runs = hand_set()[:7]  # a: 4 episodes, b: 3
    m = evaluate_trajectories(runs, HAND_TASKS).metrics
    assert m["n"] == 3 and m["ks"] == [1, 2, 3]
    assert m["pass@2"] == pytest.approx((0 + (1 - 1 / 3)) / 2, **APPROX)  # b: 1 of 3, 1 - C(2,2)/C(3,2)
    with pytest.raises(ValueError, match="n >= k"):
        evaluate_trajectories(runs, HAND_TASKS, k=4)


# ---------------------------------------------------------------------------------------------------
# Running scripted policies and models
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return load_tasks("customer_service", "val")[:8]


def distracted_oracle(task: Task):
    """The oracle, except that on about a third of its turns (a hash of the conversation) it makes small talk.

    Deterministic in the conversation, so its results vary with the environment seed but never between
    two runs with the same seed.
    """
    expert = oracle_policy(task)

    def policy(messages: list[dict]) -> str:
        digest = hashlib.sha256(repr(messages[1:]).encode()).digest()
        if digest[0] < 86:
            return "Thanks for your patience! Our store was founded in 1998."
        return expert(messages)

    return policy


def test_oracle_solves_every_task_with_every_seed(tasks: list[Task]) -> None:
    report = evaluate(oracle_policy, tasks, k=2, n=4, label="oracle")
    m = report.metrics
    assert (m["n_tasks"], m["n_episodes"], m["ks"]) == (8, 32, [1, 2, 4])
    assert all(m[key] == 1.0 for key in ("success", "pass@1", "pass@2", "pass@4", "pass^2", "pass^4", "completion"))
    assert m["violations"] == {} and m["tool_errors_mean"] == 0.0 and m["tokens_mean"] is None
    assert [(e["task_id"], e["seed"]) for e in report.episodes[:4]] == [(tasks[0].id, s) for s in range(4)]
    assert report.config == {"policy": "oracle", "source": "scripted", "k": 2, "n": 4, "seed": 0, "max_turns": 20,
                             "max_new_tokens": 128, "max_total_tokens": 8192}


def test_a_weak_policy_is_deterministic_for_a_seed_and_varies_across_seeds(tasks: list[Task]) -> None:
    first = evaluate(distracted_oracle, tasks, k=1, n=4, seed=0)
    again = evaluate(distracted_oracle, tasks, k=1, n=4, seed=0)
    shifted = evaluate(distracted_oracle, tasks, k=1, n=4, seed=100)

    def strip(report: EvalReport) -> dict:
        return {k: v for k, v in report.metrics.items() if k != "wall_time_s"}

    assert strip(first) == strip(again) and first.episodes == again.episodes
    assert [t.messages for t in first.trajectories] == [t.messages for t in again.trajectories]
    assert [e["seed"] for e in shifted.episodes[:4]] == [100, 101, 102, 103]
    m = first.metrics
    assert 0.0 < m["success"] < 1.0, "the weak policy must fail some episodes and pass others"
    # the estimators are ordered as the maths says whenever some task is neither always nor never solved
    assert m["pass^4"] <= m["pass^2"] <= m["pass^1"] == m["success"] == m["pass@1"] <= m["pass@2"] <= m["pass@4"]
    assert m["pass^2"] < m["pass@2"]


def test_progress_bar_on_request(tasks: list[Task], capsys: pytest.CaptureFixture[str]) -> None:
    evaluate(oracle_policy, tasks[:2], progress=True)
    assert "episodes" in capsys.readouterr().err
    evaluate(oracle_policy, tasks[:2])  # short runs stay quiet by default
    assert capsys.readouterr().err == ""


def test_long_runs_off_a_terminal_log_their_progress(tasks: list[Task], caplog: pytest.LogCaptureFixture,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Under pytest stderr is not a terminal, as in a log file or a SageMaker job: a long run logs how many
    episodes are done about every tenth of the way instead of drawing a bar nobody sees."""
    from pipeline.evaluation import PROGRESS_MIN_EPISODES

    n = -(-PROGRESS_MIN_EPISODES // len(tasks))  # episodes per task, so the run is long enough
    with caplog.at_level("INFO", logger="pipeline.evaluation"):
        evaluate(oracle_policy, tasks, n=n)
    total = n * len(tasks)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("episodes ")]
    assert 5 <= len(lines) <= 11 and lines[-1].startswith(f"episodes {total}/{total} ")
    assert capsys.readouterr().err == ""


def test_bad_arguments_fail_fast(tasks: list[Task]) -> None:
    with pytest.raises(ValueError, match="n >= k"):
        evaluate(oracle_policy, tasks, k=4, n=2)
    with pytest.raises(ValueError, match="no tasks"):
        evaluate(oracle_policy, [])
    with pytest.raises(TypeError, match="oracle_policy"):
        evaluate(42, tasks)


def test_a_model_is_evaluated_through_the_rollout_engine(tiny_model_dir: Path, tasks: list[Task]) -> None:
    """Token metrics come from the engine's token data; greedy decoding makes the run repeatable."""
    kwargs = dict(max_turns=2, max_new_tokens=4, batch_size=2)  # shrunk: logic, not quality
    report = evaluate(str(tiny_model_dir), tasks[:2], **kwargs)
    again = evaluate(str(tiny_model_dir), tasks[:2], **kwargs)
    assert report.episodes == again.episodes
    assert report.config["source"] == "model"
    sampled = [sum(len(turn.completion_ids) for turn in t.turns) for t in report.trajectories]
    assert report.metrics["tokens_mean"] == sum(sampled) / 2 and all(0 < s <= 4 * 2 for s in sampled)
    assert report.metrics["episode_tokens_mean"] == sum(len(t.tokens.input_ids) for t in report.trajectories) / 2
    capped = sum(turn.truncated for t in report.trajectories for turn in t.turns)
    assert report.metrics["truncated_turns_rate"] == capped / sum(t.num_turns for t in report.trajectories)

    # A sequence budget smaller than the opening prompt ends every episode at once, by token budget.
    starved = evaluate(str(tiny_model_dir), tasks[:2], max_total_tokens=100, **kwargs)
    assert starved.metrics["max_tokens_rate"] == 1.0 and starved.metrics["truncation_rate"] == 1.0
    assert starved.metrics["completion"] == 0.0 and starved.metrics["turns_mean"] == 0.0


def test_continuous_and_static_schedules_report_the_same_episodes(tiny_model_dir: Path, tasks: list[Task]) -> None:
    """The schedule changes when episodes run, not what they do: continuous batching (the default) and
    static chunks of ``batch_size`` give the same per-episode results and transcripts, in task order, and
    the progress bar reaches every episode."""
    from pipeline.models import load_model

    model = load_model(str(tiny_model_dir))
    kwargs = dict(n=2, max_turns=3, max_new_tokens=4, batch_size=3)  # shrunk: 6 episodes, 3 slots
    continuous = evaluate(model, tasks[:3], **kwargs)
    static = evaluate(model, tasks[:3], schedule="static", **kwargs)
    assert continuous.config["schedule"] == "continuous" and static.config["schedule"] == "static"
    assert continuous.episodes == static.episodes
    assert [t.messages for t in continuous.trajectories] == [t.messages for t in static.trajectories]
    assert [(e["task_id"], e["seed"]) for e in continuous.episodes] == [(t.id, s) for t in tasks[:3] for s in (0, 1)]
    with pytest.raises(ValueError, match="schedule='chunks' is not a rollout schedule"):
        evaluate(model, tasks[:1], schedule="chunks", **kwargs)


# ---------------------------------------------------------------------------------------------------
# Resuming a killed evaluation
# ---------------------------------------------------------------------------------------------------


class Killed(Exception):
    """Stands for the kill that stops an evaluation part-way."""


def kill_after(monkeypatch: pytest.MonkeyPatch, saves: int) -> None:
    """Make the journal's ``saves + 1``-th save raise :class:`Killed`, after ``saves`` episodes were saved."""
    real = EpisodeJournal.append
    count = [0]

    def append(self: EpisodeJournal, trajectory: Trajectory) -> None:
        if count[0] == saves:
            raise Killed
        count[0] += 1
        real(self, trajectory)

    monkeypatch.setattr(EpisodeJournal, "append", append)


def counted(factory):
    """``factory`` (task -> policy), counting the episodes it is asked to play in ``.calls``."""

    def make(task: Task):
        make.calls += 1
        return factory(task)

    make.calls = 0
    return make


def transcripts(report: EvalReport) -> list:
    return [(t.task_id, t.seed, t.messages) for t in report.trajectories]


def test_a_killed_scripted_evaluation_resumes_where_it_stopped(tasks: list[Task], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal saves each episode as it ends; a resumed run plays only the rest and reports every episode,
    in the order and with the results of a run that was never stopped."""
    whole = evaluate(distracted_oracle, tasks[:4], n=2)
    journal = tmp_path / "journal.jsonl"
    with monkeypatch.context() as m:
        kill_after(m, 5)
        with pytest.raises(Killed):
            evaluate(distracted_oracle, tasks[:4], n=2, journal=journal)
    assert len(load_jsonl(journal)) == 5

    identity = journal.with_suffix(".json")  # the killed part recorded its time as it saved each episode
    assert 0 <= json.loads(identity.read_text())["wall_time_s"] < 1000
    identity.write_text(json.dumps({**json.loads(identity.read_text()), "wall_time_s": 1000.0}))

    policy = counted(distracted_oracle)
    resumed = evaluate(policy, tasks[:4], n=2, journal=journal, resume=True, label="distracted_oracle")
    assert policy.calls == 3  # 8 episodes, 5 saved before the kill
    assert resumed.episodes == whole.episodes and transcripts(resumed) == transcripts(whole)
    assert resumed.config["resumed_episodes"] == 5
    assert resumed.metrics["wall_time_total_s"] == pytest.approx(1000 + resumed.metrics["wall_time_s"], abs=0.2)
    assert json.loads(identity.read_text())["wall_time_s"] >= 1000  # and the journal counts on from there
    assert "wall_time_total_s" not in whole.metrics  # a run in one piece: wall_time_s is the whole time
    assert len(load_jsonl(journal)) == 8  # the journal now holds the whole run

    # Resuming a finished journal plays nothing; without resume the journal starts over and all is played.
    again = counted(distracted_oracle)
    assert evaluate(again, tasks[:4], n=2, journal=journal, resume=True, label="distracted_oracle").episodes == \
        whole.episodes
    assert again.calls == 0
    fresh = counted(distracted_oracle)
    restarted = evaluate(fresh, tasks[:4], n=2, journal=journal, label="distracted_oracle")
    assert fresh.calls == 8 and "resumed_episodes" not in restarted.config
    assert restarted.episodes == whole.episodes and len(load_jsonl(journal)) == 8


def test_a_killed_model_evaluation_resumes_where_it_stopped(tiny_model_dir: Path, tasks: list[Task], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine hands each episode over as it ends (continuous batching ends them out of task order), so a
    model's evaluation resumes too, with the same greedy episodes, token data included."""
    from pipeline.models import load_model
    from pipeline.rollout import RolloutEngine

    model = load_model(str(tiny_model_dir))
    kwargs = dict(n=2, max_turns=3, max_new_tokens=4, batch_size=3, label="tiny")  # shrunk: 6 episodes, 3 slots
    whole = evaluate(model, tasks[:3], **kwargs)
    journal = tmp_path / "journal.jsonl"
    with monkeypatch.context() as m:
        kill_after(m, 2)
        with pytest.raises(Killed):
            evaluate(model, tasks[:3], journal=journal, **kwargs)

    played: list[int] = []
    real_run = RolloutEngine.run
    monkeypatch.setattr(RolloutEngine, "run", lambda self, f, tasks, seeds, *a, **kw: played.append(len(tasks)) or
                        real_run(self, f, tasks, seeds, *a, **kw))
    resumed = evaluate(model, tasks[:3], journal=journal, resume=True, **kwargs)
    assert played == [4] and resumed.config["resumed_episodes"] == 2
    assert resumed.episodes == whole.episodes and transcripts(resumed) == transcripts(whole)
    assert [t.tokens.input_ids for t in resumed.trajectories] == [t.tokens.input_ids for t in whole.trajectories]
    assert resumed.config["source"] == "model" and resumed.config["tool_calling"] == whole.config["tool_calling"]


def test_a_torn_last_episode_is_dropped_and_played_again(tasks: list[Task], tmp_path: Path) -> None:
    """A kill in the middle of a save leaves a line without its end: the resume cuts it and replays that episode."""
    whole = evaluate(oracle_policy, tasks[:3], label="oracle")
    journal = tmp_path / "journal.jsonl"
    evaluate(oracle_policy, tasks[:3], journal=journal, label="oracle")
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text(lines[0] + lines[1][: len(lines[1]) // 2])

    policy = counted(oracle_policy)
    resumed = evaluate(policy, tasks[:3], journal=journal, resume=True, label="oracle")
    assert policy.calls == 2 and resumed.config["resumed_episodes"] == 1
    assert resumed.episodes == whole.episodes
    assert len(load_jsonl(journal)) == 3


def test_a_resume_with_other_options_is_refused(tasks: list[Task], tmp_path: Path) -> None:
    """Episodes of one run are never mixed into another's report: the journal records what it was played with."""
    journal = tmp_path / "journal.jsonl"
    evaluate(oracle_policy, tasks[:3], n=2, max_turns=12, journal=journal, label="oracle")
    with pytest.raises(ValueError, match=r"journal\.json: the saved episodes were played with max_turns 12, this run "
                                         r"asks for 16; resume with the options of the run that saved them"):
        evaluate(oracle_policy, tasks[:3], n=2, max_turns=16, journal=journal, resume=True, label="oracle")
    with pytest.raises(ValueError, match=rf"played with 3 tasks \(task 3: {tasks[2].id}\), this run asks for 3 tasks "
                                         rf"\(task 3: {tasks[3].id}\)"):
        evaluate(oracle_policy, [*tasks[:2], tasks[3]], n=2, max_turns=12, journal=journal, resume=True,
                 label="oracle")
    with pytest.raises(ValueError, match="played with policy 'oracle', this run asks for 'other'"):
        evaluate(oracle_policy, tasks[:3], n=2, max_turns=12, journal=journal, resume=True, label="other")
    journal.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="journal.json: cannot read which run the saved episodes belong to"):
        evaluate(oracle_policy, tasks[:3], n=2, max_turns=12, journal=journal, resume=True, label="oracle")


def test_a_resume_refuses_a_model_directory_retrained_in_place(tiny_model_dir: Path, tasks: list[Task],
                                                               tmp_path: Path) -> None:
    """The journal knows a model directory by its weights, not its name: new weights under the same path would
    mix two models in one report."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    kwargs = dict(max_turns=2, max_new_tokens=4, batch_size=2)
    journal = tmp_path / "journal.jsonl"
    first = evaluate(str(model_dir), tasks[:2], journal=journal, **kwargs)
    again = evaluate(str(model_dir), tasks[:2], journal=journal, resume=True, **kwargs)
    assert again.config["resumed_episodes"] == 2 and again.episodes == first.episodes

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(model_dir)
    with pytest.raises(ValueError, match=rf"journal\.json: the weights in {re.escape(str(model_dir))} are not those "
                                         r"the saved episodes were played with \(sha256 [0-9a-f]{16} then, "
                                         r"[0-9a-f]{16} now\); rerun without --resume"):
        evaluate(str(model_dir), tasks[:2], journal=journal, resume=True, **kwargs)


def test_resume_without_a_journal_starts_from_the_beginning(tasks: list[Task], tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    policy = counted(oracle_policy)
    with caplog.at_level("WARNING", logger="pipeline.evaluation"):
        report = evaluate(policy, tasks[:2], journal=tmp_path / "new" / "journal.jsonl", resume=True)
    assert policy.calls == 2 and "resumed_episodes" not in report.config
    assert "no saved episodes in" in caplog.text
    assert len(load_jsonl(tmp_path / "new" / "journal.jsonl")) == 2


# ---------------------------------------------------------------------------------------------------
# Side by side
# ---------------------------------------------------------------------------------------------------


def _report(label: str, outcomes: dict[tuple[str, int], bool]) -> EvalReport:
    runs = [_episode(tid, seed, ok) for (tid, seed), ok in outcomes.items()]
    return evaluate_trajectories(runs, HAND_TASKS, label=label)


def test_compare_pairs_episodes_and_counts_who_won() -> None:
    keys = [(t, s) for t in "abcd" for s in range(2)]
    base = _report("base", {key: key[0] in "ab" for key in keys})  # passes a, b
    tuned = _report("tuned", {key: key[0] in "bcd" for key in keys})  # passes b, c, d
    c = compare(tuned, base, n_boot=2000, seed=1)
    assert (c.n_pairs, c.n_tasks) == (8, 4)
    assert (c.both_pass, c.candidate_only, c.base_only, c.both_fail) == (2, 4, 2, 0)
    assert (c.candidate_success, c.base_success, c.difference) == (6 / 8, 4 / 8, 2 / 8)
    assert c.ci_low <= c.difference <= c.ci_high
    # resampling whole tasks: per-task differences are -1, 0, +1, +1, so every resampled mean is a multiple of 1/4
    assert c.ci_low * 4 == round(c.ci_low * 4) and c.ci_high * 4 == round(c.ci_high * 4)
    assert {(t.task_id, t.outcome.success) for t, _ in c.disagreements} == {("a", False), ("c", True), ("d", True)}
    assert len(c.disagreements) == 6
    again = compare(tuned, base, n_boot=2000, seed=1)
    assert (again.ci_low, again.ci_high) == (c.ci_low, c.ci_high)
    assert again.by_intent == c.by_intent
    # Per intent, resampling that intent's tasks only: cancel (a, b) loses a; refund (c) and the multi-intent
    # task d are won on every seed, so their intervals cannot move off +1.
    assert list(c.by_intent) == ["cancel", "multi", "refund"]
    cancel = c.by_intent["cancel"]
    assert (cancel["n_tasks"], cancel["n_pairs"], cancel["candidate_success"], cancel["base_success"]) == (2, 4, 0.5, 1.0)
    assert cancel["difference"] == -0.5 and cancel["ci_low"] == -1.0 and cancel["ci_high"] == 0.0
    for label in ("multi", "refund"):
        assert {k: c.by_intent[label][k] for k in ("n_tasks", "difference", "ci_low", "ci_high")} == {
            "n_tasks": 1, "difference": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    assert c.to_dict()["by_intent"] == c.by_intent
    assert c.to_dict()["statement"] == c.statement() and "tuned vs base" in c.statement()


def test_compare_pairs_reports_read_back_from_report_json_as_it_pairs_the_played_ones() -> None:
    """A saved report has its episode records but no trajectories: the comparison is the same, only without
    the transcripts of the episodes where the two disagree."""
    keys = [(t, s) for t in "abcd" for s in range(2)]
    base = _report("base", {key: key[0] in "ab" for key in keys})
    tuned = _report("tuned", {key: key[0] in "bcd" for key in keys})
    played = compare(tuned, base, n_boot=2000, seed=1)
    saved = [EvalReport.from_dict(json.loads(json.dumps(r.to_dict()))) for r in (tuned, base)]
    assert all(not r.trajectories for r in saved)
    again = compare(*saved, n_boot=2000, seed=1)
    assert again.disagreements == [] and len(played.disagreements) == 6
    assert again.to_dict() == played.to_dict()  # the statistics and the disagreeing episodes listed
    assert [(c["task_id"], c["seed"], c["success"]) for c, _ in again.disagreeing] == \
        [(t.task_id, t.seed, t.outcome.success) for t, _ in played.disagreements]
    mixed = compare(saved[0], base, n_boot=2000, seed=1)  # transcripts need both sides
    assert mixed.disagreements == [] and mixed.to_dict() == played.to_dict()


def test_compare_says_plainly_whether_the_difference_is_significant() -> None:
    keys = [(t, s) for t in "abcd" for s in range(4)]
    everything = _report("tuned", {key: True for key in keys})
    nothing = _report("base", {key: False for key in keys})
    better = compare(everything, nothing, n_boot=500)
    assert (better.difference, better.ci_low, better.ci_high, better.significant) == (1.0, 1.0, 1.0, True)
    assert "significant: the interval excludes 0, so the candidate is better" in better.statement()
    assert compare(nothing, everything, n_boot=500).statement().endswith("so the candidate is worse.")
    same = compare(nothing, _report("same", {key: False for key in keys}), n_boot=500)
    assert (same.difference, same.significant) == (0.0, False)
    assert "not significant: the interval includes 0" in same.statement()


def test_compare_only_pairs_the_same_task_and_seed() -> None:
    tuned = _report("tuned", {("a", 0): True, ("a", 1): True, ("b", 0): True})
    base = _report("base", {("a", 1): False, ("b", 0): True, ("c", 0): False})
    c = compare(tuned, base, n_boot=100)
    assert c.n_pairs == 2 and c.difference == 0.5
    with pytest.raises(ValueError, match="share no episode"):
        compare(_report("x", {("a", 0): True}), _report("y", {("a", 1): True}))


def test_a_fully_resumed_evaluation_of_a_named_model_loads_no_weights(tiny_model_dir: Path, tasks: list[Task],
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every episode is in the journal: the report comes from it, and the model is not loaded (minutes for a
    large one); the tool protocol in its config still comes from the model's tokenizer."""
    import pipeline.models

    kwargs = dict(max_turns=2, max_new_tokens=4, batch_size=2)
    journal = tmp_path / "journal.jsonl"
    first = evaluate(str(tiny_model_dir), tasks[:2], journal=journal, **kwargs)
    monkeypatch.setattr(pipeline.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    again = evaluate(str(tiny_model_dir), tasks[:2], journal=journal, resume=True, **kwargs)
    assert again.config["resumed_episodes"] == 2 and again.episodes == first.episodes
    assert transcripts(again) == transcripts(first)
    assert {k: again.config[k] for k in ("source", "tool_calling", "schedule")} == \
           {k: first.config[k] for k in ("source", "tool_calling", "schedule")}
