"""SOP folders as the public benchmark ships them (issue 16): shapes that load, the linter, strict_tool_schema.

Each shape is a folder written in the public SOP-Bench style (a ``...Manager`` class in tools.py that
reads its own CSV, Bedrock ``toolSpec`` entries, a pandas-written test set) with one deviation from the
strictest form. For each, the folder loads, and a scripted policy that calls every tool with the case's
inputs and then emits the expected output solves every row. One folder has all five shapes at once;
``turnwise sop check`` lists its warnings and exits 0, and exits 1 on a folder with a real error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.chat import format_tool_call, parse_tool_message
from pipeline.envs import TaskFileError, load_tasks, make_env
from pipeline.envs.sop.folder import inspect_folder
from pipeline.rollout import run_policy

SHAPES = ("no_input_columns", "no_columns", "helpers", "index_column", "optional_argument", "enum")

SOP = """Returns desk.
1. Call get_order with the order id.
2. Call check_policy with the order's channel and amount.
3. decision is escalate when the policy says a manager is needed, else approve; refund_method is the policy's."""

# order_id, channel, amount | decision, refund_method ("phone" is outside the enum of the "enum" shape)
ROWS = [("R1", "web", "20.00", "approve", "card"), ("R2", "store", "250.00", "escalate", "N/A"),
        ("R3", "phone", "15.50", "approve", "store_credit"), ("R4", "web", "99.99", "approve", "card")]

TOOLS_PY = '''import csv
import os


class ReturnsDeskManager:
    """Tools in the public benchmark's style: a class that reads its folder's CSV itself."""

    def __init__(self):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "orders.csv")
        with open(path) as handle:
            self.orders = {row["order_id"]: row for row in csv.DictReader(handle)}

    def get_order(self, order_id):
        row = self.orders[order_id]
        return {"channel": row["channel"], "amount": float(row["amount"]), "days": int(row["days"])}

    def check_policy(self, channel, amount):
        method = {"web": "card", "phone": "store_credit"}.get(channel, "N/A")
        return {"refund_method": method, "needs_manager": float(amount) > 200}
@HELPER@
    def process_tool_call(self, tool_name, tool_input):
        return getattr(self, tool_name)(**tool_input)
'''
HELPER = '''
    def load_orders(self):
        return list(self.orders)
'''


def tool_specs(shapes: set[str]) -> list[dict]:
    channel = {"type": "string", "description": "Where the order was placed."}
    if "enum" in shapes:
        channel["enum"] = ["web", "store"]
    policy_args = {"channel": channel, "amount": {"type": "number"}}
    if "optional_argument" in shapes:
        policy_args["note"] = {"type": "string", "description": "Free text (the implementation does not take it)."}
    return [
        {"toolSpec": {"name": "get_order", "description": "Look an order up.",
                      "inputSchema": {"json": {"type": "object", "properties": {"order_id": {"type": "string"}},
                                               "required": ["order_id"]}}}},
        {"toolSpec": {"name": "check_policy", "description": "The refund policy for a channel and an amount.",
                      "inputSchema": {"json": {"type": "object", "properties": policy_args,
                                               "required": ["channel", "amount"]}}}},
    ]


def write_folder(root: Path, shapes: set[str], name: str = "returns_desk") -> Path:
    """A benchmark-style folder with the given shapes (none: the strictest form turnwise always accepted)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "sop.txt").write_text(SOP)
    metadata = {"name": name, "input_columns": ["order_id", "channel", "amount"],
                "output_columns": ["decision", "refund_method"], "id_column": "order_id"}
    if "no_input_columns" in shapes:
        metadata.pop("input_columns")
    if "no_columns" in shapes:
        metadata.pop("input_columns", None)
        metadata.pop("output_columns")
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2))
    index = "index_column" in shapes  # pandas' DataFrame.to_csv writes the index under an empty header cell
    header = ([""] if index else []) + ["order_id", "channel", "amount", "decision", "refund_method"]
    lines = [",".join(header)] + [",".join(([str(i)] if index else []) + list(r)) for i, r in enumerate(ROWS)]
    (folder / "test_set_with_outputs.csv").write_text("\n".join(lines) + "\n")
    if "no_columns" in shapes:
        inputs = [",".join(header[: -2])] + [",".join(([str(i)] if index else []) + list(r[:3])) for i, r in
                                             enumerate(ROWS)]
        (folder / "test_set_without_outputs.csv").write_text("\n".join(inputs) + "\n")
    (folder / "orders.csv").write_text("order_id,channel,amount,days\n" + "".join(
        f"{r[0]},{r[1]},{r[2]},{i + 3}\n" for i, r in enumerate(ROWS)))
    (folder / "toolspecs.json").write_text(json.dumps(tool_specs(shapes), indent=2))
    (folder / "tools.py").write_text(TOOLS_PY.replace("@HELPER@", HELPER if "helpers" in shapes else ""))
    return folder


def every_tool_then_the_answer(task):
    """A scripted policy: call every tool with the case's inputs, in order, then emit the expected output."""
    inputs = task.payload["inputs"]
    replies = [format_tool_call("get_order", {"order_id": inputs["order_id"]}),
               format_tool_call("check_policy", {"channel": inputs["channel"], "amount": float(inputs["amount"])}),
               "<final_output>" + json.dumps(task.payload["expected"]) + "</final_output>"]
    return lambda messages: replies[sum(m["role"] == "assistant" for m in messages)]


