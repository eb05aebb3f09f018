"""Hostile logged conversations and trajectory files (rewards/logged.py, pipeline/trajectory.py).

A log is a file someone hands to ``turnwise score`` or ``turnwise eval --trajectories``. Whatever it
holds, the command either scores it or stops with one sentence naming the file, the line and the field;
a wrongly typed field is never read as something else (``"success": "false"`` is not a success).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.envs import load_tasks
from pipeline.trajectory import load_jsonl
from rewards.logged import load_conversations

SYSTEM = {"role": "system", "content": "You are a support agent."}
USER = {"role": "user", "content": "Where is my order?"}
AGENT = {"role": "assistant", "content": "Could you share your email and zip code?"}
OUTCOME = {"success": True, "completed": True, "stop_reason": "resolved", "violations": [], "fields": {},
           "details": {}}


def write_lines(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def conversation(**fields) -> dict:
    return {"messages": [SYSTEM, USER, AGENT, USER], **fields}


@pytest.fixture(scope="module")
def task_id() -> str:
    return load_tasks("customer_service", "test")[0].id


def score(path: Path, capsys) -> tuple[int, str, str]:
    code = main(["score", str(path), "--reward", "default"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- issue 21, finding 9: outcomes are not type-checked --------------------------------------------
def test_success_written_as_the_string_false_is_an_error_not_a_success(tmp_path, capsys):
    """``"success": "false"`` used to count as a success, and strict success was reported as 1.000."""
    path = write_lines(tmp_path / "log.jsonl", conversation(outcome={**OUTCOME, "success": "false"}))
    code, out, err = score(path, capsys)
    assert code == 1 and "strict success: 1.000" not in out
    assert f"{path}, line 1: outcome.success: expected true or false, got the string 'false'" in err


@pytest.mark.parametrize("field, value, says", [
    ("success", 1, "outcome.success: expected true or false, got the number 1"),
    ("completed", None, "outcome.completed: expected true or false, got null"),
    ("stop_reason", 7, "outcome.stop_reason: expected a string or null, got the number 7"),
    ("violations", "identity_verification@1", "outcome.violations: expected a list"),
    ("fields", {"decision": "yes"}, "outcome.fields.decision: expected true or false (or a record"),
    ("details", [], "outcome.details: expected an object, got a list"),
    ("succes", True, "outcome: unknown field(s) succes"),
])
def test_every_outcome_field_is_type_checked(tmp_path, field, value, says):
    path = write_lines(tmp_path / "log.jsonl", conversation(), conversation(outcome={**OUTCOME, field: value}))
    with pytest.raises(ValueError) as error:
        load_conversations(path)
    assert str(error.value).startswith(f"{path}, line 2: {says}")


def test_a_trajectory_record_with_a_string_success_is_refused_by_eval(tmp_path, capsys):
    """``turnwise eval --trajectories`` reads trajectory records: the same check, naming the field."""
    record = {"task_id": "t", "messages": [SYSTEM, AGENT], "seed": 0, "outcome": {**OUTCOME, "success": "true"},
              "turns": [{"index": 0, "assistant": AGENT["content"], "env_messages": [], "info": {}}]}
    path = write_lines(tmp_path / "trajectories.jsonl", record)
    assert main(["eval", "--trajectories", str(path)]) == 1
    assert f"{path}, line 1: not a trajectory record: outcome.success: expected true or false" in capsys.readouterr().err


# -- issue 21, clear errors: seed Infinity, no assistant message -----------------------------------
def test_seed_infinity_is_an_error_naming_the_file_and_line(tmp_path, capsys, task_id):
    """``"seed": Infinity`` used to raise OverflowError (int(inf)) out of `score`."""
    path = write_lines(tmp_path / "log.jsonl", conversation(task_id=task_id), '{"messages": [], "seed": Infinity}')
    code, _, err = score(path, capsys)
    assert code == 1 and f"{path}, line 2: seed: expected an integer, got Infinity." in err


@pytest.mark.parametrize("seed, says", [("1.5", "the number 1.5"), ('"3"', "the string '3'"), ("true", "true"),
                                        ("NaN", "NaN")])
def test_a_seed_must_be_an_integer(tmp_path, seed, says):
    path = write_lines(tmp_path / "log.jsonl", '{"messages": [], "seed": ' + seed + "}")
    with pytest.raises(ValueError, match=f"line 1: seed: expected an integer, got {says}"):
        load_conversations(path)


def test_a_conversation_without_an_assistant_message_is_an_error_naming_the_line(tmp_path, capsys):
    """It used to crash `score` while printing (``[] < 0``)."""
    path = write_lines(tmp_path / "log.jsonl", conversation(), {"messages": [SYSTEM, USER]})
    code, _, err = score(path, capsys)
    assert code == 1
    assert f"{path}, line 2: the conversation has no assistant message, so there is nothing to score" in err


# -- issue 21, findings 6 and 7 through `score` ----------------------------------------------------
def test_score_replays_hostile_tool_calls_without_a_traceback(tmp_path, capsys, task_id):
    """Replayed in the task's sandbox, hostile calls become tool errors; `score` used to show a traceback."""
    hostile = ["<tool_call>" + "[" * 1000 + "</tool_call>",
               '<tool_call>{"name": "get_order", "arguments": {"order_id": ' + "9" * 5000 + "}}</tool_call>",
               '<tool_call>{"name": "refund_items", "arguments": {"amount": NaN}}</tool_call>']
    messages = [SYSTEM, USER] + [m for text in hostile for m in ({"role": "assistant", "content": text}, USER)]
    path = write_lines(tmp_path / "log.jsonl", {"messages": messages, "task_id": task_id})
    out_file = tmp_path / "scores.json"
    assert main(["score", str(path), "--out", str(out_file)]) == 0
    (row,) = json.loads(out_file.read_text())["conversations"]
    assert row["outcome_source"] == "replayed" and row["turns"] == 3 and row["failed"] == {}
    assert min(row["components"]["tool_format"]) < 0 or min(row["components"]["tool_errors"]) < 0


