"""Hostile task files and task sets (pipeline/envs/tasks.py, pipeline/envs/schema.py, ``--env``).

A task file is JSONL that users edit by hand, generate, or download. Whatever it holds, loading it either
gives tasks the environment can play, or stops with a :class:`TaskFileError` naming the file (and the line
and field where there is one) and the fix; through the CLI that is one ``turnwise: error:`` line and exit
status 1. Never a traceback, never an error that leaves out the file, and never a task set that silently
loads as empty or unknown (``turnwise score`` used to print every outcome as unknown and exit 0).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.envs import TaskFileError, load_tasks
from pipeline.envs.tasks import DATA_ROOT

SAMPLE_LOG = str(DATA_ROOT / "logged" / "sample_conversations.jsonl")
SOP_LOG = str(DATA_ROOT / "logged" / "sop_warranty_claims.jsonl")
WARRANTY_CLAIMS = DATA_ROOT / "sop" / "warranty_claims"


@pytest.fixture(scope="module")
def good_row() -> dict:
    """The first shipped customer-service test task, as a decoded row."""
    with (DATA_ROOT / "customer_service" / "tasks" / "test.jsonl").open(encoding="utf-8") as f:
        return json.loads(f.readline())


def write_lines(path: Path, *rows) -> Path:
    """Write rows as JSONL; a str row is written as it is (for broken JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def with_value(row: dict, dotted: str, value) -> dict:
    """A deep copy of ``row`` with the dotted path (``payload.customer.persona.style``) set to ``value``."""
    row = copy.deepcopy(row)
    *parents, last = dotted.split(".")
    node = row
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return row


def load_error(path: Path) -> str:
    """The message of the TaskFileError that loading ``path`` fails with; it always names the file."""
    with pytest.raises(TaskFileError) as error:
        load_tasks(path)
    message = str(error.value)
    assert message.startswith(str(path)), message
    return message


def refused(capsys, argv: list[str], *expected: str) -> str:
    """Run ``turnwise ARGV``; it must exit 1 with a ``turnwise: error:`` line holding every ``expected`` string."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("turnwise: error: ") and "Traceback" not in captured.err, captured.err
    assert "Scored" not in captured.out  # nothing was scored against a task set that did not load
    for text in expected:
        assert text in captured.err, (text, captured.err)
    return captured.err


# ===================================================================================================
# Empty files and files that are not UTF-8
# ===================================================================================================


@pytest.mark.parametrize("content", ["", "\n   \n\n"], ids=["empty", "blank-lines-only"])
def test_an_empty_task_file_is_an_error_not_an_empty_task_set(tmp_path, content):
    """It used to load as zero tasks, so every logged conversation scored as 'task not found'."""
    path = tmp_path / "EMPTY.jsonl"
    path.write_text(content)
    assert load_error(path) == f"{path}: holds no tasks (the file is empty); write one JSON task per line."


@pytest.mark.parametrize("command", [
    ["score", SAMPLE_LOG, "--env"],
    ["eval", "--policy", "oracle", "--env"],
], ids=["score", "eval"])
def test_commands_given_an_empty_task_file_exit_1_naming_it(tmp_path, capsys, command):
    path = tmp_path / "EMPTY.jsonl"
    path.write_text("")
    refused(capsys, command + [str(path)], f"turnwise: error: {path}: holds no tasks")


@pytest.mark.parametrize("content, where", [
    (b"\xff\xfe" + b'{"id": "t"}\n', "line 1: is not UTF-8 text (byte 0xff at column 1"),
    (b'\n\n{"id": "caf\xe9"}\n', "line 3: is not UTF-8 text (byte 0xe9 at column 12"),  # Latin-1 after two blank lines
], ids=["utf16-bom-bytes", "latin1-on-line-3"])
def test_a_non_utf8_task_file_names_the_file_the_byte_and_the_fix(tmp_path, content, where):
    """It used to raise a bare UnicodeDecodeError that named no file."""
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(content)
    message = load_error(path)
    assert f"{path}, {where}" in message and "save the file as UTF-8" in message


def test_a_non_utf8_byte_deep_in_the_file_is_placed_by_line_and_column(tmp_path):
    """The position was once counted from the decoder's chunk, not the file (byte 1696 for byte 100000)."""
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b"\n" * 100_000 + b'{"id": \xff}\n')
    message = load_error(path)
    assert "line 100001" in message and "byte 0xff at column 8" in message


