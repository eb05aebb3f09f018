"""Tests for rewards/rules.py: each per-turn scorer on hand-built conversations and scripted rollouts."""

from __future__ import annotations

import pickle

import pytest

from pipeline.envs import make_env
from pipeline.envs.base import Outcome
from pipeline.rollout import run_policy
from rewards.rules import (
    Politeness,
    RedundantRequest,
    Repetition,
    ResponseLength,
    UnsupportedClaim,
    policy_violation,
    requested_keys,
    tool_errors,
    tool_format,
)

from .conftest import ORDER, assistant, call, chat, error, result, user


def values(scorer, trajectory):
    return [scorer(trajectory, i).value for i in range(trajectory.num_turns)]


# -- tool_format ------------------------------------------------------------------------------------


def test_tool_format_accepts_protocol_calls_and_plain_text():
    t = chat(user("hi"), assistant(call("get_order", order_id="W1000001")), result("get_order", ORDER),
             assistant("Your order was delivered on 2026-05-06."))
    assert values(tool_format, t) == [0.0, 0.0]


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "get_order", "arguments": {</tool_call>',  # invalid JSON
    '<tool_call>{"name": "get_order", "arguments": {"order_id": "W1"}}',  # unclosed tag
    "<tool_call>{'name': 'get_order', 'arguments': {}}</tool_call>",  # single quotes
    '<tool_call>["get_order"]</tool_call>',  # not an object
    "".join(call("get_order", order_id=f"W{i}") for i in range(5)),  # too many calls
    '```json\n{"name": "get_order", "arguments": {"order_id": "W1"}}\n```',  # code fence, no tags
    '{"name": "get_order", "arguments": {"order_id": "W1"}}',  # bare JSON
    'get_order(order_id="W1")',  # function syntax
])
def test_tool_format_rejects_what_the_strict_parser_rejects(text):
    assert tool_format(chat(user("hi"), assistant(text)), 0).value == -1.0


def test_tool_format_reads_the_environments_error_kinds(test_tasks):
    task = test_tasks[0]
    texts = iter([call("no_such_tool"), call("get_order", order_id=5), "bye"])
    t = run_policy(make_env(task, max_turns=3), task, lambda m: next(texts))
    assert t.turns[0].info["tool_errors"][0]["kind"] == "unknown_tool"
    assert t.turns[1].info["tool_errors"][0]["kind"] == "invalid_arguments"
    assert values(tool_format, t) == [-1.0, -1.0, 0.0]
    # the same conversation rebuilt from its messages alone scores the same
    from rewards.logged import from_chat
    assert values(tool_format, from_chat(t.messages)) == [-1.0, -1.0, 0.0]


# -- tool_errors ------------------------------------------------------------------------------------


def test_tool_errors_is_minus_the_failed_fraction_and_never_pays_for_success():
    t = chat(user("hi"),
             assistant(call("get_order", order_id="W1") + call("track_shipment", order_id="W1")),
             error("get_order", "rejected", "Identity not verified."), result("track_shipment", {"status": "shipped"}),
             assistant(call("get_order", order_id="W1")), result("get_order", ORDER),
             assistant("Thanks."), user("ok"),
             assistant('<tool_call>{"x": 1}</tool_call>'), error(None, "invalid_call"))
    assert values(tool_errors, t) == [-0.5, 0.0, 0.0, 0.0]  # format errors belong to tool_format
    assert tool_errors(t, 0).reason == "get_order: rejected"


# -- policy_violation -------------------------------------------------------------------------------


def test_policy_violation_marks_the_turn_the_environment_recorded(test_tasks):
    task = test_tasks[0]
    texts = iter([call("get_order", order_id="W1000001"), "Hello?"])
    t = run_policy(make_env(task, max_turns=2), task, lambda m: next(texts))
    assert t.outcome.violations == ["identity_verification@0"]
    assert values(policy_violation, t) == [-1.0, 0.0]
    assert policy_violation(t, 0).reason == "identity_verification"


def test_policy_violation_does_not_apply_without_an_outcome():
    assert policy_violation(chat(assistant("hi")), 0) is None


# -- redundant_request ------------------------------------------------------------------------------


def test_requested_keys():
    assert requested_keys("What is the order number? Also your zip code, please provide it.") == ["order_id", "zip"]
    assert requested_keys("Your email has been updated.") == []


def test_asking_again_for_given_information_is_penalised():
    t = chat(user("Hi, I'm a@b.co, zip 12345. Where is order W1000001?"),
             assistant("Could you please give me your email and zip code?"), user("I already told you: a@b.co, 12345"),
             assistant("Thanks. Could you share the order number?"), user("As I said, W1000001."))
    scorer = RedundantRequest()
    assert values(scorer, t) == [-1.0, -1.0]
    assert scorer(t, 0).reason == "asked again for email, zip"


def test_a_first_request_and_a_request_answered_with_a_new_value_are_fine():
    t = chat(user("I need help with two orders."),
             assistant("Could you share the order number?"), user("It's W1000001."),
             assistant("Done with that one. Could you share the other order number?"), user("W1000002."),
             assistant(call("get_order", order_id="W1000002")))
    assert values(RedundantRequest(), t) == [0.0, 0.0, 0.0]


def test_oracle_never_asks_redundantly(oracle_rollouts):
    scorer = RedundantRequest()
    assert all(v == 0.0 for t in oracle_rollouts for v in values(scorer, t))


# -- unsupported_claim ------------------------------------------------------------------------------