def solve_every_row(folder: Path, **env_kwargs) -> list:
    """Play every row with the scripted policy; every tool answers and every episode succeeds."""
    tasks = load_tasks(f"sop:{folder}")
    assert len(tasks) == len(ROWS)
    trajectories = []
    for task in tasks:
        trajectory = run_policy(make_env(task, trust_tools=True, **env_kwargs), task, every_tool_then_the_answer(task))
        results = [parse_tool_message(m) for t in trajectory.turns for m in t.env_messages if m["role"] == "tool"]
        assert [(r["tool"], r["ok"]) for r in results] == [("get_order", True), ("check_policy", True)], results
        assert trajectory.outcome.success and trajectory.outcome.stop_reason == "final_output", trajectory.outcome
        trajectories.append(trajectory)
    return trajectories


# -- each shape loads, and an episode that calls every tool succeeds --------------------------------
def test_the_strictest_form_loads_and_every_row_is_solved(tmp_path):
    folder = write_folder(tmp_path, set())
    solve_every_row(folder)
    assert inspect_folder(folder).problems == []


def test_shape1_metadata_without_input_columns_infers_them(tmp_path):
    folder = write_folder(tmp_path, {"no_input_columns"})
    solve_every_row(folder)
    task = load_tasks(f"sop:{folder}")[0]
    assert list(task.payload["inputs"]) == ["order_id", "channel", "amount"]  # every column that is not an output
    assert list(task.payload["expected"]) == ["decision", "refund_method"]
    assert [p.message.split(": ", 1)[1] for p in inspect_folder(folder).warnings] == [
        "not given; inferred as every column of the test set that is not an output: order_id, channel, amount. "
        "List them in metadata.json to make this explicit."]


def test_shape1_metadata_without_any_columns_infers_outputs_from_the_test_set_without_outputs(tmp_path):
    folder = write_folder(tmp_path, {"no_columns"})
    solve_every_row(folder)
    folder_check = inspect_folder(folder)
    assert folder_check.folder.output_columns == ["decision", "refund_method"]
    assert folder_check.folder.inferred["output_columns"] == (
        "the columns of test_set_with_outputs.csv that test_set_without_outputs.csv lacks")


def test_shape1_without_columns_or_a_second_test_set_the_benchmarks_answer_column_is_the_output(tmp_path):
    folder = write_folder(tmp_path, {"no_columns"})
    (folder / "test_set_without_outputs.csv").unlink()
    table = (folder / "test_set_with_outputs.csv").read_text().replace("decision", "final_decision")
    (folder / "test_set_with_outputs.csv").write_text(table)
    assert inspect_folder(folder).folder.output_columns == ["final_decision"]
    assert list(load_tasks(f"sop:{folder}")[0].payload["inputs"]) == ["order_id", "channel", "amount", "refund_method"]


def test_shape1_when_nothing_can_be_inferred_the_error_says_which_key_to_add(tmp_path):
    folder = write_folder(tmp_path, {"no_columns"})
    (folder / "test_set_without_outputs.csv").unlink()
    with pytest.raises(TaskFileError) as error:
        load_tasks(f"sop:{folder}")
    message = str(error.value)
    assert f"{folder.resolve() / 'metadata.json'}, field 'output_columns'" in message
    assert "cannot be inferred" in message and 'Add "output_columns": [...] to metadata.json' in message


def test_shape2_public_helpers_without_a_spec_are_not_tools_and_the_load_log_lists_them(tmp_path, caplog):
    folder = write_folder(tmp_path, {"helpers"})
    with caplog.at_level("WARNING", logger="pipeline.envs.sop.folder"):
        trajectories = solve_every_row(folder)
    assert ("class ReturnsDeskManager has public helpers that no spec in toolspecs.json names: load_orders"
            in caplog.text)
    assert "load_orders" not in trajectories[0].messages[0]["content"]  # the agent is never shown it
    task = load_tasks(f"sop:{folder}")[0]
    env = make_env(task, trust_tools=True)
    env.reset(task)
    error = parse_tool_message(env.step(format_tool_call("load_orders", {})).messages[0])
    assert error["error_type"] == "unknown_tool"


