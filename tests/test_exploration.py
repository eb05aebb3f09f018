"""benchmarks/exploration.py: how often sampled rollouts take the actions the oracle takes, per intent. The
model-free parts are checked here with scripted policies whose groups are mixed by construction."""

from __future__ import annotations

import pytest

from pipeline.envs import load_tasks, oracle_policy
from pipeline.envs.tasks import intent_label
from pipeline.evaluation import evaluate


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("exploration")


def alternating():
    """A policy factory that plays the oracle in every other episode and small talk in the rest."""
    episodes = iter(range(10**6))

    def factory(task):
        if next(episodes) % 2 == 0:
            return oracle_policy(task)
        return lambda messages: "Thanks for waiting, I am looking into it."

    return factory


def test_pick_tasks_takes_the_first_of_each_intent_and_names_a_missing_one(script) -> None:
    tasks = load_tasks("customer_service", "train")
    picked = script.pick_tasks(tasks, ["escalation", "multi"], 3)
    assert [intent_label(t.intents) for t in picked] == ["escalation"] * 3 + ["multi"] * 3
    assert picked[:3] == [t for t in tasks if intent_label(t.intents) == "escalation"][:3]
    with pytest.raises(SystemExit, match=r"no task with intent label refunds; the task set has address_change, "):
        script.pick_tasks(tasks, ["escalation", "refunds"], 1)
    # Tasks an SFT run was shown solved are left out; the next ones of the intent take their place.
    shown = {picked[0].id, picked[4].id}
    again = script.pick_tasks(tasks, ["escalation", "multi"], 3, leave_out=shown)
    assert not shown & {t.id for t in again} and [intent_label(t.intents) for t in again] == [
        "escalation"] * 3 + ["multi"] * 3
    assert again[:2] == picked[1:3] and again[3] == picked[3]


def test_mixed_groups_and_the_oracle_tools_each_rollout_tried(script) -> None:
    tasks = script.pick_tasks(load_tasks("customer_service", "train"), ["escalation", "address_change"], 2)
    oracle = evaluate(oracle_policy, tasks, max_turns=16, label="oracle")
    played = evaluate(alternating(), tasks, n=2, max_turns=16, label="half")
    rows = script.summarize_exploration(played, oracle)
    assert set(rows) == {"escalation", "address_change"}
    for label, row in rows.items():
        assert (row["rollouts"], row["tasks"]) == (4, 2)
        assert row["success"] == 0.5 and row["mixed_groups"] == 1.0  # each task: one oracle, one small-talk episode
        assert row["tools"]["verify_identity"] == {"tried": 0.5, "oracle": 1.0}
        for task_row in row["per_task"].values():
            assert (task_row["successes"], task_row["rollouts"], task_row["tried"]["verify_identity"]) == (1, 2, 1)
    assert rows["escalation"]["tools"]["escalate_to_human"] == {"tried": 0.5, "oracle": 1.0}
    assert "update_shipping_address" in rows["address_change"]["tools"]
    # A group that all succeeds is not mixed; a tool tried only through an error still counts as tried.
    every = evaluate(oracle_policy, tasks, n=2, max_turns=16, label="all")
    for e in every.episodes:
        e["tool_calls"].pop("escalate_to_human", None)
    assert intent_label(every.episodes[0]["intents"]) == "escalation"
    every.episodes[0]["failed_calls"] = {"escalate_to_human": 1}
    again = script.summarize_exploration(every, oracle)["escalation"]
    assert again["mixed_groups"] == 0.0 and again["success"] == 1.0
    assert again["tools"]["escalate_to_human"]["tried"] == 1 / 4


def test_settings_that_cannot_explore_are_refused(script, capsys) -> None:
    for flags in (["--samples", "1"], ["--temperature", "0"], ["--per_intent", "0"]):
        with pytest.raises(SystemExit):
            script.main(["--model", "unused", "--intents", "escalation", *flags])
        assert "greedy decoding does not explore" in capsys.readouterr().err