def test_score_with_a_non_utf8_task_file_exits_1_naming_it(tmp_path, capsys):
    """`score` used to catch nothing here and exit 0 with every outcome unknown."""
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b"\xff\xfe\x00{")
    refused(capsys, ["score", SAMPLE_LOG, "--env", str(path)], str(path), "is not UTF-8 text")


def test_a_utf8_byte_order_mark_is_refused_naming_the_file_and_line(tmp_path, good_row):
    """The loader reads UTF-8 (not utf-8-sig), so a BOM is refused as invalid JSON on line 1, not crashed on."""
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(good_row) + "\n").encode())
    message = load_error(path)
    assert f"{path}, line 1: not valid JSON" in message and "BOM" in message


# ===================================================================================================
# Lines that are not task objects
# ===================================================================================================


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ("42", "int"), ("null", "NoneType"),
                                        ('"a task"', "str")])
def test_a_line_that_is_not_a_json_object_names_the_line(tmp_path, good_row, line, kind):
    path = write_lines(tmp_path / "tasks.jsonl", good_row, line)
    assert f"{path}, line 2, field '<row>': each line must be a JSON object, got {kind}" in load_error(path)


def test_truncated_json_names_the_line_and_column(tmp_path, good_row):
    path = write_lines(tmp_path / "tasks.jsonl", good_row, json.dumps({**good_row, "id": "second"})[:80])
    assert load_error(path).startswith(f"{path}, line 2: not valid JSON (")


@pytest.mark.parametrize("line", [
    "[" * 100_000 + "]" * 100_000,
    '{"id": "t", "payload": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001,
], ids=["array", "object"])
def test_deeply_nested_json_is_a_clear_error_not_a_recursion_error(tmp_path, line):
    """It used to escape as a bare RecursionError."""
    path = write_lines(tmp_path / "tasks.jsonl", line)
    assert load_error(path).startswith(f"{path}, line 1: the JSON is nested too deeply to read")


def test_an_integer_too_long_to_convert_is_a_clear_error(tmp_path):
    """It used to escape as Python's int-conversion ValueError, naming neither file nor line."""
    path = write_lines(tmp_path / "tasks.jsonl", '{"id": ' + "9" * 5000 + "}")
    assert load_error(path).startswith(f"{path}, line 1: not valid JSON (Exceeds the limit")


@pytest.mark.timeout(30)
def test_a_10_mb_line_is_read_and_refused_by_its_field_with_a_short_message(tmp_path):
    """There is no line-size cap: a 10 MB line is parsed, checked field by field, and not echoed back."""
    path = write_lines(tmp_path / "tasks.jsonl", '{"id": "' + "a" * 10_000_000 + '"}')
    start = time.perf_counter()
    message = load_error(path)
    assert time.perf_counter() - start < 5
    assert message == f"{path}, line 1, field 'domain': is missing. Fix the row or regenerate the file."


# ===================================================================================================
# Task ids, domains and payload fields
# ===================================================================================================


@pytest.mark.parametrize("make_row, says", [
    (lambda r: {k: v for k, v in r.items() if k != "id"}, "field 'id': is missing"),
    (lambda r: {**r, "id": 7}, "field 'id': must be str, got int"),
    (lambda r: {**r, "id": None}, "field 'id': must be str, got NoneType"),
    (lambda r: {**r, "id": "   "}, "field 'id': must not be empty"),
], ids=["missing", "int", "null", "blank"])
def test_a_task_id_must_be_a_non_empty_string(tmp_path, good_row, make_row, says):
    """A blank id used to load, and could not be told apart from another blank id in a log."""
    path = write_lines(tmp_path / "tasks.jsonl", make_row(good_row))
    assert load_error(path).startswith(f"{path}, line 1, {says}. Fix the row or regenerate the file.")


def test_a_duplicated_task_id_names_both_lines(tmp_path, good_row):
    other = {**good_row, "id": "other"}
    path = write_lines(tmp_path / "tasks.jsonl", good_row, other, {**good_row, "split": "train"})
    assert load_error(path) == (f"{path}, line 3, field 'id': duplicate task id {good_row['id']!r} "
                                "(first on line 1)")


