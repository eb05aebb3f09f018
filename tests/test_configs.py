"""Every shipped recipe under configs/ loads into the typed configs, and starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import parse_train_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_RECIPES = sorted(p for p in CONFIGS.glob("*.yaml"))


def test_there_are_recipes():
    assert TRAIN_RECIPES


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_documents_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# turnwise ") and str(path.relative_to(CONFIGS.parent)) in first
    task_args, rollout_config, grpo_args, model_args = parse_train_args(["--config", str(path)])
    assert model_args.model_name_or_path
    assert grpo_args.num_generations >= 2  # a group needs two rollouts to compare
    assert rollout_config.max_turns >= 1 and task_args.tasks


def test_flags_override_the_recipe():
    path = CONFIGS / "grpo_cpu_quick.yaml"
    _, rollout_config, grpo_args, _ = parse_train_args(["--config", str(path), "--max_turns", "3",
                                                        "--learning_rate", "0.5"])
    assert rollout_config.max_turns == 3 and grpo_args.learning_rate == 0.5


def test_a_bad_value_fails_fast_with_a_fix():
    path = CONFIGS / "grpo_cpu_quick.yaml"
    with pytest.raises(ValueError, match="advantage='ppo' is not an estimator; use one of"):
        parse_train_args(["--config", str(path), "--advantage", "ppo"])
