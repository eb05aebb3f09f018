"""Tests for rewards/evidence.py: reading tool results, customer messages and near-miss calls from a trajectory."""

from __future__ import annotations

from rewards.evidence import evidence_before, item_sums, near_miss_call, view_turn

from .conftest import ORDER, assistant, call, chat, error, result, user


def test_view_pairs_calls_with_results_and_reads_error_kinds():
    t = chat(user("hi"), assistant(call("get_order", order_id="W1") + call("track_shipment", order_id="W1")),
             result("get_order", ORDER), error("track_shipment", "rejected"), assistant("ok"), user("thanks"))
    view = view_turn(t.turns[0])
    assert [(r.name, r.arguments, r.ok) for r in view.results] == [
        ("get_order", {"order_id": "W1"}, True), ("track_shipment", {"order_id": "W1"}, False)]
    assert view.error_kinds == ["rejected"] and not view.is_message
    assert view_turn(t.turns[1]).replies == ["thanks"]
    before = evidence_before(t, 1)
    assert before.user_text == ["hi"] and before.succeeded({"get_order"}) and not before.succeeded({"track_shipment"})
    assert before.system_text and evidence_before(t, 0).results == []


def test_item_sums_and_near_misses():
    assert item_sums(ORDER) == {28.0, 34.0, 62.0}
    assert item_sums({"a": [{"items": [{"price": 5, "quantity": 3}]}]}) == {15.0}
    assert near_miss_call("{'name': 'get_order', 'arguments': {}}")
    assert near_miss_call("Sure!\nrefund_items(order_id='W1', item_ids=['I1'])")
    assert not near_miss_call("Please give me your name and order number.")
