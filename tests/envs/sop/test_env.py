"""Tests for the SOP-task environment (pipeline/envs/sop/: env.py, folder.py, oracle.py, tasks.py, via pipeline.envs).

Episodes are driven by scripted policies. A tiny folder written per test (`mini`) pins the scorer to
hand-labelled cases and exercises the folder checks and the trust gate on tools.py; the shipped
warranty-claims domain checks the routing (``sop:PATH`` in load_tasks, make_env and the CLI).
"""

from __future__ import annotations

import doctest
import json
import re
from pathlib import Path

import pytest

import pipeline.envs.sop.env as sop_module
from pipeline import cli
from pipeline.chat import format_tool_call, parse_tool_message
from pipeline.envs import Environment, Task, TaskFileError, load_tasks, make_env, oracle_policy
from pipeline.envs.base import STOP_FINAL_OUTPUT, STOP_MAX_TURNS
from pipeline.envs.sop.env import SopEnv, parse_final_output, values_match
from pipeline.envs.sop.folder import TRUST_ENV, UntrustedToolsError, inspect_folder
from pipeline.envs.sop.grants import grant_for
from pipeline.envs.sop.trust import encode
from pipeline.envs.tasks import DATA_ROOT
from pipeline.rollout import run_policy

SHIPPED = "sop:data/sop/warranty_claims"

MINI_SOP = """1. Call get_order with the order id.
2. decision is Approve when the order's status is damaged, otherwise Deny.
3. code is the order's refund code; note is N/A; amount is the order's amount."""
MINI_ROWS = """order_id,decision,code,note,amount
O1,Approve,R-12,N/A,12.50
O2,Deny,R-13,,7
O3,Approve,R-14,N/A,3
"""
MINI_ORDERS = """order_id,status,refund_code,amount
O1,damaged,R-12,12.50
O2,late,R-13,7
O3,damaged,R-14,3
"""
GET_ORDER = {"toolSpec": {
    "name": "get_order",
    "description": "Look an order up by id.",
    "inputSchema": {"json": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}},
    "x-csv-lookup": {"file": "orders.csv", "match": {"order_id": "order_id"},
                     "return": {"status": "status", "refund_code": "refund_code", "amount": "amount"}},
}}
FEE = {"toolSpec": {
    "name": "fee",
    "description": "The handling fee of an order (computed, so it lives in tools.py).",
    "inputSchema": {"json": {"type": "object", "properties": {"order_id": {"type": "string"}, "rate": {"type": "number"}},
                             "required": ["order_id"]}},
}}
# Importing this module leaves a marker next to the folder: the proof that a refused tools.py never ran.
TOOLS_PY = '''from pathlib import Path

Path(__file__).resolve().parent.parent.joinpath("tools_py_ran.marker").write_text("imported")


class MiniManager:
    def __init__(self):
        self.calls = 0

    def fee(self, order_id, rate=0.1):
        self.calls += 1
        if order_id == "BOOM":
            raise RuntimeError("fee service down")
        return {"fee": round(rate * 10, 2), "calls": self.calls, "missing": float("nan"), "pair": (1, 2)}

    def process_tool_call(self, tool_name, tool_input):
        return getattr(self, tool_name)(**tool_input)

    def _helper(self):
        return None
'''


def write_mini(root: Path, code: bool = False) -> Path:
    """A valid three-row SOP folder; with ``code``, it also has a tools.py tool (``fee``)."""
    folder = root / "mini"
    folder.mkdir(parents=True)
    (folder / "sop.txt").write_text(MINI_SOP)
    (folder / "metadata.json").write_text(json.dumps({
        "name": "mini", "input_columns": ["order_id"], "output_columns": ["decision", "code", "note", "amount"],
        "id_column": "order_id"}))
    (folder / "test_set_with_outputs.csv").write_text(MINI_ROWS)
    (folder / "orders.csv").write_text(MINI_ORDERS)
    (folder / "toolspecs.json").write_text(json.dumps([GET_ORDER, FEE] if code else [GET_ORDER], indent=1))
    if code:
        (folder / "tools.py").write_text(TOOLS_PY)
    return folder


@pytest.fixture
def mini(tmp_path) -> Path:
    return write_mini(tmp_path)


