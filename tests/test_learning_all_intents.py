"""benchmarks/learning_all_intents.py assembles the all-intent learning result from pieces run apart: the SFT
curve's runs, each policy's `turnwise eval --out` directory and the GRPO arms' output directories. Here the
pieces are small and made on purpose, so that every number the result states can be checked by hand."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pipeline.envs import load_tasks, oracle_policy
from pipeline.envs.tasks import intent_label, spread_over_intents
from pipeline.evaluation import evaluate, evaluate_trajectories
from pipeline.report import write_report


@pytest.fixture(scope="module")
def assembler(benchmark_script):
    return benchmark_script("learning_all_intents")


@pytest.fixture(scope="module")
def oracle_report():
    """The oracle on one held-out task of each intent label (eight intents and the multi-intent tasks)."""
    tasks = spread_over_intents(load_tasks("customer_service/all_intents_holdout", "test"), 9)
    return evaluate(oracle_policy, tasks, max_turns=16, label="oracle")


def _variant(report, label: str, fail: set[str]):
    """The oracle's episodes, failed (out of turns) on the tasks whose intent label is in ``fail``: its report,
    episode records included, as `turnwise eval` would have written it."""
    trajectories = copy.deepcopy(report.trajectories)
    labels = {e["task_id"]: intent_label(e["intents"]) for e in report.episodes}
    for t in trajectories:
        if labels[t.task_id] in fail:
            t.outcome.success, t.outcome.completed, t.outcome.stop_reason = False, False, "max_turns"
    out = evaluate_trajectories(trajectories, load_tasks("customer_service/all_intents_holdout", "test"), label=label)
    out.metrics["wall_time_s"] = report.metrics["wall_time_s"]
    return out


def _eval_dirs(oracle_report, fails: dict[str, set[str]], root: Path) -> dict[str, Path]:
    """One `turnwise eval --out` directory per policy: the oracle's episodes, failed on the given intents."""
    evals = {}
    for name, failed in fails.items():
        evals[name] = root / "eval" / name
        write_report(evals[name], [_variant(oracle_report, name, failed)], html_page=False)
    return evals


def _sft_run(root: Path, n: int, successes: list[float], rewards: list[float]) -> Path:
    run = root / f"sft_n{n}"
    run.mkdir()
    curve = [{"epoch": i + 1, "val/success": s, "val/reward/mean": r, "val/completion": 1.0}
             for i, (s, r) in enumerate(zip(successes, rewards))]
    best = max(range(len(curve)), key=lambda i: (successes[i], i))  # ties to the later epoch, as SFT keeps them
    (run / "val_curve.json").write_text(json.dumps({"curve": curve, "val_tasks": 18}))
    (run / "sft_result.json").write_text(json.dumps({
        "demos": n, "best_epoch": best + 1, "best_val_success": successes[best], "val_curve": str(run / "val_curve.json"),
        "tokens": 100 * n, "assistant_tokens": 10 * n, "wall_time_s": 60.0 * n}))
    return run


def _grpo_run(root: Path, name: str, steps: int, **times: float) -> Path:
    run = root / name
    run.mkdir()
    log = [{"step": s, "rollout/reward/mean": 0.1 * s, "rollout/success": 0.2, "rollout/max_turns_frac": 0.5}
           for s in range(1, steps + 1)]
    (run / "log_history.json").write_text(json.dumps(log))
    (run / "grpo_result.json").write_text(json.dumps({
        "adapter": str(run / "best_adapter"), "output_dir": str(run), "steps": steps, "wall_time_s": 100.0,
        "log_history": str(run / "log_history.json"), "foothold": {"success": 0.25},
        "best_val": {"step": 2, "val/success": 0.3}, **times}))
    return run


def test_the_sft_baseline_is_the_best_point_of_the_curve(assembler, tmp_path: Path) -> None:
    points = [assembler.sft_point(_sft_run(tmp_path, 64, [0.11, 0.22, 0.22], [-0.1, 0.09, 0.06])),
              assembler.sft_point(_sft_run(tmp_path, 128, [0.22, 0.33], [0.1, 0.2]))]
    assert [(p["n_demos"], p["best_epoch"], p["best_val_reward"]) for p in points] == [(64, 3, 0.06), (128, 2, 0.2)]
    best, why = assembler.best_point(points)
    assert best["n_demos"] == 128
    assert why == "N=128 has the highest val success, 0.330 at epoch 2 on 18 val tasks. Below it: N=64: 0.220."
    # a tie on success goes to the higher val reward at the kept epoch, not to the larger count
    tied = assembler.sft_point(_sft_run(tmp_path, 256, [0.33], [0.15]))
    best, why = assembler.best_point([*points, tied])
    assert best["n_demos"] == 128
    assert why == ("N=128 ties N=256 for the highest val success, 0.330 at epoch 2 on 18 val tasks; the tie goes to "
                   "the higher val reward at the kept epoch (N=128: 0.200, N=256: 0.150). Below it: N=64: 0.220.")