def test_a_220_kb_assistant_message_is_refused_naming_the_line_and_message(tmp_path, capsys):
    """One 220 KB logged message made `score` take 212 s; now the reader refuses it at once."""
    big = {"role": "assistant", "content": "<tool_call>" * 20_000}
    path = write_lines(tmp_path / "log.jsonl", conversation(), {"messages": [SYSTEM, USER, big]})
    code, _, err = score(path, capsys)
    assert code == 1
    assert f"{path}, line 2: messages[2]: an assistant message of 220,000 characters; an assistant message may " \
           "have at most 65,536" in err


# -- more hostile logs -----------------------------------------------------------------------------
def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(json.dumps(conversation()).encode() + b"\n" + b'{"messages": ["\xff\xfe"]}\n')
    with pytest.raises(ValueError, match=r"line 2: is not UTF-8 text \(byte 0xff at column 16: invalid start byte\)"):
        load_conversations(path)


@pytest.mark.parametrize("line, says", [
    ("[" * 100_000 + "]" * 100_000, "line 1: the JSON is nested too deeply to read"),
    ('{"messages": [], "seed": ' + "9" * 5000 + "}", r"line 1: not valid JSON \(Exceeds the limit"),
    ("[1, 2]", 'line 1: each line must be a JSON object with a "messages" list'),
    ('{"messages": [["user", "hi"]]}', "line 1: message 0 is not a chat message: .* got a list"),
    ('{"messages": [{"role": "root", "content": "hi"}]}', "line 1: message 0 is not a chat message"),
    ('{"messages": [{"role": "assistant", "content": "hi"}], "task_id": 12}',
     "line 1: task_id: expected a string or null, got the number 12"),
])
def test_hostile_lines_name_the_file_and_line(tmp_path, line, says):
    path = write_lines(tmp_path / "log.jsonl", line)
    with pytest.raises(ValueError, match=says) as error:
        load_conversations(path)
    assert str(error.value).startswith(f"{path}, line 1: ")


def test_a_lone_surrogate_in_a_message_is_refused(tmp_path):
    """JSON can spell a lone surrogate (\\ud800) that no UTF-8 writer (reports, tokenizers) accepts."""
    path = write_lines(tmp_path / "log.jsonl", '{"messages": [{"role": "assistant", "content": "ok \\ud800"}]}')
    with pytest.raises(ValueError, match=r"line 1: messages\[0\]: not valid Unicode text \(a lone surrogate"):
        load_conversations(path)


@pytest.mark.parametrize("turn, says", [
    ({"index": -1}, r"turns\[0\].index: expected a turn index"),
    ({"index": True}, r"turns\[0\].index: expected an integer, got true"),
    ({"assistant": None}, r"turns\[0\].assistant: expected a string, got null"),
    ({"completion_ids": [1, "2"]}, r"turns\[0\].completion_ids\[1\]: expected an integer, got the string '2'"),
    ({"logprobs": [-0.5, float("nan")]}, r"turns\[0\].logprobs\[1\]: expected a number, got NaN"),
    ({"env_messages": [{"role": "tool"}]}, r"turns\[0\].env_messages\[0\]: missing field\(s\) content"),
    ({"truncated": "no"}, r"turns\[0\].truncated: expected true or false"),
])
def test_trajectory_turns_are_type_checked(tmp_path, turn, says):
    good = {"index": 0, "assistant": "hi", "env_messages": [], "info": {}}
    record = {"task_id": "t", "messages": [AGENT], "outcome": OUTCOME, "turns": [{**good, **turn}]}
    path = write_lines(tmp_path / "t.jsonl", record)  # json.dumps writes float("nan") as NaN
    with pytest.raises(ValueError, match=f"line 1: not a trajectory record: {says}"):
        load_jsonl(path)


def test_token_spans_outside_the_sequence_are_refused(tmp_path):
    tokens = {"input_ids": [1, 2, 3], "assistant_mask": [0, 1, 1], "logprobs": [0.0, -0.1, -0.2],
              "turn_spans": [[1, 9]]}
    record = {"task_id": "t", "messages": [AGENT], "outcome": OUTCOME, "turns": [], "tokens": tokens}
    path = write_lines(tmp_path / "t.jsonl", record)
    with pytest.raises(ValueError, match=r"tokens.turn_spans\[0\]: \[1, 9\] is not a span of the 3 tokens"):
        load_jsonl(path)


def test_a_logged_tool_message_nested_too_deeply_does_not_break_the_scorers(tmp_path):
    """Rule scorers read logged tool messages as JSON; a hostile one is just not a tool result."""
    from rewards import build_reward
    from rewards.logged import score_conversations

    tool = {"role": "tool", "content": "[" * 50_000}
    path = write_lines(tmp_path / "log.jsonl", {"messages": [SYSTEM, USER, AGENT, tool], "outcome": OUTCOME})
    report = score_conversations(build_reward(), load_conversations(path))
    assert report.summary["failures"] == 0 and report.rows[0]["failed"] == {}


def test_the_shipped_logs_still_load(tmp_path):
    """Honest logs are untouched by the checks."""
    root = Path(__file__).resolve().parents[2] / "data" / "logged"
    for name in ("sample_conversations.jsonl", "sop_warranty_claims.jsonl"):
        assert len(load_conversations(root / name)) > 0