@pytest.fixture
def coded(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(TRUST_ENV, "0")  # untrusted, whatever the shell says
    return write_mini(tmp_path, code=True)


def task_of(folder: Path, row_id: str = "O1") -> Task:
    return next(t for t in load_tasks(f"sop:{folder}") if t.payload["row_id"] == row_id)


def play(env: Environment, task: Task, replies: list[str]):
    """Run scripted replies in order (the last one repeats); return the trajectory."""
    replies = list(replies)
    return run_policy(env, task, lambda messages: replies.pop(0) if len(replies) > 1 else replies[0])


def bodies(step) -> list[dict]:
    assert step.messages and all(m["role"] == "tool" for m in step.messages)
    return [parse_tool_message(m) for m in step.messages]


# -- tasks and routing ---------------------------------------------------------------------------
def test_sop_prefix_loads_every_row_with_stable_disjoint_splits():
    everything = load_tasks(SHIPPED)
    splits = {s: load_tasks(SHIPPED, s) for s in ("train", "val", "test")}
    assert len(everything) == sum(len(v) for v in splits.values()) >= 100
    assert all(splits.values())
    assert sorted(t.id for t in everything) == sorted(t.id for v in splits.values() for t in v)
    assert len({t.id for t in everything}) == len(everything)
    assert all(t.domain == "sop" and t.split == s for s, v in splits.items() for t in v)
    assert [t.split for t in everything] == [t.split for t in load_tasks(SHIPPED)]  # deterministic
    task = everything[0]
    assert task.id == f"warranty_claims-{task.payload['row_id']}"
    assert list(task.payload["inputs"]) == ["claim_id", "serial_number", "claim_date", "issue_code", "customer_note"]
    assert list(task.payload["expected"]) == ["decision", "reason_code", "recall_id"]
    assert task.intents == [task.payload["expected"]["reason_code"]]  # metadata intent_column


def test_sop_folder_is_found_from_any_working_directory(tmp_path, monkeypatch):
    expected = [t.id for t in load_tasks(SHIPPED, "test")]
    monkeypatch.chdir(tmp_path)
    assert [t.id for t in load_tasks(SHIPPED, "test")] == expected
    assert [t.id for t in load_tasks("sop:warranty_claims", "test")] == expected
    assert [t.id for t in load_tasks(f"sop:{DATA_ROOT / 'sop' / 'warranty_claims'}", "test")] == expected
    task = load_tasks(SHIPPED, "test")[0]
    assert task.payload["folder"] == "data/sop/warranty_claims"  # repo-relative: task files move between checkouts
    assert run_policy(make_env(task), task, oracle_policy(task)).outcome.success
    with pytest.raises(FileNotFoundError, match="sop:data/sop/warranty_claims"):
        load_tasks("sop:no/such/folder")
    with pytest.raises(ValueError, match="Unknown split"):
        load_tasks(SHIPPED, "dev")


def test_make_env_by_prefix_by_task_and_by_name(mini):
    task = task_of(mini)
    for env in (make_env(f"sop:{mini}"), make_env(task, max_turns=3), make_env("sop")):
        assert isinstance(env, SopEnv) and isinstance(env, Environment)
        assert env.reset(task)[0]["role"] == "system"
    assert make_env(task, max_turns=3).max_turns == 3


def test_sop_tasks_round_trip_through_a_task_file(tmp_path, mini):
    tasks = load_tasks(f"sop:{mini}")
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in tasks))
    assert load_tasks(path) == tasks
    broken = tasks[0].to_dict()
    broken["payload"]["expected"] = {}
    path.write_text(json.dumps(broken) + "\n")
    with pytest.raises(TaskFileError, match=r"line 1, field 'payload.expected'"):
        load_tasks(path)


# -- what the agent sees -------------------------------------------------------------------------
def test_reset_shows_the_sop_the_tools_and_the_inputs_but_never_the_answer():
    task = load_tasks(SHIPPED, "test")[0]
    messages = make_env(task).reset(task)
    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert "deciding a device warranty claim" in system  # the SOP text
    for tool in ("lookup_registration", "lookup_issue_code", "check_recall", "get_model_terms", "get_claim_history"):
        assert f'"name":"{tool}"' in system  # rendered as function schemas, like pipeline.chat.tools_prompt
    assert '<tool_call>{"name": "tool_name", "arguments": {"arg": "value"}}</tool_call>' in system
    assert '<final_output>{"decision": "...", "reason_code": "...", "recall_id": "..."}</final_output>' in system
    assert "x-csv-lookup" not in system and ".csv" not in system  # how tools work is hidden
    assert "customer" not in system.split("# Tools")[1]  # no "text goes to the customer" line
    inputs = json.loads(user[user.index("{"): user.rindex("}") + 1])
    assert inputs == task.payload["inputs"]