def test_the_result_pairs_every_policy_on_the_same_episodes_per_intent(assembler, oracle_report, tmp_path) -> None:
    labels = sorted({intent_label(e["intents"]) for e in oracle_report.episodes})
    assert len(labels) == 9  # eight intents and "multi"
    fails = {"base": set(labels), "sft": set(labels[:6]), "grpo": set(labels[:2]), "grpo_episode": set(labels[:4]),
             "oracle": set()}
    evals = _eval_dirs(oracle_report, fails, tmp_path)
    sft = [_sft_run(tmp_path, 64, [0.11, 0.22], [0.0, 0.1]), _sft_run(tmp_path, 128, [0.33], [0.2])]
    # the turn-level arm ran in two parts: 100 s in its last, 250 s in all
    grpo = {"grpo": _grpo_run(tmp_path, "turn", 4, wall_time_total_s=250.0),
            "grpo_episode": _grpo_run(tmp_path, "episode", 4)}

    result = assembler.assemble(sft, evals, grpo, n_boot=500, note="the episode-level arm shared the cores")
    assert [result[name]["success"] for name in ("base", "sft", "grpo", "oracle")] == [0.0, 3 / 9, 7 / 9, 1.0]
    # the keys of learning.json: where the reports are, the check that scored them, and what the recipe leaves out
    learning = json.loads((assembler.ROOT / "benchmarks" / "results" / "learning.json").read_text())
    assert set(learning) - {"recipe"} <= set(result)  # the recipe is the --commands file, added by main()
    assert result["report"] == str((tmp_path / "eval").resolve())
    assert "env.py" in result["success_check"] and result["recipe_note"] == "the episode-level arm shared the cores"
    assert result["delta_grpo_vs_sft"]["mean"] == pytest.approx(4 / 9) and result["n_tasks"] == 9
    assert result["grpo"]["max_turns_rate"] == pytest.approx(2 / 9)
    assert result["targets"] == {"grpo_vs_sft_at_least_0.10_with_ci_low_above_0": True,
                                 "grpo_success_at_least_0.60": True, "grpo_max_turns_rate_under_0.20": False}
    assert result["meets_10_points"] is True and result["sft_curve"]["best_n_demos"] == 128
    # per intent: one task each, so every paired difference is exactly -1, 0 or +1 and so is its interval
    rows = result["per_intent"]
    assert list(rows) == labels
    for i, label in enumerate(labels):
        row = rows[label]
        assert row["n_tasks"] == 1 and row["oracle"]["success"] == 1.0 and row["base"]["max_turns_rate"] == 1.0
        expected = 1.0 if 2 <= i < 6 else 0.0
        assert row["grpo_vs_sft"] == {"difference": expected, "ci_low": expected, "ci_high": expected, "n_pairs": 1}
    # turn-level (fails 2 intents) against episode-level (fails 4), at the same number of steps
    adv = result["advantage_comparison"]
    assert adv["delta_turn_vs_episode"]["mean"] == pytest.approx(2 / 9) and adv["equal_steps"] is True
    assert adv["arms"]["grpo"]["advantage"] == "group_based_per_turn" and adv["arms"]["grpo_episode"]["success"] == 5 / 9
    assert result["grpo_signals"]["reward"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # the cost: every SFT point, the headline GRPO arm (all its parts) and each evaluation, as recorded
    played = oracle_report.metrics["wall_time_s"]
    assert result["stage_times_s"] == {"sft_curve": 60.0 * 192, "sft_best": 60.0 * 128, "grpo": 250.0,
                                       "eval": {name: played for name in fails}}
    assert result["wall_time_s"] == pytest.approx(60.0 * 192 + 250.0 + 5 * played, abs=0.1)
    assert [adv["arms"][name]["wall_time_s"] for name in ("grpo", "grpo_episode")] == [250.0, 100.0]


def test_a_further_grpo_run_is_compared_with_sft_without_replacing_the_headline(assembler, oracle_report,
                                                                              tmp_path) -> None:
    labels = sorted({intent_label(e["intents"]) for e in oracle_report.episodes})
    fails = {"base": set(labels), "sft": set(labels[:6]), "grpo": set(labels[:2]), "longer": set(labels[:1]),
             "oracle": set()}
    evals = _eval_dirs(oracle_report, fails, tmp_path)
    sft = [_sft_run(tmp_path, 64, [0.33], [0.2])]
    runs = {"grpo": _grpo_run(tmp_path, "turn", 4),
            "longer": _grpo_run(tmp_path, "longer", 8, wall_time_total_s=900.0)}

    result = assembler.assemble(sft, evals, runs, n_boot=500)
    assert result["grpo"]["success"] == 7 / 9 and result["delta_grpo_vs_sft"]["mean"] == pytest.approx(4 / 9)
    assert "advantage_comparison" not in result  # no episode-level arm was given
    longer = result["further_arms"]["longer"]
    assert longer["success"] == 8 / 9 and longer["steps"] == 8 and longer["wall_time_s"] == 900.0
    assert longer["delta_vs_sft"]["mean"] == pytest.approx(5 / 9)  # SFT fails six intents, this run one
    assert [longer["per_intent_vs_sft"][label]["difference"] for label in labels] == [0, 1, 1, 1, 1, 1, 0, 0, 0]

    del runs["longer"]
    with pytest.raises(SystemExit, match="--grpo lacks longer=DIR"):
        assembler.assemble(sft, evals, runs, n_boot=50)


def test_extend_adds_a_further_run_to_an_assembled_result_from_saved_reports(assembler, oracle_report,
                                                                           tmp_path) -> None:
    """A run made after the result was assembled joins ``further_arms`` with only SFT's evaluation (here a
    directory that kept only its report.json, as the committed ones do) and the run's own pieces."""
    import shutil

    labels = sorted({intent_label(e["intents"]) for e in oracle_report.episodes})
    evals = _eval_dirs(oracle_report, {"base": set(labels), "sft": set(labels[:6]), "grpo": set(labels[:2]),
                                       "oracle": set(), "weighted": set(labels[:3])}, tmp_path)
    sft = [_sft_run(tmp_path, 64, [0.33], [0.2])]
    runs = {"grpo": _grpo_run(tmp_path, "turn", 4), "weighted": _grpo_run(tmp_path, "weighted", 8)}
    headline = {k: v for k, v in evals.items() if k != "weighted"}
    result = assembler.assemble(sft, headline, runs, n_boot=500)
    assert "further_arms" not in result
    both = assembler.assemble(sft, evals, runs, n_boot=500)  # what assembling with it from the start gives

    shutil.rmtree(evals["sft"] / "trajectories")
    assert (evals["sft"] / "report.json").is_file()
    extended = assembler.extend(result, {"sft": evals["sft"], "weighted": evals["weighted"]}, runs, n_boot=500)
    arm = extended["further_arms"]["weighted"]
    assert arm["success"] == 6 / 9 and arm["steps"] == 8
    assert arm["delta_vs_sft"]["mean"] == pytest.approx(3 / 9)  # SFT fails six intents, this run three
    assert arm == both["further_arms"]["weighted"]
    assert extended["stage_times_s"] == both["stage_times_s"] and extended["wall_time_s"] == both["wall_time_s"]
    assert {k: v for k, v in extended.items() if k not in ("further_arms", "stage_times_s", "wall_time_s")} == \
        {k: v for k, v in result.items() if k not in ("stage_times_s", "wall_time_s")}  # the headline is untouched
    assert "further_arms" not in result  # the result given is not changed in place

    with pytest.raises(SystemExit, match="give --eval sft=DIR too"):
        assembler.extend(result, {"weighted": evals["weighted"]}, runs, n_boot=50)
    with pytest.raises(SystemExit, match="grpo is not one"):
        assembler.extend(result, {"sft": evals["sft"], "grpo": evals["grpo"]}, runs, n_boot=50)
    with pytest.raises(SystemExit, match="--extend needs a further run to add: give --eval NAME=DIR"):
        assembler.extend(result, {"sft": evals["sft"]}, runs, n_boot=50)
    with pytest.raises(SystemExit, match="the result's SFT scores 0.333: give the SFT evaluation the result was"):
        assembler.extend(result, {"sft": evals["base"], "weighted": evals["weighted"]}, runs, n_boot=50)


def test_extend_adds_a_point_to_the_sft_curve_while_the_baseline_stays_its_best(assembler, oracle_report,
                                                                             tmp_path) -> None:
    """A count run after the result was assembled joins the curve, with its time; one that would become the best
    point is refused, since the baseline and every arm paired with it would move."""
    labels = sorted({intent_label(e["intents"]) for e in oracle_report.episodes})
    evals = _eval_dirs(oracle_report, {"base": set(labels), "sft": set(labels[:6]), "grpo": set(labels[:2]),
                                       "oracle": set()}, tmp_path)
    sft = [_sft_run(tmp_path, 64, [0.22], [0.06]), _sft_run(tmp_path, 128, [0.22, 0.33], [0.1, 0.2])]
    result = assembler.assemble(sft, evals, {"grpo": _grpo_run(tmp_path, "turn", 4)}, n_boot=50)
    (tmp_path / "worse").mkdir()
    extended = assembler.extend_sft_curve(result, [_sft_run(tmp_path / "worse", 256, [0.28, 0.22], [0.1, 0.1])])
    curve = extended["sft_curve"]
    assert [p["n_demos"] for p in curve["points"]] == [64, 128, 256] and curve["best_n_demos"] == 128
    assert curve["points"][2]["best_val_success"] == 0.28 and curve["points"][2]["best_epoch"] == 1
    assert curve["why"] == ("N=128 has the highest val success, 0.330 at epoch 2 on 18 val tasks. Below it: "
                            "N=64: 0.220, N=256: 0.280.")
    assert extended["stage_times_s"]["sft_curve"] == result["stage_times_s"]["sft_curve"] + 60.0 * 256
    assert extended["wall_time_s"] == pytest.approx(result["wall_time_s"] + 60.0 * 256)
    assert {k: v for k, v in extended.items() if k not in ("sft_curve", "stage_times_s", "wall_time_s")} == \
        {k: v for k, v in result.items() if k not in ("sft_curve", "stage_times_s", "wall_time_s")}
    assert len(result["sft_curve"]["points"]) == 2  # the result given is not changed in place

    (tmp_path / "better").mkdir()
    with pytest.raises(SystemExit, match=r"with N=256 the curve's best point moves \(N=256 has the highest val "
                                         r"success, 0.440"):
        assembler.extend_sft_curve(result, [_sft_run(tmp_path / "better", 256, [0.44], [0.3])])
    with pytest.raises(SystemExit, match=r"the curve would hold a count twice \(64, 128, 128\)"):
        assembler.extend_sft_curve(result, [sft[1]])


def test_a_saved_curve_stands_for_its_runs_when_the_result_is_assembled_again(assembler, oracle_report,
                                                                               tmp_path) -> None:
    """Re-assembling after the baseline moved: the curve's earlier points come from the saved curve (their runs'
    directories gone), the new run from its directory, and the baseline is the best of them all."""
    labels = sorted({intent_label(e["intents"]) for e in oracle_report.episodes})
    evals = _eval_dirs(oracle_report, {"base": set(labels), "sft": set(labels[:6]), "grpo": set(labels[:2]),
                                       "oracle": set()}, tmp_path)
    old = [assembler.sft_point(_sft_run(tmp_path, n, [0.22], [0.1])) for n in (64, 128)]
    saved = tmp_path / "sft_curve.json"
    saved.write_text(json.dumps({"what": "a saved curve", "points": old, "best_n_demos": 128}))
    new = _sft_run(tmp_path, 256, [0.33, 0.61, 0.44], [0.2, 0.48, 0.3])
    result = assembler.assemble([saved, new], evals, {"grpo": _grpo_run(tmp_path, "turn", 4)}, n_boot=50)
    curve = result["sft_curve"]
    assert [p["n_demos"] for p in curve["points"]] == [64, 128, 256] and curve["best_n_demos"] == 256
    assert curve["points"][:2] == old
    assert curve["why"] == ("N=256 has the highest val success, 0.610 at epoch 2 on 18 val tasks. Below it: "
                            "N=64: 0.220, N=128: 0.220.")
    assert result["sft_val_curve"]["best_epoch"] == 2 and result["stage_times_s"]["sft_best"] == 60.0 * 256
    assert result["stage_times_s"]["sft_curve"] == 60.0 * (64 + 128 + 256)

    with pytest.raises(SystemExit, match=r"the curve would hold a count twice \(64, 128, 128\)"):
        assembler.assemble([saved, tmp_path / "sft_n128"], evals, {"grpo": _grpo_run(tmp_path, "t2", 4)}, n_boot=50)
    (tmp_path / "odd").mkdir()
    odd = _sft_run(tmp_path / "odd", 512, [0.5], [0.4])
    (odd / "val_curve.json").write_text(json.dumps({"curve": [{"epoch": 1, "val/success": 0.5}], "val_tasks": 36}))
    with pytest.raises(SystemExit, match=r"validated on different numbers of tasks \(N=64: 18, N=128: 18, N=256: 18, "
                                         r"N=512: 36\); re-run the odd ones with the curve's --val_limit"):
        assembler.assemble([saved, new, odd], evals, {"grpo": _grpo_run(tmp_path, "t3", 4)}, n_boot=50)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"points": [{"n_demos": 64}]}))
    with pytest.raises(SystemExit, match=r"--sft .*broken.json: expected a saved SFT curve, .* best_epoch"):
        assembler.sft_points(broken)
    broken.write_text("{not json")
    with pytest.raises(SystemExit, match=r"--sft .*broken.json: not a JSON file"):
        assembler.sft_points(broken)


