"""Tests for pipeline/demo.py: `turnwise demo --resume` reuses finished stages and continues GRPO.

The stages themselves are replaced by recorders here (test_sft.py and tests/training/ train for real);
what is under test is which stages run again, with what, and what the summary says about the time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import pipeline.sft
import pipeline.training
from pipeline import demo


@pytest.fixture
def recipe(tmp_path: Path, tiny_model_dir: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "sft": {"num_demos": 1, "num_train_epochs": 1, "use_cpu": True, "bf16": False},
        "grpo": {"max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 2, "use_cpu": True,
                 "bf16": False, "report_to": []},
        "eval": {"limit": 1, "html": False},
    }))
    return path


@pytest.fixture
def stages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list]:
    """Record the calls of the SFT, GRPO and evaluation stages instead of running them."""
    calls: dict[str, list] = {"sft": [], "grpo": [], "eval": [], "curves": []}

    def sft(sft_args, sft_config, model_args):
        calls["sft"].append(sft_config.output_dir)
        raise AssertionError("the SFT stage ran")

    def grpo(task_args, rollout_config, grpo_args, model_args):
        calls["grpo"].append(task_args)
        log = Path(grpo_args.output_dir) / "log_history.json"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps([{"rollout/reward/mean": 0.5, "analysis/zero_adv_groups": 0.0}]))
        return {"adapter": str(Path(grpo_args.output_dir) / "adapter"), "log_history": str(log),
                "samples": str(Path(grpo_args.output_dir) / "samples"), "wall_time_s": 3.0}

    def evaluate(p, sft_adapter, grpo_adapter, curves=None):
        calls["eval"].append((sft_adapter, grpo_adapter))
        calls["curves"] = curves
        return {"n_tasks": 1}

    monkeypatch.setattr(pipeline.sft, "run_sft", sft)
    monkeypatch.setattr(pipeline.training, "train", grpo)
    monkeypatch.setattr(demo, "evaluate_policies", evaluate)
    return calls


def finish_sft(run: Path, wall_time_s: float = 12.0) -> str:
    """Leave what a finished SFT stage leaves: the adapter, the val curve and, last, sft_result.json."""
    out = run / "sft"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (out / "val_curve.json").write_text(json.dumps({"curve": [{"epoch": 1, "val/success": 0.4}]}))
    result = {"adapter": str(out / "adapter"), "val_curve": str(out / "val_curve.json"),
              "log_history": str(out / "log_history.json"), "wall_time_s": wall_time_s}
    (out / pipeline.sft.RESULT_FILE).write_text(json.dumps(result))
    return result["adapter"]


def test_resume_skips_a_finished_sft_and_resumes_grpo_from_its_adapter(recipe, stages, tmp_path):
    adapter = finish_sft(tmp_path / "run")
    summary = demo.run(recipe, resume=True)
    assert stages["sft"] == []
    [task_args] = stages["grpo"]
    assert task_args.resume is True and task_args.adapter == adapter  # continues from the last GRPO checkpoint
    assert stages["eval"] == [(adapter, str(tmp_path / "run" / "grpo" / "adapter"))]
    assert summary["sft_val_curve"]["curve"][0]["val/success"] == 0.4
    assert summary["reused_stage_times_s"] == {"sft": 12.0} and "sft" not in summary["stage_times_s"]
    assert summary["wall_time_total_s"] == pytest.approx(summary["wall_time_s"] + 12.0, abs=0.11)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["reused_stage_times_s"] == {"sft": 12.0}


def test_resume_skips_a_finished_grpo_and_only_evaluates(recipe, stages, tmp_path):
    sft_adapter = finish_sft(tmp_path / "run")
    grpo = tmp_path / "run" / "grpo"
    grpo.mkdir()
    (grpo / "log_history.json").write_text(json.dumps([{"rollout/reward/mean": 0.25, "val/success": 0.5}]))
    (grpo / pipeline.training.RESULT_FILE).write_text(json.dumps({
        "adapter": str(grpo / "adapter"), "log_history": str(grpo / "log_history.json"),
        "samples": str(grpo / "samples"), "wall_time_s": 30.0, "wall_time_total_s": 75.0}))
    summary = demo.run(recipe, resume=True)
    assert stages["sft"] == [] and stages["grpo"] == []
    assert stages["eval"] == [(sft_adapter, str(grpo / "adapter"))]
    assert summary["grpo_signals"]["val_success"] == [0.5]
    # GRPO had itself been resumed: its whole time (75 s over its parts) counts, not its last part's 30 s; the
    # SFT result predates wall_time_total_s, so its wall_time_s counts
    assert summary["reused_stage_times_s"] == {"sft": 12.0, "grpo": 75.0}
    # the report's training curves come from the reused stages' logs (finish_sft leaves no SFT log history)
    assert stages["curves"] == {"sft_curve": [{"epoch": 1, "val/success": 0.4}],
                                "grpo_logs": [{"rollout/reward/mean": 0.25, "val/success": 0.5}]}


def test_without_resume_every_stage_runs_again(recipe, stages, tmp_path):
    finish_sft(tmp_path / "run")
    with pytest.raises(AssertionError, match="the SFT stage ran"):
        demo.run(recipe)
    assert stages["sft"] == [str(tmp_path / "run" / "sft")]


def test_resume_runs_an_sft_that_did_not_finish(recipe, stages, tmp_path):
    """An adapter and a val curve without sft_result.json are what a run killed between epochs leaves."""
    finish_sft(tmp_path / "run")
    (tmp_path / "run" / "sft" / pipeline.sft.RESULT_FILE).unlink()
    with pytest.raises(AssertionError, match="the SFT stage ran"):
        demo.run(recipe, resume=True)


@pytest.mark.parametrize("eval_tasks", [None, "customer_service/order_status_holdout"])
def test_the_evaluation_runs_on_its_own_task_set_when_the_recipe_names_one(monkeypatch, eval_tasks):
    """``eval.tasks`` evaluates on another task set (a fresh held-out one); without it, the recipe's tasks."""
    import pipeline.evaluation
    from pipeline.envs import load_tasks

    seen: list[list[str]] = []

    class Stop(Exception):
        pass

    def evaluate(source, tasks, **kwargs):
        seen.append([t.id for t in tasks])
        raise Stop

    monkeypatch.setattr(pipeline.evaluation, "evaluate", evaluate)
    recipe = {"tasks": "customer_service/order_status", "eval": {"tasks": eval_tasks, "limit": 3, "oracle": False}}
    with pytest.raises(Stop):
        demo.evaluate_policies(demo.plan(recipe, output_dir=Path("unused"), model="smollm2-135m"), None, None)
    expected = load_tasks(eval_tasks or "customer_service/order_status", "test")[:3]
    assert seen == [[t.id for t in expected]]
    assert all(t.id.startswith("cs-s1-") for t in expected) == (eval_tasks is not None)


