"""Tests for pipeline/plugins.py: declared scorers and policy factories, named by import path."""

from __future__ import annotations

import doctest

import pytest

import pipeline.plugins
from pipeline.plugins import (
    POLICY_FACTORY,
    SCORER,
    NotDeclaredError,
    declare_policy_factory,
    declare_scorer,
    declared_kind,
    load_declared,
)


def test_doctests():
    result = doctest.testmod(pipeline.plugins, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_the_decorators_mark_and_return_the_object_itself():
    def f(trajectory):
        return 0.0

    class C:
        def __call__(self, trajectory):
            return 0.0

    assert declare_scorer(f) is f and declared_kind(f) == SCORER
    assert declare_policy_factory(C) is C and declared_kind(C) == POLICY_FACTORY
    assert declared_kind(type("Sub", (C,), {})) == POLICY_FACTORY  # a subclass of a declared class is declared
    with pytest.raises(TypeError, match="applies to a function or a class"):
        declare_scorer(3)


def test_a_forged_marker_is_not_a_declaration():
    class Claims:
        __turnwise_declared__ = "root"

    class Answers:
        def __getattr__(self, name):
            return "scorer"

    assert declared_kind(Claims) is None and declared_kind(Answers()) is None


def test_load_declared_finds_shipped_declarations():
    from rewards.model import TurnRewardModelScorer

    assert load_declared("rewards.model:TurnRewardModelScorer", SCORER) is TurnRewardModelScorer
    with pytest.raises(NotDeclaredError, match="declared as a scorer"):
        load_declared("rewards.model:TurnRewardModelScorer", POLICY_FACTORY)
