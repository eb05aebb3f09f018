"""The agent's tools for the retail domain.

Each tool is a typed method with a docstring; the JSON schemas in the system prompt are generated from
them. Tools read and write only this episode's :class:`Database`, and check the SOP through the
episode's :class:`Session`: a forbidden action is refused with a :class:`ToolError` that explains the
rule, and the violation is recorded.
"""

from __future__ import annotations

from typing import Any

from pipeline.chat import ToolError
from pipeline.envs.base import tool
from pipeline.envs.customer_service.db import Database, money
from pipeline.envs.customer_service.policy import (
    DAMAGED_WINDOW_DAYS,
    REFUND_LIMIT,
    RETURN_WINDOW_DAYS,
    Session,
)


class RetailTools:
    """Tool methods bound to one episode's database and policy session."""

    def __init__(self, db: Database, session: Session) -> None:
        self.db = db
        self.session = session

    # -- helpers --------------------------------------------------------------------------------
    def _require_verified(self, what: str) -> str:
        if self.session.verified_customer is None:
            self.session.violate("identity_verification", f"{what} before identity verification")
            raise ToolError("Identity not verified. Ask for the customer's email and zip code and call "
                            "verify_identity first.")
        return self.session.verified_customer

    def _own_order(self, order_id: str) -> dict:
        customer_id = self._require_verified(f"access to order {order_id}")
        order = self.db.orders.get(order_id.strip().lstrip("#"))
        if order is None:
            raise ToolError(f"Order {order_id!r} not found. Order ids look like W1234567.")
        if order["customer_id"] != customer_id:
            self.session.violate("identity_verification", f"order {order_id} belongs to another customer")
            raise ToolError(f"Order {order_id} does not belong to the verified customer.")
        self.session.saw(order["order_id"])
        return order

    def _items(self, order: dict, item_ids: list[str]) -> list[dict]:
        if not item_ids:
            raise ToolError("item_ids is empty; pass the item_id of each item (see get_order).")
        items = []
        for item_id in item_ids:
            item = self.db.item(order, item_id)
            if item is None:
                known = ", ".join(i["item_id"] for i in order["items"])
                raise ToolError(f"Item {item_id!r} is not in order {order['order_id']}. Items: {known}.")
            if item.get("status", "ok") != "ok":
                raise ToolError(f"Item {item_id} is already {item['status']}.")
            items.append(item)
        if len({i["item_id"] for i in items}) != len(items):
            raise ToolError("item_ids lists the same item twice.")
        return items

    # -- read tools -----------------------------------------------------------------------------
    @tool()
    def verify_identity(self, email: str, zip_code: str) -> dict[str, Any]:
        """Verify a customer's identity by email and zip code. Required before any other customer tool.

        Args:
            email: The customer's email address.
            zip_code: The 5-digit zip code of the customer's account address.
        """
        customer = self.db.find_customer(email, zip_code)
        if customer is None:
            raise ToolError("No customer matches that email and zip code. Ask the customer to check both.")
        self.session.verified_customer = customer["customer_id"]
        return {"customer_id": customer["customer_id"], "name": customer["name"]}

    @tool()
    def list_orders(self, customer_id: str) -> list[dict[str, Any]]:
        """List a verified customer's orders.

        Args:
            customer_id: The id returned by verify_identity.
        """
        verified = self._require_verified("listing orders")
        if customer_id != verified:
            self.session.violate("identity_verification", f"listing orders of {customer_id}")
            raise ToolError("You can only list the verified customer's own orders.")
        orders = [o for o in self.db.orders.values() if o["customer_id"] == customer_id]
        for order in orders:
            self.session.saw(order["order_id"])
        return [{"order_id": o["order_id"], "status": o["status"], "order_date": o["order_date"],
                 "items": [i["name"] for i in o["items"]]} for o in orders]

    @tool()
    def get_order(self, order_id: str) -> dict[str, Any]:
        """Get an order's details: status, dates, items (with item ids, variants and prices), address, payment.

        Args:
            order_id: The order id, like "W1234567".
        """
        order = self._own_order(order_id)
        keys = ("order_id", "status", "order_date", "ship_date", "delivery_date", "shipping_address",
                "payment_method")
        view = {k: order.get(k) for k in keys}
        view["items"] = [
            {k: i.get(k) for k in ("item_id", "name", "product_id", "variant_id", "options", "quantity", "price",
                                   "status")}
            for i in order["items"]
        ]
        view["total"] = money(sum(i["price"] * i["quantity"] for i in order["items"]))
        return view

    @tool()
    def track_shipment(self, order_id: str) -> dict[str, Any]:
        """Track an order's shipment: carrier, tracking number and dates.

        Args:
            order_id: The order id, like "W1234567".
        """
        order = self._own_order(order_id)
        return {k: order.get(k) for k in ("order_id", "status", "carrier", "tracking_number", "ship_date",
                                          "delivery_date", "estimated_delivery")}

    @tool()
    def get_product(self, product_id: str) -> dict[str, Any]:
        """Get a product's variants with their options, price and stock.

        Args:
            product_id: The product id, like "P101".
        """
        product = self.db.products.get(product_id)
        if product is None:
            raise ToolError(f"Product {product_id!r} not found; product ids are listed in get_order items.")
        return {
            "product_id": product_id,
            "name": product["name"],
            "variants": [
                {"variant_id": vid, "options": v["options"], "price": v["price"], "in_stock": v["stock"] > 0}
                for vid, v in product["variants"].items()
            ],
        }

    # -- write tools ----------------------------------------------------------------------------
    @tool(mutates=True)
    def cancel_order(self, order_id: str, reason: str) -> dict[str, Any]:
        """Cancel an order that is still processing.

        Args:
            order_id: The order id, like "W1234567".
            reason: Why the customer wants to cancel.
        """
        order = self._own_order(order_id)
        if order["status"] != "processing":
            self.session.violate("cancel_after_ship", f"cancel of {order['status']} order {order['order_id']}")
            raise ToolError(f"Order {order['order_id']} is {order['status']} and cannot be cancelled.")
        self.db.cancel(order["order_id"])
        total = money(sum(i["price"] * i["quantity"] for i in order["items"]))
        return {"order_id": order["order_id"], "status": "cancelled", "refunded_to": order["payment_method"],
                "amount": total}

    @tool(mutates=True)
    def refund_items(self, order_id: str, item_ids: list[str], reason: str) -> dict[str, Any]:
        """Refund items of a delivered order to the original payment method.

        Args:
            order_id: The order id, like "W1234567".
            item_ids: The item_id of each item to refund.
            reason: "damaged" for items that arrived damaged or defective, "return" for any other return. (choices: ["damaged", "return"])
        """
        order = self._own_order(order_id)
        items = self._items(order, item_ids)
        days = self.db.days_since_delivery(order)
        window = DAMAGED_WINDOW_DAYS if reason == "damaged" else RETURN_WINDOW_DAYS
        if order["status"] != "delivered" or days is None:
            self.session.violate("refund_window", f"refund of {order['status']} order {order['order_id']}")
            raise ToolError(f"Order {order['order_id']} is {order['status']}; only delivered items can be refunded.")
        if days > window:
            self.session.violate("refund_window", f"{reason} refund {days} days after delivery (window {window})")
            raise ToolError(f"Delivered {days} days ago; {reason} refunds are allowed within {window} days.")
        amount = money(sum(i["price"] * i["quantity"] for i in items))
        if amount > REFUND_LIMIT:
            self.session.violate("refund_limit", f"refund of ${amount:.2f}")
            raise ToolError(f"Refunds over ${REFUND_LIMIT:.0f} need a human: escalate as high_value_refund.")
        amount = self.db.refund(order["order_id"], [i["item_id"] for i in items], reason)
        return {"order_id": order["order_id"], "refunded_items": sorted(item_ids), "amount": amount,
                "refunded_to": order["payment_method"]}

    @tool(mutates=True)
    def exchange_item(self, order_id: str, item_id: str, new_variant_id: str) -> dict[str, Any]:
        """Exchange a delivered item for another variant of the same product (e.g. another size or color).

        Args:
            order_id: The order id, like "W1234567".
            item_id: The item to exchange.
            new_variant_id: The variant to send instead; it must be in stock (see get_product).
        """
        order = self._own_order(order_id)
        (item,) = self._items(order, [item_id])
        days = self.db.days_since_delivery(order)
        if order["status"] != "delivered" or days is None or days > RETURN_WINDOW_DAYS:
            self.session.violate("exchange_variant", f"exchange on {order['status']} order, {days} days")
            raise ToolError(f"Exchanges need a delivered order within {RETURN_WINDOW_DAYS} days of delivery.")
        variant = self.db.variant(item["product_id"], new_variant_id)
        if variant is None:
            self.session.violate("exchange_variant", f"{new_variant_id} is not a variant of {item['product_id']}")
            raise ToolError(f"{new_variant_id} is not a variant of product {item['product_id']}.")
        if new_variant_id == item["variant_id"]:
            raise ToolError("That is the variant the customer already has.")
        if variant["stock"] < item["quantity"]:
            self.session.violate("exchange_variant", f"{new_variant_id} out of stock")
            raise ToolError(f"Variant {new_variant_id} is out of stock.")
        self.db.exchange(order["order_id"], item_id, new_variant_id)
        return {"order_id": order["order_id"], "item_id": item_id, "new_variant_id": new_variant_id,
                "options": variant["options"], "status": "exchange_requested"}

    @tool(mutates=True)
    def update_shipping_address(self, order_id: str, street: str, city: str, state: str, zip_code: str) -> dict[str, Any]:
        """Change the shipping address of an order that has not shipped yet.

        Args:
            order_id: The order id, like "W1234567".
            street: Street and number.
            city: City.
            state: Two-letter state code.
            zip_code: 5-digit zip code.
        """
        order = self._own_order(order_id)
        if order["status"] != "processing":
            self.session.violate("address_after_ship", f"address change on {order['status']} order")
            raise ToolError(f"Order {order['order_id']} is {order['status']}; the address can no longer change.")
        address = {"street": street.strip(), "city": city.strip(), "state": state.strip().upper(),
                   "zip_code": zip_code.strip()}
        self.db.update_address(order["order_id"], address)
        return {"order_id": order["order_id"], "shipping_address": address}

    @tool(mutates=True)
    def issue_store_credit(self, order_id: str, item_ids: list[str]) -> dict[str, Any]:
        """Issue store credit for undamaged delivered items whose 30-day return window has passed.

        Args:
            order_id: The order id, like "W1234567".
            item_ids: The item_id of each item.
        """
        order = self._own_order(order_id)
        items = self._items(order, item_ids)
        days = self.db.days_since_delivery(order)
        if order["status"] != "delivered" or days is None or days <= RETURN_WINDOW_DAYS:
            self.session.violate("store_credit", f"store credit on {order['status']} order, {days} days")
            raise ToolError(f"Store credit is only for delivered items past the {RETURN_WINDOW_DAYS}-day window; "
                            "inside the window, refund instead.")
        amount = money(sum(i["price"] * i["quantity"] for i in items))
        for item in items:
            item["status"] = "store_credit"
        self.db.add_store_credit(order["customer_id"], order["order_id"], amount)
        return {"order_id": order["order_id"], "amount": amount, "credited_items": sorted(item_ids)}

    @tool(mutates=True)
    def escalate_to_human(self, order_id: str, category: str, summary: str) -> dict[str, Any]:
        """Hand the case to a human specialist and open a ticket.

        Args:
            order_id: The order id, like "W1234567".
            category: "lost_package" (delivered but not received) or "high_value_refund" (refund over $250). (choices: ["lost_package", "high_value_refund"])
            summary: One or two sentences for the specialist.
        """
        order = self._own_order(order_id)
        total = money(sum(i["price"] * i["quantity"] for i in order["items"] if i.get("status", "ok") == "ok"))
        if category == "lost_package" and order["status"] != "delivered":
            self.session.violate("escalation", f"lost_package for a {order['status']} order")
            raise ToolError("lost_package is only for orders marked delivered.")
        if category == "high_value_refund" and (order["status"] != "delivered" or total <= REFUND_LIMIT):
            self.session.violate("escalation", f"high_value_refund for ${total:.2f} {order['status']} order")
            raise ToolError(f"high_value_refund is only for delivered orders with over ${REFUND_LIMIT:.0f} to refund.")
        ticket = self.db.escalate(order["customer_id"], order["order_id"], category, summary)
        return {"ticket_id": ticket, "category": category, "order_id": order["order_id"]}