def test_a_row_naming_an_unknown_domain_is_refused_listing_the_registered_ones(tmp_path, good_row):
    """It used to load, and fail only when an environment was built for it."""
    path = write_lines(tmp_path / "tasks.jsonl", {**good_row, "domain": "customer_servce"})
    message = load_error(path)
    assert f"{path}, line 1, field 'domain': names no registered domain ('customer_servce')" in message
    assert "customer_service" in message.split("registered: ")[1]


def test_an_unknown_persona_style_names_the_field_and_the_allowed_styles(tmp_path, good_row):
    """It used to load, and raise KeyError: 'furious' when the customer first spoke."""
    path = write_lines(tmp_path / "tasks.jsonl", with_value(good_row, "payload.customer.persona.style", "furious"))
    assert load_error(path) == (f"{path}, line 1, field 'payload.customer.persona.style': unknown style 'furious'; "
                                "use one of polite, terse, impatient, chatty. Fix the row or regenerate the file.")


@pytest.mark.parametrize("price", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_price_is_refused_naming_the_field(tmp_path, good_row, price):
    """A NaN price once loaded, and made a damaged-refund task one the oracle could not solve, silently."""
    order_id = next(iter(good_row["payload"]["db"]["orders"]))
    row = json.dumps(with_value(good_row, f"payload.db.orders.{order_id}.items.0.price", 1.5))
    path = write_lines(tmp_path / "tasks.jsonl", row.replace('"price": 1.5', f'"price": {price}', 1))
    assert f"field 'payload.db.orders.{order_id}.items[0].price'" in load_error(path)


# ===================================================================================================
# --env values that name no usable task set
# ===================================================================================================


def test_score_with_a_misspelt_domain_exits_1_with_a_suggestion(capsys):
    """`score --env customer_servce` used to exit 0, with every outcome unknown."""
    refused(capsys, ["score", SAMPLE_LOG, "--env", "customer_servce"],
            "No task set 'customer_servce'. Did you mean 'customer_service'?")


@pytest.fixture
def sop_copy(tmp_path) -> Path:
    """A writable copy of the shipped warranty_claims SOP folder (about 100 KB)."""
    return Path(shutil.copytree(WARRANTY_CLAIMS, tmp_path / "warranty_claims"))


def test_score_with_an_sop_folder_missing_its_test_set_exits_1_naming_the_file(sop_copy, capsys):
    """It used to exit 0, with every outcome unknown."""
    (sop_copy / "test_set_with_outputs.csv").unlink()
    refused(capsys, ["score", SOP_LOG, "--env", f"sop:{sop_copy}"],
            f"{sop_copy}: missing test_set_with_outputs.csv")


def test_score_with_a_tool_that_has_no_implementation_exits_1_naming_the_spec(sop_copy, capsys):
    """It used to exit 0, with every outcome unknown."""
    specs = json.loads((sop_copy / "toolspecs.json").read_text())
    specs.append({"toolSpec": {"name": "mystery_tool", "description": "Not implemented anywhere.",
                               "inputSchema": {"json": {"type": "object", "properties": {}}}}})
    (sop_copy / "toolspecs.json").write_text(json.dumps(specs))
    refused(capsys, ["score", SOP_LOG, "--env", f"sop:{sop_copy}"],
            f"{sop_copy}/toolspecs.json, field '[{len(specs) - 1}]': tool 'mystery_tool' has no implementation",
            "implement mystery_tool in tools.py")


def test_a_key_given_twice_in_a_row_is_refused(tmp_path, good_row):
    """json.loads keeps the last of two keys; the row's first id once vanished without a word."""
    row = json.dumps(good_row)
    path = write_lines(tmp_path / "tasks.jsonl", row[:-1] + ', "id": "other"}')
    message = load_error(path)
    assert "line 1" in message and "the key 'id' appears twice" in message
    assert "a row gives each key once" in message


def test_an_error_quoting_a_megabyte_value_stays_short(tmp_path, good_row):
    """Two rows sharing a 1 MB id gave a million-character error; the message now keeps its start and end."""
    row = json.dumps(with_value(good_row, "id", "x" * 1_000_000))
    message = load_error(write_lines(tmp_path / "tasks.jsonl", row, row))
    assert len(message) < 1_000 and "line 2, field 'id': duplicate task id 'xxx" in message
    assert message.endswith("(first on line 1)")
