"""Hostile command-line values and recipes (pipeline/cli/, pipeline/config.py, pipeline/demo.py).

A bad flag or recipe value is refused before any work starts, with the flag or key, the value, the file
where there is one, and the fix; never a traceback, and never a silent acceptance that changes the run.
The tests named ``test_finding_*`` are issue 21's findings; the rest are further hostile inputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]
QUICK = str(REPO / "configs" / "grpo_cpu_quick.yaml")


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a command gets as far as training: every case here must stop while parsing."""
    import pipeline.training as training

    def train(*args, **kwargs):
        raise AssertionError("the command reached training with a bad option")

    monkeypatch.setattr(training, "train", train)


def refused(capsys, argv: list[str], *expected: str) -> str:
    """Run ``turnwise ARGV``; it must exit 1 with one sentence on stderr holding every ``expected`` string."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("turnwise: error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ===================================================================================================
# Issue 21's findings
# ===================================================================================================


def test_finding_num_generations_zero_is_a_sentence_not_a_zero_division(capsys, no_training):
    """``--num_generations 0`` used to raise ZeroDivisionError inside TRL's GRPOConfig."""
    refused(capsys, ["train", "--config", QUICK, "--num_generations", "0"],
            "num_generations must be at least 2", "got 0")


def test_finding_a_typo_in_a_demo_recipes_eval_section_names_the_key(tmp_path, capsys):
    """``eval: {limt: 3}`` used to raise TypeError (EvalArguments got an unexpected keyword)."""
    path = recipe(tmp_path, "eval:\n  limt: 3\n")
    err = refused(capsys, ["demo", "--config", path], "Unknown option(s) in the recipe's eval: section: limt",
                  "did you mean limit?")
    assert not (tmp_path / "outputs").exists()


def test_finding_eval_limit_minus_one_is_refused_before_any_episode(capsys, monkeypatch):
    """``eval --limit -1`` used to evaluate 121 of the 122 test tasks (a slice ``[:-1]``)."""
    import pipeline.evaluation

    monkeypatch.setattr(pipeline.evaluation, "evaluate", lambda *a, **k: pytest.fail("an episode was played"))
    refused(capsys, ["eval", "--policy", "oracle", "--limit", "-1"], "--limit must be at least 1, got -1")


def test_finding_a_negative_train_limit_in_a_recipe_is_refused(tmp_path, capsys, no_training):
    """``train_limit: -3`` used to be accepted (and to train on all but the last three tasks)."""
    refused(capsys, ["train", "--config", recipe(tmp_path, "train_limit: -3\n")],
            "train_limit", "must be at least 1, got -3")


@pytest.mark.parametrize("entries, expected", [
    (["escalation"], "intent_weights entry 'escalation' is not INTENT=WEIGHT; write it like escalation=3."),
    (["=2"], "intent_weights entry '=2' is not INTENT=WEIGHT"),
    (["escalation=-1"], "the weight of 'escalation' is '-1'; use a whole number of 0 or more"),
    (["escalation=2.5"], "the weight of 'escalation' is '2.5'"),
    (["escalation=\u00b2"], "the weight of 'escalation' is '\u00b2'"),  # a digit to isdigit, not to int()
    (["cancel=1", "cancel=2"], "intent_weights names 'cancel' twice"),
    (["cancel=1,cancel=2"], "intent_weights names 'cancel' twice"),  # one value, as a SageMaker hyperparameter
    (["escalation=2.5 cancel=1"], "the weight of 'escalation' is '2.5 cancel=1'"),
])
def test_a_bad_intent_weight_is_refused_as_a_flag_and_in_a_recipe(tmp_path, capsys, no_training, entries, expected):
    refused(capsys, ["train", "--config", QUICK, "--intent_weights", *entries], expected)
    path = recipe(tmp_path, "intent_weights: " + json.dumps(entries) + "\n")
    refused(capsys, ["train", "--config", path], expected)


def test_an_intent_weight_for_an_intent_the_tasks_lack_is_refused_before_the_model_loads(capsys, monkeypatch):
    import pipeline.models

    monkeypatch.setattr(pipeline.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    refused(capsys, ["train", "--config", QUICK, "--tasks", "customer_service/order_status", "--intent_weights",
                     "order_status=2", "order_sttus=0"],
            "intent_weights names 'order_sttus', which no training task has",
            "intents are: order_status.")


def test_finding_a_fractional_turn_budget_in_a_recipe_is_refused(tmp_path, capsys, no_training):
    """``max_turns: 3.7`` used to be accepted: argparse converts only string defaults."""
    path = recipe(tmp_path, "max_turns: 3.7\n")
    refused(capsys, ["train", "--config", path], f"recipe {path}: max_turns must be a whole number, got 3.7")


def test_finding_negative_patience_in_a_task_file_is_refused(tmp_path):
    """A customer with ``patience: -1`` used to load: it leaves at once, and every episode fails for it."""
    from pipeline.envs import load_tasks

    row = json.loads((REPO / "data" / "customer_service" / "tasks" / "test.jsonl").read_text().splitlines()[0])
    row["payload"]["customer"]["persona"]["patience"] = -1
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="patience"):
        load_tasks(str(path))


