"""Tests for pipeline/envs/customer_service/customer.py: the scripted customer, on its own and inside the env."""

from __future__ import annotations

import random

import pytest

from pipeline.chat import format_tool_call
from pipeline.envs import Task, load_tasks, make_env
from pipeline.envs.customer_service.customer import ScriptedCustomer
from pipeline.simulators import UserSimulator
from pipeline.envs.customer_service.customer import ALREADY, LEAVE

ASK_EMAIL = "Could you please tell me your email address?"
ASK_ZIP = "What is your zip code?"
ASK_ORDER = "Could you please share the order number?"
OFF_TOPIC = "Our store was founded in 1998."
ALREADY_OPENERS = tuple(t.split("{")[0].strip() for t in ALREADY)


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return load_tasks("customer_service", "test")


def pick(tasks: list[Task], intent: str, upfront: bool = False, **goal) -> Task:
    return next(
        t for t in tasks
        if t.intents == [intent] and t.payload["customer"]["persona"]["upfront_order_id"] == upfront
        and all(t.payload["goals"][0].get(k) == v for k, v in goal.items())
    )


def start(task: Task, **env_kwargs):
    env = make_env(task, **env_kwargs)
    messages = env.reset(task, seed=0)
    return env, messages[1]["content"]


def reply(env, text: str):
    step = env.step(text)
    return step, step.messages[0]["content"] if step.messages else ""


def test_scripted_customer_is_a_user_simulator():
    customer = ScriptedCustomer({"persona": {"style": "terse", "patience": 3}}, [], random.Random(0))
    assert isinstance(customer, UserSimulator)


# -- facts only when asked -----------------------------------------------------------------------
def test_facts_are_revealed_only_when_asked(tasks):
    task = pick(tasks, "cancel", resolution="act")
    customer, oid = task.payload["customer"], task.payload["goals"][0]["order_id"]
    env, opening = start(task)
    secrets = (customer["email"], customer["zip_code"], oid)
    assert not any(s in opening for s in secrets)

    _, text = reply(env, ASK_EMAIL)
    assert customer["email"] in text and customer["zip_code"] not in text and oid not in text
    _, text = reply(env, ASK_ZIP)
    assert customer["zip_code"] in text and customer["email"] not in text and oid not in text
    _, text = reply(env, ASK_ORDER)
    assert oid in text and customer["email"] not in text
    assert env.customer.frustration == 0


def test_upfront_customers_give_the_order_number_in_the_opening(tasks):
    task = pick(tasks, "cancel", upfront=True)
    env, opening = start(task)
    assert task.payload["goals"][0]["order_id"] in opening
    _, text = reply(env, ASK_ORDER)
    assert text.startswith(ALREADY_OPENERS)
    assert env.customer.frustration > 0


def test_asking_again_raises_frustration_and_says_so(tasks):
    task = pick(tasks, "cancel", resolution="act")
    email = task.payload["customer"]["email"]
    env, _ = start(task)
    reply(env, ASK_EMAIL)
    before = env.customer.frustration
    step, text = reply(env, ASK_EMAIL)
    assert text.startswith(ALREADY_OPENERS) and email in text
    assert env.customer.frustration == before + 1  # one point per message, however many things annoy
    assert env.outcome().details["frustration"] == env.customer.frustration
    assert not step.done


# -- patience ------------------------------------------------------------------------------------
def test_off_topic_turns_wear_patience_down_until_the_customer_leaves(tasks):
    task = pick(tasks, "cancel", resolution="act")
    patience = task.payload["customer"]["persona"]["patience"]
    env, _ = start(task)
    steps = [env.step(OFF_TOPIC) for _ in range(patience)]
    assert [s.done for s in steps] == [False] * (patience - 1) + [True]
    assert env.customer.frustration == patience
    assert steps[-1].messages[0]["content"] in LEAVE
    outcome = env.outcome()
    assert (outcome.stop_reason, outcome.completed, outcome.success) == ("user_left", True, False)


def test_helpful_turns_do_not_wear_patience_down(tasks):
    task = pick(tasks, "cancel", resolution="act")
    env, _ = start(task)
    for text in (ASK_EMAIL, ASK_ZIP, ASK_ORDER):
        assert not env.step(text).done
    assert env.customer.frustration == 0


