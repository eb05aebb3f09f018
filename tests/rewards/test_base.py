"""Tests for rewards/base.py: scorer kinds, value checking, the breakdown record."""

from __future__ import annotations

import math

import pytest

from rewards.base import RewardBreakdown, RewardValueError, Score, as_score, scorer_level, scorer_name
from rewards.rules import RedundantRequest, tool_format


def test_scorer_level_and_name_come_from_the_callable():
    assert scorer_level(tool_format) == "turn" and scorer_name(tool_format) == "tool_format"
    assert scorer_level(RedundantRequest()) == "turn" and scorer_name(RedundantRequest()) == "redundant_request"
    assert scorer_level(lambda trajectory, index=0: 0.0) == "episode"  # optional args do not count
    with pytest.raises(TypeError, match="takes 0 required"):
        scorer_level(lambda: 0.0)
    with pytest.raises(TypeError, match="must be callable"):
        scorer_level(3)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1.0", [1.0], 1j, Score(math.nan)])
def test_as_score_rejects_non_finite_and_non_numbers(value):
    with pytest.raises(RewardValueError, match="scorer 'x'"):
        as_score(value, "scorer 'x'")


def test_as_score_normalises():
    assert as_score(1, "x") == Score(1.0) and as_score(False, "x") == Score(0.0)
    assert as_score(Score(0.5, "why"), "x") == Score(0.5, "why")
    assert as_score(None, "x") is None


def test_breakdown_metrics_and_round_trip():
    b = RewardBreakdown([0.1, 0.2], 0.3, 0.6, {"a": [1.0, 0.0], "b": 0.5}, failed={"c": "KeyError: x"})
    assert not b.ok and float(b) == 0.6
    assert b.metrics() == {"rewards/total": 0.6, "rewards/terminal": 0.3, "rewards/a": 0.5, "rewards/b": 0.5,
                           "rewards/failed": 1.0}
    assert RewardBreakdown.from_dict(b.to_dict()) == b
