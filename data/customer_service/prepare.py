"""Generate the customer-service task sets from a seed.

    python data/customer_service/prepare.py            # writes tasks/{train,val,test}.jsonl
    python data/customer_service/prepare.py --seed 7 --out /tmp/tasks
    python data/customer_service/prepare.py --intents order_status --out data/customer_service/order_status/tasks
    python data/customer_service/prepare.py --seed 1 --intents order_status --only-split test \
        --out data/customer_service/order_status_holdout/tasks
    python data/customer_service/prepare.py --seed 2 --intents order_status --only-split test \
        --out data/customer_service/order_status_holdout2/tasks
    python data/customer_service/prepare.py --seed 3 --only-split test --per-intent 25 \
        --out data/customer_service/all_intents_holdout/tasks

Every task gets its own customer and orders (ids are unique across the whole set), so the splits are
disjoint by customer and by order, not just by row. The expected end state is computed by applying the
intended changes with the same database code the tools use, and stored as the state keys that change.
``--only-split`` puts every task of a set in one split: with another ``--seed``, that is a fresh held-out
test set, whose task ids (``cs-s1-0000``) name their seed. ``--per-intent N`` keeps the first N tasks (by id)
of each intent label (the eight single intents and ``multi``), so a held-out set covers every intent evenly.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.envs.customer_service.db import Database, money, state_changes  # noqa: E402

SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}
INTENT_COUNTS = {
    "order_status": 100, "cancel": 100, "damaged_refund": 90, "return_refund": 90, "refund_denied": 80,
    "address_change": 90, "exchange": 90, "escalation": 80, "multi": 80,
}
SINGLE = [i for i in INTENT_COUNTS if i != "multi"]

FIRST = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo",
         "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wen", "Yara", "Zoe"]
LAST = ["Garcia", "Smith", "Nguyen", "Okafor", "Kowalski", "Ito", "Haddad", "Silva", "Brown", "Rossi", "Khan",
        "Muller", "Larsen", "Patel", "Cohen", "Dubois"]
STREETS = ["Oak St", "Maple Ave", "Pine Rd", "Cedar Ln", "Elm St", "Lake Dr", "Hill Rd", "River Way", "Park Ave"]
CITIES = [("Austin", "TX"), ("Denver", "CO"), ("Portland", "OR"), ("Madison", "WI"), ("Raleigh", "NC"),
          ("Tucson", "AZ"), ("Boise", "ID"), ("Columbus", "OH"), ("Albany", "NY"), ("Fresno", "CA")]
CARRIERS = ["UPS", "FedEx", "USPS"]
PAYMENTS = ["visa ending 4242", "mastercard ending 5454", "amex ending 3005", "paypal", "gift card"]
# name, base price, option dimensions
CATALOG = [
    ("t-shirt", 19.0, {"color": ["black", "white", "blue"], "size": ["S", "M", "L"]}),
    ("hoodie", 45.0, {"color": ["grey", "navy"], "size": ["M", "L", "XL"]}),
    ("running shoes", 89.0, {"color": ["red", "black"], "size": ["8", "9", "10"]}),
    ("water bottle", 15.0, {"color": ["green", "steel"]}),
    ("coffee mug", 12.5, {"color": ["white", "black", "blue"]}),
    ("desk lamp", 34.0, {"color": ["white", "black"]}),
    ("backpack", 59.0, {"color": ["black", "olive", "blue"]}),
    ("yoga mat", 28.0, {"color": ["purple", "teal"]}),
    ("wireless mouse", 25.0, {"color": ["black", "white"]}),
    ("phone case", 18.0, {"color": ["clear", "black", "pink"]}),
    ("rain jacket", 75.0, {"color": ["yellow", "navy"], "size": ["S", "M", "L"]}),
    ("sneakers", 65.0, {"color": ["white", "black"], "size": ["7", "8", "9", "10"]}),
    ("headphones", 120.0, {"color": ["black", "silver"]}),
    ("blender", 95.0, {"color": ["red", "black"]}),
    ("wool scarf", 32.0, {"color": ["red", "grey"]}),
    ("espresso machine", 329.0, {"color": ["silver", "black"]}),
    ("standing desk", 420.0, {"color": ["oak", "white"]}),
    ("smart watch", 279.0, {"color": ["black", "gold"], "size": ["40mm", "44mm"]}),
    ("air purifier", 265.0, {"color": ["white"]}),
    ("camping tent", 310.0, {"color": ["green", "orange"]}),
]
HIGH_VALUE = [i for i, p in enumerate(CATALOG) if p[1] > 250]
LOW_VALUE = [i for i, p in enumerate(CATALOG) if p[1] <= 130]


class Builder:
    """Builds one task at a time; holds the counters that keep ids unique across the whole set."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        # another seed's ids (tasks, customers, orders, items) start in their own range, so that no id of a
        # fresh held-out set also names something in the seed-0 splits a model was trained on
        self.id_prefix = "cs-" if seed == 0 else f"cs-s{seed}-"
        self.next_customer = 1 + 10_000 * seed
        self.next_order = 1000001 + 1_000_000 * seed
        self.next_item = 1 + 100_000 * seed

    # -- world ----------------------------------------------------------------------------------
    def address(self) -> dict[str, str]:
        city, state = self.rng.choice(CITIES)
        return {"street": f"{self.rng.randint(10, 9999)} {self.rng.choice(STREETS)}", "city": city, "state": state,
                "zip_code": f"{self.rng.randint(10000, 99999)}"}

    def customer(self) -> dict:
        first, last = self.rng.choice(FIRST), self.rng.choice(LAST)
        cid = f"C{self.next_customer:05d}"
        self.next_customer += 1
        home = self.address()
        return {
            "customer_id": cid, "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}{self.rng.randint(1, 99)}@example.com",
            "zip_code": home["zip_code"], "address": home,
            "persona": {"style": self.rng.choice(["polite", "terse", "impatient", "chatty"]),
                        "patience": self.rng.randint(3, 5), "upfront_order_id": self.rng.random() < 0.4},
        }

    def product(self, products: dict, index: int) -> str:
        name, base, dims = CATALOG[index]
        pid = f"P{101 + index}"
        if pid not in products:
            variants = {}
            combos = [{}]
            for dim, values in dims.items():
                combos = [{**c, dim: v} for c in combos for v in values]
            for j, options in enumerate(combos):
                variants[f"{pid}-{j + 1}"] = {"options": options, "price": base, "stock": self.rng.choice([0, 3, 8, 15])}
            products[pid] = {"product_id": pid, "name": name, "variants": variants}
        return pid

    def order(self, db: dict, customer: dict, status: str, today: date, days_since_delivery: int | None = None,
              product_indices: list[int] | None = None) -> dict:
        oid = f"W{self.next_order}"
        self.next_order += self.rng.randint(1, 97)
        indices = product_indices or self.rng.sample(LOW_VALUE, self.rng.randint(1, 3))
        items = []
        for index in indices:
            pid = self.product(db["products"], index)
            vid = self.rng.choice(sorted(db["products"][pid]["variants"]))
            variant = db["products"][pid]["variants"][vid]
            items.append({"item_id": f"I{self.next_item:06d}", "product_id": pid, "variant_id": vid,
                          "name": CATALOG[index][0], "options": variant["options"],
                          "quantity": 1, "price": variant["price"], "status": "ok"})
            self.next_item += 1
        order = {"order_id": oid, "customer_id": customer["customer_id"], "status": status, "items": items,
                 "shipping_address": dict(customer["address"]), "payment_method": self.rng.choice(PAYMENTS),
                 "carrier": None, "tracking_number": None, "ship_date": None, "delivery_date": None,
                 "estimated_delivery": None}
        if status == "processing":
            order["order_date"] = str(today - timedelta(days=self.rng.randint(0, 1)))
        elif status == "shipped":
            shipped = today - timedelta(days=self.rng.randint(1, 3))
            order.update(order_date=str(shipped - timedelta(days=1)), ship_date=str(shipped),
                         estimated_delivery=str(today + timedelta(days=self.rng.randint(1, 4))))
        else:
            delivered = today - timedelta(days=days_since_delivery if days_since_delivery is not None
                                          else self.rng.randint(1, 120))
            shipped = delivered - timedelta(days=self.rng.randint(2, 5))
            order.update(order_date=str(shipped - timedelta(days=1)), ship_date=str(shipped),
                         delivery_date=str(delivered))
        if status in ("shipped", "delivered"):
            order["carrier"] = self.rng.choice(CARRIERS)
            order["tracking_number"] = "1Z" + "".join(self.rng.choice("0123456789ABCDEFGHJKLMNPRSTVWXY") for _ in range(10))
        db["orders"][oid] = order
        return order

    # -- goals: each returns (goal, mutate) where mutate(db) applies the intended change ----------
    def goal(self, intent: str, db: dict, customer: dict, today: date) -> tuple[dict, callable]:
        r = self.rng
        base = {"intent": intent, "opening": intent, "facts": [], "accept": [], "variant_options": None,
                "new_address": None, "dimension": None}

        def noop(d: Database) -> None:
            return None

        if intent == "order_status":
            status = r.choice(["processing", "shipped", "delivered"])
            order = self.order(db, customer, status, today, r.randint(1, 20))
            facts = [[status]] + ([[order["tracking_number"]]] if status == "shipped" else [])
            return {**base, "order_id": order["order_id"], "item_names": [i["name"] for i in order["items"]],
                    "item_ids": [], "facts": facts, "resolution": "inform"}, noop
        if intent in ("cancel", "address_change"):
            decline = r.random() < 0.25
            order = self.order(db, customer, "shipped" if decline else "processing", today)
            action = "cancel" if intent == "cancel" else "address"
            goal = {**base, "order_id": order["order_id"], "item_names": [i["name"] for i in order["items"]],
                    "item_ids": [], "accept": [action], "resolution": "decline" if decline else "act"}
            if intent == "address_change":
                goal["new_address"] = self.address()
            if decline:
                return {**goal, "facts": [["shipped"]]}, noop
            if intent == "cancel":
                return {**goal, "facts": [["cancel"]]}, lambda d: d.cancel(order["order_id"])
            return goal, lambda d: d.update_address(order["order_id"], goal["new_address"])
        if intent in ("damaged_refund", "return_refund", "refund_denied"):
            window = {"damaged_refund": (1, 60), "return_refund": (1, 30), "refund_denied": (31, 90)}[intent]
            order = self.order(db, customer, "delivered", today, r.randint(*window))
            item = r.choice(order["items"])
            amount = money(item["price"] * item["quantity"])
            goal = {**base, "order_id": order["order_id"], "item_names": [item["name"]], "item_ids": [item["item_id"]],
                    "resolution": "act"}
            if intent == "refund_denied":
                goal.update(opening="return_refund", accept=["refund", "store_credit"],
                            facts=[["30 days", "30-day", "30 day"]], resolution="offer")

                def credit(d: Database) -> None:
                    d.item(d.orders[order["order_id"]], item["item_id"])["status"] = "store_credit"
                    d.add_store_credit(customer["customer_id"], order["order_id"], amount)

                return goal, credit
            reason = "damaged" if intent == "damaged_refund" else "return"
            goal.update(accept=["refund"], facts=[[f"{amount:.2f}"]])
            return goal, lambda d: d.refund(order["order_id"], [item["item_id"]], reason)
        if intent == "exchange":
            multi_variant = [i for i in LOW_VALUE if len(CATALOG[i][2]) > 0 and
                             sum(len(v) for v in CATALOG[i][2].values()) > 2]
            order = self.order(db, customer, "delivered", today, r.randint(1, 30),
                               product_indices=[r.choice(multi_variant)] + r.sample(LOW_VALUE, r.randint(0, 1)))
            item = order["items"][0]
            product = db["products"][item["product_id"]]
            dim = r.choice(sorted(CATALOG[int(item["product_id"][1:]) - 101][2]))
            candidates = [vid for vid, v in sorted(product["variants"].items())
                          if vid != item["variant_id"] and all(v["options"][k] == item["options"][k]
                                                                 for k in v["options"] if k != dim)]
            if not candidates:  # single-value dimension: fall back to any other variant
                candidates = [vid for vid in sorted(product["variants"]) if vid != item["variant_id"]]
            target = r.choice(candidates)
            product["variants"][target]["stock"] = max(product["variants"][target]["stock"], 2)
            goal = {**base, "order_id": order["order_id"], "item_names": [item["name"]], "item_ids": [item["item_id"]],
                    "accept": ["exchange"], "variant_options": product["variants"][target]["options"],
                    "variant_id": target, "dimension": dim, "resolution": "act"}
            return goal, lambda d: d.exchange(order["order_id"], item["item_id"], target)
        if intent == "escalation":
            lost = r.random() < 0.5
            if lost:
                order = self.order(db, customer, "delivered", today, r.randint(1, 20))
                goal = {**base, "opening": "lost_package", "order_id": order["order_id"],
                        "item_names": [i["name"] for i in order["items"]], "item_ids": [],
                        "accept": ["escalate"], "category": "lost_package", "resolution": "escalate"}
            else:
                order = self.order(db, customer, "delivered", today, r.randint(1, 55),
                                   product_indices=[r.choice(HIGH_VALUE)])
                item = order["items"][0]
                goal = {**base, "opening": "damaged_refund", "order_id": order["order_id"],
                        "item_names": [item["name"]], "item_ids": [item["item_id"]],
                        "accept": ["refund", "escalate"], "category": "high_value_refund", "resolution": "escalate"}

            def escalate(d: Database) -> None:
                goal["facts"] = [[d.escalate(customer["customer_id"], order["order_id"], goal["category"], "")]]

            return goal, escalate
        raise ValueError(f"unknown intent {intent!r}")

    def task(self, intent: str, index: int) -> dict:
        today = date(2026, 3, 1) + timedelta(days=self.rng.randint(0, 200))
        customer = self.customer()
        db = {"today": str(today), "customers": {customer["customer_id"]: {k: v for k, v in customer.items()
                                                                          if k != "persona"}},
              "orders": {}, "products": {}}
        if intent == "multi":
            first = self.rng.choice(SINGLE)
            second = self.rng.choice([i for i in SINGLE if i != first and {i, first} != {"escalation"}])
            intents = [first, second]
            customer["persona"]["patience"] += 1
        else:
            intents = [intent]
        built = [self.goal(i, db, customer, today) for i in intents]
        if self.rng.random() < 0.5:  # a distractor order the agent must not touch
            self.order(db, customer, self.rng.choice(["processing", "shipped", "delivered"]), today)
        sandbox = Database(db)
        before = sandbox.state()
        for _, mutate in built:
            mutate(sandbox)
        changes = state_changes(before, sandbox.state())
        goals = []
        for goal, _ in built:
            table = {"escalation": "escalations/", "refund_denied": "store_credits/"}.get(goal["intent"])
            owned = {k: v for k, v in changes.items() if goal["order_id"] in k or (table and k.startswith(table))}
            item_keys = {f"orders/{goal['order_id']}/items/{i['item_id']}" for i in db["orders"][goal["order_id"]]["items"]}
            owned.update({k: v for k, v in changes.items() if k.startswith("stock/") and goal["intent"] == "exchange"
                          and goal.get("variant_id") and k.endswith(goal["variant_id"])})
            assert item_keys, goal
            goals.append({**goal, "changes": owned})
        return {
            "id": f"{self.id_prefix}{index:04d}", "domain": "customer_service", "split": "",
            "intents": intents,
            "payload": {"db": db, "customer": {**{k: customer[k] for k in ("customer_id", "name", "email", "zip_code")},
                                                "persona": customer["persona"]},
                        "goals": goals, "expected_changes": changes},
        }


