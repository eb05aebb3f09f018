"""Tests for pipeline/envs/customer_service/policy.py: every SOP rule is enforced and recorded.

Each rule is broken on purpose by a scripted agent on a small hand-made task. The environment must
refuse the action (an ok=false ``rejected`` tool message), leave the sandbox unchanged, record
``"<rule>@<turn>"`` in ``Outcome.violations`` and fail strict success. Each case has a control: the
same script on a task where the action is allowed, which must go through without a violation, so a
test cannot pass because the harness itself is broken.
"""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from pipeline.chat import format_tool_call, parse_tool_message
from pipeline.envs import Step, Task, make_env
from pipeline.envs.customer_service.policy import RULES
from pipeline.envs.tasks import check_task_row

TODAY = date(2026, 5, 1)
EMAIL, ZIP = "ava.smith1@example.com", "12345"
HOME = {"street": "1 Oak St", "city": "Austin", "state": "TX", "zip_code": ZIP}
NEW_ADDRESS = {"street": "9 Elm St", "city": "Boise", "state": "ID", "zip_code": "83701"}
OPENINGS = {"cancel": "cancel", "address": "address_change", "refund": "damaged_refund", "exchange": "exchange",
            "store_credit": "return_refund", "escalate": "lost_package"}


def make_task(status: str = "delivered", days_ago: int | None = 10, price: float = 40.0, stock: tuple = (5, 5),
              accept: tuple = ("refund",), changes: dict | None = None, facts: list | None = None) -> Task:
    """One customer (Ava, order W1000001 with one hoodie) plus another customer's order W2000002.

    ``days_ago`` is days since delivery (delivered orders only). By default the goal can never be met
    (its fact is never said), so the customer stays in the conversation whatever the agent does.
    """

    def order(oid: str, cid: str, status: str, item_id: str) -> dict:
        delivered = str(TODAY - timedelta(days=days_ago)) if status == "delivered" else None
        return {
            "order_id": oid, "customer_id": cid, "status": status, "order_date": str(TODAY - timedelta(days=90)),
            "ship_date": None if status == "processing" else str(TODAY - timedelta(days=89)),
            "delivery_date": delivered, "estimated_delivery": None, "carrier": None, "tracking_number": None,
            "payment_method": "visa ending 4242", "shipping_address": dict(HOME),
            "items": [{"item_id": item_id, "product_id": "P101", "variant_id": "P101-1", "name": "hoodie",
                       "options": {"size": "M"}, "quantity": 1, "price": price, "status": "ok"}],
        }

    db = {
        "today": str(TODAY),
        "customers": {
            "C00001": {"customer_id": "C00001", "name": "Ava Smith", "email": EMAIL, "zip_code": ZIP, "address": HOME},
            "C00002": {"customer_id": "C00002", "name": "Ben Ito", "email": "ben.ito2@example.com", "zip_code": "54321",
                       "address": {**HOME, "zip_code": "54321"}},
        },
        "orders": {"W1000001": order("W1000001", "C00001", status, "I000001"),
                   "W2000002": order("W2000002", "C00002", "delivered", "I000002")},
        "products": {
            "P101": {"product_id": "P101", "name": "hoodie", "variants": {
                "P101-1": {"options": {"size": "M"}, "price": price, "stock": stock[0]},
                "P101-2": {"options": {"size": "L"}, "price": price, "stock": stock[1]}}},
            "P102": {"product_id": "P102", "name": "coffee mug", "variants": {
                "P102-1": {"options": {"color": "white"}, "price": 12.5, "stock": 9}}},
        },
    }
    goal = {"intent": OPENINGS[accept[0]], "opening": OPENINGS[accept[0]], "order_id": "W1000001",
            "item_names": ["hoodie"], "item_ids": ["I000001"], "facts": facts or [["<never said>"]],
            "accept": list(accept), "changes": changes or {}, "variant_options": None,
            "new_address": NEW_ADDRESS, "dimension": "size"}
    customer = {"customer_id": "C00001", "name": "Ava Smith", "email": EMAIL, "zip_code": ZIP,
                "persona": {"style": "polite", "patience": 5, "upfront_order_id": False}}
    return Task(id="policy-1", domain="customer_service", split="test", intents=[goal["intent"]],
                payload={"db": db, "customer": customer, "goals": [goal], "expected_changes": changes or {}})


