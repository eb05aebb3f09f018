"""Loading and checking task files.

Task sets are JSONL, one task per line (``data/<domain>/tasks/<split>.jsonl``). Every load is checked
against the schema below, and a bad row raises :class:`TaskFileError` naming the file, the line and the
field, so a hand-edited or generated file fails at load time instead of halfway through a training run.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

from pipeline.envs.base import Task

DATA_ROOT = Path(__file__).resolve().parents[2] / "data"
SPLITS = ("train", "val", "test")


class TaskFileError(ValueError):
    """A task file that cannot be used; the message names the file, line and field."""

    def __init__(self, path: Path | str, line: int | None, field: str | None, problem: str) -> None:
        where = f"{path}" + (f", line {line}" if line is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.field = path, line, field


def _require(row: dict, key: str, kind: type | tuple[type, ...], prefix: str = "") -> Any:
    name = f"{prefix}{key}"
    if not isinstance(row, dict) or key not in row:
        raise _FieldError(name, "is missing")
    value = row[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise _FieldError(name, f"must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    return value


class _FieldError(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


def _check_customer_service(payload: dict) -> None:
    db = _require(payload, "db", dict, "payload.")
    try:
        date.fromisoformat(_require(db, "today", str, "payload.db."))
    except ValueError:
        raise _FieldError("payload.db.today", "must be an ISO date like 2026-05-01") from None
    for table in ("customers", "orders", "products"):
        _require(db, table, dict, "payload.db.")
    for oid, order in db["orders"].items():
        prefix = f"payload.db.orders.{oid}."
        for key, kind in (("customer_id", str), ("status", str), ("items", list), ("shipping_address", dict)):
            _require(order, key, kind, prefix)
        if order["status"] not in ("processing", "shipped", "delivered", "cancelled"):
            raise _FieldError(prefix + "status", f"unknown status {order['status']!r}")
        for i, item in enumerate(order["items"]):
            for key, kind in (("item_id", str), ("product_id", str), ("variant_id", str), ("price", (int, float)),
                              ("quantity", int)):
                _require(item, key, kind, f"{prefix}items[{i}].")
    for pid, product in db["products"].items():
        variants = _require(product, "variants", dict, f"payload.db.products.{pid}.")
        for vid, variant in variants.items():
            for key, kind in (("options", dict), ("price", (int, float)), ("stock", int)):
                _require(variant, key, kind, f"payload.db.products.{pid}.variants.{vid}.")
    for oid, order in db["orders"].items():
        if order["customer_id"] not in db["customers"]:
            raise _FieldError(f"payload.db.orders.{oid}.customer_id",
                              f"{order['customer_id']!r} is not a customer in payload.db.customers")
        for i, item in enumerate(order["items"]):
            if item["variant_id"] not in db["products"].get(item["product_id"], {}).get("variants", {}):
                raise _FieldError(f"payload.db.orders.{oid}.items[{i}].variant_id",
                                  f"{item['variant_id']!r} is not a variant of product {item['product_id']!r} in "
                                  "payload.db.products")
    customer = _require(payload, "customer", dict, "payload.")
    for key in ("customer_id", "name", "email", "zip_code"):
        _require(customer, key, str, "payload.customer.")
    if customer["customer_id"] not in db["customers"]:
        raise _FieldError("payload.customer.customer_id", f"{customer['customer_id']!r} is not in payload.db.customers")
    persona = _require(customer, "persona", dict, "payload.customer.")
    _require(persona, "style", str, "payload.customer.persona.")
    _require(persona, "patience", int, "payload.customer.persona.")
    goals = _require(payload, "goals", list, "payload.")
    if not goals:
        raise _FieldError("payload.goals", "must list at least one goal")
    for i, goal in enumerate(goals):
        prefix = f"payload.goals[{i}]."
        for key, kind in (("intent", str), ("order_id", str), ("item_names", list), ("item_ids", list),
                          ("facts", list), ("accept", list), ("changes", dict)):
            _require(goal, key, kind, prefix)
        if goal["order_id"] not in db["orders"]:
            raise _FieldError(prefix + "order_id", f"{goal['order_id']!r} is not an order in payload.db.orders")
        items = {i["item_id"] for i in db["orders"][goal["order_id"]]["items"]}
        unknown = [i for i in goal["item_ids"] if i not in items]
        if unknown:
            raise _FieldError(prefix + "item_ids", f"{unknown} are not items of order {goal['order_id']!r}")
        if not all(isinstance(f, list) and f and all(isinstance(a, str) for a in f) for f in goal["facts"]):
            raise _FieldError(prefix + "facts", "must be a list of non-empty lists of strings (alternatives)")
    _require(payload, "expected_changes", dict, "payload.")


def _check_sop(payload: dict) -> None:
    from pipeline.envs.sop import check_sop_payload  # sop.py imports this module

    check_sop_payload(payload)


DOMAIN_CHECKS = {"customer_service": _check_customer_service, "sop": _check_sop}


def check_task_row(row: Any) -> Task:
    """Validate one decoded row and build its :class:`Task` (raises ``_FieldError``)."""
    if not isinstance(row, dict):
        raise _FieldError("<row>", f"each line must be a JSON object, got {type(row).__name__}")
    for key, kind in (("id", str), ("domain", str), ("split", str), ("intents", list), ("payload", dict)):
        _require(row, key, kind)
    check = DOMAIN_CHECKS.get(row["domain"])
    if check is not None:
        check(row["payload"])
    return Task.from_dict(row)


def read_task_file(path: Path) -> list[Task]:
    if not path.is_file():
        raise TaskFileError(path, None, None, "file not found. Regenerate the shipped sets with "
                                              "`python data/customer_service/prepare.py`, or pass an existing path.")
    tasks, seen = [], {}
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskFileError(path, lineno, None, f"not valid JSON ({exc.msg}, column {exc.colno})") from None
            try:
                task = check_task_row(row)
            except _FieldError as exc:
                raise TaskFileError(path, lineno, exc.field, f"{exc}. Fix the row or regenerate the file.") from None
            if task.id in seen:
                raise TaskFileError(path, lineno, "id", f"duplicate task id {task.id!r} (first on line {seen[task.id]})")
            seen[task.id] = lineno
            tasks.append(task)
    return tasks


def load_tasks(path_or_name: str | Path, split: str | None = None) -> list[Task]:
    """Load tasks by domain name (``"customer_service"``), directory of split files, JSONL file, or ``sop:PATH``.

    ``split`` picks ``train``/``val``/``test`` from a name or directory; ``None`` loads every split.
    ``sop:PATH`` reads an SOP-Bench folder, one task per row of its CSV (see :mod:`pipeline.envs.sop`).
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}, or None for all.")
    if str(path_or_name).startswith("sop:"):
        from pipeline.envs.sop import load_sop_tasks

        return load_sop_tasks(str(path_or_name), split)
    source = Path(path_or_name)
    if not source.exists() and (DATA_ROOT / str(path_or_name) / "tasks").is_dir():
        source = DATA_ROOT / str(path_or_name) / "tasks"
    if source.is_dir():
        files = [source / f"{s}.jsonl" for s in ((split,) if split else SPLITS)]
        return [task for f in files for task in read_task_file(f)]
    if source.suffix == ".jsonl" or source.exists():
        tasks = read_task_file(source)
        return [t for t in tasks if split is None or t.split == split]
    raise FileNotFoundError(
        f"No task set {str(path_or_name)!r}: pass a domain name ({', '.join(sorted(set(DOMAIN_CHECKS) - {'sop'}))}), a "
        "directory of <split>.jsonl files, a .jsonl file, or sop:PATH for an SOP-Bench folder."
    )
