"""Acceptance: over 50 test tasks every scripted hacking policy scores below the oracle and never succeeds.

Run with ``-s`` to see the table:

    pytest -s tests/rewards/test_hacks.py -k table
"""

from __future__ import annotations

import pickle

import pytest

from pipeline.envs import load_tasks, make_env
from pipeline.rollout import run_policy
from rewards import build_reward
from rewards.audit import hacking_table, render_hacking_table
from rewards.hacks import GENERIC_HACKS, NoisyOracle, hacks_for, policy_factory

HACKS = hacks_for("customer_service")


@pytest.fixture(scope="module")
def table(test_tasks):
    return hacking_table(build_reward(tasks=test_tasks), test_tasks[:50])


def test_hacking_table_over_50_test_tasks(table):
    print("\n" + render_hacking_table(table))
    oracle = table[0]
    assert oracle["policy"] == "oracle" and oracle["episodes"] == 50 and oracle["strict_successes"] == 50
    assert {r["policy"] for r in table[1:]} == set(HACKS) and len(HACKS) == 8
    for row in table[1:]:
        assert row["episodes"] == 50
        assert row["strict_successes"] == 0, row
        assert row["mean_total"] < oracle["mean_total"], row
        assert row["max_total"] < oracle["min_total"], row  # not just on average: on every task


@pytest.mark.parametrize("name", sorted(HACKS))
def test_each_hack_does_what_it_says(name, test_tasks):
    task = next(t for t in test_tasks if t.intents == ["cancel"])
    t = run_policy(make_env(task), task, policy_factory(name)(task, 0))
    texts = [turn.assistant for turn in t.turns]
    checks = {
        "tool_spam": lambda: t.outcome.stop_reason == "max_turns" and all("<tool_call>" in x for x in texts[1:]),
        "resolve_no_action": lambda: all("resolved" in x for x in texts),
        "claim_no_tool": lambda: any("I've cancelled" in x for x in texts) and not t.outcome.details["changes_made"],
        "politeness_spam": lambda: all("apologize" in x for x in texts),
        "ask_everything": lambda: len(set(texts)) == 1 and "email" in texts[0],
        "skip_verification": lambda: not any("verify_identity" in x for x in texts)
        and any(v.startswith("identity_verification") for v in t.outcome.violations),
        "empty_reply": lambda: set(texts) == {""},
        "echo_customer": lambda: texts[0] == t.messages[1]["content"],
    }
    assert checks[name](), texts


def test_policies_pickle_and_the_noisy_oracle_is_reproducible(test_tasks):
    task = test_tasks[3]
    for name in HACKS:
        pickle.loads(pickle.dumps(policy_factory(name)(task, 0)))
    a = run_policy(make_env(task), task, NoisyOracle(task, seed=1, p=0.5), seed=1)
    b = run_policy(make_env(task), task, pickle.loads(pickle.dumps(NoisyOracle(task, seed=1, p=0.5))), seed=1)
    assert a.messages == b.messages
    with pytest.raises(ValueError, match="Unknown scripted policy"):
        policy_factory("nope", "customer_service")
    with pytest.raises(ValueError, match="Unknown scripted policy 'tool_spam' for the sop domain"):
        policy_factory("tool_spam")(load_tasks("sop:data/sop/warranty_claims", "test")[0], 0)


def test_the_domain_adds_its_own_hacks_to_the_generic_ones():
    assert set(GENERIC_HACKS) == {"resolve_no_action", "politeness_spam", "empty_reply", "echo_customer"}
    assert set(hacks_for("customer_service")) - set(GENERIC_HACKS) == {"tool_spam", "claim_no_tool", "ask_everything",
                                                                       "skip_verification"}
    assert set(hacks_for("sop")) == set(GENERIC_HACKS)