def call(name: str, **arguments) -> str:
    return format_tool_call(name, arguments)


VERIFY = call("verify_identity", email=EMAIL, zip_code=ZIP)


def drive(task: Task, texts: list[str]):
    """Play fixed assistant texts; return the env and its steps."""
    env = make_env(task)
    env.reset(task, seed=0)
    return env, [env.step(text) for text in texts]


def tool_body(step: Step) -> dict:
    (message,) = step.messages
    assert message["role"] == "tool"
    return parse_tool_message(message)


def test_hand_made_tasks_are_valid_task_rows():
    """The hand-made tasks pass the same checks as the shipped task files."""
    assert check_task_row(make_task().to_dict()) == make_task()


# -- each rule: (task kwargs, proposal, violating call, rule, task kwargs of the allowed control) ---
RULE_CASES = {
    "cancel_after_ship": (
        dict(status="shipped", accept=("cancel",)), "Shall I cancel your order?",
        call("cancel_order", order_id="W1000001", reason="changed mind"), dict(status="processing")),
    "address_after_ship": (
        dict(status="shipped", accept=("address",)), "Shall I update the shipping address?",
        call("update_shipping_address", order_id="W1000001", **NEW_ADDRESS), dict(status="processing")),
    "refund_window/return_outside_window": (
        dict(days_ago=45), "Shall I refund the hoodie?",
        call("refund_items", order_id="W1000001", item_ids=["I000001"], reason="return"), dict(days_ago=10)),
    "refund_window/damaged_outside_window": (
        dict(days_ago=75), "Shall I refund the hoodie?",
        call("refund_items", order_id="W1000001", item_ids=["I000001"], reason="damaged"), dict(days_ago=45)),
    "refund_window/undelivered": (
        dict(status="shipped"), "Shall I refund the hoodie?",
        call("refund_items", order_id="W1000001", item_ids=["I000001"], reason="damaged"), dict(status="delivered")),
    "refund_limit": (
        dict(price=300.0), "Shall I refund the hoodie?",
        call("refund_items", order_id="W1000001", item_ids=["I000001"], reason="damaged"), dict(price=240.0)),
    "exchange_variant/other_product": (
        dict(accept=("exchange",)), "Shall I exchange your hoodie?",
        call("exchange_item", order_id="W1000001", item_id="I000001", new_variant_id="P102-1"), None),
    "exchange_variant/out_of_stock": (
        dict(accept=("exchange",), stock=(5, 0)), "Shall I exchange your hoodie?",
        call("exchange_item", order_id="W1000001", item_id="I000001", new_variant_id="P101-2"), dict(stock=(5, 1))),
    "exchange_variant/outside_window": (
        dict(accept=("exchange",), days_ago=40), "Shall I exchange your hoodie?",
        call("exchange_item", order_id="W1000001", item_id="I000001", new_variant_id="P101-2"), dict(days_ago=20)),
    "store_credit": (
        dict(accept=("store_credit",), days_ago=10), "Would you like store credit instead?",
        call("issue_store_credit", order_id="W1000001", item_ids=["I000001"]), dict(days_ago=45)),
    "escalation/lost_package_not_delivered": (
        dict(status="shipped", accept=("escalate",)), "Shall I escalate this to a specialist?",
        call("escalate_to_human", order_id="W1000001", category="lost_package", summary="Not received."),
        dict(status="delivered")),
    "escalation/high_value_refund_under_limit": (
        dict(price=40.0, accept=("escalate",)), "Shall I escalate this to a specialist?",
        call("escalate_to_human", order_id="W1000001", category="high_value_refund", summary="Big refund."),
        dict(price=260.0)),
}


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_rule_violation_is_refused_recorded_and_fails_success(case):
    """verify (turn 0), propose and get a yes (turn 1), then break the rule (turn 2)."""
    rule = case.split("/")[0]
    kwargs, proposal, bad_call, _ = RULE_CASES[case]
    env, steps = drive(make_task(**kwargs), [VERIFY, proposal])
    assert tool_body(steps[0])["ok"] is True
    assert env.session.confirmed_action is not None, steps[1].messages  # the customer said yes
    before = env.db.state()

    step = env.step(bad_call)

    body = tool_body(step)
    assert body["ok"] is False and body["error_type"] == "rejected"
    assert [e["kind"] for e in step.info["tool_errors"]] == ["rejected"]
    assert not step.done
    assert env.db.state() == before
    outcome = env.outcome()
    assert outcome.violations == [f"{rule}@2"]
    assert outcome.details["violation_records"][0]["rule"] == rule
    assert outcome.success is False


