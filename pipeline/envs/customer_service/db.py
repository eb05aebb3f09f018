"""The retail sandbox database: customers, orders and products with variants and stock.

Each episode gets a deep copy of its task's database, so nothing one episode does can be seen by
another. Success is judged on :meth:`Database.state`, a flat, canonical view of everything a tool can
change; the task stores the expected end state as the keys of that view that must change, so any
sequence of actions that reaches the same end state passes.
"""

from __future__ import annotations

import copy
from datetime import date
from typing import Any

ORDER_STATUSES = ("processing", "shipped", "delivered", "cancelled")


def money(x: float) -> float:
    return round(float(x) + 1e-9, 2)


class Database:
    """A thin, copy-on-create wrapper over the task's JSON database."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = copy.deepcopy(data)
        self.data.setdefault("refunds", [])
        self.data.setdefault("escalations", [])
        self.data.setdefault("store_credits", [])

    # -- reads ----------------------------------------------------------------------------------
    @property
    def today(self) -> date:
        return date.fromisoformat(self.data["today"])

    @property
    def customers(self) -> dict[str, dict]:
        return self.data["customers"]

    @property
    def orders(self) -> dict[str, dict]:
        return self.data["orders"]

    @property
    def products(self) -> dict[str, dict]:
        return self.data["products"]

    def find_customer(self, email: str, zip_code: str) -> dict | None:
        email, zip_code = email.strip().lower(), zip_code.strip()
        for customer in self.customers.values():
            if customer["email"].lower() == email and customer["zip_code"] == zip_code:
                return customer
        return None

    def item(self, order: dict, item_id: str) -> dict | None:
        return next((it for it in order["items"] if it["item_id"] == item_id), None)

    def variant(self, product_id: str, variant_id: str) -> dict | None:
        product = self.products.get(product_id)
        return None if product is None else product["variants"].get(variant_id)

    def days_since_delivery(self, order: dict) -> int | None:
        if not order.get("delivery_date"):
            return None
        return (self.today - date.fromisoformat(order["delivery_date"])).days

    # -- writes (tools call these after the policy checks) ---------------------------------------
    def cancel(self, order_id: str) -> None:
        self.orders[order_id]["status"] = "cancelled"

    def refund(self, order_id: str, item_ids: list[str], reason: str) -> float:
        order = self.orders[order_id]
        amount = 0.0
        for item_id in item_ids:
            item = self.item(order, item_id)
            item["status"] = "refunded"
            amount += item["price"] * item["quantity"]
        amount = money(amount)
        self.data["refunds"].append(
            {"order_id": order_id, "item_ids": sorted(item_ids), "amount": amount, "reason": reason}
        )
        return amount

    def exchange(self, order_id: str, item_id: str, new_variant_id: str) -> None:
        item = self.item(self.orders[order_id], item_id)
        item["status"] = "exchange_requested"
        item["exchange_variant_id"] = new_variant_id
        self.variant(item["product_id"], new_variant_id)["stock"] -= item["quantity"]

    def update_address(self, order_id: str, address: dict[str, str]) -> None:
        self.orders[order_id]["shipping_address"] = dict(address)

    def escalate(self, customer_id: str, order_id: str | None, category: str, summary: str) -> str:
        ticket_id = f"TCK-{len(self.data['escalations']) + 1:03d}{customer_id[-4:]}"
        self.data["escalations"].append(
            {"ticket_id": ticket_id, "customer_id": customer_id, "order_id": order_id, "category": category,
             "summary": summary}
        )
        return ticket_id

    def add_store_credit(self, customer_id: str, order_id: str, amount: float) -> None:
        self.data["store_credits"].append({"customer_id": customer_id, "order_id": order_id, "amount": money(amount)})

    # -- the judged view ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything a tool can change, as ``{key: value}`` with canonical, order-free values.

        Free text (escalation summaries) and generated ids are left out: they differ between equally
        good action paths.
        """
        view: dict[str, Any] = {}
        for oid, order in self.orders.items():
            view[f"orders/{oid}/status"] = order["status"]
            view[f"orders/{oid}/shipping_address"] = dict(sorted(order["shipping_address"].items()))
            for it in order["items"]:
                view[f"orders/{oid}/items/{it['item_id']}"] = [it.get("status", "ok"), it.get("exchange_variant_id")]
        for pid, product in self.products.items():
            for vid, variant in product["variants"].items():
                view[f"stock/{pid}/{vid}"] = variant["stock"]
        refunds: dict[str, list] = {}
        for r in self.data["refunds"]:
            refunds.setdefault(f"refunds/{r['order_id']}", []).append([r["item_ids"], money(r["amount"]), r["reason"]])
        escalations: dict[str, list] = {}
        for e in self.data["escalations"]:
            escalations.setdefault(f"escalations/{e['customer_id']}", []).append([e["order_id"], e["category"]])
        credits: dict[str, list] = {}
        for c in self.data["store_credits"]:
            credits.setdefault(f"store_credits/{c['customer_id']}", []).append([c["order_id"], money(c["amount"])])
        for table in (refunds, escalations, credits):
            view.update({k: sorted(v, key=repr) for k, v in table.items()})
        return view


def state_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The keys whose value differs between two :meth:`Database.state` views (``None`` = removed)."""
    keys = set(before) | set(after)
    return {k: after.get(k) for k in sorted(keys) if before.get(k) != after.get(k)}
