"""Tests for pipeline/conversations.py: the three conversation formats, their detection, and lossless conversion.

The data: the shipped sample logs (26 customer-service and 13 SOP conversations, scripted agents good and
bad), format probes whose tool calls are malformed, and data/logged/formats/, the same three conversations
written in each format by data/logged/prepare.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.conversations import (
    FORMATS,
    convert_row,
    detect_format,
    from_bedrock,
    from_openai,
    read_rows,
    to_turnwise_row,
    write_conversations,
)
from pipeline.envs import load_tasks, make_env
from pipeline.rollout import run_policy
from rewards import build_reward
from rewards.audit import PROBE_VARIANTS, FormatProbe
from rewards.logged import load_conversations, score_conversations

REPO = Path(__file__).resolve().parents[1]
LOGGED = REPO / "data" / "logged"


@pytest.fixture(scope="module")
def conversations() -> list[dict]:
    """Every shipped sample conversation, and one probe per malformed-call variant."""
    rows = [json.loads(line) for name in ("sample_conversations.jsonl", "sop_warranty_claims.jsonl")
            for line in (LOGGED / name).read_text().splitlines()]
    task = load_tasks("customer_service", "test")[3]
    for variant in PROBE_VARIANTS:
        probe = run_policy(make_env(task), task, FormatProbe(task, variant))
        rows.append({"messages": probe.messages, "task_id": task.id, "policy": f"probe:{variant}"})
    return rows


@pytest.mark.parametrize("fmt", ["openai", "bedrock"])
def test_converting_to_a_format_and_back_gives_the_same_messages(conversations, fmt):
    for row in conversations:
        written = json.loads(json.dumps(convert_row(row, fmt)))  # through JSON, as a file holds it
        plain = all(isinstance(m.get("content"), str) and set(m) == {"role", "content"} for m in written["messages"])
        assert detect_format(written) == (None if plain and fmt == "openai" else fmt)  # plain chat fits every format
        back = to_turnwise_row(written, fmt)
        assert back["messages"] == row["messages"], row.get("policy")
        assert {k: back[k] for k in row if k != "messages"} == {k: v for k, v in row.items() if k != "messages"}
        assert convert_row(back, fmt) == written  # and from the format: the same lines again


def test_structured_calls_are_written_natively(conversations):
    """Well-formed calls become tool_calls / toolUse with their results answering by id, not protocol text."""
    oracle = conversations[0]
    openai = convert_row(oracle, "openai")["messages"]
    calls = [m for m in openai if m.get("tool_calls")]
    assert calls and all(m["content"] is None for m in calls)
    assert not any("<tool_call>" in (m["content"] or "") for m in openai if m["role"] == "assistant")
    ids = [c["id"] for m in calls for c in m["tool_calls"]]
    assert [m["tool_call_id"] for m in openai if m["role"] == "tool"] == ids
    first = calls[0]["tool_calls"][0]["function"]
    assert first["name"] == "verify_identity" and isinstance(json.loads(first["arguments"]), dict)
    result = next(m for m in openai if m["role"] == "tool")
    assert "ok" not in json.loads(result["content"])  # the value itself, as an application logs it
    bedrock = convert_row(oracle, "bedrock")
    assert bedrock["system"] == [{"text": oracle["messages"][0]["content"]}]
    uses = [b["toolUse"] for m in bedrock["messages"] for b in m["content"] if "toolUse" in b]
    results = [b["toolResult"] for m in bedrock["messages"] for b in m["content"] if "toolResult" in b]
    assert [u["toolUseId"] for u in uses] == [r["toolUseId"] for r in results] == ids
    assert all(r["status"] == "success" and "json" in r["content"][0] for r in results)


def test_the_three_format_files_give_identical_score_breakdowns(tmp_path, capsys):
    """Acceptance: the same three conversations in all three formats, scored by `turnwise score`."""
    scores = {}
    for fmt in FORMATS:
        path = LOGGED / "formats" / f"{fmt}.jsonl"
        assert [f for _, _, f in read_rows(path)] == [fmt] * 3
        out = tmp_path / f"{fmt}.json"
        assert main(["score", str(path), "--out", str(out)]) == 0
        scores[fmt] = json.loads(out.read_text())
    rows = {fmt: [{k: v for k, v in r.items()} for r in s["conversations"]] for fmt, s in scores.items()}
    assert rows["openai"] == rows["turnwise"] == rows["bedrock"]
    assert scores["openai"]["summary"] == scores["turnwise"]["summary"] == scores["bedrock"]["summary"]
    oracle, skipped, malformed = rows["turnwise"]
    assert oracle["success"] and not skipped["success"] and skipped["components"]["policy_compliance"] < 0
    assert min(malformed["components"]["tool_format"]) < 0  # the malformed calls were read as malformed
    assert "format openai" in capsys.readouterr().out


def openai_log() -> dict:
    """A production OpenAI log: content parts, a developer prompt, two calls answered out of order, the
    application's own JSON results (no turnwise envelope), and a failed call."""
    task = load_tasks("customer_service", "test")[0]
    c, goal = task.payload["customer"], task.payload["goals"][0]
    order = goal["order_id"]
    return {"task_id": task.id, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "You are a support agent."}]},
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "verify_identity", "arguments": json.dumps(
                {"email": c["email"], "zip_code": c["zip_code"]})}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": json.dumps({"customer_id": "C1", "name": c["name"]})},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_b", "type": "function", "function": {"name": "get_order", "arguments": json.dumps({"order_id": order})}},
            {"id": "call_c", "type": "function", "function": {"name": "track_shipment", "arguments": "{\"order_id\": \"W0\"}"}}]},
        {"role": "tool", "tool_call_id": "call_c", "content": json.dumps({"error": "Order W0 not found."})},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": json.dumps({"status": "delivered"})}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Your order "}, {"type": "text", "text": "was delivered."}]},
    ]}