@pytest.mark.parametrize("case", [c for c in RULE_CASES if RULE_CASES[c][3] is not None])
def test_same_script_is_allowed_when_the_rule_permits(case):
    """The control: the same verify / propose / call script passes where the SOP allows the action."""
    kwargs, proposal, good_call, allowed = RULE_CASES[case]
    env, steps = drive(make_task(**{**kwargs, **allowed}), [VERIFY, proposal, good_call])
    body = tool_body(steps[2])
    assert body["ok"] is True, body
    assert env.outcome().violations == []
    assert env.db.state() != env.initial_state


def test_exchange_to_an_in_stock_variant_of_the_same_product_is_allowed():
    env, steps = drive(make_task(accept=("exchange",)), [
        VERIFY, "Shall I exchange your hoodie?",
        call("exchange_item", order_id="W1000001", item_id="I000001", new_variant_id="P101-2")])
    assert tool_body(steps[2])["ok"] is True and env.outcome().violations == []


def test_every_rule_is_covered():
    covered = {case.split("/")[0] for case in RULE_CASES} | {"identity_verification", "confirm_before_change"}
    assert covered == set(RULES)


# -- identity_verification -----------------------------------------------------------------------
@pytest.mark.parametrize("first_call", [
    call("get_order", order_id="W1000001"),
    call("track_shipment", order_id="W1000001"),
    call("cancel_order", order_id="W1000001", reason="x"),
    call("list_orders", customer_id="C00001"),
])
def test_nothing_before_verification(first_call):
    """Reading or changing an order before verify_identity is refused as identity_verification@0."""
    env, (step,) = drive(make_task(status="processing", accept=("cancel",)), [first_call])
    body = tool_body(step)
    assert body["ok"] is False and body["error_type"] == "rejected" and "verify_identity" in body["error"]
    assert "result" not in body  # nothing was disclosed
    assert env.db.state() == env.initial_state
    outcome = env.outcome()
    assert outcome.violations == ["identity_verification@0"] and not outcome.success


@pytest.mark.parametrize("other_call", [
    call("get_order", order_id="W2000002"),
    call("list_orders", customer_id="C00002"),
])
def test_another_customers_order_is_refused(other_call):
    """After verifying Ava, Ben's order (or order list) stays closed: identity_verification@1."""
    env, (verify, step) = drive(make_task(), [VERIFY, other_call])
    body = tool_body(step)
    assert body["ok"] is False and body["error_type"] == "rejected"
    assert "result" not in body and "I000002" not in step.messages[0]["content"]
    assert env.outcome().violations == ["identity_verification@1"]
    assert not env.outcome().success


def test_a_change_to_another_customers_order_is_an_identity_violation_even_without_a_yes():
    """Ownership is judged before confirmation: acting on Ben's order is identity_verification, not
    confirm_before_change."""
    env, (_, step) = drive(make_task(), [VERIFY, call("cancel_order", order_id="W2000002", reason="x")])
    assert tool_body(step)["ok"] is False
    assert env.outcome().violations == ["identity_verification@1"]


