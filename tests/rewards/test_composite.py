"""Tests for rewards/composite.py: weighted composition, metrics, failures, NaN/inf, clipping, configs."""

from __future__ import annotations

import logging
import re
import math
import pickle
from pathlib import Path

import pytest
import yaml

from pipeline.envs import make_env, oracle_policy
from pipeline.envs.base import Outcome
from pipeline.rollout import run_policy
from rewards import RewardBreakdown, RewardConfig, RewardConfigError, RewardValueError, build_reward
from rewards.composite import CONFIG_DIR, DEFAULT_CONFIG, SCORERS, load_config

from .conftest import assistant, chat, user

HERE = "tests.rewards.scorers_for_tests"


def config(*scorers, **kw):
    return {"scorers": [dict(s) for s in scorers], **kw}


def s(scorer, weight=1.0, name=None, **params):
    entry = {"scorer": scorer if ":" in scorer or scorer in SCORERS else f"{HERE}:{scorer}", "weight": weight}
    if name:
        entry["name"] = name
    if params:
        entry["params"] = params
    return entry


def three_turns(outcome=Outcome(True, True, "resolved")):
    return chat(user("hi"), assistant("a"), user("b"), assistant("c"), user("d"), assistant("e"), outcome=outcome)


def test_total_is_mean_turn_scores_plus_terminal():
    reward = build_reward(config(s("turn_index", 0.3), s("always_one", 0.5)))
    b = reward(three_turns())
    # turn scores 0, 1, 2 averaged over 3 turns: per_turn[t] = 0.3 * t / 3
    assert b.per_turn == pytest.approx([0.0, 0.1, 0.2])
    assert b.terminal == pytest.approx(0.5)
    assert b.total == pytest.approx(0.8)
    assert b.components == {"turn_index": [0.0, 1.0, 2.0], "always_one": 1.0}
    assert not b.clipped and b.ok


def test_sum_aggregation_and_clipping_to_the_declared_range():
    b = build_reward(config(s("turn_index", 1.0), turn_aggregation="sum"))(three_turns())
    assert b.per_turn == [0.0, 1.0, 2.0] and b.total == 1.0 and b.clipped  # 3.0 clipped to the default [-1, 1]
    b = build_reward(config(s("turn_index", 1.0), turn_aggregation="sum", range=[-5, 5]))(three_turns())
    assert b.total == 3.0 and not b.clipped


def test_weight_zero_is_a_metric_only():
    with_metric = build_reward(config(s("always_one", 0.5), s("turn_index", 0.0)))(three_turns())
    without = build_reward(config(s("always_one", 0.5)))(three_turns())
    assert with_metric.total == without.total
    assert with_metric.components["turn_index"] == [0.0, 1.0, 2.0]
    assert with_metric.metrics()["rewards/turn_index"] == 1.0


def test_a_raising_scorer_is_recorded_counted_and_left_out_never_zero(caplog):
    reward = build_reward(config(s("always_one", 0.5), s("raises", 0.5), s("turn_raises", 0.3)))
    with caplog.at_level(logging.WARNING, logger="rewards.composite"):
        b = reward(three_turns())
    assert b.failed == {"raises": "KeyError: \"details['missing']\"",
                        "turn_raises": "ZeroDivisionError: division by zero"}
    assert not b.ok and "raises" not in b.components and "turn_raises" not in b.components
    assert b.total == 0.5 and b.per_turn == [0.0, 0.0, 0.0]  # left out, not renormalised
    assert b.metrics()["rewards/failed"] == 2.0
    reward(three_turns())
    assert reward.failures == {"raises": 2, "turn_raises": 2}
    assert reward.metrics()["rewards/failures/raises"] == 2.0
    assert reward.metrics()["rewards/failure_rate"] == 2.0  # two failed scorer runs per trajectory
    assert "left out of this total" in caplog.text


@pytest.mark.parametrize("scorer, message", [
    ("returns_nan", "scorer 'returns_nan' returned nan"),
    ("turn_returns_inf", "scorer 'turn_returns_inf' on turn 0 returned inf"),
    ("returns_text", "scorer 'returns_text' returned '0.5' (str)"),
])
def test_nan_inf_and_non_numbers_are_rejected_with_a_clear_error(scorer, message):
    b = build_reward(config(s("always_one", 0.1), s(scorer)))(three_turns())
    assert message in b.failed[scorer] and b.failed[scorer].startswith("RewardValueError")
    assert math.isfinite(b.total) and b.total == pytest.approx(0.1)
    with pytest.raises(RewardValueError, match=re.escape(message)):
        build_reward(config(s(scorer), on_error="raise"))(three_turns())


def test_not_applicable_scorers_are_listed_not_failed():
    b = build_reward()(chat(user("hi"), assistant("Hello, how can I help?")))  # outcome unknown
    assert not b.failed
    assert {"success", "partial_credit", "policy_compliance", "satisfaction", "policy_violation"} <= set(
        b.not_applicable)
    assert set(b.components) >= {"tool_format", "repetition", "politeness"}