def test_an_openai_log_is_read_as_calls_and_named_results():
    """The defect behind this module: an OpenAI log's tool turns were scored as empty replies. Now each call is
    a call, each result is named after the call it answers and put in call order, and a failure is a failure."""
    messages = from_openai(openai_log()["messages"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "tool", "assistant"]
    assert messages[0]["content"] == "You are a support agent."
    assert messages[2]["content"].startswith('<tool_call>{"name": "verify_identity", "arguments": {"email": ')
    assert messages[4]["content"].startswith("Let me check.\n<tool_call>")
    get_order, track = (json.loads(m["content"]) for m in messages[5:7])
    assert get_order == {"ok": True, "tool": "get_order", "result": {"status": "delivered"}}
    assert track == {"ok": False, "tool": "track_shipment", "error": "Order W0 not found.", "error_type": "tool_error"}
    assert messages[7]["content"] == "Your order was delivered."


def test_an_openai_log_scores_like_its_turnwise_twin(tmp_path):
    """Scored, the OpenAI log and the same conversation written in turnwise's format agree on every component;
    the status claim after the lookup is supported (it used to be flagged as unsupported)."""
    log = openai_log()
    openai_path, turnwise_path = tmp_path / "openai.jsonl", tmp_path / "turnwise.jsonl"
    openai_path.write_text(json.dumps(log) + "\n")
    turnwise_path.write_text(json.dumps({"task_id": log["task_id"], "messages": from_openai(log["messages"])}) + "\n")
    tasks = load_tasks("customer_service", "test")
    reward = build_reward(tasks=tasks)
    by_id = {t.id: t for t in tasks}
    (a,), (b,) = (score_conversations(reward, load_conversations(p, by_id)).rows for p in (openai_path, turnwise_path))
    assert a["components"] == b["components"] and a["total"] == b["total"]
    turns = load_conversations(openai_path, by_id)[0].trajectory.turns
    assert [t.info["kind"] for t in turns] == ["tool_calls", "tool_calls", "message"]
    assert a["components"]["unsupported_claim"][-1] == 0


def test_a_bedrock_log_with_text_beside_calls_failures_and_reasoning():
    messages = from_bedrock([
        {"role": "user", "content": [{"text": "Cancel my order W1."}]},
        {"role": "assistant", "content": [{"reasoningContent": {"reasoningText": {"text": "hmm"}}},
                                          {"text": "Checking."},
                                          {"toolUse": {"toolUseId": "tooluse_1", "name": "get_order", "input": {"order_id": "W1"}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "not found"}],
                                                     "status": "error"}},
                                     {"text": "Well?"}]},
    ], system=[{"text": "Be brief."}, {"cachePoint": {"type": "default"}}])
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Cancel my order W1."},
        {"role": "assistant", "content": 'Checking.\n<tool_call>{"name": "get_order", "arguments": {"order_id": "W1"}}</tool_call>'},
        {"role": "tool", "content": json.dumps({"error": "not found", "error_type": "tool_error", "ok": False,
                                                "tool": "get_order"}, sort_keys=True)},
        {"role": "user", "content": "Well?"},
    ]