def test_claimed_actions_need_the_matching_successful_tool_result():
    scorer = UnsupportedClaim()
    claim = "Your order #W1000001 has been cancelled."
    assert scorer(chat(user("cancel W1000001"), assistant(claim)), 0).value == -1.0
    done = chat(user("cancel W1000001"), assistant(call("cancel_order", order_id="W1000001", reason="x")),
                result("cancel_order", {"order_id": "W1000001", "status": "cancelled", "amount": 62.0}),
                assistant(claim + " $62.00 will be refunded."))
    assert scorer(done, 1).value == 0.0
    failed = chat(user("cancel W1000001"), assistant(call("cancel_order", order_id="W1000001", reason="x")),
                  error("cancel_order", "rejected"), assistant(claim))
    assert scorer(failed, 1).reason == "unsupported cancellation claim"


@pytest.mark.parametrize("text, ok", [
    ("I can refund the yoga mat ($28.00). Shall I go ahead with the refund?", True),  # an item price
    ("I can refund both items ($62.00).", True),  # the order total
    ("The refund would be $300.00, over our $250 limit.", False),  # $300 nowhere
    ("Refunds over $250 need a specialist.", True),  # the policy limit, from the system prompt
    ("Your order was delivered on 2026-05-06.", True),
    ("Your order was delivered on 2026-05-07.", False),
    ("Your order is still processing.", False),  # the order says delivered
    ("I'm sorry, your order has already shipped, so it can no longer be cancelled.", True),  # delivered => shipped
    ("Would you like me to cancel it?", True),  # a proposal is not a claim
    ("Your issue has been resolved!", False),  # nothing was done
    ("Your tracking number is 1ZABCDEF1234.", False),
])
def test_order_facts_must_be_supported_by_what_the_tools_returned(text, ok):
    t = chat(user("My yoga mat from W1000001 arrived damaged."), assistant(call("get_order", order_id="W1000001")),
             result("get_order", ORDER), assistant(text))
    score = UnsupportedClaim()(t, 1)
    assert (score.value == 0.0) == ok, score


def test_the_bound_database_supports_facts_no_tool_showed(test_tasks):
    task = test_tasks[0]  # order W1000001, shipped, tracking 1ZWJNCE3P8B9
    t = chat(user("Where is my order W1000001?"), assistant("It has shipped; the tracking number is 1ZWJNCE3P8B9."),
             task_id=task.id)
    unbound, bound = UnsupportedClaim(), UnsupportedClaim()
    bound.bind({task.id: task})
    assert unbound(t, 0).value == -1.0
    assert bound(t, 0).value == 0.0
    assert pickle.loads(pickle.dumps(bound))(t, 0).value == 0.0


def test_oracle_makes_no_unsupported_claim(oracle_rollouts, test_tasks):
    scorer = UnsupportedClaim()
    scorer.bind({t.id: t for t in test_tasks})
    for t in oracle_rollouts:
        assert values(scorer, t) == [0.0] * t.num_turns, [scorer(t, i) for i in range(t.num_turns)]


# -- response_length, politeness, repetition --------------------------------------------------------


def test_response_length_budget():
    t = chat(assistant("   "), assistant("y" * 900), assistant("y" * 2000), assistant("Sure."))
    assert values(ResponseLength(max_chars=600), t) == [-1.0, -0.5, -1.0, 0.0]
    with pytest.raises(ValueError, match="min_chars"):
        ResponseLength(max_chars=10, min_chars=20)


def test_politeness_is_small_capped_and_ignores_tool_calls():
    t = chat(assistant("Thank you! Your order has shipped."), assistant("Your order has shipped."),
             assistant("Thank you so much, sorry, I apologize, happy to help!"), assistant("Whatever, deal with it."),
             assistant(call("get_order", order_id="please")))
    assert values(Politeness(), t) == [1.0, 0.0, 0.0, -1.0, 0.0]


def test_repetition_catches_repeats_echoes_and_repeated_successful_calls():
    t = chat(user("My parcel never arrived."),
             assistant("Let me look into that for you."), user("ok"),
             assistant("Let me look into that for you!"), user("hello?"),
             assistant("hello?"), user("..."),
             assistant(call("get_order", order_id="W1")), result("get_order", ORDER),
             assistant(call("get_order", order_id="W1")), result("get_order", ORDER),
             assistant(call("track_shipment", order_id="W1")), error("track_shipment", "rejected"),
             assistant(call("track_shipment", order_id="W1")), error("track_shipment", "rejected"))
    assert values(Repetition(), t) == [0.0, -1.0, -1.0, 0.0, -1.0, 0.0, 0.0]
    assert Repetition()(t, 2).reason == "echoes the customer"
    with pytest.raises(ValueError):
        Repetition(similarity=0)


def test_rule_scorers_are_zero_on_every_oracle_turn_except_politeness(oracle_rollouts):
    scorers = [tool_format, tool_errors, policy_violation, RedundantRequest(), UnsupportedClaim(), ResponseLength(),
               Repetition()]
    for t in oracle_rollouts:
        for scorer in scorers:
            assert values(scorer, t) == [0.0] * t.num_turns, (t.task_id, scorer)


def test_scorers_work_on_a_bare_trajectory_without_outcome_or_info():
    t = chat(user("hi"), assistant(""), assistant("hi"))
    assert t.outcome == Outcome(False, False, None)
    for scorer in (tool_format, tool_errors, RedundantRequest(), UnsupportedClaim(), ResponseLength(), Politeness(),
                   Repetition()):
        assert all(isinstance(v, float) for v in values(scorer, t))