# -- proposals -----------------------------------------------------------------------------------
def test_a_proposal_the_goal_accepts_is_confirmed(tasks):
    task = pick(tasks, "cancel", resolution="act")
    env, _ = start(task)
    step, text = reply(env, "Would you like me to cancel your order?")
    assert text.lower().startswith(("yes", "okay, yes", "sure"))
    assert env.session.confirmed_action == "cancel"
    assert env.customer.frustration == 0 and not step.done


def test_a_proposal_of_another_action_is_turned_down(tasks):
    task = pick(tasks, "cancel", resolution="act")
    env, _ = start(task)
    step, text = reply(env, "Would you like a refund instead?")
    assert text.startswith(("No", "That's not what I asked"))
    assert env.session.confirmed_action is None
    assert env.customer.frustration > 0


@pytest.mark.parametrize("text, expected", [
    ("Could you give me your email and zip code?", ["email", "zip"]),
    ("Thanks. What's the order number?", ["order_id"]),
    ("Which size would you like instead?", ["variant"]),
    ("What is the new shipping address?", ["address"]),
    ("I have noted your email.", []),  # a statement, not a request
])
def test_requested_reads_what_the_agent_asks_for(text, expected):
    assert ScriptedCustomer.requested(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Shall I cancel it?", ["cancel"]),
    ("The refund would be over our limit, so shall I escalate it to a specialist?", ["escalate", "refund"]),
    ("I can't refund it, but would you like store credit instead?", ["store_credit"]),
    ("Your order was cancelled.", []),  # reporting an action is not proposing one
])
def test_proposed_puts_the_action_asked_about_first(text, expected):
    assert ScriptedCustomer.proposed(text) == expected


# -- ending --------------------------------------------------------------------------------------
def test_goodbye_only_when_everything_was_done_and_told(tasks):
    """An order-status customer leaves satisfied only after hearing the status and the tracking number
    (told after looking the order up, so that the environment counts them as told, not guessed)."""
    task = next(t for t in tasks if t.intents == ["order_status"] and len(t.payload["goals"][0]["facts"]) == 2)
    status, tracking = (alts[0] for alts in task.payload["goals"][0]["facts"])
    customer, order_id = task.payload["customer"], task.payload["goals"][0]["order_id"]
    env, _ = start(task)
    env.step(format_tool_call("verify_identity", {"email": customer["email"], "zip_code": customer["zip_code"]}))
    assert not env.step(format_tool_call("track_shipment", {"order_id": order_id})).done
    step, _ = reply(env, f"Your order has {status}.")
    assert not step.done
    step, _ = reply(env, f"The tracking number is {tracking}.")
    assert step.done
    outcome = env.outcome()
    assert outcome.stop_reason == "resolved" and outcome.completed and outcome.success


@pytest.mark.parametrize("stall", ["tools", "chat"])
def test_running_out_of_turns_is_incomplete(tasks, stall):
    """With max_turns=3 an agent that stalls (idle lookups, or chat to a patient customer) hits the budget."""
    task = next(t for t in tasks if t.payload["customer"]["persona"]["patience"] >= 4)
    env, _ = start(task, max_turns=3)
    text = format_tool_call("get_product", {"product_id": "P101"}) if stall == "tools" else OFF_TOPIC
    steps = [env.step(text) for _ in range(3)]
    assert [s.done for s in steps] == [False, False, True]
    outcome = env.outcome()
    assert (outcome.stop_reason, outcome.completed, outcome.success) == ("max_turns", False, False)


def test_replies_are_deterministic_given_the_rng(tasks):
    task = pick(tasks, "exchange")
    goals, customer = task.payload["goals"], task.payload["customer"]
    runs = []
    for _ in range(2):
        sim = ScriptedCustomer(customer, goals, random.Random(7))
        texts = [sim.start()] + [sim.respond(t, {}).text for t in (ASK_EMAIL, OFF_TOPIC, ASK_EMAIL, "Which size?")]
        runs.append(texts)
    assert runs[0] == runs[1]