def test_eval_bootstrap_zero_is_refused_before_the_evaluation(capsys):
    """``--bootstrap 0`` used to raise IndexError after the whole evaluation had run."""
    started = time.perf_counter()
    err = refused(capsys, ["eval", "--policy", "oracle", "--base", "oracle", "--tasks", "val", "--limit", "2",
                           "--bootstrap", "0"], "--bootstrap must be at least 1")
    assert "got 0" in err
    assert time.perf_counter() - started < 5  # refused up front: no episode was played


@pytest.mark.parametrize("n_boot", [0, -5, 2.5, True])
def test_compare_refuses_a_bootstrap_count_that_is_not_a_positive_integer(n_boot):
    from pipeline.envs import load_tasks, oracle_policy
    from pipeline.evaluation import compare, evaluate

    tasks = load_tasks("customer_service", "val")[:1]
    report = evaluate(oracle_policy, tasks)
    with pytest.raises(ValueError, match="n_boot must be a whole number of bootstrap resamples, at least 1"):
        compare(report, report, n_boot=n_boot)


# ===================================================================================================
# Recipes
# ===================================================================================================


@pytest.mark.parametrize("text, expected", [
    ("- max_turns: 3\n- max_turns: 4\n", "must be a YAML mapping of option: value lines, not a list"),
    ("42\n", "must be a YAML mapping of option: value lines, not a number"),
    ("max_turns: 3\nlearning_rate: 1.0e-5\nmax_turns: 4\n", "line 3: 'max_turns' is given twice (first on line 1)"),
    ("{max_turns: 3, max_turns: 4}\n", "line 1: 'max_turns' is given twice (first on line 1)"),
    ("max_steps: 100000000000000000000000000000\n", "max_steps is too large"),
    ("learning_rate: .nan\n", "learning_rate must be a finite number, got nan"),
    ("learning_rate: .inf\n", "learning_rate must be a finite number, got inf"),
    ("max_turns: null\n", "max_turns cannot be null"),
    ("max_turns: [3]\n", "max_turns must be a whole number, got [3]"),
    ("max_turns: true\n", "max_turns must be a whole number, got True"),
    ("seed: 4294967296\n", "seed must be in [0, 2**32), got 4294967296"),
    ("save_strategy: no\n", 'save_strategy must be text, got boolean False (YAML reads an unquoted yes, no'),
    ("max_turn: 3\n", "Unknown option(s) in recipe"),
    ("temperature: 0\n", "temperature must be greater than 0"),
    ("per_device_train_batch_size: 0\n", "per_device_train_batch_size must be at least 1"),
    ("max_turns: '1e3'\n", None),  # a number YAML left as text: read as 1000, accepted
    ("learning_rate: 1e-5\n", None),  # YAML 1.1 reads this as text; a float field takes it
    ("a: [unclosed\n", "is not valid YAML"),
], ids=["list", "number", "key_twice", "key_twice_one_line", "huge_int", "nan", "inf", "null_budget", "list_for_int", "bool_for_int",
        "seed_out_of_range", "unquoted_no", "unknown_key", "zero_temperature", "zero_batch", "numeric_text",
        "exponent_text", "bad_yaml"])
def test_hostile_training_recipes(tmp_path, capsys, no_training, monkeypatch, text, expected):
    from pipeline.config import parse_train_args

    path = recipe(tmp_path, text)
    if expected is None:
        parse_train_args(["--config", path, "--output_dir", str(tmp_path / "out")])
        return
    with pytest.raises(ValueError) as error:
        parse_train_args(["--config", path])
    assert expected in str(error.value) and path in str(error.value)
    refused(capsys, ["train", "--config", path], expected)


def test_a_recipe_that_is_not_utf8_names_the_file_and_the_byte(tmp_path, capsys, no_training):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("tasks: caf\xe9\n".encode("latin-1"))
    refused(capsys, ["train", "--config", str(path)], f"recipe {path} is not UTF-8 text", "save it as UTF-8")


def test_a_recipe_over_the_size_cap_is_refused_unread(tmp_path, capsys, no_training):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * (1 << 20) + "\nmax_turns: 3\n")
    refused(capsys, ["train", "--config", str(path)], "a recipe is at most 1048576 bytes")


def test_config_pointing_at_a_directory_or_nowhere(tmp_path, capsys, no_training):
    refused(capsys, ["train", "--config", str(tmp_path)], f"recipe {tmp_path} is a directory")
    refused(capsys, ["train", "--config", str(tmp_path / "missing.yaml")], "missing.yaml does not exist")
    refused(capsys, ["demo", "--config", str(tmp_path)], f"Pipeline recipe {tmp_path} is a directory")


def test_config_given_twice_or_without_a_file(tmp_path, capsys, no_training):
    a, b = recipe(tmp_path, "max_turns: 3\n", "a.yaml"), recipe(tmp_path, "max_turns: 4\n", "b.yaml")
    refused(capsys, ["train", "--config", a, "--config", b], "--config is given 2 times", "give one recipe")
    refused(capsys, ["train", f"--config={a}", "--config", b], "--config is given 2 times")
    refused(capsys, ["train", "--config"], "--config needs a recipe file")
    refused(capsys, ["train", "--config", "--max_turns", "3"], "--config needs a recipe file")


