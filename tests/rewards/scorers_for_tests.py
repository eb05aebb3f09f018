"""Scorers that misbehave on purpose, importable by path from reward configs in the tests.

Each is declared with @declare_scorer, as any scorer a reward config names by import path must be.
"""

from __future__ import annotations

from rewards import declare_scorer


@declare_scorer
def always_one(trajectory) -> float:
    return 1.0


@declare_scorer
def turn_index(trajectory, index) -> float:
    return float(index)


@declare_scorer
def raises(trajectory) -> float:
    raise KeyError("details['missing']")


@declare_scorer
def turn_raises(trajectory, index) -> float:
    if index == 1:
        raise ZeroDivisionError("division by zero")
    return -1.0


@declare_scorer
def returns_nan(trajectory) -> float:
    return float("nan")


@declare_scorer
def turn_returns_inf(trajectory, index) -> float:
    return float("inf")


@declare_scorer
def returns_text(trajectory):
    return "0.5"


@declare_scorer
def three_args(trajectory, index, extra):
    return 0.0