def test_the_report_shows_the_training_curves_of_the_stages_that_ran(tmp_path):
    """The HTML report of a pipeline run opens with its training curves, also written as a PNG file."""
    recipe = {"tasks": "customer_service/order_status", "eval": {"limit": 2, "base": False, "oracle": True}}
    p = demo.plan(recipe, output_dir=tmp_path, model="smollm2-135m")
    curves = {"sft_curve": [{"epoch": 0, "val/success": 0.0}, {"epoch": 1, "val/success": 0.5}],
              "sft_logs": [{"loss": 0.9, "epoch": 0.5}, {"loss": 0.4, "epoch": 1.0}],
              "grpo_logs": [{"rollout/reward/mean": 0.1, "step": 1}, {"val/success": 0.5, "step": 1}]}
    result = demo.evaluate_policies(p, None, None, curves)
    png = Path(result["report"]["training_curves"])
    assert png == tmp_path / "report" / "plots" / "training_curves.png" and png.read_bytes().startswith(b"\x89PNG")
    page = Path(result["report"]["html"]).read_text()
    assert page.index('alt="training_curves"') < page.index('alt="success_by_intent"')
    assert result["eval_tasks"] == "customer_service/order_status" and result["oracle"]["success"] == 1.0

    without = demo.evaluate_policies(p, None, None)  # no stage trained: no curves, and no empty plot
    assert without["report"]["training_curves"] == ""
    assert not (tmp_path / "report" / "plots" / "training_curves.png").exists()


@pytest.mark.parametrize("sft_only, grpo, expected", [
    (True, True, ["SFT+GRPO", "SFT only", "base (smollm2-135m)", "oracle"]),
    (False, True, ["SFT+GRPO", "base (smollm2-135m)", "oracle"]),
    (False, False, ["SFT only", "base (smollm2-135m)", "oracle"]),  # without GRPO, SFT is the trained policy
])
def test_eval_sft_only_decides_whether_the_sft_adapter_is_evaluated_beside_sft_grpo(
        monkeypatch, tmp_path, sft_only, grpo, expected):
    import pipeline.evaluation
    from pipeline.envs import oracle_policy

    real_evaluate, labels = pipeline.evaluation.evaluate, []

    def evaluate(source, tasks, label, **kwargs):  # every policy plays as the oracle; what is run is recorded
        labels.append(label)
        return real_evaluate(oracle_policy, tasks, label=label, max_turns=12)

    monkeypatch.setattr(pipeline.evaluation, "evaluate", evaluate)
    recipe = {"tasks": "customer_service/order_status", "eval": {"limit": 2, "sft_only": sft_only, "html": False}}
    p = demo.plan(recipe, output_dir=tmp_path, model="smollm2-135m")
    result = demo.evaluate_policies(p, "runs/sft/adapter", "runs/grpo/adapter" if grpo else None)
    assert labels == expected
    assert ("delta_grpo_vs_sft" in result) == (sft_only and grpo) and ("delta_grpo_vs_base" in result) == grpo
