"""Scorers that misbehave on purpose, importable by path from reward configs in the tests."""

from __future__ import annotations


def always_one(trajectory) -> float:
    return 1.0


def turn_index(trajectory, index) -> float:
    return float(index)


def raises(trajectory) -> float:
    raise KeyError("details['missing']")


def turn_raises(trajectory, index) -> float:
    if index == 1:
        raise ZeroDivisionError("division by zero")
    return -1.0


def returns_nan(trajectory) -> float:
    return float("nan")


def turn_returns_inf(trajectory, index) -> float:
    return float("inf")


def returns_text(trajectory):
    return "0.5"


def three_args(trajectory, index, extra):
    return 0.0