def test_flags_override_the_recipe_in_either_spelling(tmp_path):
    from pipeline.config import parse_train_args

    path = recipe(tmp_path, "max_turns: 3\nmax_new_tokens: 8\n")
    _, rollout, grpo, _ = parse_train_args(["--config", path, "--max-turns", "5", "--max_new_tokens", "9",
                                            "--learning-rate", "0.25", "--output_dir", str(tmp_path / "o")])
    assert (rollout.max_turns, rollout.max_new_tokens, grpo.learning_rate) == (5, 9, 0.25)


@pytest.mark.parametrize("text, expected", [
    ("evl:\n  limit: 2\n", "unknown top-level key(s) evl"),
    ("eval: [1, 2]\n", "section 'eval' must be a mapping of options, not list [1, 2]"),
    ("seed: abc\n", "seed must be a whole number, got 'abc'"),
    ("seed: -1\n", "seed must be at least 0, got -1"),
    ("eval:\n  limit: -1\n", "--limit must be at least 1, got -1"),
    ("eval:\n  max_turns: 2.5\n", "max_turns must be a whole number, got 2.5"),
    ("eval:\n  k: 4\n  n: 2\n", "need 1 <= --k <= --n, got --k 4 and --n 2"),
    ("sft:\n  patience: -1\n", "patience must be at least 0, got -1"),
    ("grpo:\n  num_generations: 0\n", "num_generations must be at least 2"),
    ("output_dir: [a, b]\n", "output_dir must be text"),
], ids=["unknown_section", "section_not_a_mapping", "seed_text", "seed_negative", "eval_limit", "eval_budget_float",
        "k_over_n", "sft_patience", "grpo_num_generations", "output_dir_list"])
def test_hostile_pipeline_recipes_fail_before_any_stage(tmp_path, capsys, monkeypatch, text, expected):
    import pipeline.demo as demo

    monkeypatch.setattr(demo, "prepare_embedded_model", lambda **k: pytest.fail("a stage ran"), raising=False)
    path = recipe(tmp_path, text)
    refused(capsys, ["demo", "--config", path, "--output-dir", str(tmp_path / "out")], expected)
    assert not (tmp_path / "out" / "run.log").exists()


# ===================================================================================================
# Flags
# ===================================================================================================


def test_limit_zero_and_negative_counts_are_refused(capsys):
    refused(capsys, ["eval", "--policy", "oracle", "--limit", "0"], "--limit must be at least 1, got 0")
    refused(capsys, ["eval", "--policy", "oracle", "--n", "0"], "--n must be at least 1, got 0")
    refused(capsys, ["eval", "--policy", "oracle", "--batch-size", "0"], "--batch-size must be at least 1, got 0")
    refused(capsys, ["eval", "--policy", "oracle", "--max-turns", "0"], "EvalArguments.max_turns must be at least 1")
    refused(capsys, ["audit", "--limit", "-1"], "--limit must be at least 1, got -1")
    refused(capsys, ["audit", "--k", "0"], "--k must be at least 1, got 0")
    refused(capsys, ["rm", "train", "--limit", "0"], "limit is a number of pairs, at least 1", "got 0")


def test_a_nan_learning_rate_flag_is_refused(capsys, no_training):
    refused(capsys, ["train", "--config", QUICK, "--learning_rate", "nan"], "learning_rate must be a finite number")
    refused(capsys, ["sft", "--learning-rate", "inf"], "learning_rate must be a finite number, got inf")


@pytest.mark.parametrize("value", ["0", "-2", "100000"])
def test_threads_out_of_range_are_refused(capsys, value):
    refused(capsys, ["eval", "--policy", "oracle", "--threads", value], "--threads must be")


def test_a_flag_argparse_cannot_read_exits_2_with_the_usage(capsys):
    for argv in (["eval", "--policy", "oracle", "--max-turns", "3.5"], ["eval", "--policy", "oracle", "--no-such"],
                 ["train", "--max_turns", "many"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "usage: turnwise" in err and ("invalid int value" in err or "unrecognized arguments" in err)


def test_two_policies_at_once_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--policy", "oracle", "--model", "smollm2-135m"])
    assert exit_.value.code == 2
    assert "argument --policy: not allowed with argument --model" in capsys.readouterr().err


def test_an_unknown_dlc_version_is_refused_before_anything_is_packaged(tmp_path, capsys):
    refused(capsys, ["sagemaker", "submit", "--config", str(REPO / "configs/sagemaker/grpo_g5.yaml"), "--role",
                     "arn:aws:iam::123456789012:role/SM", "--bucket", "my-bucket", "--dlc-version", "0.0", "--dry-run"],
            "--dlc-version '0.0' is not a DLC turnwise knows")


def test_an_embedded_model_name_that_does_not_exist(capsys, tmp_path):
    refused(capsys, ["model", "path", "--model", "gpt-5", "--cache-dir", str(tmp_path)],
            "--model 'gpt-5' is not an embedded model")
