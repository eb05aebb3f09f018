"""Every shipped recipe under configs/ loads into the typed configs, and starts with the command that runs it.

Training recipes (``turnwise train`` and ``turnwise sagemaker submit``, under configs/ and configs/sagemaker/)
load through `parse_train_args`; pipeline recipes (``turnwise demo``) load every stage through
`pipeline.demo.plan`. configs/rewards/ and configs/accelerate/ hold reward and launcher configs, not recipes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import parse_train_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_RECIPES = sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("sagemaker/*.yaml")])


def command_of(path: Path) -> str:
    return path.read_text().splitlines()[0]


def test_there_are_recipes():
    names = {p.name for p in TRAIN_RECIPES}
    assert {"demo.yaml", "cpu_full.yaml", "grpo_cpu_quick.yaml"} <= names
    assert any("qwen2.5" in p.name.lower() for p in TRAIN_RECIPES)  # GPU recipes with a real hub model


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_loads_and_documents_its_command(path):
    first = command_of(path)
    assert first.startswith("# turnwise ") and str(path.relative_to(CONFIGS.parent)) in first
    if first.startswith("# turnwise demo "):
        from pipeline.demo import load_recipe, parse_grpo, plan

        p = plan(load_recipe(path))
        sft_args, sft_config, sft_model = p.sft
        assert sft_model.use_peft and sft_args.num_demos >= 1
        # a truncated demonstration would lose its ending; every demonstration (~2,600 tokens) must fit
        assert sft_config.max_length is None or sft_config.max_length >= 4096
        task_args, rollout_config, grpo_args, model_args = parse_grpo(p.grpo_section)
        assert p.eval.split == "test" and p.output_dir.name == path.stem
    else:
        import torch

        # A GPU recipe (configs/sagemaker/) gets bf16, which TrainingArguments refuses on a machine without a
        # GPU unless told to run on the CPU; the flag overrides only that, so the rest is checked as written.
        gpu_recipe = path.parent.name == "sagemaker" and not torch.cuda.is_available()
        flags = ["--use_cpu", "true"] if gpu_recipe else []
        task_args, rollout_config, grpo_args, model_args = parse_train_args(["--config", str(path), *flags])
    assert model_args.model_name_or_path
    assert grpo_args.num_generations >= 2  # a group needs two rollouts to compare
    assert grpo_args.per_device_train_batch_size % grpo_args.num_generations == 0  # whole groups per batch
    assert rollout_config.max_turns >= 1 and task_args.tasks
    if "use_cpu: true" in path.read_text():  # CPUs without native bf16 run it ~40x slower than float32
        assert not grpo_args.bf16, f"{path.name}: set bf16: false for a CPU run"


def test_the_pipeline_recipes_train_sft_then_grpo_and_compare_on_held_out_tasks():
    from pipeline.demo import load_recipe, plan

    from pipeline.envs import load_tasks

    full = plan(load_recipe(CONFIGS / "cpu_full.yaml"))
    assert full.sft[0].patience >= 1 and full.sft[0].val_limit >= 8  # SFT until val success stops improving
    held_out = load_tasks(full.eval.tasks or full.tasks, full.eval.split)[: full.eval.limit]
    assert len(held_out) >= 15 and len(held_out) * full.eval.n >= 50  # enough held-out episodes for an interval
    seen = load_tasks(full.tasks, full.sft[0].train_split) + load_tasks(full.tasks, full.sft[0].val_split)
    assert not {t.id for t in held_out} & {t.id for t in seen}  # no task SFT or GRPO trained or selected on
    assert full.eval.base and full.grpo_section and full.sft  # base, SFT-only and SFT+GRPO on the same tasks
    demo = plan(load_recipe(CONFIGS / "demo.yaml"), output_dir=Path("/tmp/elsewhere"), seed=3)
    assert demo.output_dir == Path("/tmp/elsewhere") and demo.sft[1].output_dir == "/tmp/elsewhere/sft"
    assert demo.sft[1].seed == 3 and demo.grpo_section["output_dir"] == "/tmp/elsewhere/grpo"


def test_a_bad_pipeline_recipe_fails_naming_the_key(tmp_path):
    from pipeline.demo import load_recipe, plan

    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  num_demos: 4\nnum_demos: 4\n")
    with pytest.raises(ValueError, match="unknown top-level key.*num_demos"):
        load_recipe(bad)
    bad.write_text("sft:\n  num_demo: 4\n")
    with pytest.raises(ValueError, match="Unknown option.*num_demo"):
        plan(load_recipe(bad))
    bad.write_text("grpo:\n  advantage: ppo\n")
    with pytest.raises(ValueError, match="advantage='ppo'"):
        plan(load_recipe(bad))


def test_flags_override_the_recipe():
    path = CONFIGS / "grpo_cpu_quick.yaml"
    _, rollout_config, grpo_args, _ = parse_train_args(["--config", str(path), "--max_turns", "3",
                                                        "--learning_rate", "0.5"])
    assert rollout_config.max_turns == 3 and grpo_args.learning_rate == 0.5


@pytest.mark.parametrize("given", [
    ["escalation=4", "refund_denied=0"],  # flags, or a recipe's list
    ["escalation=4,refund_denied=0"],  # one SageMaker hyperparameter
    ["escalation=4 refund_denied=0 "],
    ["escalation = 4, refund_denied=0,"],
])
def test_intent_weights_come_as_entries_or_as_one_value(given):
    task_args, *_ = parse_train_args(["--config", str(CONFIGS / "grpo_cpu_quick.yaml"), "--intent_weights", *given])
    assert task_args.intent_weights == {"escalation": 4, "refund_denied": 0}


def test_an_intent_name_with_a_space_stays_whole_in_one_value():
    from pipeline.config import parse_intent_weights

    assert parse_intent_weights(["late delivery=2, tier 2 refund=0"]) == {"late delivery": 2, "tier 2 refund": 0}


def test_a_bad_value_fails_fast_with_a_fix():
    path = CONFIGS / "grpo_cpu_quick.yaml"
    with pytest.raises(ValueError, match="advantage='ppo' is not an estimator; use one of"):
        parse_train_args(["--config", str(path), "--advantage", "ppo"])


def test_train_bf16_follows_the_hardware_unless_asked_for():
    """TRL defaults bf16 on; turnwise keeps it off where there is no bf16 GPU, and a flag still wins."""
    import torch

    from pipeline.config import hardware_bf16, parse_train_args

    assert hardware_bf16() == bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert parse_train_args(["--output_dir", "out"])[2].bf16 is hardware_bf16()
    if not torch.cuda.is_available():
        assert parse_train_args(["--output_dir", "out", "--bf16", "true", "--use_cpu", "true"])[2].bf16 is True
