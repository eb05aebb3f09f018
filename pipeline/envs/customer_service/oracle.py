"""The scripted expert for the retail domain.

``oracle_policy(task)`` returns a policy ``(messages) -> str`` that solves the task through the same
text interface a model uses: it asks the customer for what it needs, calls tools with
``<tool_call>`` blocks, reads their JSON results, proposes each change and waits for the customer's
yes. It knows the task's plan (which is how it can serve as a solvability check and as the source of
SFT demonstrations), but every value it uses has first appeared in the conversation.

The policy is stateless: each call re-reads the whole conversation, so one policy object can drive
any number of episodes of its task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.chat import format_tool_call, parse_tool_calls, parse_tool_message
from pipeline.envs.base import Task
from pipeline.envs.customer_service.policy import REFUND_LIMIT
from pipeline.envs.customer_service.customer import describe_options, format_address

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")
_ZIP = re.compile(r"\b\d{5}\b")
_YES = re.compile(r"\b(yes|sure)\b", re.IGNORECASE)

ASK_IDENTITY = "To verify your identity, could you please give me your email address and zip code?"
ASK_ORDER = "Could you please share the order number?"
CLOSING = "Is there anything else I can help you with?"


@dataclass
class View:
    """What the conversation so far has established."""

    user_text: str = ""
    said: list[str] = field(default_factory=list)
    results: list[tuple[str, dict, dict]] = field(default_factory=list)  # (tool, arguments, body)
    replies: dict[str, str] = field(default_factory=dict)  # agent message -> the customer's next message

    @classmethod
    def read(cls, messages: list[dict]) -> "View":
        view = cls()
        pending: list[tuple[str, dict]] = []
        last_said: str | None = None
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "user":
                view.user_text += "\n" + content
                if last_said is not None:
                    view.replies.setdefault(last_said, content)
                    last_said = None
            elif role == "assistant":
                calls = parse_tool_calls(content)
                if calls:
                    pending = [(c.name, c.arguments) for c in calls if hasattr(c, "arguments")]
                else:
                    view.said.append(content)
                    last_said = content
            elif role == "tool":
                body = parse_tool_message(message) or {}
                name, args = pending.pop(0) if pending else (body.get("tool"), {})
                view.results.append((name, args, body))
        return view

    def ok(self, tool: str, **match: Any) -> dict | None:
        """The result of the last successful call of ``tool`` whose arguments include ``match``."""
        for name, args, body in reversed(self.results):
            if name == tool and body.get("ok") and all(args.get(k) == v for k, v in match.items()):
                return body["result"]
        return None

    def agreed(self, proposal: str) -> bool:
        return proposal in self.replies and bool(_YES.search(self.replies[proposal]))


def _call(name: str, **arguments: Any) -> str:
    return format_tool_call(name, arguments)


def _money(x: float) -> str:
    return f"${x:.2f}"


class RetailOracle:
    """Callable policy for one task (see module docstring)."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.goals = task.payload["goals"]

    def __call__(self, messages: list[dict]) -> str:
        view = View.read(messages)
        if view.ok("verify_identity") is None:
            email, zipcode = _EMAIL.search(view.user_text), _ZIP.search(view.user_text)
            if email and zipcode:
                return _call("verify_identity", email=email.group(0).rstrip("."), zip_code=zipcode.group(0))
            return ASK_IDENTITY
        for goal in self.goals:
            step = self._solve(goal, view)
            if step is not None:
                return step
        return CLOSING

    def _solve(self, goal: dict, view: View) -> str | None:
        """The next message for ``goal``, or ``None`` once its closing message has been sent."""
        oid = goal["order_id"]
        if oid not in view.user_text:
            return ASK_ORDER
        order = view.ok("get_order", order_id=oid)
        if order is None:
            return _call("get_order", order_id=oid)
        items = [i for i in order["items"] if i["item_id"] in goal["item_ids"]]
        intent = goal["intent"]
        if intent == "order_status":
            return self._status(order, view)
        if intent in ("cancel", "address_change") and order["status"] != "processing":
            what = "it can no longer be cancelled" if intent == "cancel" else "its address can no longer be changed"
            return self._once(f"I'm sorry, order #{oid} has already shipped, so {what}.", view)
        if intent == "cancel":
            return self._change(view, f"Order #{oid} is still processing, so I can cancel it. Would you like me to "
                                      "cancel it now?", "cancel_order", {"order_id": oid, "reason": "customer request"},
                                lambda r: f"Your order #{oid} has been cancelled and {_money(r['amount'])} will be "
                                          f"refunded to your {r['refunded_to']}.")
        if intent == "address_change":
            address = goal["new_address"]
            if address["street"] not in view.user_text:
                return "What is the new shipping address for this order?"
            text = format_address(address)
            return self._change(view, f"I'll change the shipping address of order #{oid} to {text}. Shall I update "
                                      "the address?", "update_shipping_address", {"order_id": oid, **address},
                                lambda r: f"Done: order #{oid} will now ship to {text}.")
        amount = sum(i["price"] * i["quantity"] for i in items)
        names = " and ".join(i["name"] for i in items)
        ids = [i["item_id"] for i in items]
        if intent in ("damaged_refund", "return_refund"):
            reason = "damaged" if intent == "damaged_refund" else "return"
            return self._change(view, f"I can refund the {names} ({_money(amount)}) to your {order['payment_method']}."
                                      " Shall I go ahead with the refund?",
                                "refund_items", {"order_id": oid, "item_ids": ids, "reason": reason},
                                lambda r: f"Done: {_money(r['amount'])} has been refunded to your {r['refunded_to']}.")
        if intent == "refund_denied":
            return self._change(view, f"I'm sorry, the {names} was delivered on {order['delivery_date']}, which is "
                                      "past our 30-day return window, so I can't refund it. I can offer store "
                                      f"credit of {_money(amount)} instead. Would you like the store credit?",
                                "issue_store_credit", {"order_id": oid, "item_ids": ids},
                                lambda r: f"Done: {_money(r['amount'])} in store credit has been added to your account.")
        if intent == "exchange":
            return self._exchange(goal, order, items[0], view)
        if intent == "escalation":
            if goal["category"] == "lost_package":
                proposal = ("I'm sorry your package didn't arrive. I can escalate this to a human specialist who will "
                            "investigate. Would you like me to escalate it?")
                summary = f"Order {oid} marked delivered but the customer did not receive it."
            else:
                proposal = (f"The refund would be {_money(amount)}, which is over our ${REFUND_LIMIT:.0f} limit, so a "
                            "human specialist must handle it. Shall I escalate it?")
                summary = f"Damaged {names} in order {oid}; refund of {_money(amount)} needs approval."
            return self._change(view, proposal, "escalate_to_human",
                                {"order_id": oid, "category": goal["category"], "summary": summary},
                                lambda r: f"I've escalated this to a specialist. Your ticket id is {r['ticket_id']}.")
        raise ValueError(f"the oracle has no plan for intent {intent!r}")

    @staticmethod
    def _once(text: str, view: View) -> str | None:
        return None if text in view.said else text

    def _change(self, view: View, proposal: str, tool: str, arguments: dict, closing: Callable[[dict], str]) -> str | None:
        """Propose, wait for the yes, call the tool, then tell the customer the result."""
        result = view.ok(tool, **{k: v for k, v in arguments.items() if k != "summary"})
        if result is not None:
            return self._once(closing(result), view)
        if not view.agreed(proposal):
            return proposal
        return _call(tool, **arguments)

    def _status(self, order: dict, view: View) -> str | None:
        oid = order["order_id"]
        if order["status"] == "processing":
            return self._once(f"Order #{oid} is still processing and has not shipped yet.", view)
        if order["status"] == "delivered":
            return self._once(f"Order #{oid} was delivered on {order['delivery_date']}.", view)
        tracking = view.ok("track_shipment", order_id=oid)
        if tracking is None:
            return _call("track_shipment", order_id=oid)
        return self._once(f"Order #{oid} has shipped via {tracking['carrier']}; the tracking number is "
                          f"{tracking['tracking_number']}, expected by {tracking['estimated_delivery']}.", view)

    def _exchange(self, goal: dict, order: dict, item: dict, view: View) -> str | None:
        options = describe_options(goal["variant_options"])
        if options.lower() not in view.user_text.lower():
            return f"Which {goal['dimension']} would you like instead?"
        product = view.ok("get_product", product_id=item["product_id"])
        if product is None:
            return _call("get_product", product_id=item["product_id"])
        variant = next(v for v in product["variants"] if v["options"] == goal["variant_options"])
        return self._change(view, f"The {options} {item['name']} is in stock. Would you like me to exchange your "
                                  f"{item['name']} for it?", "exchange_item",
                            {"order_id": order["order_id"], "item_id": item["item_id"],
                             "new_variant_id": variant["variant_id"]},
                            lambda r: f"Done: your {item['name']} will be exchanged for the {options} one.")


def oracle_policy(task: Task) -> Callable[[list[dict]], str]:
    return RetailOracle(task)
