"""Hostile command-line values that used to fail late (pipeline/cli.py, pipeline/evaluation.py).

A bad flag is refused before any work starts, with the flag, the value and the fix.
"""

from __future__ import annotations

import time

import pytest

from pipeline.cli import main


def test_eval_bootstrap_zero_is_refused_before_the_evaluation(capsys):
    """``--bootstrap 0`` used to raise IndexError after the whole evaluation had run."""
    started = time.perf_counter()
    assert main(["eval", "--policy", "oracle", "--base", "oracle", "--tasks", "val", "--limit", "2",
                 "--bootstrap", "0"]) == 1
    err = capsys.readouterr().err
    assert "--bootstrap must be at least 1" in err and "got 0" in err
    assert time.perf_counter() - started < 5  # refused up front: no episode was played


@pytest.mark.parametrize("n_boot", [0, -5, 2.5, True])
def test_compare_refuses_a_bootstrap_count_that_is_not_a_positive_integer(n_boot):
    from pipeline.envs import load_tasks, oracle_policy
    from pipeline.evaluation import compare, evaluate

    tasks = load_tasks("customer_service", "val")[:1]
    report = evaluate(oracle_policy, tasks)
    with pytest.raises(ValueError, match="n_boot must be a whole number of bootstrap resamples, at least 1"):
        compare(report, report, n_boot=n_boot)
