"""Tests for the retail customer-service environment (pipeline/envs/customer_service/, via pipeline.envs).

Covers the environment contract (make_env, reset, step, outcome, the oracle), the tool-call error
paths against the real tools, episode isolation (interleaved episodes, shared tasks, untouched task
payloads) and determinism.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest

from pipeline.chat import MAX_CALLS_PER_MESSAGE, format_tool_call, parse_tool_message
from pipeline.envs import Environment, Outcome, Step, Task, load_tasks, make_env, oracle_policy
from pipeline.envs.customer_service import CustomerServiceEnv
from pipeline.envs.customer_service.env import sop_text
from pipeline.envs.customer_service.policy import RULES
from pipeline.envs.customer_service.tools import RetailTools
from pipeline.rollout import run_policy

ROLES = {"system", "user", "assistant", "tool"}
TOOL_NAMES = ["verify_identity", "list_orders", "get_order", "track_shipment", "get_product", "cancel_order",
              "refund_items", "exchange_item", "update_shipping_address", "issue_store_credit", "escalate_to_human"]


@pytest.fixture(scope="module")
def test_tasks() -> list[Task]:
    return load_tasks("customer_service", "test")


@pytest.fixture(scope="module")
def by_intent(test_tasks) -> dict[str, Task]:
    """The first single-intent test task of each intent."""
    out: dict[str, Task] = {}
    for task in test_tasks:
        if len(task.intents) == 1:
            out.setdefault(task.intents[0], task)
    return out


def find(tasks: list[Task], intent: str, **resolution) -> Task:
    """The first single-goal task with this intent (and goal fields, e.g. resolution="act")."""
    return next(t for t in tasks if t.intents == [intent]
                and all(t.payload["goals"][0].get(k) == v for k, v in resolution.items()))


def credentials(task: Task) -> str:
    c = task.payload["customer"]
    return format_tool_call("verify_identity", {"email": c["email"], "zip_code": c["zip_code"]})


def tool_bodies(step: Step) -> list[dict]:
    assert step.messages and all(m["role"] == "tool" for m in step.messages)
    return [parse_tool_message(m) for m in step.messages]


def assert_chat_format(messages: list[dict]) -> None:
    for message in messages:
        assert set(message) == {"role", "content"}
        assert message["role"] in ROLES and isinstance(message["content"], str)


# -- make_env / reset ----------------------------------------------------------------------------
def test_make_env_by_name_and_by_task(test_tasks):
    by_name = make_env("customer_service")
    by_task = make_env(test_tasks[0], max_turns=7)
    assert isinstance(by_name, CustomerServiceEnv) and isinstance(by_name, Environment)
    assert isinstance(by_task, CustomerServiceEnv) and by_task.max_turns == 7
    with pytest.raises(ValueError, match="customer_service"):
        make_env("no_such_env")


def test_reset_gives_system_prompt_with_sop_and_tools_then_the_customer(test_tasks):
    task = test_tasks[0]
    env = make_env(task)
    messages = env.reset(task, seed=0)
    assert_chat_format(messages)
    assert [m["role"] for m in messages] == ["system", "user"]
    system, opening = messages[0]["content"], messages[1]["content"]
    assert sop_text().strip() in system
    for rule in RULES:
        assert f"[{rule}]" in system
    for schema in env.tool_schemas:
        fn = schema["function"]
        line = json.dumps({k: fn[k] for k in ("name", "description", "parameters")}, separators=(",", ":"))
        assert line in system
    assert [s["function"]["name"] for s in env.tool_schemas] == TOOL_NAMES
    assert "<tool_call>" in system
    for name in task.payload["goals"][0]["item_names"]:
        assert name in opening


def test_step_returns_the_customers_reply(test_tasks):
    env = make_env(test_tasks[0])
    env.reset(test_tasks[0])
    step = env.step("Could you please give me your email address and zip code?")
    assert isinstance(step, Step) and not step.done
    assert_chat_format(step.messages)
    assert [m["role"] for m in step.messages] == ["user"]
    customer = test_tasks[0].payload["customer"]
    assert customer["email"] in step.messages[0]["content"] and customer["zip_code"] in step.messages[0]["content"]
    assert step.info["turn"] == 0 and step.info["kind"] == "message" and step.info["stop_reason"] is None


def test_tool_call_returns_a_tool_message(test_tasks):
    task = test_tasks[0]
    env = make_env(task)
    env.reset(task)
    step = env.step(credentials(task))
    (body,) = tool_bodies(step)
    assert body == {"tool": "verify_identity", "ok": True,
                    "result": {"customer_id": task.payload["customer"]["customer_id"],
                               "name": task.payload["customer"]["name"]}}
    assert step.info["tool_calls"][0]["name"] == "verify_identity" and not step.done


def test_outcome_reports_every_field(test_tasks):
    env = make_env(test_tasks[0])
    env.reset(test_tasks[0])
    outcome = env.outcome()  # judged mid-episode: nothing done yet
    assert isinstance(outcome, Outcome)
    assert (outcome.success, outcome.completed, outcome.stop_reason) == (False, False, None)
    assert outcome.violations == [] and outcome.fields == {}
    assert outcome.details["missing_facts"]


@pytest.mark.parametrize("lookup", ["goal order", "made-up order", None])
def test_a_fact_counts_only_when_told_after_a_tool_showed_the_order(test_tasks, lookup):
    """A status said after a lookup of the goal's order is told; one said after a failed lookup (a made-up
    order id) or without any lookup is a guess: a missing fact, listed as ungrounded, and no success."""
    task = next(t for t in test_tasks
                if t.intents == ["order_status"] and t.payload["goals"][0]["facts"] == [["delivered"]])
    goal_order = task.payload["goals"][0]["order_id"]
    env = make_env(task)
    env.reset(task)
    env.step(credentials(task))
    if lookup is not None:
        order_id = goal_order if lookup == "goal order" else "W1234567"
        (body,) = tool_bodies(env.step(format_tool_call("get_order", {"order_id": order_id})))
        assert body["ok"] == (lookup == "goal order")
    env.step(f"Your order {goal_order} has been delivered.")
    outcome = env.outcome()
    assert outcome.success == (lookup == "goal order")
    expected = [] if lookup == "goal order" else ["delivered"]
    assert outcome.details["missing_facts"] == outcome.details["ungrounded_facts"] == expected


# -- the oracle ----------------------------------------------------------------------------------
@pytest.mark.parametrize("intent", ["order_status", "cancel", "damaged_refund", "return_refund", "refund_denied",
                                    "address_change", "exchange", "escalation"])
def test_oracle_solves_each_intent_through_text(by_intent, intent):
    """The oracle resolves each kind of task using only text and <tool_call> blocks."""
    task = by_intent[intent]
    trajectory = run_policy(make_env(task), task, oracle_policy(task))
    outcome = trajectory.outcome
    assert (outcome.success, outcome.completed, outcome.stop_reason) == (True, True, "resolved")
    assert outcome.violations == [] and outcome.details["state_match"]
    assert_chat_format(trajectory.messages)
    assistant = [m["content"] for m in trajectory.messages if m["role"] == "assistant"]
    assert assistant[0].endswith("?")  # asks before it acts
    assert any("<tool_call>" in text for text in assistant)
    assert trajectory.messages[-1]["role"] == "user"  # the customer closes the conversation


def test_oracle_solves_two_intent_tasks(test_tasks):
    multi = [t for t in test_tasks if len(t.intents) == 2]
    assert multi
    for task in multi:
        outcome = run_policy(make_env(task), task, oracle_policy(task)).outcome
        assert outcome.success, (task.id, outcome.details)
        assert outcome.details["goals_met"] == 2


def test_oracle_is_reusable_across_episodes(by_intent):
    """The oracle is stateless: one policy object drives several episodes of its task."""
    task = by_intent["cancel"]
    policy = oracle_policy(task)
    first = run_policy(make_env(task), task, policy)
    second = run_policy(make_env(task), task, policy)
    assert first.outcome.success and second.messages == first.messages


# -- tool-call errors against the real tools -----------------------------------------------------
MALFORMED = [
    ('<tool_call>{"name": "get_order", "arguments": {"order_id": "W1"}}', "malformed_tag"),
    ('{"name": "get_order"}</tool_call>', "malformed_tag"),
    ('<tool_call>{"name": "get_order", "arguments": {"order_id": </tool_call>', "invalid_json"),
    ("<tool_call>[\"get_order\"]</tool_call>", "invalid_call"),
    ('<tool_call>{"arguments": {"order_id": "W1"}}</tool_call>', "invalid_call"),
    ('<tool_call>{"name": "get_order", "arguments": ["W1"]}</tool_call>', "invalid_call"),
    (format_tool_call("get_product", {"product_id": "P101"}) * (MAX_CALLS_PER_MESSAGE + 1), "too_many_calls"),
    ('<tool_call>{"name": "delete_account", "arguments": {}}</tool_call>', "unknown_tool"),
    ('<tool_call>{"name": "get_order", "arguments": {}}</tool_call>', "invalid_arguments"),
    ('<tool_call>{"name": "get_order", "arguments": {"order_id": "W1", "force": true}}</tool_call>',
     "invalid_arguments"),
    ('<tool_call>{"name": "get_order", "arguments": {"order_id": 1000001}}</tool_call>', "invalid_arguments"),
    ('<tool_call>{"name": "get_order", "arguments": {"order_id": true}}</tool_call>', "invalid_arguments"),
    ('<tool_call>{"name": "refund_items", "arguments": {"order_id": "W1", "item_ids": ["I1"], "reason": "lost"}}'
     "</tool_call>", "invalid_arguments"),
    ('<tool_call>{"name": "refund_items", "arguments": {"order_id": "W1", "item_ids": "I1", "reason": "return"}}'
     "</tool_call>", "invalid_arguments"),
    ('<tool_call>{"name": "get_product", "arguments": {"product_id": "P999"}}</tool_call>', "rejected"),
]


@pytest.mark.parametrize("text, kind", MALFORMED)
def test_bad_tool_calls_are_answered_and_the_episode_goes_on(test_tasks, text, kind):
    task = test_tasks[0]
    env = make_env(task)
    env.reset(task)
    step = env.step(text)
    (body,) = tool_bodies(step)
    assert body["ok"] is False and body["error_type"] == kind and body["error"]
    assert [e["kind"] for e in step.info["tool_errors"]] == [kind]
    assert not step.done
    assert env.db.state() == env.initial_state
    assert env.outcome().violations == []  # a broken call is not an SOP violation
    assert not env.step("Could you please give me your email address and zip code?").done


def test_policy_refusal_is_a_rejected_tool_message(test_tasks):
    """A call the SOP forbids (an order lookup before verification) is `rejected`, not an exception."""
    task = test_tasks[0]
    env = make_env(task)
    env.reset(task)
    step = env.step(format_tool_call("get_order", {"order_id": task.payload["goals"][0]["order_id"]}))
    (body,) = tool_bodies(step)
    assert (body["ok"], body["error_type"]) == (False, "rejected")
    assert step.info["tool_errors"][0]["kind"] == "rejected" and not step.done


def test_a_tool_that_raises_becomes_a_tool_exception(test_tasks, monkeypatch):
    """A bug inside a tool is caught: the agent gets a tool_exception message, the episode goes on."""
    original = RetailTools.get_product

    @functools.wraps(original)
    def broken(self, product_id: str):
        raise KeyError("corrupted catalogue")

    monkeypatch.setattr(RetailTools, "get_product", broken)
    task = test_tasks[0]
    env = make_env(task)
    env.reset(task)
    step = env.step(format_tool_call("get_product", {"product_id": "P101"}))
    (body,) = tool_bodies(step)
    assert (body["ok"], body["error_type"]) == (False, "tool_exception")
    assert "KeyError" in body["error"]
    assert step.info["tool_errors"][0]["kind"] == "tool_exception" and not step.done
    assert not env.step(credentials(task)).done


def test_good_and_bad_calls_in_one_message(test_tasks):
    """Each call of a message is answered on its own, in order: one bad call does not block the rest."""
    task = test_tasks[0]
    env = make_env(task)
    env.reset(task)
    step = env.step(format_tool_call("nope", {}) + credentials(task))
    assert [b["ok"] for b in tool_bodies(step)] == [False, True]
    assert [e["kind"] for e in step.info["tool_errors"]] == ["unknown_tool"]
    assert [c["name"] for c in step.info["tool_calls"]] == ["verify_identity"]


def test_none_text_and_steps_after_done(by_intent):
    """None from a policy is an empty message; a step after the end is answered with an error."""
    task = by_intent["cancel"]
    env = make_env(task, max_turns=2)
    env.reset(task)
    first = env.step(None)
    assert [m["role"] for m in first.messages] == ["user"] and not first.done
    last = env.step(None)
    assert last.done and last.info["stop_reason"] == "max_turns"
    after = env.step(credentials(task))
    assert after.done and after.messages == [] and "error" in after.info
    assert env.outcome().stop_reason == "max_turns"
    assert env.session.verified_customer is None  # the late call did not run


# -- isolation -----------------------------------------------------------------------------------
def reckless_policy(task: Task):
    """A scripted bad agent: verifies, proposes and makes changes it may not be allowed, then rambles."""
    goal = task.payload["goals"][0]
    oid, item_ids = goal["order_id"], [i["item_id"] for i in task.payload["db"]["orders"][goal["order_id"]]["items"]]
    script = [
        "<tool_call>{not json</tool_call>",
        credentials(task),
        "Shall I cancel your order?",
        format_tool_call("cancel_order", {"order_id": oid, "reason": "customer request"}),
        "Shall I refund the items?",
        format_tool_call("refund_items", {"order_id": oid, "item_ids": item_ids, "reason": "damaged"}),
        "Lovely weather today.",
    ]

    def policy(messages: list[dict]) -> str:
        turn = sum(m["role"] == "assistant" for m in messages)
        return script[min(turn, len(script) - 1)]

    return policy


def policy_for(index: int, task: Task):
    return reckless_policy(task) if index % 3 == 2 else oracle_policy(task)


def test_interleaved_episodes_match_sequential_ones(test_tasks):
    """64 episodes stepped round-robin give the same messages and outcomes as the same episodes run alone."""
    tasks = test_tasks[:64]
    assert len({tuple(t.intents) for t in tasks}) >= 8
    alone = [run_policy(make_env(t), t, policy_for(i, t), seed=i % 4) for i, t in enumerate(tasks)]

    envs = [make_env(t) for t in tasks]
    conversations = [env.reset(t, seed=i % 4) for i, (env, t) in enumerate(zip(envs, tasks))]
    policies = [policy_for(i, t) for i, t in enumerate(tasks)]
    active = list(range(len(tasks)))
    while active:
        for i in active:
            text = policies[i](list(conversations[i]))
            step = envs[i].step(text)
            conversations[i] = [*conversations[i], {"role": "assistant", "content": text}, *step.messages]
        active = [i for i in active if not envs[i].done]

    for i, trajectory in enumerate(alone):
        assert conversations[i] == trajectory.messages, tasks[i].id
        assert envs[i].outcome() == trajectory.outcome, tasks[i].id
    # Both kinds of episode really happened: the oracle ones succeeded, the reckless ones did not.
    assert all(t.outcome.success for i, t in enumerate(alone) if i % 3 != 2)
    assert not any(t.outcome.success for i, t in enumerate(alone) if i % 3 == 2)
    assert any(t.outcome.violations for i, t in enumerate(alone) if i % 3 == 2)


@pytest.mark.parametrize("intent", ["cancel", "damaged_refund"])
def test_a_change_in_one_episode_is_invisible_to_another(test_tasks, intent):
    """Two envs on the same task: the one that cancels/refunds changes only its own sandbox."""
    task = find(test_tasks, intent, resolution="act")
    acting, watching = make_env(task), make_env(task)
    acting.reset(task)
    watching.reset(task)
    untouched = watching.db.state()
    policy = oracle_policy(task)
    messages = acting.reset(task)
    while not acting.done:
        text = policy(messages)
        messages = [*messages, {"role": "assistant", "content": text}, *acting.step(text).messages]
    assert acting.outcome().success and acting.db.state() != untouched
    assert watching.db.state() == untouched
    assert run_policy(watching, task, policy).outcome.success



def test_a_reused_env_carries_nothing_over(test_tasks):
    """One env reset for episode after episode gives what a fresh env gives each time."""
    env = make_env("customer_service")
    for i, task in enumerate(test_tasks[:12]):
        policy = policy_for(i, task)
        reused = run_policy(env, task, policy)
        fresh = run_policy(make_env(task), task, policy)
        assert reused.messages == fresh.messages and reused.outcome == fresh.outcome, task.id

def test_episodes_never_mutate_the_task(test_tasks):
    """Running good and bad episodes leaves every task payload exactly as loaded."""
    tasks = test_tasks[:30]
    before = copy.deepcopy(tasks)
    for i, task in enumerate(tasks):
        run_policy(make_env(task), task, oracle_policy(task))
        run_policy(make_env(task), task, reckless_policy(task))
    assert tasks == before


# -- determinism ---------------------------------------------------------------------------------
def test_same_task_seed_and_texts_give_the_same_episode(test_tasks):
    for task in test_tasks[:10]:
        texts = [t.assistant for t in run_policy(make_env(task), task, reckless_policy(task), seed=3).turns]
        runs = []
        for _ in range(2):
            env = make_env(task)
            messages = env.reset(task, seed=3)
            for text in texts:
                messages = [*messages, {"role": "assistant", "content": text}, *env.step(text).messages]
            runs.append((messages, env.outcome()))
        assert runs[0] == runs[1]
        a = run_policy(make_env(task), task, oracle_policy(task), seed=5)
        b = run_policy(make_env(task), task, oracle_policy(task), seed=5)
        assert a.messages == b.messages and a.outcome == b.outcome


def test_seeds_change_the_wording_but_not_the_solvability(test_tasks):
    """Different seeds paraphrase the customer; the oracle still solves every task with each seed."""
    differs = 0
    for task in test_tasks:
        runs = [run_policy(make_env(task), task, oracle_policy(task), seed=seed) for seed in (0, 1, 2)]
        assert all(r.outcome.success for r in runs), task.id
        user_texts = [[m["content"] for m in r.messages if m["role"] == "user"] for r in runs]
        differs += len({tuple(u) for u in user_texts}) > 1
    assert differs >= len(test_tasks) // 2
