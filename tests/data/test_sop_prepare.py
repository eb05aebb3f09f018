"""Tests for data/sop/warranty_claims/: the shipped SOP domain, its generator, its SOP text and its oracle."""

from __future__ import annotations

import csv
import importlib.util
import io
import re
from collections import Counter
from pathlib import Path

import pytest

from pipeline.envs import Task, load_tasks, make_env, oracle_policy
from pipeline.envs.sop.folder import TRUST_ENV, load_folder
from pipeline.rollout import run_policy

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "sop" / "warranty_claims"
ENV = "sop:data/sop/warranty_claims"
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def prepare():
    """data/sop/warranty_claims/prepare.py, imported from its path (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("warranty_claims_prepare", DATA_DIR / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Task]]:
    return {split: load_tasks(ENV, split) for split in SPLITS}


def test_generate_reproduces_the_committed_files(prepare):
    """`prepare.generate(0)` writes exactly the shipped files, byte for byte (sop.md is hand-written)."""
    generated = prepare.generate(0)
    assert set(generated) | {"sop.md", "prepare.py"} == {p.name for p in DATA_DIR.iterdir() if p.is_file()}
    for name, text in generated.items():
        assert text == (DATA_DIR / name).read_text(), name


def test_another_seed_gives_other_claims(prepare):
    first, other = prepare.generate(0), prepare.generate(1)
    assert first["test_set_with_outputs.csv"] != other["test_set_with_outputs.csv"]
    assert first["toolspecs.json"] == other["toolspecs.json"]  # the tools do not depend on the seed


def test_enough_rows_and_every_branch_of_the_sop(splits):
    tasks = [t for split in SPLITS for t in splits[split]]
    assert len(tasks) >= 100
    reasons = Counter(t.payload["expected"]["reason_code"] for t in tasks)
    assert set(reasons) == {"RECALL", "IN_WARRANTY", "REPEAT_DEFECT", "ACCIDENTAL_COVERED", "NOT_COVERED",
                            "OUT_OF_WARRANTY", "CLAIM_LIMIT", "UNKNOWN_SERIAL"}
    assert min(reasons.values()) >= 10
    assert all(len(splits[split]) >= 20 for split in SPLITS)
    recall = [t for t in tasks if t.payload["expected"]["reason_code"] == "RECALL"]
    assert all(t.payload["expected"]["recall_id"].startswith("RC-") for t in recall)
    assert all(t.payload["expected"]["recall_id"] == "N/A" for t in tasks if t not in recall)


def test_the_traps_are_there(prepare):
    """Claims whose right answer differs from the obvious one are part of the set."""
    rows = list(csv.DictReader(io.StringIO(prepare.generate(0)["test_set_with_outputs.csv"])))
    registrations = {r["serial_number"]: r for r in csv.DictReader(io.StringIO(prepare.generate(0)["registrations.csv"]))}
    late_recalls = [r for r in rows if r["reason_code"] == "RECALL"
                    and r["claim_date"] > registrations[r["serial_number"]]["warranty_end"]]
    on_last_day = [r for r in rows if r["serial_number"] in registrations
                   and r["claim_date"] == registrations[r["serial_number"]]["warranty_end"]]
    worn_battery_on_recalled_model = [r for r in rows if r["issue_code"] == "W-BAT-09" and r["serial_number"].startswith("AX1")]
    assert late_recalls and on_last_day and worn_battery_on_recalled_model
    assert all(r["reason_code"] != "RECALL" for r in worn_battery_on_recalled_model)


def test_folder_is_declarative_so_it_needs_no_trust(monkeypatch):
    monkeypatch.setenv(TRUST_ENV, "0")
    folder = load_folder(DATA_DIR)
    assert folder.code is None and folder.code_tools == []
    assert all(spec.lookup is not None for spec in folder.specs.values())
    task = load_tasks(ENV, "test")[0]
    make_env(ENV, trust_tools=False).reset(task)


def test_sop_names_every_tool_field_and_reason():
    sop = (DATA_DIR / "sop.md").read_text()
    folder = load_folder(DATA_DIR)
    for tool in folder.specs:
        assert f"`{tool}`" in sop
    for column in folder.output_columns:
        assert f"`{column}`" in sop
    for reason in re.findall(r"reason code `([A-Z_]+)`", sop):
        assert f"`{reason}`" in sop.split("## Output")[1]


def test_oracle_solves_every_row_within_the_strict_schema(splits):
    """The shipped folder's oracle solves every row, and never passes an argument its spec does not allow."""
    from pipeline.envs.sop.folder import inspect_folder

    check = inspect_folder(DATA_DIR)
    assert check.problems == [] and check.folder.strict_tool_schema is True
    tasks = [t for split in SPLITS for t in splits[split]]
    assert len(tasks) == len(check.folder.table.rows)
    outcomes = [run_policy(make_env(t), t, oracle_policy(t)).outcome for t in tasks]
    assert [t.id for t, o in zip(tasks, outcomes) if not o.success] == []
    assert all(o.details["schema_mismatches"] == [] for o in outcomes)


@pytest.mark.parametrize("split", SPLITS)
def test_oracle_solves_the_split(splits, split):
    """Every split is solvable: the scripted expert's strict success rate is at least 98%."""
    tasks = splits[split]
    outcomes = [run_policy(make_env(t), t, oracle_policy(t)).outcome for t in tasks]
    success = sum(o.success for o in outcomes) / len(tasks)
    assert success >= 0.98, [t.id for t, o in zip(tasks, outcomes) if not o.success]
    assert all(o.completed and o.stop_reason == "final_output" for o in outcomes)