@pytest.mark.parametrize("bad, message", [
    (config(s("no_such_scorer")), "has no attribute 'no_such_scorer'"),
    ({"scorers": [{"scorer": "no_such_module:f"}]}, "cannot import 'no_such_module'"),
    ({"scorers": [{"scorer": "nope"}]}, "Unknown scorer 'nope'"),
    (config(s("always_one", float("nan"))), "weight must be finite"),
    (config(s("always_one", "heavy")), "is not a number"),
    (config(s("always_one"), s("always_one")), "two scorers are named 'always_one'"),
    (config(s("always_one"), range=[1, -1]), "low < high"),
    (config(s("always_one"), range=[0, float("inf")]), "finite"),
    (config(s("always_one"), turn_aggregation="max"), "turn_aggregation"),
    (config(s("always_one"), on_error="ignore"), "on_error"),
    (config(s("always_one"), weights=[1]), "unknown reward config key"),
    ({"scorers": []}, "at least one scorer"),
    ({"scorers": [{"scorer": "tool_format", "wieght": 1}]}, "unknown key(s) ['wieght']"),
    (config(s("always_one", x=1)), "is a function and takes no params"),
    (config(s("response_length", max_chars=-1)), "max_chars"),
    (config(s("response_length", budget=3)), "bad params"),
    (config(s("three_args")), "3 required positional arguments"),
])
def test_bad_configs_fail_fast_and_say_how_to_fix(bad, message):
    with pytest.raises(RewardConfigError) as info:
        build_reward(bad)
    assert message in str(info.value)


def test_default_yaml_matches_the_embedded_default():
    shipped = yaml.safe_load((CONFIG_DIR / "default.yaml").read_text())
    assert load_config(shipped).to_dict() == load_config(None).to_dict()
    assert load_config("default").to_dict() == RewardConfig.from_dict(DEFAULT_CONFIG).to_dict()


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_reward_config_loads_and_documents_its_command(path: Path):
    reward = build_reward(path)
    assert path.read_text().startswith("#")
    assert "turnwise " in path.read_text().split("\n\n")[0] or "turnwise " in path.read_text()[:600]
    assert reward(three_turns()).total == reward(three_turns()).total


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scorers:\n  - {scorer: tool_format, weight: .nan}\n")
    with pytest.raises(RewardConfigError, match=r"bad\.yaml: .*weight must be finite"):
        build_reward(bad)
    with pytest.raises(FileNotFoundError, match="shipped configs are in"):
        build_reward(tmp_path / "missing.yaml")


def test_default_reward_on_a_real_episode_meets_the_contract(test_tasks):
    task = test_tasks[2]
    t = run_policy(make_env(task), task, oracle_policy(task))
    b = build_reward(tasks=test_tasks)(t)
    assert isinstance(b, RewardBreakdown)
    assert len(b.per_turn) == t.num_turns
    assert b.total == pytest.approx(sum(b.per_turn) + b.terminal)
    assert -1.0 <= b.total <= 1.0 and b.ok
    # what the trainer does with components: numbers, or lists it sums
    assert all(isinstance(v, (int, float)) or (isinstance(v, list) and len(v) == t.num_turns)
               for v in b.components.values())
    assert RewardBreakdown.from_dict(b.to_dict()) == b
    assert float(b) == b.total


def test_reward_function_pickles_with_its_tasks(test_tasks):
    task = test_tasks[0]
    t = chat(user("Where is W1000001?"), assistant("It has shipped; the tracking number is 1ZWJNCE3P8B9."),
             task_id=task.id, outcome=Outcome(False, True, "user_left"))
    reward = build_reward(tasks=[task])
    clone = pickle.loads(pickle.dumps(reward))
    assert clone(t) == reward(t)
    assert reward(t).components["unsupported_claim"] == [0.0]  # supported by the bound database
    assert build_reward()(t).components["unsupported_claim"] == [-1.0]  # not without it


def test_the_default_reward_ranks_success_above_a_near_miss(test_tasks):
    """Strict success dominates: an episode that does everything but tell the tracking number stays below 0.5."""
    reward = build_reward(tasks=test_tasks)
    task = next(t for t in test_tasks if t.intents == ["order_status"] and len(t.payload["goals"][0]["facts"]) == 2)
    oracle = oracle_policy(task)

    def never_tells_the_tracking_number(messages):
        reply = oracle(messages)
        return "Your order has shipped." if "tracking number is" in reply else reply

    good = reward(run_policy(make_env(task), task, oracle))
    almost = run_policy(make_env(task), task, never_tells_the_tracking_number)
    assert not almost.outcome.success
    assert good.total > 0.8 and reward(almost).total < 0.5