def test_shape3_an_empty_first_header_cell_is_pandas_index_column_named_unnamed_0(tmp_path):
    folder = write_folder(tmp_path, {"index_column", "no_input_columns"})
    solve_every_row(folder)
    check = inspect_folder(folder)
    assert check.folder.table.columns[0] == "Unnamed: 0"  # pandas' name: metadata written against pandas works
    assert check.folder.input_columns == ["order_id", "channel", "amount"]  # the index is not a case input
    assert any("header cell(s) with no name, read as 'Unnamed: 0'" in p.message for p in check.warnings)
    metadata = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**metadata, "id_column": "Unnamed: 0"}))
    assert [t.payload["row_id"] for t in load_tasks(f"sop:{folder}")] == ["0", "1", "2", "3"]


def test_shape4_an_optional_spec_argument_the_implementation_does_not_take_warns_and_never_blocks(tmp_path):
    folder = write_folder(tmp_path, {"optional_argument"})
    solve_every_row(folder)
    warnings = [p.message for p in inspect_folder(folder).warnings]
    assert len(warnings) == 1
    tools_py = folder.resolve() / "tools.py"
    assert f"{tools_py}, line 17: check_policy(channel, amount) does not take 'note'" in warnings[0]
    task = load_tasks(f"sop:{folder}")[0]
    env = make_env(task, trust_tools=True)
    env.reset(task)
    step = env.step(format_tool_call("check_policy", {"channel": "web", "amount": 20, "note": "hi"}))
    error = parse_tool_message(step.messages[0])
    assert error["ok"] is False and "check_policy does not take 'note'" in error["error"]
    assert not step.done  # the agent can call it again without the argument


def test_shape5_an_enum_the_folders_own_tools_do_not_enforce_blocks_nothing_and_is_recorded(tmp_path):
    folder = write_folder(tmp_path, {"enum"})
    trajectories = solve_every_row(folder)  # R3's channel "phone" is outside the enum, and the call still runs
    phone = next(t for t in trajectories if t.task_id.endswith("-R3"))
    mismatch = {"name": "check_policy", "problem": "Argument 'channel': must be one of ['web', 'store'], got 'phone'.",
                "refused": False}
    assert phone.turns[1].info["schema_mismatches"] == [mismatch]
    assert phone.outcome.details["schema_mismatches"] == [{"turn": 1, **mismatch}]
    others = [t for t in trajectories if t is not phone]
    assert all("schema_mismatches" not in turn.info for t in others for turn in t.turns)
    assert any("does not allow 'phone', which the test set's channel column holds" in p.message
               for p in inspect_folder(folder).warnings)


def test_strict_tool_schema_refuses_the_call_and_records_it_too(tmp_path):
    folder = write_folder(tmp_path, {"enum"})
    task = next(t for t in load_tasks(f"sop:{folder}") if t.payload["row_id"] == "R3")
    for env in (make_env(task, trust_tools=True, strict_tool_schema=True), None):
        if env is None:  # the folder's own setting
            metadata = json.loads((folder / "metadata.json").read_text())
            (folder / "metadata.json").write_text(json.dumps({**metadata, "strict_tool_schema": True}))
            env = make_env(task, trust_tools=True)
        env.reset(task)
        step = env.step(format_tool_call("check_policy", {"channel": "phone", "amount": 15.5}))
        error = parse_tool_message(step.messages[0])
        assert error["error_type"] == "invalid_arguments" and "must be one of ['web', 'store']" in error["error"]
        assert step.info["schema_mismatches"][0]["refused"] is True


def test_strict_tool_schema_defaults_on_without_tools_py_and_off_with_it(tmp_path):
    assert inspect_folder(write_folder(tmp_path / "a", {"enum"})).folder.strict_tool_schema is False
    shipped = inspect_folder(Path(__file__).resolve().parents[3] / "data" / "sop" / "warranty_claims").folder
    assert shipped.code is None and shipped.strict_tool_schema is True