def test_oracle_solves_shipped_tasks_through_tool_calls():
    task = load_tasks(SHIPPED, "test")[0]
    trajectory = run_policy(make_env(task), task, oracle_policy(task))
    outcome = trajectory.outcome
    assert outcome.success and outcome.completed and outcome.stop_reason == STOP_FINAL_OUTPUT
    assert outcome.fields == {"decision": True, "reason_code": True, "recall_id": True}
    assert outcome.details["emitted"] is True and outcome.details["field_accuracy"] == 1.0
    assert trajectory.turns[0].info["tool_calls"][0]["name"] == "lookup_registration"
    assert trajectory.turns[-1].assistant.startswith("<final_output>")
    again = run_policy(make_env(task), task, oracle_policy(task))
    assert again.messages == trajectory.messages and again.outcome == outcome  # deterministic


def test_no_oracle_for_an_unknown_sop_domain_says_how_to_add_one(mini):
    with pytest.raises(ValueError, match="ORACLES in pipeline/envs/sop/oracle.py"):
        oracle_policy(task_of(mini))


# -- the strict scorer, on hand-labelled cases ---------------------------------------------------
# Row O1 expects decision "Approve", code "R-12", note "N/A" (null-like), amount "12.50".
GOOD = {"decision": "Approve", "code": "R-12", "note": "N/A", "amount": "12.50"}
RIGHT = {"decision": True, "code": True, "note": True, "amount": True}


def answer(**changes) -> str:
    fields = {k: v for k, v in {**GOOD, **changes}.items() if v is not ...}
    return f"<final_output>{json.dumps(fields)}</final_output>"


# (case, assistant text, completed, fields right)
LABELLED = [
    ("exact", answer(), True, RIGHT),
    ("case_and_whitespace", answer(decision="  aPPROVE\n", code=" r-12 "), True, RIGHT),
    ("null_like_json_null", answer(note=None), True, RIGHT),
    ("null_like_None", answer(note="None"), True, RIGHT),
    ("null_like_empty", answer(note=""), True, RIGHT),
    ("null_like_n/a_lower", answer(note=" n/a "), True, RIGHT),
    ("null_like_null_text", answer(note="NULL"), True, RIGHT),
    ("value_for_a_null_field", answer(note="refund soon"), True, {**RIGHT, "note": False}),
    ("null_for_a_value_field", answer(decision=None), True, {**RIGHT, "decision": False}),
    ("wrong_value", answer(decision="Deny"), True, {**RIGHT, "decision": False}),
    ("json_number_matches_text", answer(amount=12.5), True, RIGHT),
    ("text_numbers_compare_as_text", answer(amount="12.5"), True, {**RIGHT, "amount": False}),
    ("missing_field", answer(code=...), True, {**RIGHT, "code": False}),
    ("missing_null_like_field_is_still_wrong", answer(note=...), True, {**RIGHT, "note": False}),
    ("extra_fields_ignored", answer(comment="checked twice", confidence=0.9), True, RIGHT),
    ("key_case_ignored", '<final_output>{"DECISION": "Approve", " code ": "R-12", "Note": null, "amount": "12.50"}'
                         "</final_output>", True, RIGHT),
    ("json_in_prose", "<final_output>Here is my decision: " + json.dumps(GOOD) + " Thanks!</final_output>", True, RIGHT),
    ("json_in_code_fence", "<final_output>\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\n</final_output>", True,
     RIGHT),
    ("prose_around_the_tag", "All steps done.\n" + answer() + "\nHave a nice day.", True, RIGHT),
    # several blocks: the last complete one counts, as in the public benchmark's parser
    ("last_block_counts", answer(decision="Deny") + answer(), True, RIGHT),
    ("last_block_counts_even_when_wrong", answer() + answer(decision="Deny"), True, {**RIGHT, "decision": False}),
    ("unclosed_tag_after_a_block_is_ignored", answer() + "<final_output>{\"decision\": \"Deny\"}", True, RIGHT),
    ("stray_close_tag_then_a_block", "</final_output>" + answer(), True, RIGHT),
    ("malformed_last_block_is_malformed", answer() + "<final_output>not json</final_output>", False, None),
    ("malformed_json", '<final_output>{"decision": "Approve", "code": "R-12",}</final_output>', False, None),
    ("python_dict_is_not_json", "<final_output>" + repr(GOOD) + "</final_output>", False, None),
    ("json_array", "<final_output>[" + json.dumps(GOOD) + "]</final_output>", True, RIGHT),
    ("json_string", '<final_output>"Approve"</final_output>', False, None),
    ("unclosed_tag", "<final_output>" + json.dumps(GOOD), False, None),
    ("empty_tag", "<final_output></final_output>", False, None),
]


