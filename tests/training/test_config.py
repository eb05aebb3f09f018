"""Tests for pipeline/training/config.py: RolloutConfig fails fast with the fix in the message."""

from __future__ import annotations

import pytest

from pipeline.training import ESTIMATORS, RolloutConfig


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_registered_estimator_is_accepted(name):
    assert RolloutConfig(advantage=name).advantage == name


@pytest.mark.parametrize("field, value, message", [
    ("advantage", "ppo",
     "RolloutConfig.advantage='ppo' is not an estimator; use one of group_based, rloo"),
    ("max_turns", 0, "RolloutConfig.max_turns must be at least 1, got 0."),
    ("gamma", 1.5, r"RolloutConfig.gamma must be in \[0, 1\], got 1.5."),
    ("lam", -0.1, r"RolloutConfig.lam must be in \[0, 1\], got -0.1."),
    ("value_epochs", 0, "value_lr must be > 0 and value_epochs >= 1, got 0.001 and 0."),
])
def test_bad_values_name_the_field_and_the_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        RolloutConfig(**{field: value})