# -- all five shapes at once, and the linter ------------------------------------------------------
def test_a_folder_with_all_five_shapes_loads_and_sop_check_prints_warnings_only(tmp_path, capsys):
    folder = write_folder(tmp_path, set(SHAPES) - {"no_input_columns"})  # "no_columns" covers it
    solve_every_row(folder)
    assert cli.main(["sop", "check", str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    problems, summary = out[:-1], out[-1]
    assert problems and all(line.startswith("warning: ") for line in problems), out
    for part in ("field 'output_columns': not given; inferred", "field 'input_columns': not given; inferred",
                 "header cell(s) with no name, read as 'Unnamed: 0'", "public helpers that no spec in toolspecs.json "
                 "names: load_orders", "check_policy(channel, amount) does not take 'note'", "does not allow 'phone'"):
        assert sum(part in line for line in problems) == 1, (part, out)
    assert summary.startswith(f"{folder.resolve()}: 0 errors, 6 warnings; 4 tasks, 2 tools (2 in tools.py)")
    assert "strict_tool_schema off" in summary


def test_a_folder_with_real_errors_fails_at_load_and_sop_check_lists_them_all_and_exits_1(tmp_path, capsys):
    folder = write_folder(tmp_path, set(SHAPES) - {"no_input_columns"})
    specs = json.loads((folder / "toolspecs.json").read_text())
    specs.append({"toolSpec": {"name": "issue_refund", "description": "Refund an order.",
                               "inputSchema": {"json": {"type": "object", "properties": {}}}}})
    (folder / "toolspecs.json").write_text(json.dumps(specs))
    with pytest.raises(TaskFileError) as error:
        load_tasks(f"sop:{folder}")
    assert str(error.value) == (f"{folder.resolve() / 'toolspecs.json'}, field '[2]': tool 'issue_refund' has no "
                                "implementation: tools.py has no function or method issue_refund. Add an x-csv-lookup "
                                "to its toolSpec, or implement issue_refund in tools.py.")
    assert cli.main(["sop", "check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "error: " + str(error.value) in out.splitlines()
    (folder / "test_set_with_outputs.csv").unlink()
    assert cli.main(["sop", "check", f"sop:{folder}"]) == 1
    lines = capsys.readouterr().out.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 2, lines  # both problems at once: the missing test set and the spec without code
    assert "missing test_set_with_outputs.csv" in errors[0] and "issue_refund" in errors[1]
    assert lines[-1].startswith(f"{folder.resolve()}: 2 errors")


def test_sop_check_never_runs_tools_py(tmp_path, capsys):
    folder = write_folder(tmp_path, set())
    (folder / "tools.py").write_text((folder / "tools.py").read_text() + "\nopen('RAN', 'w').write('x')\n")
    assert cli.main(["sop", "check", str(folder)]) == 0
    assert not Path("RAN").exists() and not (folder / "RAN").exists()


# -- tools classes as the public benchmark writes them ----------------------------------------------
def test_a_tool_routed_by_process_tool_call_to_a_method_of_another_name_is_called_through_it(tmp_path):
    folder = write_folder(tmp_path, set())
    code = (folder / "tools.py").read_text().replace("def check_policy(", "def _policy_for(")
    code = code.replace("return getattr(self, tool_name)(**tool_input)",
                        'if tool_name == "check_policy":\n            return self._policy_for(**tool_input)\n'
                        "        return getattr(self, tool_name)(**tool_input)")
    (folder / "tools.py").write_text(code)
    solve_every_row(folder)
    warnings = [p.message for p in inspect_folder(folder).warnings]
    assert any("has no method check_policy; its process_tool_call routes the tool" in w for w in warnings), warnings


def test_a_manager_that_inherits_its_tools_from_a_base_class_in_tools_py_is_the_tools_class(tmp_path):
    folder = write_folder(tmp_path, set())
    code = (folder / "tools.py").read_text().replace("class ReturnsDeskManager:", "class Base:")
    code += ("\n\nclass ReturnsDeskManager(Base):\n    def get_order(self, order_id):\n"
             "        return super().get_order(order_id)\n")
    (folder / "tools.py").write_text(code)
    assert inspect_folder(folder).folder.code.class_name == "ReturnsDeskManager"
    solve_every_row(folder)


def test_of_unrelated_classes_holding_tools_the_manager_is_taken_and_two_managers_are_an_error(tmp_path):
    """As the public benchmark's loader, which takes the class whose name ends with Manager."""
    folder = write_folder(tmp_path, set())
    other = "\n\nclass {}:\n    def get_order(self, order_id):\n        return {{}}\n"
    (folder / "tools.py").write_text((folder / "tools.py").read_text() + other.format("Fixture"))
    assert inspect_folder(folder).folder.code.class_name == "ReturnsDeskManager"
    (folder / "tools.py").write_text((folder / "tools.py").read_text() + other.format("AuditManager"))
    with pytest.raises(TaskFileError, match=r"defines tools in several classes \(ReturnsDeskManager, AuditManager\)"):
        load_tasks(f"sop:{folder}")


def test_an_implementation_that_requires_what_the_spec_marks_optional_is_a_warning(tmp_path):
    folder = write_folder(tmp_path, set())
    specs = json.loads((folder / "toolspecs.json").read_text())
    specs[1]["toolSpec"]["inputSchema"]["json"]["required"] = ["channel"]  # amount optional, as in some public specs
    (folder / "toolspecs.json").write_text(json.dumps(specs))
    warnings = [p.message for p in inspect_folder(folder).warnings]
    assert len(warnings) == 1 and "check_policy(channel, amount) requires ['amount'], which its inputSchema in " \
                                  "toolspecs.json marks optional" in warnings[0]
    solve_every_row(folder)  # the scripted policy passes it, so every row still works