@pytest.mark.parametrize("text, completed, fields", [c[1:] for c in LABELLED], ids=[c[0] for c in LABELLED])
def test_scorer_agrees_with_hand_labels(mini, text, completed, fields):
    task = task_of(mini, "O1")
    env = make_env(task)
    env.reset(task)
    step = env.step(text)
    assert step.done and step.messages == [] and step.info["stop_reason"] == STOP_FINAL_OUTPUT
    outcome = env.outcome()
    fields = fields or dict.fromkeys(RIGHT, False)  # not completed: every field is wrong
    assert outcome.completed is completed and outcome.details["emitted"] is completed
    assert outcome.fields == fields
    assert outcome.success is (completed and all(fields.values()))
    assert outcome.details["field_accuracy"] == sum(fields.values()) / len(fields)
    assert outcome.details["final_output_tag"] is True
    assert (outcome.details["parse_error"] is None) is completed


def test_scorer_reports_missing_and_extra_fields(mini):
    task = task_of(mini, "O1")
    env = make_env(task)
    env.reset(task)
    env.step(answer(code=..., comment="x"))
    details = env.outcome().details
    assert details["missing_fields"] == ["code"] and details["extra_fields"] == ["comment"]
    assert details["field_values"]["decision"] == {"expected": "Approve", "actual": "Approve", "present": True,
                                                   "correct": True}


def test_empty_expected_value_is_null_like(mini):
    """Row O2 expects an empty note: null, "None", "N/A" and "" all match it."""
    task = task_of(mini, "O2")
    for note in (None, "None", "N/A", ""):
        env = make_env(task)
        env.reset(task)
        env.step(f"<final_output>{json.dumps({'decision': 'deny', 'code': 'R-13', 'note': note, 'amount': 7})}"
                 "</final_output>")
        assert env.outcome().success, note


def test_values_match_doctests():
    assert doctest.testmod(sop_module).failed == 0
    assert values_match(True, "TRUE") and values_match("3", 3) and not values_match("3", True)
    assert parse_final_output("no tag") == (None, "no <final_output> block")


# -- episodes without a final output -------------------------------------------------------------
def test_plain_messages_get_a_reminder_and_the_budget_ends_the_episode(mini):
    task = task_of(mini)
    trajectory = play(make_env(task, max_turns=3), task, ["Let me think about this case.", None])
    assert len(trajectory.turns) == 3
    reminders = [m for t in trajectory.turns[:2] for m in t.env_messages]
    assert [m["role"] for m in reminders] == ["user", "user"]
    assert "Call a tool, or finish with the final output" in reminders[0]["content"]
    outcome = trajectory.outcome
    assert outcome.stop_reason == STOP_MAX_TURNS
    assert not outcome.completed and not outcome.success and outcome.details["emitted"] is False
    assert outcome.details["final_output_tag"] is False and outcome.details["reminders"] == 3
    assert outcome.fields == dict.fromkeys(RIGHT, False)


def test_truncation_mid_episode_counts_as_not_completed(mini):
    task = task_of(mini)
    env = make_env(task)
    env.reset(task)
    env.step(format_tool_call("get_order", {"order_id": "O1"}))
    env.mark_truncated()
    outcome = env.outcome()
    assert outcome.stop_reason == "max_tokens" and not outcome.completed and not outcome.success


# -- tools ---------------------------------------------------------------------------------------
def test_csv_lookup_tool_and_its_errors(mini):
    task = task_of(mini)
    env = make_env(task)
    env.reset(task)
    found = bodies(env.step(format_tool_call("get_order", {"order_id": " o2 "})))[0]  # case and spaces ignored
    assert found == {"tool": "get_order", "ok": True, "result": {"status": "late", "refund_code": "R-13", "amount": "7"}}
    step = env.step(format_tool_call("get_order", {"order_id": "O9"}) + format_tool_call("get_order", {"id": "O1"})
                    + format_tool_call("refund", {"order_id": "O1"}))
    missing, bad_args, unknown = bodies(step)
    assert not step.done
    assert missing["error_type"] == "rejected" and "No record in orders.csv matches order_id='O9'" in missing["error"]
    assert bad_args["error_type"] == "invalid_arguments" and "order_id" in bad_args["error"]
    assert unknown["error_type"] == "unknown_tool" and "get_order" in unknown["error"]
    env.step(answer())
    assert env.outcome().success


