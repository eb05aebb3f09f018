"""Tests for pipeline/cli/options.py (--threads, output checks, --trust-tools) and the one home of the
episode budgets' defaults (pipeline/budgets.py)."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import pytest

from pipeline import budgets
from pipeline.cli import main
from pipeline.cli.options import ThreadArguments, default_threads, physical_cores, writable_dir, writable_file

REPO = Path(__file__).resolve().parents[2]


def test_physical_cores_counts_cores_not_hyperthreads_within_the_affinity_mask():
    cpus = os.sched_getaffinity(0)
    siblings = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        if not (topology / "core_id").exists():
            pytest.skip("no CPU topology in /sys on this machine")
        siblings.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
    assert physical_cores() <= len(siblings) <= len(cpus)  # at most one thread per core, within a cgroup quota
    assert physical_cores() >= 1


def test_default_threads_share_the_cores_among_a_launchs_local_processes(monkeypatch):
    monkeypatch.setattr("pipeline.cli.options.physical_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_threads() == 2 and ThreadArguments().threads == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_threads() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_threads() == 8


def test_threads_are_set_before_the_command_works(monkeypatch):
    """--threads reaches torch before the evaluation starts, and the default is the physical cores."""
    import torch

    import pipeline.cli.eval as command

    seen = []
    monkeypatch.setattr(command, "evaluate", lambda *args: seen.append(torch.get_num_threads()) or 0)
    monkeypatch.setattr("pipeline.cli.options.physical_cores", lambda: 1)
    before = torch.get_num_threads()
    try:
        assert main(["eval", "--policy", "oracle", "--threads", "2"]) == 0
        assert main(["eval", "--policy", "oracle"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 1]


def test_writable_dir_and_file(tmp_path):
    assert writable_dir(tmp_path / "a" / "b", "--out").is_dir()
    assert not list((tmp_path / "a" / "b").iterdir())  # the probe file is gone
    with pytest.raises(ValueError, match="--out .* is a file"):
        writable_dir(Path(__file__), "--out")
    with pytest.raises(ValueError, match="--out .* is a directory; give a file name"):
        writable_file(tmp_path, "--out")
    assert writable_file(tmp_path / "c" / "scores.json", "--out").parent.is_dir()


# ---------------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------------

LITERAL_DEFAULT = re.compile(r"max[_-](turns|new[_-]tokens|total[_-]tokens)\"?(: int = |: int = field\(default=|"
                             r", type=int, default=)[0-9]")


def test_no_budget_default_is_written_anywhere_but_pipeline_budgets():
    """Each budget's default lives in one place: a literal default elsewhere is a second one that drifts."""
    hits = [f"{path.relative_to(REPO)}:{n}" for root in ("pipeline", "rewards", "sagemaker_entry")
            for path in sorted((REPO / root).rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if LITERAL_DEFAULT.search(line)]
    assert hits == []


def test_every_budget_default_is_the_shared_one():
    from pipeline.config import EvalArguments
    from pipeline.envs.base import ToolEnvironment
    from pipeline.envs.customer_service.env import CustomerServiceEnv
    from pipeline.evaluation import evaluate
    from pipeline.rollout import RolloutEngine
    from pipeline.sft import SFTArguments, oracle_demonstrations
    from pipeline.training import RolloutConfig
    from rewards.audit import model_rollouts, scripted_rollouts
    from rewards.logged import replay

    expected = (budgets.MAX_TURNS, budgets.MAX_NEW_TOKENS, budgets.MAX_TOTAL_TOKENS)
    for config in (RolloutConfig(), EvalArguments(), budgets.EpisodeBudget()):
        assert (config.max_turns, config.max_new_tokens, config.max_total_tokens) == expected
    sft = SFTArguments()
    assert (sft.demo_max_turns, sft.val_max_turns, sft.val_max_new_tokens) == (
        budgets.MAX_TURNS, budgets.MAX_TURNS, budgets.MAX_NEW_TOKENS)

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    for function in (evaluate, oracle_demonstrations, scripted_rollouts, model_rollouts, replay,
                     ToolEnvironment.__init__, CustomerServiceEnv.__init__):
        assert default(function, "max_turns") == budgets.MAX_TURNS, function
    for function in (evaluate, model_rollouts, RolloutEngine.__init__):
        assert default(function, "max_new_tokens") == budgets.MAX_NEW_TOKENS, function
        assert default(function, "max_total_tokens") == budgets.MAX_TOTAL_TOKENS, function
    assert CustomerServiceEnv().max_turns == budgets.MAX_TURNS


@pytest.mark.parametrize("value, message", [
    (0, "RolloutConfig.max_turns must be at least 1, got 0."),
    (3.7, "RolloutConfig.max_turns must be a whole number, got 3.7."),
    (True, "RolloutConfig.max_turns must be a whole number, got True."),
    (2**40, "RolloutConfig.max_turns must be at most 2147483647"),
])
def test_a_budget_is_a_whole_number_in_range(value, message):
    from pipeline.training import RolloutConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        RolloutConfig(max_turns=value)


def test_budgets_doctest():
    import doctest

    assert doctest.testmod(budgets).failed == 0
