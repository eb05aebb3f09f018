"""Tests for pipeline/envs/tasks.py: loading task sets, and failing loudly on bad rows."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline.envs import Task, TaskFileError, load_tasks
from pipeline.envs.tasks import DATA_ROOT, intent_label, spread_over_intents, weight_intents

TASK_DIR = DATA_ROOT / "customer_service" / "tasks"


@pytest.fixture(scope="module")
def all_tasks() -> list[Task]:
    return load_tasks("customer_service")


@pytest.fixture(scope="module")
def good_row() -> dict:
    with (TASK_DIR / "test.jsonl").open() as f:
        return json.loads(f.readline())


def write_rows(path: Path, rows: list) -> Path:
    """Write rows as JSONL; a str row is written as-is (for broken JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- loading -------------------------------------------------------------------------------------
def test_load_by_name_gives_every_split(all_tasks):
    assert all(isinstance(t, Task) and t.domain == "customer_service" for t in all_tasks)
    assert {t.split for t in all_tasks} == {"train", "val", "test"}
    assert len({t.id for t in all_tasks}) == len(all_tasks)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_filter_by_name_directory_and_file(all_tasks, split):
    """A split loads the same tasks whether named by domain, by directory or by its own file."""
    expected = [t for t in all_tasks if t.split == split]
    assert expected
    assert load_tasks("customer_service", split) == expected
    assert load_tasks(TASK_DIR, split) == expected
    assert load_tasks(str(TASK_DIR / f"{split}.jsonl")) == expected
    assert load_tasks(TASK_DIR / f"{split}.jsonl", split=split) == expected


def test_split_filter_on_a_file_drops_other_splits(tmp_path, good_row):
    other = {**copy.deepcopy(good_row), "id": "other", "split": "train"}
    path = write_rows(tmp_path / "mixed.jsonl", [good_row, other])
    assert [t.id for t in load_tasks(path)] == [good_row["id"], "other"]
    assert [t.id for t in load_tasks(path, split="train")] == ["other"]



def test_load_by_name_does_not_depend_on_the_working_directory(all_tasks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_tasks("customer_service", "val") == [t for t in all_tasks if t.split == "val"]

def test_load_by_directory_without_split_is_every_split(all_tasks):
    assert load_tasks(TASK_DIR) == all_tasks


def test_blank_lines_are_skipped(tmp_path, good_row):
    path = write_rows(tmp_path / "t.jsonl", ["", good_row, "   "])
    assert len(load_tasks(path)) == 1


def test_unknown_split_and_unknown_name_are_refused():
    with pytest.raises(ValueError, match="Unknown split"):
        load_tasks("customer_service", "dev")
    with pytest.raises(FileNotFoundError, match="no_such_domain"):
        load_tasks("no_such_domain")
    with pytest.raises(ValueError, match="Unknown split 'dev'"):  # a typo never yields an empty task list
        load_tasks(DATA_ROOT / "customer_service" / "tasks" / "test.jsonl", "dev")


# -- bad files -----------------------------------------------------------------------------------
def mutate(row: dict, path: str, value=None, delete: bool = False) -> dict:
    """A deep copy of ``row`` with the dotted ``path`` set to ``value`` (or deleted)."""
    row = copy.deepcopy(row)
    *parents, last = path.split(".")
    node = row
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if delete:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return row


def first_order_id(row: dict) -> str:
    return next(iter(row["payload"]["db"]["orders"]))


BAD_ROWS = {
    "missing id": (lambda r: mutate(r, "id", delete=True), "'id'", "is missing"),
    "intents not a list": (lambda r: mutate(r, "intents", "cancel"), "'intents'", "must be list"),
    "missing db": (lambda r: mutate(r, "payload.db", delete=True), "'payload.db'", "is missing"),
    "bad date": (lambda r: mutate(r, "payload.db.today", "2026-13-45"), "'payload.db.today'", "ISO date"),
    "patience is a string": (lambda r: mutate(r, "payload.customer.persona.patience", "3"),
                             "'payload.customer.persona.patience'", "must be int, got str"),
    "patience is a bool": (lambda r: mutate(r, "payload.customer.persona.patience", True),
                           "'payload.customer.persona.patience'", "got bool"),
    "missing email": (lambda r: mutate(r, "payload.customer.email", delete=True), "'payload.customer.email'",
                      "is missing"),
    "no goals": (lambda r: mutate(r, "payload.goals", []), "'payload.goals'", "at least one goal"),
    "goal order not in db": (lambda r: mutate(r, "payload.goals.0.order_id", "W9999999"),
                             "'payload.goals[0].order_id'", "W9999999"),
    "facts not lists": (lambda r: mutate(r, "payload.goals.0.facts", ["shipped"]), "'payload.goals[0].facts'",
                        "list of non-empty lists"),
    "unknown order status": (lambda r: mutate(r, f"payload.db.orders.{first_order_id(r)}.status", "lost"),
                             "'payload.db.orders.{oid}.status'", "unknown status"),
    "goal item not in its order": (lambda r: mutate(r, "payload.goals.0.item_ids", ["I999999"]),
                                   "'payload.goals[0].item_ids'", "I999999"),
    "customer not in db": (lambda r: mutate(r, "payload.customer.customer_id", "C99999"),
                           "'payload.customer.customer_id'", "C99999"),
    "item variant not in products": (
        lambda r: mutate(r, f"payload.db.orders.{first_order_id(r)}.items.0.variant_id", "P999-1"),
        "'payload.db.orders.{oid}.items[0].variant_id'", "P999-1"),
    "item price is a string": (lambda r: mutate(r, f"payload.db.orders.{first_order_id(r)}.items.0.price", "9.99"),
                               "'payload.db.orders.{oid}.items[0].price'", "must be int or float"),
}


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_row_names_file_line_and_field(tmp_path, good_row, name):
    """A bad row (on line 2, after a good one) fails the load with file, line and field in the message."""
    make_bad, field, problem = BAD_ROWS[name]
    other = {**copy.deepcopy(good_row), "id": "second"}
    path = write_rows(tmp_path / "tasks.jsonl", [good_row, make_bad(other)])
    with pytest.raises(TaskFileError) as info:
        load_tasks(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 2" in message
    assert "field " + field.format(oid=first_order_id(good_row)) in message
    assert problem in message
    assert info.value.line == 2


def test_invalid_json_names_file_and_line(tmp_path, good_row):
    path = write_rows(tmp_path / "tasks.jsonl", [good_row, {**good_row, "id": "second"}, '{"id": "x", '])
    with pytest.raises(TaskFileError) as info:
        load_tasks(path)
    assert str(path) in str(info.value) and "line 3" in str(info.value) and "not valid JSON" in str(info.value)


def test_a_row_that_is_not_an_object_is_refused(tmp_path):
    path = write_rows(tmp_path / "tasks.jsonl", ["[1, 2]"])
    with pytest.raises(TaskFileError, match=r"line 1.*must be a JSON object"):
        load_tasks(path)


def test_duplicate_id_names_both_lines(tmp_path, good_row):
    path = write_rows(tmp_path / "tasks.jsonl", [good_row, {**good_row, "split": "val"}])
    with pytest.raises(TaskFileError) as info:
        load_tasks(path)
    message = str(info.value)
    assert str(path) in message and "line 2" in message and "field 'id'" in message
    assert "duplicate" in message and "line 1" in message


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "test.jsonl"
    with pytest.raises(TaskFileError) as info:
        load_tasks(path)
    assert str(path) in str(info.value) and "not found" in str(info.value)


def test_directory_missing_a_split_file_names_it(tmp_path, good_row):
    write_rows(tmp_path / "train.jsonl", [good_row])
    assert len(load_tasks(tmp_path, "train")) == 1
    with pytest.raises(TaskFileError, match="val.jsonl"):
        load_tasks(tmp_path)


def test_a_validation_subset_takes_every_intent_in_turn():
    val = load_tasks("customer_service", "val")
    subset = spread_over_intents(val, 18)
    group = [intent_label(t.intents) for t in subset]
    assert len(set(group)) == 9 and all(group.count(name) == 2 for name in set(group))  # 8 intents + multi-intent
    assert [t.id for t in val[:18]] != [t.id for t in subset]  # the first 18 cover fewer intents
    firsts = {}
    for t in val:
        firsts.setdefault(intent_label(t.intents), t.id)
    assert {t.id for t in subset[:9]} == set(firsts.values())  # each group's first task, in the file's order
    assert len(set(t.id for t in subset)) == 18


def test_intent_weights_repeat_each_tasks_of_an_intent_and_zero_leaves_it_out():
    train = load_tasks("customer_service", "train")
    counts = Counter(intent_label(t.intents) for t in train)
    weighted = weight_intents(train, {"escalation": 3, "cancel": 0, "multi": 1})
    after = Counter(intent_label(t.intents) for t in weighted)
    assert after["escalation"] == 3 * counts["escalation"] and "cancel" not in after
    assert all(after[name] == counts[name] for name in counts if name not in ("escalation", "cancel"))
    escalations = [t.id for t in train if intent_label(t.intents) == "escalation"]
    assert [t.id for t in weighted if intent_label(t.intents) == "escalation"] == [i for i in escalations
                                                                                  for _ in range(3)]
    kept = [t.id for t in weighted if intent_label(t.intents) != "escalation"]
    assert kept == [t.id for t in train if intent_label(t.intents) not in ("escalation", "cancel")]  # in order
    assert weight_intents(train, {}) == train


def test_intent_weights_refuse_an_intent_the_tasks_lack_and_a_weighting_that_leaves_nothing():
    tasks = load_tasks("customer_service/order_status", "train")
    with pytest.raises(ValueError, match=r"names 'escalaton', which no training task has; the training tasks' "
                                         r"intents are: order_status\."):
        weight_intents(tasks, {"escalaton": 2})
    with pytest.raises(ValueError, match="every training intent weight 0"):
        weight_intents(tasks, {"order_status": 0})


def test_a_single_intent_subset_is_the_first_tasks_and_a_large_limit_keeps_all():
    tasks = load_tasks("customer_service/order_status", "val")
    assert spread_over_intents(tasks, 4) == tasks[:4]
    assert spread_over_intents(tasks, None) == tasks == spread_over_intents(tasks, len(tasks) + 5)
