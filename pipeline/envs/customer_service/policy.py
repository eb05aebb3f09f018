"""The SOP rules of the retail domain, as data the environment enforces and records.

The prose policy the agent reads lives in ``data/customer_service/sop.md``; each rule there carries the
id used here, so a violation in ``Outcome.violations`` points straight at the paragraph that forbids it.
The environment enforces every rule: a forbidden action is refused (the tool returns an error) *and*
recorded as a violation, so a violating episode can never count as a strict success.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RETURN_WINDOW_DAYS = 30
DAMAGED_WINDOW_DAYS = 60
REFUND_LIMIT = 250.0

RULES: dict[str, str] = {
    "identity_verification": "Verify identity (email + zip code) before disclosing or changing anything; "
    "act only on the verified customer's own orders.",
    "confirm_before_change": "Get the customer's explicit yes before any change.",
    "cancel_after_ship": "Only orders still processing can be cancelled.",
    "address_after_ship": "The shipping address can change only while the order is processing.",
    "refund_window": f"Refund delivered items only: returns within {RETURN_WINDOW_DAYS} days of delivery, "
    f"damaged items within {DAMAGED_WINDOW_DAYS} days.",
    "refund_limit": f"Refunds over ${REFUND_LIMIT:.0f} go to a human (escalate as high_value_refund).",
    "exchange_variant": f"Exchange only to an in-stock variant of the same product, within {RETURN_WINDOW_DAYS} "
    "days of delivery.",
    "store_credit": f"Store credit only for undamaged delivered items past the {RETURN_WINDOW_DAYS}-day window.",
    "escalation": "Escalate only a lost package (delivered, not received) or a refund over the limit.",
}

#: Tool name -> the action word a customer confirms ("yes, cancel it").
CONFIRMABLE_ACTIONS: dict[str, str] = {
    "cancel_order": "cancel",
    "refund_items": "refund",
    "exchange_item": "exchange",
    "update_shipping_address": "address",
    "issue_store_credit": "store_credit",
    "escalate_to_human": "escalate",
}


@dataclass
class Violation:
    rule: str
    turn: int
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}@{self.turn}"


@dataclass
class Session:
    """Per-episode policy state: who is verified, what the customer just agreed to, what went wrong."""

    verified_customer: str | None = None
    confirmed_action: str | None = None
    turn: int = 0
    violations: list[Violation] = field(default_factory=list)
    told: int = 0  # messages the agent had sent to the customer when the current tool call was made
    # order id -> ``told`` when a tool first showed that order: facts about an order count only when told after
    seen_orders: dict[str, int] = field(default_factory=dict)

    def saw(self, order_id: str) -> None:
        self.seen_orders.setdefault(order_id, self.told)

    def violate(self, rule: str, detail: str) -> None:
        assert rule in RULES, rule
        self.violations.append(Violation(rule, self.turn, detail))
