"""The customer-service task set: where it ships, and the schema of a task's payload.

A payload carries the episode's sandbox database (``db``), the simulated customer (identity, persona and
the facts it will give when asked), the customer's ``goals`` in order (intent, order, items, the facts the
agent must tell, the actions the customer accepts, the state changes that meet it) and the expected end
state (``expected_changes``). :func:`check_payload` rejects a row the environment could not play, naming
the field, when the file is loaded.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from pipeline.envs.base import Task
from pipeline.envs.customer_service.customer import OPENINGS, STYLE_PREFIX
from pipeline.envs.customer_service.db import ORDER_STATUSES
from pipeline.envs.schema import FieldError, require
from pipeline.envs.tasks import load_split_files

DATA_DIR = Path(__file__).resolve().parents[3] / "data" / "customer_service"


def load_tasks(variant: str | None, split: str | None) -> list[Task]:
    """The shipped tasks (``data/customer_service/tasks``) or a shipped variant (``customer_service/VARIANT``:
    ``data/customer_service/VARIANT/tasks``, e.g. ``order_status``)."""
    directory = DATA_DIR / variant / "tasks" if variant else DATA_DIR / "tasks"
    if variant and (not (DATA_DIR / variant).resolve().is_relative_to(DATA_DIR) or not directory.is_dir()):
        shipped = sorted(p.parent.name for p in DATA_DIR.glob("*/tasks") if p.is_dir())
        raise FileNotFoundError(f"No customer_service task set {variant!r}; shipped variants: {', '.join(shipped)} "
                                "(customer_service/VARIANT), or pass a directory or .jsonl file of your own tasks.")
    return load_split_files(directory, split)


def check_payload(payload: dict) -> None:
    """Validate a customer-service task payload; raises :class:`~pipeline.envs.schema.FieldError`."""
    db = require(payload, "db", dict, "payload.")
    try:
        date.fromisoformat(require(db, "today", str, "payload.db."))
    except ValueError:
        raise FieldError("payload.db.today", "must be an ISO date like 2026-05-01") from None
    for table in ("customers", "orders", "products"):
        require(db, table, dict, "payload.db.")
    for oid, order in db["orders"].items():
        prefix = f"payload.db.orders.{oid}."
        for key, kind in (("customer_id", str), ("status", str), ("items", list), ("shipping_address", dict)):
            require(order, key, kind, prefix)
        if order["status"] not in ORDER_STATUSES:
            raise FieldError(prefix + "status", f"unknown status {order['status']!r}; use one of "
                                                f"{', '.join(ORDER_STATUSES)}")
        for i, item in enumerate(order["items"]):
            for key, kind in (("item_id", str), ("product_id", str), ("variant_id", str), ("price", (int, float)),
                              ("quantity", int)):
                require(item, key, kind, f"{prefix}items[{i}].")
    for pid, product in db["products"].items():
        variants = require(product, "variants", dict, f"payload.db.products.{pid}.")
        for vid, variant in variants.items():
            for key, kind in (("options", dict), ("price", (int, float)), ("stock", int)):
                require(variant, key, kind, f"payload.db.products.{pid}.variants.{vid}.")
    for oid, order in db["orders"].items():
        if order["customer_id"] not in db["customers"]:
            raise FieldError(f"payload.db.orders.{oid}.customer_id",
                             f"{order['customer_id']!r} is not a customer in payload.db.customers")
        for i, item in enumerate(order["items"]):
            if item["variant_id"] not in db["products"].get(item["product_id"], {}).get("variants", {}):
                raise FieldError(f"payload.db.orders.{oid}.items[{i}].variant_id",
                                 f"{item['variant_id']!r} is not a variant of product {item['product_id']!r} in "
                                 "payload.db.products")
    customer = require(payload, "customer", dict, "payload.")
    for key in ("customer_id", "name", "email", "zip_code"):
        require(customer, key, str, "payload.customer.")
    if customer["customer_id"] not in db["customers"]:
        raise FieldError("payload.customer.customer_id", f"{customer['customer_id']!r} is not in payload.db.customers")
    persona = require(customer, "persona", dict, "payload.customer.")
    style = require(persona, "style", str, "payload.customer.persona.")
    if style not in STYLE_PREFIX:
        raise FieldError("payload.customer.persona.style", f"unknown style {style!r}; use one of "
                                                           f"{', '.join(STYLE_PREFIX)}")
    if require(persona, "patience", int, "payload.customer.persona.") < 1:
        raise FieldError("payload.customer.persona.patience", f"must be at least 1 turn, got {persona['patience']}")
    goals = require(payload, "goals", list, "payload.")
    if not goals:
        raise FieldError("payload.goals", "must list at least one goal")
    for i, goal in enumerate(goals):
        prefix = f"payload.goals[{i}]."
        for key, kind in (("intent", str), ("opening", str), ("order_id", str), ("item_names", list),
                          ("item_ids", list), ("facts", list), ("accept", list), ("changes", dict)):
            require(goal, key, kind, prefix)
        if goal["opening"] not in OPENINGS:
            raise FieldError(prefix + "opening", f"unknown opening {goal['opening']!r}; use one of "
                                                 f"{', '.join(OPENINGS)}")
        if goal["order_id"] not in db["orders"]:
            raise FieldError(prefix + "order_id", f"{goal['order_id']!r} is not an order in payload.db.orders")
        items = {i["item_id"] for i in db["orders"][goal["order_id"]]["items"]}
        unknown = [i for i in goal["item_ids"] if i not in items]
        if unknown:
            raise FieldError(prefix + "item_ids", f"{unknown} are not items of order {goal['order_id']!r}")
        if not all(isinstance(f, list) and f and all(isinstance(a, str) for a in f) for f in goal["facts"]):
            raise FieldError(prefix + "facts", "must be a list of non-empty lists of strings (alternatives)")
    require(payload, "expected_changes", dict, "payload.")
