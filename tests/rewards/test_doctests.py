"""Every rewards module's doctests run (and the LLM backends' the judge uses), and every registered scorer
carries a doctest example."""

from __future__ import annotations

import doctest
import importlib

import pytest

from rewards.composite import SCORERS, resolve_scorer

MODULES = ["rewards.base", "rewards.composite", "rewards.evidence", "rewards.rules", "rewards.outcome",
           "rewards.logged", "rewards.naive", "rewards.audit", "rewards.hacks", "rewards.model", "rewards.judge",
           "pipeline.llm", "pipeline.envs.base"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


@pytest.mark.parametrize("key", sorted(SCORERS))
def test_every_registered_scorer_has_a_doctest(key: str) -> None:
    scorer = resolve_scorer(key)
    module = importlib.import_module(scorer.__module__)
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(scorer, key, module=module) if t.examples]
    assert tests, f"scorer {key} ({SCORERS[key]}) has no doctest example"