def test_untrusted_tools_py_is_refused_and_the_error_says_how_to_allow_it(coded, tmp_path):
    tasks = load_tasks(f"sop:{coded}")  # reading and checking the folder never runs tools.py
    for build in (lambda: make_env(f"sop:{coded}"), lambda: make_env(tasks[0]),
                  lambda: make_env("sop").reset(tasks[0]), lambda: make_env(tasks[0], trust_tools=False)):
        with pytest.raises(UntrustedToolsError) as refused:
            build()
        message = str(refused.value)
        assert str(coded / "tools.py") in message and "fee" in message
        for how in ("trust_tools=True", f"{TRUST_ENV}=\"$(turnwise sop trust PATH)\"", "--trust-tools", "x-csv-lookup"):
            assert how in message
    assert isinstance(refused.value, PermissionError)  # the CLI prints it as an error, without a traceback
    assert not (tmp_path / "tools_py_ran.marker").exists()


def test_trusted_tools_py_runs_with_fresh_state_per_episode(coded, tmp_path, monkeypatch):
    task = task_of(coded)
    monkeypatch.setenv(TRUST_ENV, encode([grant_for(coded)]))  # a grant for this folder, as `turnwise sop trust` prints
    with pytest.raises(UntrustedToolsError):
        make_env(task, trust_tools=False)  # an explicit False beats the environment variable
    for env in (make_env(task), make_env(task, trust_tools=True)):
        for _ in range(2):  # a new episode starts a new MiniManager: its call counter restarts
            env.reset(task)
            result = bodies(env.step(format_tool_call("fee", {"order_id": "O1", "rate": 0.2})))[0]["result"]
            assert result == {"fee": 2.0, "calls": 1, "missing": None, "pair": [1, 2]}  # NaN -> null, tuple -> list
    assert (tmp_path / "tools_py_ran.marker").exists()


def test_a_tool_that_raises_gives_the_agent_a_tool_error(coded):
    task = task_of(coded)
    env = make_env(task, trust_tools=True)
    env.reset(task)
    step = env.step(format_tool_call("fee", {"order_id": "BOOM"}))
    error = bodies(step)[0]
    assert not step.done and error["ok"] is False and error["error_type"] == "tool_exception"
    assert "fee service down" in error["error"]
    assert bodies(env.step(format_tool_call("fee", {"order_id": "O1"})))[0]["ok"] is True  # the episode goes on


# -- bad folders get clear errors ----------------------------------------------------------------
def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def _spec(folder: Path) -> dict:
    return json.loads((folder / "toolspecs.json").read_text())[0]["toolSpec"]


