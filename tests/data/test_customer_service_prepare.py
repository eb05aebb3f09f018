"""Tests for data/customer_service/: the shipped task sets, their generator and the SOP text."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline.envs import Task, load_tasks, make_env, oracle_policy
from pipeline.envs.customer_service.policy import RULES
from pipeline.rollout import run_policy

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "customer_service"
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def prepare():
    """data/customer_service/prepare.py, imported from its path (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("customer_service_prepare", DATA_DIR / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Task]]:
    return {split: load_tasks("customer_service", split) for split in SPLITS}


def test_enough_tasks_and_intents(splits):
    tasks = [t for split in SPLITS for t in splits[split]]
    assert len(tasks) >= 600
    intents = Counter(i for t in tasks for i in t.intents)
    assert len(intents) >= 8
    multi = [t for t in tasks if len(t.intents) == 2]
    assert multi and all(len(t.payload["goals"]) == 2 for t in multi)
    assert all(len(t.payload["goals"]) == len(t.intents) for t in tasks)


def test_every_split_has_every_intent(splits):
    single = {split: {t.intents[0] for t in splits[split] if len(t.intents) == 1} for split in SPLITS}
    assert single["train"] == single["val"] == single["test"]
    assert all(any(len(t.intents) == 2 for t in splits[split]) for split in SPLITS)
    assert all(t.split == split for split in SPLITS for t in splits[split])


def test_splits_are_disjoint_by_customer_and_order(splits):
    """No customer and no order (of any task's db, distractors included) appears in two splits."""
    customers = {s: {c for t in splits[s] for c in t.payload["db"]["customers"]} for s in SPLITS}
    orders = {s: {o for t in splits[s] for o in t.payload["db"]["orders"]} for s in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not customers[a] & customers[b], (a, b)
        assert not orders[a] & orders[b], (a, b)
    for split in SPLITS:
        assert all(t.payload["customer"]["customer_id"] in t.payload["db"]["customers"] for t in splits[split])


def test_generate_reproduces_the_committed_files(prepare):
    """`prepare.generate(0)` writes exactly the shipped JSONL files, byte for byte."""
    generated = prepare.generate(0)
    assert set(generated) == set(SPLITS)
    for split in SPLITS:
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in generated[split])
        assert text == (DATA_DIR / "tasks" / f"{split}.jsonl").read_text(), split


def test_the_order_status_set_is_the_full_sets_order_status_tasks(prepare, splits, tmp_path, monkeypatch, capsys):
    """`prepare.py --intents order_status` regenerates data/customer_service/order_status/tasks byte for byte:
    the full set's single-intent order-status tasks, same ids and splits, loadable by name."""
    monkeypatch.setattr("sys.argv", ["prepare.py", "--intents", "order_status", "--out", str(tmp_path)])
    prepare.main()
    for split in SPLITS:
        shipped = DATA_DIR / "order_status" / "tasks" / f"{split}.jsonl"
        assert (tmp_path / f"{split}.jsonl").read_text() == shipped.read_text(), split
        narrowed = load_tasks("customer_service/order_status", split)
        assert [t.id for t in narrowed] == [t.id for t in splits[split] if t.intents == ["order_status"]]
        assert len(narrowed) >= 15 and all(t.domain == "customer_service" for t in narrowed)
    monkeypatch.setattr("sys.argv", ["prepare.py", "--intents", "refund", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        prepare.main()
    assert "unknown intent(s) refund; choose from order_status, cancel" in capsys.readouterr().err


@pytest.mark.parametrize("name, seed, narrow", [("order_status_holdout", 1, ["--intents", "order_status"]),
                                               ("order_status_holdout2", 2, ["--intents", "order_status"]),
                                               ("all_intents_holdout", 3, ["--per-intent", "25"])])
def test_a_holdout_is_a_fresh_seed_disjoint_from_the_seed_0_sets(prepare, splits, tmp_path, monkeypatch, name, seed,
                                                                 narrow):
    """`prepare.py --seed S ... --only-split test` regenerates a shipped held-out set byte for byte: only a test
    file, and no task, customer, order or item id of it is in the seed-0 sets."""
    out = tmp_path / "holdout"
    monkeypatch.setattr("sys.argv", ["prepare.py", "--seed", str(seed), *narrow, "--only-split", "test", "--out",
                                     str(out)])
    prepare.main()
    shipped = DATA_DIR / name / "tasks"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in shipped.iterdir()) == ["test.jsonl"]
    assert (out / "test.jsonl").read_text() == (shipped / "test.jsonl").read_text()
    holdout = load_tasks(f"customer_service/{name}", "test")
    assert len(holdout) >= 100 and all(t.split == "test" for t in holdout)
    labels = Counter(t.intents[0] if len(t.intents) == 1 else "multi" for t in holdout)
    if narrow[0] == "--intents":
        assert set(labels) == {"order_status"}
    else:  # every intent label, evenly
        assert set(labels.values()) == {25} and len(labels) == len(prepare.INTENT_COUNTS)
    seen = [t for split in SPLITS for t in splits[split]]

    def ids(tasks: list[Task]) -> set[str]:
        return ({t.id for t in tasks} | {c for t in tasks for c in t.payload["db"]["customers"]}
                | {o for t in tasks for o in t.payload["db"]["orders"]}
                | {i["item_id"] for t in tasks for o in t.payload["db"]["orders"].values() for i in o["items"]})

    assert not ids(holdout) & ids(seen)
    assert all(t.id.startswith(f"cs-s{seed}-") for t in holdout)
    outcomes = [run_policy(make_env(t), t, oracle_policy(t)).outcome for t in holdout]
    assert sum(o.success for o in outcomes) / len(holdout) >= 0.98


def test_another_seed_gives_other_tasks(prepare):
    first, other = prepare.generate(0)["test"], prepare.generate(1)["test"]
    assert [t["payload"] for t in first] != [t["payload"] for t in other]


@pytest.mark.parametrize("split", SPLITS)
def test_oracle_solves_the_split(splits, split):
    """Every split is solvable: the scripted expert's strict success rate is at least 98%."""
    tasks = splits[split]
    outcomes = [run_policy(make_env(t), t, oracle_policy(t)).outcome for t in tasks]
    success = sum(o.success for o in outcomes) / len(tasks)
    failed = [t.id for t, o in zip(tasks, outcomes) if not o.success]
    assert success >= 0.98, failed
    assert all(o.violations == [] for o in outcomes)


def test_sop_names_every_rule():
    """The SOP the agent reads tags each paragraph with the rule id that Outcome.violations reports."""
    sop = (DATA_DIR / "sop.md").read_text()
    for rule in RULES:
        assert f"[{rule}]" in sop
