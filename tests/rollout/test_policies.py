"""Tests for pipeline/rollout/policies.py: run_policy and run_batched with scripted policies."""

from __future__ import annotations

import pytest

from pipeline.envs import Task, load_tasks, make_env, oracle_policy
from pipeline.rollout import run_batched, run_policy
from pipeline.trajectory import Trajectory


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return load_tasks("customer_service", "test")[:12]


def chatter(messages: list[dict]) -> str:
    return "Our store was founded in 1998."


def test_run_policy_returns_a_complete_trajectory(tasks):
    task = tasks[0]
    env = make_env(task)
    seen: list[list[dict]] = []

    def policy(messages):
        seen.append(messages)
        return oracle_policy(task)(messages)

    trajectory = run_policy(env, task, policy, seed=3)
    assert isinstance(trajectory, Trajectory)
    assert trajectory.task_id == task.id and trajectory.seed == 3
    assert trajectory.outcome == env.outcome() and trajectory.outcome.success
    assert trajectory.tokens is None
    assistant = [m["content"] for m in trajectory.messages if m["role"] == "assistant"]
    assert trajectory.num_turns == len(trajectory.turns) == len(assistant)
    assert [t.assistant for t in trajectory.turns] == assistant
    assert [t.index for t in trajectory.turns] == list(range(len(trajectory.turns)))
    assert trajectory.turns[-1].info["stop_reason"] == "resolved"
    assert all(t.info["stop_reason"] is None for t in trajectory.turns[:-1])
    # The policy saw the conversation so far each turn: system prompt first, and exactly what came back.
    assert seen[0] == trajectory.messages[:2] and seen[0][0]["role"] == "system"
    rebuilt = list(seen[0])
    for turn in trajectory.turns:
        rebuilt += [{"role": "assistant", "content": turn.assistant}, *turn.env_messages]
    assert rebuilt == trajectory.messages


def test_run_policy_stops_on_the_turn_budget(tasks):
    task = next(t for t in tasks if t.payload["customer"]["persona"]["patience"] > 3)
    trajectory = run_policy(make_env(task, max_turns=3), task, chatter)
    assert trajectory.num_turns == 3
    assert (trajectory.outcome.stop_reason, trajectory.outcome.completed) == ("max_turns", False)


def test_run_policy_gives_the_policy_a_copy(tasks):
    """A policy that scribbles on its input cannot corrupt the recorded conversation."""
    task = tasks[0]

    def vandal(messages):
        reply = oracle_policy(task)(messages)
        messages.clear()
        return reply

    expected = run_policy(make_env(task), task, oracle_policy(task)).messages
    assert run_policy(make_env(task), task, vandal).messages == expected


def test_run_batched_matches_run_policy(tasks):
    """Batched episodes (mixed good and bad policies, per-task seeds) equal the same episodes run alone."""
    policies = {t.id: (oracle_policy(t) if i % 2 == 0 else chatter) for i, t in enumerate(tasks)}
    seeds = list(range(len(tasks)))
    # A batch policy only sees conversations; the customer's opening tells it which task each one is.
    openings = {make_env(t).reset(t, seed=s)[1]["content"]: t.id for t, s in zip(tasks, seeds)}
    assert len(openings) == len(tasks)
    batch_sizes, progress = [], []

    def batch_policy(conversations):
        batch_sizes.append(len(conversations))
        return [policies[openings[c[1]["content"]]](c) for c in conversations]

    batched = run_batched(make_env, tasks, batch_policy, seeds=seeds, on_turn=lambda a, f: progress.append((a, f)))
    alone = [run_policy(make_env(t), t, policies[t.id], seed=s) for t, s in zip(tasks, seeds)]
    assert [b.task_id for b in batched] == [t.id for t in tasks]
    for b, a in zip(batched, alone):
        assert (b.messages, b.turns, b.outcome, b.seed) == (a.messages, a.turns, a.outcome, a.seed)
    assert batch_sizes[0] == len(tasks) and batch_sizes == sorted(batch_sizes, reverse=True)
    assert progress[-1] == (0, len(tasks))
    assert all(a + f == len(tasks) for a, f in progress)


def test_run_batched_refuses_a_wrong_number_of_replies(tasks):
    with pytest.raises(ValueError, match="replies"):
        run_batched(make_env, tasks[:3], lambda conversations: ["hi"])