BAD_LINES = {
    "turnwise": ('{"messages": [{"role": "user", "content": {"text": "hi"}}]}', "message 0 is not a chat message"),
    "openai": ('{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", '
               '"function": {"arguments": "{}"}}]}]}', r"messages\[0\].tool_calls\[0\].function.name: expected the tool's name"),
    "bedrock": ('{"system": [{"text": "s"}], "messages": [{"role": "user", "content": "hi"}]}',
                r"messages\[0\].content: expected a list of content blocks"),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_malformed_line_in_each_format_names_the_file_line_and_field(tmp_path, fmt):
    good = (LOGGED / "formats" / f"{fmt}.jsonl").read_text().splitlines()[0]
    bad, says = BAD_LINES[fmt]
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text(good + "\n" + bad + "\n")
    with pytest.raises(ValueError, match=says) as error:
        load_conversations(path)
    assert str(error.value).startswith(f"{path}, line 2: ")


def test_a_file_holds_one_format_and_format_forces_one(tmp_path):
    lines = [(LOGGED / "formats" / f"{fmt}.jsonl").read_text().splitlines()[0] for fmt in ("openai", "bedrock")]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 2: this line is in the Bedrock Converse format, but line 1 set the "
                                         "file's format to OpenAI chat"):
        list(read_rows(mixed))
    bedrock = LOGGED / "formats" / "bedrock.jsonl"
    with pytest.raises(ValueError, match=r"line 1: this line is in the Bedrock Converse format, but --format says "
                                         r"openai; .* \(read as OpenAI chat, as --format says\)"):
        load_conversations(bedrock, format="openai")
    # forcing turnwise's format on an OpenAI log would drop its calls: refused, not mis-scored
    with pytest.raises(ValueError, match="line 1: this line is in the OpenAI chat format, but --format says turnwise"):
        load_conversations(LOGGED / "formats" / "openai.jsonl", format="turnwise")
    assert len(load_conversations(bedrock, format="bedrock")) == 3
    # plain chat (string contents only) fits every format
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
    assert [f for _, _, f in read_rows(plain)] == ["turnwise"]
    assert load_conversations(plain, format="openai")[0].trajectory.messages[1]["content"] == "yo"


def test_score_takes_a_format_flag(tmp_path, capsys):
    path = LOGGED / "formats" / "openai.jsonl"
    assert main(["score", str(path), "--format", "openai"]) == 0
    assert "Scored 3 conversations" in capsys.readouterr().out
    assert main(["score", str(path), "--format", "bedrock"]) == 1
    assert "line 1: this line is in the OpenAI chat format, but --format says bedrock" in capsys.readouterr().err


def test_write_conversations_refuses_what_a_format_cannot_hold(tmp_path):
    stray = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"},
                          {"role": "assistant", "content": "ok"}]}
    with pytest.raises(ValueError, match="conversation 0: message 1 is a tool result that answers no tool call"):
        write_conversations([stray], tmp_path / "x.jsonl", "openai")
    late_system = {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "later"},
                                {"role": "assistant", "content": "ok"}]}
    with pytest.raises(ValueError, match="a system message after the conversation started"):
        write_conversations([late_system], tmp_path / "x.jsonl", "bedrock")
    assert write_conversations([late_system], tmp_path / "x.jsonl", "openai").is_file()


def test_rejudge_reads_every_format(tmp_path, benchmark_script):
    """benchmarks/rejudge.py replays an evaluation's logged episodes; written in any format, the same episodes
    replay to the same verdicts."""
    from pipeline.envs import oracle_policy
    from pipeline.trajectory import save_jsonl

    rejudge = benchmark_script("rejudge").rejudge
    tasks = load_tasks("customer_service", "test")[:2]
    played = [run_policy(make_env(t), t, oracle_policy(t), seed=1) for t in tasks]
    records = tmp_path / "turnwise.jsonl"
    save_jsonl(played, records)
    rows = [t.to_dict() for t in played]
    results = {"turnwise": rejudge(records, {t.id: t for t in tasks}, 20)}
    for fmt in ("openai", "bedrock"):
        path = write_conversations(rows, tmp_path / f"{fmt}.jsonl", fmt)
        results[fmt] = rejudge(path, {t.id: t for t in tasks}, 20)
    for episodes, changed in results.values():
        assert changed == 0 and [e.outcome for e in episodes] == [t.outcome for t in played]
        assert [e.messages for e in episodes] == [t.messages for t in played]