def test_a_grpo_runs_committed_summaries_stand_for_its_gone_output_directory(assembler, oracle_report,
                                                                            tmp_path) -> None:
    """A run's grpo_result.json and log_history.json copied elsewhere (committed) after its output directory
    went: the training log is read beside the copied result, not from the path the result recorded."""
    labels = sorted({intent_label(e["intents"]) for e in oracle_report.episodes})
    evals = _eval_dirs(oracle_report, {"base": set(labels), "sft": set(labels[:6]), "grpo": set(labels[:2]),
                                       "oracle": set()}, tmp_path)
    run = _grpo_run(tmp_path, "turn", 3)
    kept = tmp_path / "committed" / "turn"
    kept.mkdir(parents=True)
    for name in ("grpo_result.json", "log_history.json"):
        (kept / name).write_text((run / name).read_text())
    (run / "log_history.json").unlink()  # the output directory is gone: only the copies remain
    result = assembler.assemble([_sft_run(tmp_path, 64, [0.33], [0.2])], evals, {"grpo": kept}, n_boot=50)
    assert result["grpo_signals"]["reward"] == pytest.approx([0.1, 0.2, 0.3])
    (kept / "log_history.json").unlink()  # no log anywhere: the signals are empty, not an error
    result = assembler.assemble([_sft_run(tmp_path / "committed", 64, [0.33], [0.2])], evals, {"grpo": kept},
                                n_boot=50)
    assert result["grpo_signals"]["reward"] == []
    (kept / "grpo_result.json").write_text('{"steps": 3, "log_hist')  # a copy cut short
    with pytest.raises(SystemExit, match=r"committed/turn/grpo_result.json: not a JSON file \(.*\); the GRPO run "
                                         r"writes it when it finishes"):
        assembler.assemble([tmp_path / "committed" / "sft_n64"], evals, {"grpo": kept}, n_boot=50)


def test_policies_evaluated_on_different_episodes_are_refused(assembler, oracle_report, tmp_path) -> None:
    evals = {}
    for name in ("base", "sft", "grpo", "oracle"):
        report = _variant(oracle_report, name, set())
        if name == "sft":  # one task short, as a run with a different --limit would be
            report.trajectories = report.trajectories[:-1]
        evals[name] = tmp_path / name
        write_report(evals[name], [report], html_page=False)
    sft = [_sft_run(tmp_path, 64, [0.2], [0.0])]
    with pytest.raises(SystemExit, match="not evaluated on the same task ids and seeds"):
        assembler.assemble(sft, evals, {"grpo": _grpo_run(tmp_path, "turn", 2)}, n_boot=100)
    with pytest.raises(SystemExit, match="--eval lacks oracle"):
        assembler.assemble(sft, {k: v for k, v in evals.items() if k != "oracle"}, {}, n_boot=100)
