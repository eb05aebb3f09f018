"""Tests for rewards/outcome.py: terminal scorers on hand-built outcomes and on scripted episodes."""

from __future__ import annotations

import pytest

from pipeline.envs import make_env, oracle_policy
from pipeline.envs.base import Outcome
from pipeline.rollout import run_policy
from rewards.outcome import (
    CustomerSatisfaction,
    FieldAccuracy,
    PartialCredit,
    PolicyCompliance,
    TurnEfficiency,
    field_correct,
    strict_success,
)

from .conftest import assistant, chat


def episode(outcome: Outcome, turns: int = 1):
    return chat(*[assistant("ok")] * turns, outcome=outcome)


def test_strict_success_is_the_environments_verdict():
    assert strict_success(episode(Outcome(True, True, "resolved"))) == 1.0
    assert strict_success(episode(Outcome(False, True, "resolved"))) == 0.0
    assert strict_success(chat(assistant("ok"))) is None  # outcome unknown: not applicable


def test_partial_credit_counts_verified_changes_and_takes_back_unexpected_ones():
    scorer = PartialCredit()
    half = {"changes_made": 1, "changes_expected": 2, "state_diff": {"k2": 1}}
    assert scorer(episode(Outcome(False, True, "user_left", details=half))).value == 0.5
    wrong_extra = {"changes_made": 2, "changes_expected": 2, "state_diff": {"orders/W2/status": "cancelled"}}
    assert scorer(episode(Outcome(False, True, "resolved", details=wrong_extra))).value == 0.5
    nothing_to_change = {"changes_made": 0, "changes_expected": 0, "state_diff": {}}
    assert scorer(episode(Outcome(True, True, "resolved", details=nothing_to_change))).value == 0.0
    assert scorer(chat(assistant("ok"))) is None


def test_partial_credit_counts_facts_told_when_the_task_is_bound(test_tasks):
    task = next(t for t in test_tasks if t.intents == ["order_status"] and len(t.payload["goals"][0]["facts"]) == 2)
    oracle = oracle_policy(task)

    def stop_before_tracking(messages):  # the oracle, but it never tells the tracking number
        reply = oracle(messages)
        return "Your order has shipped." if "tracking number is" in reply else reply

    t = run_policy(make_env(task, max_turns=8), task, stop_before_tracking)
    scorer = PartialCredit()
    assert scorer(t).value == 0.0  # nothing to change, and without the task the facts are unknown
    scorer.bind({task.id: task})
    assert scorer(t).value == 0.5 and scorer(t).reason == "facts 1/2"


@pytest.mark.parametrize("fields, expected", [
    ({"a": {"expected": 1, "actual": 1}, "b": {"expected": 2, "actual": 2}}, 1.0),  # right and emitted
    ({"a": {"expected": 1, "actual": 3}, "b": {"expected": 2, "actual": 4}}, 0.0),  # emitted, wrong: no format credit
    ({"a": {"expected": 1, "actual": None}, "b": {"expected": 2, "actual": None}}, -0.1),  # not emitted
    ({"a": True, "b": False}, 0.5),
    ({"a": {"correct": True, "emitted": True}, "b": {"correct": False, "emitted": False}}, 0.45),
])
def test_field_accuracy_is_field_acc_plus_format_coef_times_emitted_minus_one(fields, expected):
    value = FieldAccuracy(format_coef=0.1)(episode(Outcome(False, True, "final_output", fields=fields))).value
    assert value == pytest.approx(expected)


def test_field_accuracy_does_not_apply_without_fields_and_checks_its_coefficient():
    assert FieldAccuracy()(episode(Outcome(True, True, "resolved"))) is None
    with pytest.raises(ValueError, match="format_coef"):
        FieldAccuracy(format_coef=2.0)
    assert field_correct({"expected": "x", "actual": "X"}) is False  # strict, like the evaluation


def test_policy_compliance_is_a_penalty_only():
    scorer = PolicyCompliance(per_violation=0.5)
    assert scorer(episode(Outcome(True, True, "resolved"))).value == 0.0
    assert scorer(episode(Outcome(False, True, "resolved", violations=["refund_limit@3"]))).value == -0.5
    assert scorer(episode(Outcome(False, True, "resolved", violations=["a@1", "b@2", "c@3"]))).value == -1.0
    with pytest.raises(ValueError):
        PolicyCompliance(per_violation=0)


@pytest.mark.parametrize("stop, frustration, expected", [
    ("resolved", 0, 1.0), ("resolved", 2, 0.8), ("resolved", 9, 0.5), ("user_left", 0, -1.0),
    ("max_turns", 1, -0.5), ("max_tokens", 0, -0.5), ("final_output", 0, None), (None, 0, None),
])
def test_customer_satisfaction_reads_how_the_conversation_ended(stop, frustration, expected):
    score = CustomerSatisfaction()(episode(Outcome(False, True, stop, details={"frustration": frustration})))
    assert (score if score is None else score.value) == (None if expected is None else pytest.approx(expected))


def test_turn_efficiency_pays_only_successful_episodes():
    scorer = TurnEfficiency(max_turns=10)
    assert scorer(episode(Outcome(True, True, "resolved"), turns=4)).value == pytest.approx(0.6)
    assert scorer(episode(Outcome(False, True, "user_left"), turns=1)).value == 0.0  # a short failure earns nothing
    with pytest.raises(ValueError):
        TurnEfficiency(max_turns=0)


def test_on_real_episodes_the_oracle_beats_an_empty_policy(test_tasks):
    task = test_tasks[2]
    good = run_policy(make_env(task), task, oracle_policy(task))
    bad = run_policy(make_env(task), task, lambda m: "")
    for scorer in (strict_success, PartialCredit(), CustomerSatisfaction(), TurnEfficiency()):
        g, b = scorer(good), scorer(bad)
        g, b = getattr(g, "value", g), getattr(b, "value", b)
        assert g > b, scorer


def test_field_accuracy_on_sop_episodes_charges_only_a_missing_final_output():
    """SOP tasks report one final output per episode: emitted is 0 or 1, whatever the fields say."""
    import json

    from pipeline.envs import load_tasks

    task = load_tasks("sop:data/sop/warranty_claims", "test")[0]
    expected = task.payload["expected"]

    def final(**changes):
        return lambda messages: "<final_output>" + json.dumps({**expected, **changes}) + "</final_output>"

    cases = [(oracle_policy(task), 1.0), (final(), 1.0), (final(decision="nonsense"), 2 / 3),
             (final(decision="x", reason_code="x", recall_id="x"), 0.0),  # emitted, all wrong: no format credit
             (lambda messages: "<final_output>{broken</final_output>", -0.1),  # malformed: not emitted
             (lambda messages: "Still working on it.", -0.1)]  # budget ran out without a final output
    for policy, value in cases:
        trajectory = run_policy(make_env(task, max_turns=8), task, policy)
        assert FieldAccuracy(format_coef=0.1)(trajectory).value == pytest.approx(value, abs=1e-6)
