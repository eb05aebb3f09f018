"""Tests for rewards/audit.py and `turnwise audit`: each check on scripted rollouts, default vs lenient."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.envs import make_env
from pipeline.rollout import run_policy
from rewards import build_reward
from rewards.audit import (
    PROBE_VARIANTS,
    AuditConfig,
    FormatProbe,
    audit,
    mangle_tool_calls,
    rejected_turns,
    scripted_rollouts,
)
from rewards.rules import tool_format

LENIENT = "configs/rewards/lenient_example.yaml"


@pytest.fixture(scope="module")
def baseline(test_tasks):
    return scripted_rollouts("noisy_oracle", test_tasks[:10], k=3)


def checks(report):
    return {c.name: c.passed for c in report.checks}


def test_default_reward_passes_every_check(baseline, test_tasks):
    report = audit(build_reward(tasks=test_tasks), baseline, test_tasks,
                   AuditConfig(leniency_tasks=3, hacks=True, hack_tasks=10))
    assert checks(report) == {"in_range": True, "scorer_errors": True, "variance": True, "disagreements": True,
                              "leniency": True, "hack_resistance": True}, report.to_text()
    assert report.passed and report.n_rollouts == 30
    stats = {s["name"]: s for s in report.components}
    assert stats["success"]["corr_success"] == pytest.approx(1.0)
    assert stats["field_accuracy"]["n"] == 0 and stats["field_accuracy"]["not_applicable"] == 30
    text = report.to_text()
    assert "RESULT: PASS" in text and "Hacking table" in text


def test_lenient_example_fails_disagreements_leniency_and_hacks(baseline, test_tasks):
    report = audit(build_reward(LENIENT, tasks=test_tasks), baseline, test_tasks,
                   AuditConfig(leniency_tasks=3, hacks=True, hack_tasks=10))
    result = checks(report)
    assert result["disagreements"] is False and result["leniency"] is False and result["hack_resistance"] is False
    assert not report.passed
    disagreements = next(c for c in report.checks if c.name == "disagreements")
    assert disagreements.details["high_reward_failures"]
    assert "resolution_claim" in disagreements.details["listed"][0]
    leniency = next(c for c in report.checks if c.name == "leniency")
    assert any("tool_calls" in line for line in leniency.details["credited_turns"])


def test_deterministic_rollouts_fail_the_variance_check_and_k1_skips_it(test_tasks):
    reward = build_reward(tasks=test_tasks)
    oracle = scripted_rollouts("oracle", test_tasks[:4], k=2)
    report = audit(reward, oracle, None, AuditConfig(leniency_tasks=0))
    variance = next(c for c in report.checks if c.name == "variance")
    assert variance.passed is False and variance.details["zero_variance_frac"] == 1.0
    single = audit(reward, oracle[::2], None, AuditConfig(leniency_tasks=0))
    assert checks(single)["variance"] is None and checks(single)["leniency"] is None  # skipped, not failed
    assert single.passed


def test_scorer_failures_and_clipping_fail_their_checks(test_tasks):
    rollouts = scripted_rollouts("oracle", test_tasks[:3])
    broken = build_reward({"scorers": [{"scorer": "tests.rewards.scorers_for_tests:raises"},
                                       {"scorer": "strict_success", "weight": 3.0}]})
    result = checks(audit(broken, rollouts, None, AuditConfig(leniency_tasks=0)))
    assert result["scorer_errors"] is False and result["in_range"] is False


@pytest.mark.parametrize("variant", PROBE_VARIANTS)
def test_every_probe_format_is_rejected_by_the_environment_and_the_default_reward(variant, test_tasks):
    task = test_tasks[2]
    t = run_policy(make_env(task), task, FormatProbe(task, variant))
    assert not t.outcome.success
    bad = rejected_turns(t)
    assert bad and all(tool_format(t, i).value == -1.0 for i in bad)
    with pytest.raises(ValueError, match="unknown probe variant"):
        mangle_tool_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call>', "nope")


def test_audit_config_fails_fast():
    with pytest.raises(ValueError, match="max_zero_variance_frac"):
        AuditConfig(max_zero_variance_frac=2)
    with pytest.raises(ValueError, match="no rollouts"):
        audit(build_reward(), [])


def test_cli_audit_exits_0_on_default_and_1_on_lenient(tmp_path, capsys):
    common = ["--limit", "6", "--k", "3", "--probe-tasks", "2", "--hacks", "--hack-tasks", "6"]
    assert main(["audit", *common, "--out", str(tmp_path / "default")]) == 0
    out = capsys.readouterr().out
    assert "RESULT: PASS" in out
    saved = json.loads((tmp_path / "default" / "audit.json").read_text())
    assert saved["passed"] is True and (tmp_path / "default" / "audit.md").is_file()

    assert main(["audit", *common, "--reward", LENIENT, "--out", str(tmp_path / "lenient")]) == 1
    out = capsys.readouterr().out
    assert "RESULT: FAIL" in out and "[FAIL] disagreements" in out and "[FAIL] leniency" in out


def test_cli_audit_on_a_logged_file(tmp_path, capsys):
    assert main(["audit", "--logged", "data/logged/sample_conversations.jsonl", "--probe-tasks", "1",
                 "--out", str(tmp_path)]) == 0
    assert "Rollouts: 26 from data/logged/sample_conversations.jsonl" in capsys.readouterr().out