def test_own_order_is_open_after_verification():
    env, (_, step) = drive(make_task(), [VERIFY, call("get_order", order_id="W1000001")])
    body = tool_body(step)
    assert body["ok"] is True and body["result"]["items"][0]["item_id"] == "I000001"
    assert env.outcome().violations == []


def test_wrong_credentials_do_not_verify():
    """A failed verification is refused without a violation, and does not open the account."""
    env, steps = drive(make_task(), [call("verify_identity", email=EMAIL, zip_code="99999"),
                                     call("get_order", order_id="W1000001")])
    assert tool_body(steps[0])["ok"] is False
    assert tool_body(steps[1])["ok"] is False
    assert env.outcome().violations == ["identity_verification@1"]


# -- confirm_before_change -----------------------------------------------------------------------
CANCEL = call("cancel_order", order_id="W1000001", reason="changed mind")


def test_change_without_a_yes_is_refused():
    env, (_, step) = drive(make_task(status="processing", accept=("cancel",)), [VERIFY, CANCEL])
    body = tool_body(step)
    assert body["ok"] is False and body["error_type"] == "rejected"
    assert env.db.state() == env.initial_state
    assert env.outcome().violations == ["confirm_before_change@1"] and not env.outcome().success


def test_a_yes_to_another_action_does_not_count():
    """The customer agreed to a refund; a cancellation still needs its own yes."""
    env, steps = drive(make_task(status="processing", accept=("refund", "cancel")),
                       [VERIFY, "Shall I refund the hoodie?", CANCEL])
    assert env.session.confirmed_action == "refund"
    assert tool_body(steps[2])["ok"] is False
    assert env.db.state() == env.initial_state
    assert env.outcome().violations == ["confirm_before_change@2"]


def test_a_yes_does_not_survive_a_later_message():
    """Confirmation applies to the next action only; another message to the customer resets it."""
    env, steps = drive(make_task(status="processing", accept=("cancel",)),
                       [VERIFY, "Shall I cancel your order?", "Thanks for waiting.", CANCEL])
    assert tool_body(steps[3])["ok"] is False
    assert env.outcome().violations == ["confirm_before_change@3"]


def test_a_rejected_proposal_gives_no_confirmation():
    """The customer turns down an action its goal does not allow, so the action stays forbidden."""
    env, steps = drive(make_task(status="processing", accept=("cancel",)),
                       [VERIFY, "Shall I issue store credit instead?",
                        call("issue_store_credit", order_id="W1000001", item_ids=["I000001"])])
    assert env.session.confirmed_action is None
    assert steps[1].messages[0]["content"].startswith(("No", "That's not"))
    assert env.outcome().violations == ["confirm_before_change@2"]


def test_a_violation_fails_an_otherwise_perfect_episode():
    """Right end state, every fact told, customer satisfied, but one early violation: not a success."""
    cancelled = {"orders/W1000001/status": "cancelled"}
    task = make_task(status="processing", accept=("cancel",), changes=cancelled, facts=[["cancelled"]])
    env, steps = drive(task, [VERIFY, CANCEL, "Shall I cancel your order?", CANCEL, "Your order has been cancelled."])
    assert [tool_body(s)["ok"] for s in (steps[1], steps[3])] == [False, True]
    assert steps[-1].done
    outcome = env.outcome()
    assert outcome.stop_reason == "resolved" and outcome.completed
    assert outcome.details["state_match"] and outcome.details["missing_facts"] == []
    assert outcome.violations == ["confirm_before_change@1"]
    assert outcome.success is False


def test_the_same_episode_without_the_violation_succeeds():
    cancelled = {"orders/W1000001/status": "cancelled"}
    task = make_task(status="processing", accept=("cancel",), changes=cancelled, facts=[["cancelled"]])
    env, steps = drive(task, [VERIFY, "Shall I cancel your order?", CANCEL, "Your order has been cancelled."])
    outcome = env.outcome()
    assert steps[-1].done and outcome.success and outcome.violations == []