BAD_FOLDERS = {
    "missing_toolspecs": (lambda f: (f / "toolspecs.json").unlink(), ["missing toolspecs.json", "An SOP folder holds"]),
    "missing_sop": (lambda f: (f / "sop.txt").unlink(), ["missing sop.txt (or sop.md)"]),
    "missing_test_set": (lambda f: (f / "test_set_with_outputs.csv").unlink(), ["missing test_set_with_outputs.csv"]),
    "two_sops": (lambda f: (f / "sop.md").write_text("x"), ["both sop.txt and sop.md", "keep one"]),
    "output_column_not_in_csv": (
        lambda f: edit_json(f / "metadata.json", lambda m: m["output_columns"].append("refund_total")),
        ["metadata.json, field 'output_columns'", "['refund_total'] are not columns of test_set_with_outputs.csv",
         "fix metadata.json or the CSV header"]),
    "input_column_not_in_csv": (
        lambda f: edit_json(f / "metadata.json", lambda m: m.update(input_columns=["order"])),
        ["metadata.json, field 'input_columns'", "['order'] are not columns"]),
    "output_is_also_input": (
        lambda f: edit_json(f / "metadata.json", lambda m: m.update(input_columns=["order_id", "code"])),
        ["field 'output_columns'", "also input_columns"]),
    "no_output_columns": (
        lambda f: edit_json(f / "metadata.json", lambda m: m.pop("output_columns")),
        ["metadata.json, field 'output_columns'", "non-empty list"]),
    "spec_without_implementation": (
        lambda f: edit_json(f / "toolspecs.json", lambda s: s[0]["toolSpec"].pop("x-csv-lookup")),
        ["toolspecs.json, field '[0]'", "'get_order' has no implementation: there is no tools.py",
         "Add an x-csv-lookup to its toolSpec, or implement get_order in tools.py"]),
    "tools_py_not_utf8": (
        lambda f: (f / "tools.py").write_bytes(b"# caf\xe9\ndef helper():\n    pass\n"),
        ["tools.py, line 1", "is not UTF-8 text", "Save it as UTF-8"]),
    "tool_defined_twice": (
        lambda f: (f / "tools.py").write_text("def get_order(order_id):\n    pass\n"),
        ["tools.py, line 1", "get_order is also an x-csv-lookup tool", "keep one implementation"]),
    "invalid_schema_type": (
        lambda f: edit_json(f / "toolspecs.json",
                            lambda s: s[0]["toolSpec"]["inputSchema"]["json"]["properties"]["order_id"].update(type="str")),
        ["toolspecs.json, field '[0].toolSpec.inputSchema.json.properties.order_id.type'",
         "['str'] is not a JSON schema type"]),
    "schema_not_an_object": (
        lambda f: edit_json(f / "toolspecs.json", lambda s: s[0]["toolSpec"]["inputSchema"].update(json={"type": "string"})),
        ["field '[0].toolSpec.inputSchema.json'", '"type": "object"']),
    "required_not_declared": (
        lambda f: edit_json(f / "toolspecs.json",
                            lambda s: s[0]["toolSpec"]["inputSchema"]["json"].update(required=["order_id", "email"])),
        ["field '[0].toolSpec.inputSchema.json.required'", "['email']", "not in properties"]),
    "bad_tool_name": (
        lambda f: edit_json(f / "toolspecs.json", lambda s: s[0]["toolSpec"].update(name="get order")),
        ["field '[0].toolSpec.name'", "letters, digits"]),
    "duplicate_tool": (
        lambda f: edit_json(f / "toolspecs.json", lambda s: s.append(s[0])),
        ["field '[1].toolSpec.name'", "declared twice"]),
    "toolspecs_not_json": (lambda f: (f / "toolspecs.json").write_text('[\n  {"toolSpec": }\n]'),
                           ["toolspecs.json, line 2", "not valid JSON"]),
    "lookup_file_missing": (
        lambda f: (f / "orders.csv").unlink(),
        ["field '[0].toolSpec.x-csv-lookup.file'", "orders.csv does not exist"]),
    "lookup_column_missing": (
        lambda f: edit_json(f / "toolspecs.json",
                            lambda s: s[0]["toolSpec"]["x-csv-lookup"].update(match={"order_id": "id"})),
        ["field '[0].toolSpec.x-csv-lookup.match'", "['id'] are not columns of orders.csv",
         "its columns: order_id, status, refund_code, amount"]),
    "lookup_leaks_the_answer": (
        lambda f: edit_json(f / "toolspecs.json", lambda s: s[0]["toolSpec"]["x-csv-lookup"].update(
            file="test_set_with_outputs.csv", **{"return": ["decision"]})),
        ["field '[0].toolSpec.x-csv-lookup.return'", "hand the agent the answer"]),
    "lookup_outside_the_folder": (
        lambda f: edit_json(f / "toolspecs.json",
                            lambda s: s[0]["toolSpec"]["x-csv-lookup"].update(file="../orders.csv")),
        ["field '[0].toolSpec.x-csv-lookup.file'", "inside the folder"]),
    "duplicate_row_id": (
        lambda f: (f / "test_set_with_outputs.csv").write_text(MINI_ROWS + "O1,Deny,R-1,,1\n"),
        ["test_set_with_outputs.csv, line 5, field 'order_id'", "repeats 'O1' (first on line 2)"]),
    "ragged_csv_row": (
        lambda f: (f / "test_set_with_outputs.csv").write_text(MINI_ROWS + "O4,Deny,R-1\n"),
        ["test_set_with_outputs.csv, line 5", "has 3 values but the header has 5 columns"]),
    "tools_py_syntax_error": (
        lambda f: (f / "tools.py").write_text("def broken(:\n"), ["tools.py, line 1", "not valid Python"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folders_fail_at_load_naming_the_file_and_the_fix(mini, case):
    breakage, expected = BAD_FOLDERS[case]
    breakage(mini)
    with pytest.raises(TaskFileError) as error:
        load_tasks(f"sop:{mini}")
    message = str(error.value)
    assert str(mini) in message
    for part in expected:
        assert part in message, (part, message)


def test_a_spec_argument_the_implementation_does_not_take_is_a_warning_and_a_tool_error_when_passed(coded):
    """Shape 4 of issue 16: the domain loads; the call that passes the argument gets a tool error naming it."""
    (coded / "tools.py").write_text("class M:\n    def fee(self, order_id):\n        return {'fee': 1}\n")
    warnings = [p.message for p in inspect_folder(coded).warnings]
    assert any("tools.py, line 2: fee(order_id) does not take 'rate', which its inputSchema in toolspecs.json "
               "declares (optional)" in w for w in warnings), warnings
    task = task_of(coded)
    env = make_env(task, trust_tools=True)
    env.reset(task)
    assert bodies(env.step(format_tool_call("fee", {"order_id": "O1"})))[0]["result"] == {"fee": 1}
    error = bodies(env.step(format_tool_call("fee", {"order_id": "O1", "rate": 0.2})))[0]
    assert error["ok"] is False and error["error_type"] == "rejected"
    assert "fee does not take 'rate': tools.py implements it as fee(order_id). Call it without it." in error["error"]


def test_a_folder_of_code_tools_needs_no_trust_to_be_checked(coded):
    """Structure checks read tools.py with ast: a spec it does not implement fails load_tasks without running it."""
    (coded / "tools.py").write_text(TOOLS_PY.replace("    def fee", "    def fees"))
    with pytest.raises(TaskFileError, match="tool 'fee' has no implementation: tools.py has no function or method fee"):
        load_tasks(f"sop:{coded}")
    assert not (coded.parent / "tools_py_ran.marker").exists()


def test_public_helpers_without_a_spec_are_not_tools(coded):
    """Shape 2 of issue 16: a public method no spec names is a helper; the agent never sees or calls it."""
    (coded / "tools.py").write_text(TOOLS_PY.replace("    def _helper", "    def audit"))
    check = inspect_folder(coded)
    assert not check.errors and check.folder.helpers == ["audit"]
    assert any("class MiniManager has public helpers that no spec in toolspecs.json names: audit" in p.message
               for p in check.warnings)
    task = task_of(coded)
    env = make_env(task, trust_tools=True)
    system = env.reset(task)[0]["content"]
    assert '"name":"fee"' in system and "audit" not in system
    error = bodies(env.step(format_tool_call("audit", {})))[0]
    assert error["error_type"] == "unknown_tool"


# -- the command line ----------------------------------------------------------------------------
def test_turnwise_eval_runs_the_oracle_on_an_sop_folder(capsys):
    assert cli.main(["eval", "--env", SHIPPED, "--policy", "oracle", "--tasks", "test", "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "on 5 test tasks" in out and re.search(r"success\s+1\.000", out)


MINI_POLICY = """import json

from pipeline.plugins import declare_policy_factory


@declare_policy_factory
def factory(task):
    answer = json.dumps(task.payload["expected"])
    return lambda messages: "<final_output>" + answer + "</final_output>"
"""


def test_turnwise_eval_refuses_untrusted_tools_py_and_trust_tools_allows_it(coded, tmp_path, monkeypatch, capsys):
    (tmp_path / "mini_policy.py").write_text(MINI_POLICY)  # an answer-key policy, named MODULE:FUNCTION
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(TRUST_ENV, "0")  # restored after the test, though --trust-tools sets it
    argv = ["eval", "--env", f"sop:{coded}", "--policy", "mini_policy:factory", "--tasks", task_of(coded).split]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("turnwise: error:") and "--trust-tools" in err and "tools.py is Python code" in err
    assert not (tmp_path / "tools_py_ran.marker").exists()
    assert cli.main([*argv, "--trust-tools"]) == 0
    assert re.search(r"success\s+1\.000", capsys.readouterr().out)


def test_turnwise_audit_passes_the_sop_reward_on_an_sop_folder(tmp_path, capsys):
    """With no --reward, an SOP folder gets configs/rewards/sop.yaml, and its audit passes."""
    argv = ["audit", "--env", SHIPPED, "--limit", "6", "--k", "3", "--probe-tasks", "2", "--hacks", "--hack-tasks", "3",
            "--out", str(tmp_path / "audit")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Reward audit: sop" in out and "RESULT: PASS" in out
    assert re.search(r"field_accuracy\s+episode\s+0\.50", out)
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["passed"] and report["reward"] == "sop"
    rows = {r["policy"]: r for r in report["hacking_table"]}
    assert all(r["strict_successes"] == 0 for name, r in rows.items() if name != "oracle")


def test_turnwise_score_replays_a_logged_sop_file(tmp_path, capsys):
    out_json = tmp_path / "scores.json"
    assert cli.main(["score", "data/logged/sop_warranty_claims.jsonl", "--env", SHIPPED, "--out", str(out_json)]) == 0
    assert "with reward 'sop'" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    by_policy = {}
    for row in report["conversations"]:
        by_policy.setdefault(row["policy"], []).append(row)
    assert [r["outcome_source"] for r in report["conversations"]].count("replayed") == 12
    assert all(r["success"] for r in by_policy["oracle"][:2] + by_policy["json_in_prose"])
    # the dense term: one field of three wrong keeps 2/3; no parsed final output costs format_coef
    for row in by_policy["wrong_decision"]:
        assert row["components"]["field_accuracy"] == pytest.approx(2 / 3) and not row["success"]
    for row in by_policy["malformed_json"] + by_policy["never_answers"]:
        assert row["components"]["field_accuracy"] == pytest.approx(-0.1) and not row["success"]
    ranked = report["summary"]["by_policy"]
    assert ranked["json_in_prose"] > ranked["wrong_decision"] > ranked["malformed_json"] > ranked["never_answers"]


def test_audit_and_score_refuse_untrusted_tools_py_and_trust_tools_allows_it(coded, tmp_path, capsys):
    task = task_of(coded)
    chat = {"task_id": task.id, "messages": [{"role": "assistant", "content": format_tool_call("fee", {"order_id": "O1"})},
                                             {"role": "assistant", "content": answer()}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    argv = ["score", str(tmp_path / "chat.jsonl"), "--env", f"sop:{coded}"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("turnwise: error:") and "--trust-tools" in err
    assert not (tmp_path / "tools_py_ran.marker").exists()
    assert cli.main([*argv, "--trust-tools"]) == 0
    assert re.search(r"replayed\s+yes", capsys.readouterr().out)


def test_turnwise_train_takes_an_sop_folder_with_the_sop_reward(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`turnwise train --env sop:PATH` trains on the folder's rows with the SOP reward (one tiny step)."""
    import importlib

    from pipeline.config import TaskArguments

    trainer_module = importlib.import_module("pipeline.training.train")  # the module; pipeline.training.train is train()
    rewards_built = []
    default_reward = trainer_module.default_reward
    monkeypatch.setattr(trainer_module, "default_reward", lambda path=None, tasks=(): rewards_built.append(path) or
                        default_reward(path, tasks))

    assert TaskArguments(env=SHIPPED).reward_config == "sop"  # the SOP domain's default reward
    assert TaskArguments(tasks=SHIPPED, reward_config="mine.yaml").reward_config == "mine.yaml"
    assert TaskArguments().reward_config == "default"  # the default domain's: the package default
    argv = ["train", "--env", SHIPPED, "--model_name_or_path", str(tiny_model_dir), "--use_peft", "--lora_r", "4",
            "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj", "--output_dir", str(tmp_path / "run"),
            "--per_device_train_batch_size", "2", "--num_generations", "2", "--max_steps", "1", "--logging_steps", "1",
            "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--beta", "0.0", "--max_turns", "2",
            "--max_new_tokens", "4", "--max_total_tokens", "8000", "--train_limit", "2", "--val_limit", "2"]
    assert cli.main(argv) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    sample = json.loads((tmp_path / "run" / "samples" / "step-000001.jsonl").read_text().splitlines()[0])
    assert sample["task_id"].startswith("warranty_claims-")
    assert set(sample["outcome"]["fields"]) == {"decision", "reason_code", "recall_id"}
    assert rewards_built == ["sop"]


def test_turnwise_sop_trust_prints_the_grant_for_one_folder(coded, capsys, monkeypatch):
    assert cli.main(["sop", "trust", str(coded)]) == 0
    out, err = capsys.readouterr()
    grant = json.loads(out)
    assert grant == [{"folder": str(coded.resolve()), "tools_sha256": grant_for(coded).tools_sha256}]
    assert "export it as TURNWISE_TRUST_TOOLS" in err
    monkeypatch.setenv(TRUST_ENV, out.strip())
    task = task_of(coded)
    env = make_env(task)  # trusted through the exported grant alone
    env.reset(task)
    assert bodies(env.step(format_tool_call("fee", {"order_id": "O1"})))[0]["ok"] is True
    assert cli.main(["sop", "trust", SHIPPED]) == 1
    assert "has no tools.py, so there is no code to trust" in capsys.readouterr().err
