"""Tests for SFT from your own transcripts (pipeline/sft.py: ``--demos``, ``logged_demonstrations``).

The transcripts are the shipped sample log (oracle and scripted hacking agents on test tasks; two lines carry
no task id), in turnwise's format and converted to OpenAI and Bedrock. Shrunk settings: the tiny two-layer
random model, one epoch, validation on one val task with 2 turns of at most 4 new tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.conversations import write_conversations
from pipeline.envs import load_tasks
from pipeline.models import load_model
from pipeline.sft import SFTArguments, logged_demonstrations, parse_sft_args, run_sft, tokenize_demonstration

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "logged" / "sample_conversations.jsonl"


@pytest.fixture(scope="module")
def tasks():
    return load_tasks("customer_service")  # every split: transcripts are matched by task id


def test_transcripts_that_break_the_sop_are_listed_and_can_be_dropped(tasks):
    demos, screening = logged_demonstrations(SAMPLE, tasks)
    rows = screening.rows
    assert len(rows) == len(demos) == 26 and screening.format == "turnwise"
    assert sum(r["checked"] for r in rows) == 24  # the two lines without a task id cannot be replayed
    violating = {r["line"]: r for r in screening.violating}
    policies = [json.loads(line)["policy"] for line in SAMPLE.read_text().splitlines()]
    assert {policies[line - 1] for line in violating} >= {"skip_verification"}
    assert not any(policies[line - 1] == "oracle" for line in violating)  # the oracle breaks no rule
    assert all(r["violations"] and "@" in r["violations"][0] for r in violating.values())
    kept, dropped = logged_demonstrations(SAMPLE, tasks, drop_violations=True)
    assert len(kept) == 26 - len(violating) and dropped.violating == [{**r, "kept": False} for r in violating.values()]
    assert {d.metadata["line"] for d in kept}.isdisjoint(violating)


def test_the_same_transcripts_in_any_format_give_the_same_training_sequences(tasks, tiny_model_dir, tmp_path):
    _, tokenizer = load_model(str(tiny_model_dir))
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:3]]
    sequences = {}
    for fmt in ("turnwise", "openai", "bedrock"):
        path = write_conversations(rows, tmp_path / f"{fmt}.jsonl", fmt)
        demos, screening = logged_demonstrations(path, tasks)
        assert screening.format == fmt
        sequences[fmt] = [tokenize_demonstration(d.messages, tokenizer) for d in demos]
    assert sequences["openai"] == sequences["turnwise"] == sequences["bedrock"]


def test_sft_demos_trains_an_adapter_and_reports_val_success(tiny_model_dir, tmp_path):
    """`turnwise sft --demos FILE --drop_violations`: trains on the kept transcripts only (OpenAI format here),
    reports val success, and lists the transcripts that broke the SOP."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    picked = [rows[0], rows[1]] + [r for r in rows if r["policy"] == "skip_verification"]
    demos_file = write_conversations(picked, tmp_path / "agents.jsonl", "openai")
    sft_args, config, model_args = parse_sft_args(
        ["--demos", str(demos_file), "--drop-violations", "--val_limit", "1", "--val_max_turns", "2",
         "--val_max_new_tokens", "4", "--patience", "0"],
        config={"output_dir": str(tmp_path / "sft"), "num_train_epochs": 1, "max_length": None, "learning_rate": 1e-2,
                "use_cpu": True, "bf16": False, "model_name_or_path": str(tiny_model_dir), "lora_r": 4,
                "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"]})
    assert sft_args.demos == str(demos_file) and sft_args.drop_violations
    result = run_sft(sft_args, config, model_args)
    screening = result["screening"]
    assert screening["format"] == "openai" and screening["transcripts"] == 4
    assert [r["line"] for r in screening["violating"]] == [3, 4] and screening["kept"] == 2
    assert result["demos"] == 2 and result["demos_source"] == str(demos_file)
    assert result["best_val_success"] is not None and (tmp_path / "sft" / "adapter" / "adapter_config.json").is_file()
    trained = [json.loads(line) for line in (tmp_path / "sft" / "demonstrations.jsonl").read_text().splitlines()]
    assert [t["task_id"] for t in trained] == [rows[0]["task_id"], rows[1]["task_id"]]


def test_the_cli_lists_the_transcripts_that_broke_the_sop(tiny_model_dir, tmp_path, capsys):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    picked = [rows[0]] + [r for r in rows if r["policy"] == "skip_verification"][:1]
    demos_file = tmp_path / "agents.jsonl"
    demos_file.write_text("".join(json.dumps(r) + "\n" for r in picked))
    code = main(["sft", "--demos", str(demos_file), "--drop-violations", "--model_name_or_path", str(tiny_model_dir),
                 "--output_dir", str(tmp_path / "sft"), "--num_train_epochs", "1", "--val_limit", "1",
                 "--val_max_turns", "2", "--val_max_new_tokens", "4", "--lora_r", "4", "--lora_alpha", "8",
                 "--max_length", "20000"])  # the byte-level tokenizer spells each character as a token
    out = capsys.readouterr().out
    assert code == 0
    assert f"SFT on 1 transcripts from {demos_file}" in out and "best val success" in out
    assert "read 2 transcripts (turnwise format): 1 kept" in out and "1 broke the SOP (left out):" in out
    assert f"line   2  {picked[1]['task_id']}" in out and "identity_verification@" in out


def test_bad_demos_options_fail_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="demos='nope.jsonl' is not a file"):
        SFTArguments(demos="nope.jsonl")
    with pytest.raises(ValueError, match="drop_violations screens --demos transcripts"):
        SFTArguments(drop_violations=True)
    with pytest.raises(ValueError, match=r"demos_format must be auto \(detect it\) or one of turnwise, openai, bedrock"):
        SFTArguments(demos=str(SAMPLE), demos_format="csv")
    with pytest.raises(ValueError, match="tool_calling must be one of auto, native, text"):
        SFTArguments(tool_calling="json")
    with pytest.raises(ValueError, match="unknown customer"):
        SFTArguments(customer="gpt-4")
    every_line_violates = tmp_path / "bad.jsonl"
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    every_line_violates.write_text("".join(json.dumps(r) + "\n" for r in rows if r["policy"] == "skip_verification"))
    with pytest.raises(ValueError, match="every transcript in .* breaks the SOP"):
        logged_demonstrations(every_line_violates, load_tasks("customer_service"), drop_violations=True)