def generate(seed: int = 0, only_split: str | None = None) -> dict[str, list[dict]]:
    builder = Builder(seed)
    plan = [intent for intent, n in INTENT_COUNTS.items() for _ in range(n)]
    builder.rng.shuffle(plan)
    tasks = [builder.task(intent, i) for i, intent in enumerate(plan)]
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    by_intent: dict[str, list[dict]] = {}
    for task, intent in zip(tasks, plan):
        by_intent.setdefault(intent, []).append(task)
    for intent, group in by_intent.items():  # stratify so every split has every intent
        n_val = round(len(group) * SPLITS["val"])
        n_test = round(len(group) * SPLITS["test"])
        for j, task in enumerate(group):
            split = only_split or ("test" if j < n_test else "val" if j < n_test + n_val else "train")
            task["split"] = split
            splits[split].append(task)
    for rows in splits.values():
        rows.sort(key=lambda t: t["id"])
    return splits


def first_per_intent(rows: list[dict], n: int) -> list[dict]:
    """The first ``n`` rows (in order) of each intent label: the single intent, or ``multi``."""
    kept: dict[str, int] = {}
    out = []
    for row in rows:
        label = row["intents"][0] if len(row["intents"]) == 1 else "multi"
        if kept.get(label, 0) < n:
            kept[label] = kept.get(label, 0) + 1
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tasks")
    parser.add_argument("--intents", nargs="+", metavar="INTENT",
                        help="Keep only the tasks whose intents are exactly these (e.g. --intents order_status for the "
                             "single-intent set in order_status/tasks); the default keeps every task.")
    parser.add_argument("--only-split", choices=sorted(SPLITS), default=None,
                        help="Put every task in this split and write only its file (with a --seed other than 0: a "
                             "fresh held-out test set for models trained on the seed-0 splits).")
    parser.add_argument("--per-intent", type=int, default=None, metavar="N",
                        help="Keep the first N tasks (by id) of each intent label, 'multi' included.")
    args = parser.parse_args()
    if args.per_intent is not None and args.per_intent < 1:
        parser.error(f"--per-intent must be at least 1, got {args.per_intent}.")
    unknown = sorted(set(args.intents or ()) - set(SINGLE))
    if unknown:
        parser.error(f"unknown intent(s) {', '.join(unknown)}; choose from {', '.join(SINGLE)}.")
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(args.seed, args.only_split).items():
        if args.only_split and split != args.only_split:
            continue
        if args.intents:
            rows = [row for row in rows if sorted(row["intents"]) == sorted(args.intents)]
        if args.per_intent:
            rows = first_per_intent(rows, args.per_intent)
        path = args.out / f"{split}.jsonl"
        with path.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        print(f"{path}: {len(rows)} tasks")


if __name__ == "__main__":
    main()
