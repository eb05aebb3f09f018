"""Tests for rewards/naive.py: the negative examples really are hackable (that is their job)."""

from __future__ import annotations

from pipeline.envs import make_env
from pipeline.rollout import run_policy
from rewards import build_reward
from rewards.hacks import HACKS

LENIENT = "configs/rewards/lenient_example.yaml"


def test_the_lenient_example_pays_tool_spam_more_than_the_oracle(test_tasks):
    from pipeline.envs import oracle_policy

    reward = build_reward(LENIENT)
    task = test_tasks[0]
    spam = reward(run_policy(make_env(task), task, HACKS["tool_spam"](task)))
    oracle = reward(run_policy(make_env(task), task, oracle_policy(task)))
    assert spam.total > oracle.total and spam.clipped
    claim = reward(run_policy(make_env(task), task, HACKS["resolve_no_action"](task)))
    assert claim.components["resolution_claim"] == 1.0 and claim.total > 0
