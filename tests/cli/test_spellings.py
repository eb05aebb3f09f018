"""Every command accepts the command lines written for it before pipeline/cli/ (argparse with dashes for
eval, audit, score, rm, demo, model, sagemaker; TrlParser with underscores for train and sft), and the
other spelling of each option as well. Each command's work is replaced by a recorder, so what is checked
is what the command would have run with."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]


def dashes_to_underscores(argv: list[str]) -> list[str]:
    return ["--" + a[2:].replace("-", "_") if a.startswith("--") else a for a in argv]


def underscores_to_dashes(argv: list[str]) -> list[str]:
    return ["--" + a[2:].replace("_", "-") if a.startswith("--") else a for a in argv]


@pytest.fixture
def record(monkeypatch):
    """``record(module, name)`` replaces ``module.name`` with a recorder returning ``result``; the calls' arguments
    collect in the returned list."""

    def install(module, name: str, result=0) -> list:
        calls: list = []
        monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append((args, kwargs)) or result)
        return calls

    return install


@pytest.fixture(autouse=True)
def keep_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


EVAL = ["eval", "--policy", "oracle", "--tasks", "val", "--limit", "2", "--k", "1", "--n", "2", "--seed", "3",
        "--max-turns", "5", "--max-new-tokens", "7", "--max-total-tokens", "900", "--batch-size", "4", "--bootstrap",
        "10", "--base", "oracle", "--reference", "oracle", "--env", "customer_service", "--no-html", "--threads", "1",
        "--customer", "scripted", "--tool-calling", "text"]


@pytest.mark.parametrize("spell", [lambda a: a, dashes_to_underscores], ids=["dashes", "underscores"])
def test_eval(spell, record, tmp_path):
    import pipeline.cli.eval as command

    calls = record(command, "evaluate")
    assert main(spell([*EVAL, "--out", str(tmp_path / "report")])) == 0
    [((who, how, task_set, episodes), _)] = calls
    assert (episodes.customer, episodes.tool_calling) == ("scripted", "text")
    assert (who.policy, who.base, who.reference, who.seed, who.out) == ("oracle", "oracle", ["oracle"], 3,
                                                                       tmp_path / "report")
    assert (how.split, how.limit, how.k, how.n, how.batch_size, how.bootstrap, how.html) == ("val", 2, 1, 2, 4, 10, False)
    assert (how.max_turns, how.max_new_tokens, how.max_total_tokens) == (5, 7, 900)
    assert task_set.env == "customer_service" and (tmp_path / "report").is_dir()
    import torch

    assert torch.get_num_threads() == 1  # --threads, set before the evaluation


def test_eval_new_spellings_and_a_recipe(record, tmp_path):
    import pipeline.cli.eval as command

    calls = record(command, "evaluate")
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("split: val\nlimit: 3\nmax_turns: 6\nreference: [oracle]\n")
    assert main(["eval", "--config", str(recipe), "--policy", "oracle", "--split", "test", "--html", "false"]) == 0
    [((who, how, _, _), _)] = calls
    assert (how.split, how.limit, how.max_turns, how.html, who.reference) == ("test", 3, 6, False, ["oracle"])


AUDIT = ["audit", "--policy", "oracle", "--env", "customer_service", "--tasks", "val", "--limit", "3", "--k", "2",
         "--seed", "1", "--max-turns", "9", "--max-new-tokens", "11", "--hacks", "--hack-tasks", "5", "--probe-tasks",
         "2", "--high-reward", "0.7", "--max-zero-variance", "0.25", "--reward", "default", "--customer", "scripted",
         "--tool-calling", "native"]


@pytest.mark.parametrize("spell", [lambda a: a, dashes_to_underscores], ids=["dashes", "underscores"])
def test_audit(spell, record, tmp_path):
    import pipeline.cli.audit as command

    calls = record(command, "run_audit")
    assert main(spell([*AUDIT, "--out", str(tmp_path / "audit")])) == 0
    [((options, config, task_set, episodes), _)] = calls
    assert (episodes.customer, episodes.tool_calling) == ("scripted", "native")
    assert (options.policy, options.split, options.limit, options.k, options.seed, options.reward) == (
        "oracle", "val", 3, 2, 1, "default")
    assert (options.max_turns, options.max_new_tokens, options.out) == (9, 11, tmp_path / "audit")
    assert (config.hacks, config.hack_tasks, config.leniency_tasks, config.high_reward,
            config.max_zero_variance_frac) == (True, 5, 2, 0.7, 0.25)
    assert task_set.env == "customer_service"


@pytest.mark.parametrize("spell", [lambda a: a, dashes_to_underscores], ids=["dashes", "underscores"])
def test_score(spell, tmp_path, capsys):
    out = tmp_path / "scores.json"
    argv = ["score", str(REPO / "data" / "logged" / "sample_conversations.jsonl"), "--reward", "default", "--env",
            "customer_service", "--per-turn", "--out", str(out)]
    assert main(spell(argv)) == 0
    assert "per turn:" in capsys.readouterr().out and out.is_file()


TRAIN = ["train", "--config", str(REPO / "configs" / "grpo_cpu_quick.yaml"), "--max_turns", "3", "--max_new_tokens",
         "5", "--learning_rate", "0.5", "--num_generations", "2", "--per_device_train_batch_size", "2", "--train_limit",
         "4", "--env", "customer_service", "--threads", "1"]


@pytest.mark.parametrize("spell", [lambda a: a, underscores_to_dashes], ids=["underscores", "dashes"])
def test_train(spell, record, tmp_path):
    import pipeline.training as training

    calls = record(training, "train", {"steps": 0, "val": {"val/success": 0.0}, "adapter": "a", "output_dir": "o",
                                       "samples": "s"})
    assert main(spell([*TRAIN, "--output_dir", str(tmp_path / "out")])) == 0
    [((task_args, rollout, grpo, model_args), _)] = calls
    assert (rollout.max_turns, rollout.max_new_tokens, grpo.learning_rate, grpo.num_generations) == (3, 5, 0.5, 2)
    assert (task_args.train_limit, task_args.tasks, grpo.output_dir) == (4, "customer_service", str(tmp_path / "out"))
    assert rollout.max_total_tokens == 4096 and model_args.model_name_or_path == "smollm2-135m"  # from the recipe


def test_train_help_all_still_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help-all"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--max_turns MAX_TURNS, --max-turns MAX_TURNS" in out and "--num_generations" in out and "--threads" in out


@pytest.mark.parametrize("spell", [lambda a: a, underscores_to_dashes], ids=["underscores", "dashes"])
def test_sft(spell, record, tmp_path):
    import pipeline.sft as sft

    calls = record(sft, "run_sft", {"demos": 1, "assistant_tokens": 1, "tokens": 2, "epochs": [1], "wall_time_s": 0.0,
                                    "best_val_success": None, "adapter": "a", "val_curve": "v", "log_history": "l"})
    argv = ["sft", "--num_demos", "5", "--num_train_epochs", "4", "--val_max_turns", "6", "--patience", "0",
            "--output_dir", str(tmp_path / "sft"), "--threads", "1"]
    assert main(spell(argv)) == 0
    [((sft_args, config, model_args), _)] = calls
    assert (sft_args.num_demos, sft_args.val_max_turns, sft_args.patience, config.num_train_epochs) == (5, 6, 0, 4)
    assert config.output_dir == str(tmp_path / "sft") and model_args.lora_r == 16  # turnwise's SFT default


@pytest.mark.parametrize("spell", [lambda a: a, dashes_to_underscores], ids=["dashes", "underscores"])
def test_rm_train(spell, record, tmp_path):
    import rewards.model as model

    metrics = {"held_out": None, "held_out_before": None, "train_pairs": 2, "steps": 1, "wall_time_s": 0.0,
               "train_loss": 0.5, "model_dir": "m"}
    calls = record(model, "train_reward_model", metrics)
    argv = ["rm", "train", "--limit", "96", "--eval-limit", "60", "--output-dir", str(tmp_path / "rm"),
            "--no-eval-before", "--eval-pairs", "none", "--max-length", "64", "--out", str(tmp_path / "m.json")]
    assert main(spell(argv)) == 0
    [((config,), _)] = calls
    assert (config.limit, config.eval_limit, config.output_dir, config.eval_before, config.eval_pairs) == (
        96, 60, tmp_path / "rm", False, None)
    assert config.max_length == 64 and (tmp_path / "m.json").is_file()


@pytest.mark.parametrize("spell", [lambda a: a, dashes_to_underscores], ids=["dashes", "underscores"])
def test_demo(spell, record, tmp_path, monkeypatch):
    import pipeline.demo as demo

    summary = {"wall_time_s": 1.0, "stage_times_s": {}, "n_tasks": 0, "eval": {"split": "test"},
               "report": {"html": "r.html", "markdown": "r.md"}, "paths": {"log": "l", "summary": "s"}}
    calls = record(demo, "run", summary)
    argv = ["demo", "--config", "configs/cpu_full.yaml", "--seed", "3", "--model", "smollm2-135m", "--output-dir",
            str(tmp_path / "demo"), "--resume", "--threads", "1", "--customer", "llm:hf:smollm2-135m"]
    assert main(spell(argv)) == 0
    [((recipe,), kwargs)] = calls
    assert recipe == Path("configs/cpu_full.yaml")
    assert kwargs == {"output_dir": tmp_path / "demo", "model": "smollm2-135m", "seed": 3, "resume": True,
                      "customer": "llm:hf:smollm2-135m"}


@pytest.mark.parametrize("spell", [lambda a: a, dashes_to_underscores], ids=["dashes", "underscores"])
def test_model(spell, tmp_path, capsys):
    assert main(spell(["model", "path", "--cache-dir", str(tmp_path), "--model", "smollm2-135m"])) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'models' / 'smollm2-135m-instruct'}\n"


@pytest.mark.parametrize("spell", [lambda a: a, dashes_to_underscores], ids=["dashes", "underscores"])
def test_sagemaker(spell, record, tmp_path):
    import pipeline.cli.sagemaker as command
    import pipeline.sagemaker as sagemaker

    submitted = record(sagemaker, "submit", {"TrainingJobName": "j"})
    argv = ["sagemaker", "submit", "--config", "configs/sagemaker/grpo_g5.yaml", "--role",
            "arn:aws:iam::123456789012:role/SM", "--bucket", "my-bucket", "--job-name", "j", "--spot", "--max-wait",
            "7200", "--max-runtime", "3600", "--instance-count", "2", "--volume-size", "50", "-H", "max_steps=5",
            "--hyperparameter", "eval_limit=3", "--tag", "team=support", "--env", "LOG_LEVEL=debug", "--subnet",
            "subnet-0abc", "--security-group", "sg-0abc", "--train", "s3://my-bucket/tasks", "--dry-run"]
    assert main(spell(argv)) == 0
    [((config,), kwargs)] = submitted
    assert kwargs == {"dry_run": True} and config.config == "configs/sagemaker/grpo_g5.yaml"
    assert config.hyperparameters == {"max_steps": "5", "eval_limit": "3"} and config.tags == {"team": "support"}
    assert (config.spot, config.max_wait_s, config.max_runtime_s, config.instance_count, config.volume_size_gb) == (
        True, 7200, 3600, 2, 50)
    assert config.environment == {"LOG_LEVEL": "debug"} and config.inputs == {"train": "s3://my-bucket/tasks"}
    assert (config.subnets, config.security_group_ids) == (["subnet-0abc"], ["sg-0abc"])

    actions = record(command, "job_action")
    for argv in (["sagemaker", "logs", "job-1", "--follow", "--region", "us-west-2"],
                 ["sagemaker", "wait", "job-1", "--poll", "5"],
                 ["sagemaker", "download", "job-1", "--out", str(tmp_path)], ["sagemaker", "stop", "job-1"]):
        assert main(spell(argv)) == 0
    (logs, _), (wait, _), (download, _), (stop, _) = actions
    assert logs[:2] == ("logs", "job-1") and logs[2].region == "us-west-2" and logs[3].follow is True
    assert wait[3].poll == 5.0 and download[3].out == tmp_path and stop[:2] == ("stop", "job-1")


def test_sop(capsys):
    assert main(["sop", "check", "data/sop/warranty_claims"]) == 0
    assert "0 errors" in capsys.readouterr().out
