"""Tests for pipeline/trajectory.py: trajectories survive JSONL and `datasets` round trips exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.envs import Task, load_tasks, make_env, oracle_policy
from pipeline.rollout import run_policy
from pipeline.trajectory import (
    TokenData,
    Trajectory,
    atomic_write_text,
    from_dataset,
    load_jsonl,
    save_jsonl,
    to_dataset,
)


def bad_policy(messages: list[dict]) -> str:
    """Fails in every way it can: broken calls, a forbidden call, then chatter until the customer leaves."""
    script = ['<tool_call>{"name": "get_order", "arguments": {</tool_call>',
              '<tool_call>{"name": "get_order", "arguments": {"order_id": "W1000001"}}</tool_call>',
              None]
    turn = sum(m["role"] == "assistant" for m in messages)
    return script[min(turn, len(script) - 1)] or "Anything else?"


@pytest.fixture(scope="module")
def trajectories() -> list[Trajectory]:
    """Oracle episodes of mixed intents (one with token data) plus a failing episode with violations."""
    tasks: list[Task] = load_tasks("customer_service", "test")[:6]
    out = [run_policy(make_env(t), t, oracle_policy(t), seed=i) for i, t in enumerate(tasks)]
    out.append(run_policy(make_env(tasks[0]), tasks[0], bad_policy, seed=9))
    first = out[0]
    first.turns[0].completion_ids = [5, 17, 3]
    first.turns[0].logprobs = [-0.125, -2.5e-07, -3.0000001]
    first.turns[0].truncated = True
    first.tokens = TokenData(input_ids=[1, 5, 17, 3, 2], assistant_mask=[0, 1, 1, 1, 0],
                             logprobs=[0.0, -0.125, -2.5e-07, -3.0000001, 0.0], turn_spans=[(1, 4)])
    first.metadata = {"model": "tiny", "temperature": 0.7}
    return out


def test_fixture_covers_failures_and_violations(trajectories):
    assert any(t.outcome.success for t in trajectories)
    failed = trajectories[-1]
    assert not failed.outcome.success and failed.outcome.violations == ["identity_verification@1"]
    assert any(turn.info.get("tool_errors") for turn in failed.turns)


def test_jsonl_round_trip_is_exact(trajectories, tmp_path):
    path = tmp_path / "out" / "rollouts.jsonl"
    save_jsonl(trajectories, path)
    loaded = load_jsonl(path)
    assert loaded == trajectories
    for a, b in zip(loaded, trajectories):
        assert a.messages == b.messages and a.turns == b.turns and a.outcome == b.outcome
        assert a.num_turns == b.num_turns
    assert loaded[0].tokens.turn_spans == [(1, 4)]


def test_save_leaves_no_temporary_files(trajectories, tmp_path):
    path = tmp_path / "rollouts.jsonl"
    save_jsonl(trajectories[:2], path)
    save_jsonl(trajectories, path)  # overwrite in place
    assert os.listdir(tmp_path) == ["rollouts.jsonl"]
    assert len(path.read_text().splitlines()) == len(trajectories)


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "data.txt"
    atomic_write_text(path, "old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["data.txt"]


def test_load_jsonl_names_the_bad_line(tmp_path, trajectories):
    path = tmp_path / "rollouts.jsonl"
    save_jsonl(trajectories[:1], path)
    with path.open("a") as f:
        f.write("\n{\"task_id\": \"x\"}\n")
    with pytest.raises(ValueError) as info:
        load_jsonl(path)
    assert str(path) in str(info.value) and "line 3" in str(info.value)


def test_dataset_round_trip_is_exact(trajectories):
    dataset = to_dataset(trajectories)
    assert len(dataset) == len(trajectories)
    assert dataset[0]["messages"] == trajectories[0].messages  # a structured column, not a string
    assert dataset["success"] == [t.outcome.success for t in trajectories]
    assert from_dataset(dataset) == trajectories


def test_dataset_round_trip_through_disk(trajectories, tmp_path: Path):
    from datasets import load_from_disk

    to_dataset(trajectories).save_to_disk(str(tmp_path / "ds"))
    assert from_dataset(load_from_disk(str(tmp_path / "ds"))) == trajectories
