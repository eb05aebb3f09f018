"""Tests for rewards/naive.py: each naive scorer on hand-built chats, and the negative examples really are
hackable (that is their job)."""

from __future__ import annotations

from pipeline.envs import make_env
from pipeline.rollout import run_policy
from rewards import build_reward
from rewards.hacks import hacks_for

HACKS = hacks_for("customer_service")
from rewards.naive import ToolCallAttempts, customer_thanks, resolution_claimed, turn_penalty

from .conftest import assistant, call, chat, user

LENIENT = "configs/rewards/lenient_example.yaml"


def test_the_lenient_example_pays_tool_spam_more_than_the_oracle(test_tasks):
    from pipeline.envs import oracle_policy

    reward = build_reward(LENIENT)
    task = test_tasks[0]
    spam = reward(run_policy(make_env(task), task, HACKS["tool_spam"](task)))
    oracle = reward(run_policy(make_env(task), task, oracle_policy(task)))
    assert spam.total > oracle.total and spam.clipped
    claim = reward(run_policy(make_env(task), task, HACKS["resolve_no_action"](task)))
    assert claim.components["resolution_claim"] == 1.0 and claim.total > 0


# -- each naive scorer on hand-built conversations -------------------------------------------------


def test_tool_call_attempts_pays_formats_the_environment_rejects_up_to_the_cap():
    fence, bare = '```json\n{"name": "get_order"}\n```', "{'name': 'get_order', 'arguments': {}}"
    t = chat(user("hi"), assistant(fence), user("?"), assistant(bare), user("?"), assistant("Just text."),
             user("?"), assistant("\n".join([call("get_order", order_id="W1")] * 4)))
    assert [ToolCallAttempts()(t, i).value for i in range(4)] == [1.0, 1.0, 0.0, 4.0]  # capped at 4
    assert ToolCallAttempts(cap=2)(t, 3).value == 2.0


def test_resolution_claimed_takes_the_agents_word():
    assert resolution_claimed(chat(user("refund?"), assistant("All set, it's been taken care of."))) == 1.0
    assert resolution_claimed(chat(user("refund?"), assistant("Could you share the order number?"))) == 0.0


def test_customer_thanks_reads_only_the_last_customer_message():
    assert customer_thanks(chat(user("hi"), assistant("a"), user("Thank you!"))) == 1.0
    assert customer_thanks(chat(user("Thanks in advance"), assistant("a"), user("This is useless."))) == 0.0


def test_turn_penalty_charges_every_turn():
    t = chat(user("hi"), assistant("a"), user("b"), assistant("c"))
    assert [turn_penalty(t, i) for i in range(2)] == [-1.0, -1.0]
