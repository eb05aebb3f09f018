"""The learning result on the whole customer-service domain, assembled from pieces that run separately.

Each piece takes between half an hour and a few hours on 2 CPU cores, so each runs (and is re-run) alone:

1. The SFT curve: ``turnwise sft --tasks customer_service --num_demos N --output_dir outputs/all_intents/sft_nN``
   for N, 2N, and 4N if 2N still improved (the flags are in the README, "Learning on all intents").
2. GRPO from the best point's adapter on all intents, once per advantage estimator, at the same budget
   on the same tasks and seeds: ``turnwise train --adapter <best SFT>/adapter --advantage
   group_based_per_turn ...`` and the same with ``--advantage group_based``.
3. Every policy on the fresh held-out set, with the same seed and budgets: ``turnwise eval --model X
   --env customer_service/all_intents_holdout --split test --out outputs/all_intents/eval/<name>``, for the
   base model, the best SFT adapter, both GRPO adapters and ``--policy oracle``.

Then::

    python benchmarks/learning_all_intents.py \\
        --sft outputs/all_intents/sft_n64 outputs/all_intents/sft_n128 ... \\
        --eval base=outputs/all_intents/eval/base sft=... grpo=... grpo_episode=... oracle=... \\
        --grpo grpo=outputs/all_intents/grpo_turn grpo_episode=outputs/all_intents/grpo_episode

writes ``benchmarks/results/learning_all_intents.json``: the keys of ``learning.json`` (``grpo`` is the
turn-level arm, the project's default, fixed before any test number was seen; ``report`` the directory that holds
the evaluations; ``recipe`` the ``--commands`` file and ``recipe_note`` the ``--note`` text), plus ``sft_curve`` (each
point and which is best, and why), ``per_intent`` (each policy's success per intent and the paired
differences with their intervals) and ``advantage_comparison`` (turn-level against episode-level, paired
on the same test episodes). Any other ``--eval NAME=DIR`` with a ``--grpo NAME=DIR`` of the same name is a
further GRPO run (a longer one, say) and goes under ``further_arms``: its summary, its training record and its
paired difference against SFT, overall and per intent; it does not replace the headline. The policies are
paired from their logged trajectories (``pipeline.evaluation.evaluate_trajectories``), so nothing is re-run
here.

A further run made after the result was assembled is added to it with ``--extend``, which needs only SFT's
evaluation and the new run's pieces, not the earlier runs' output directories::

    python benchmarks/learning_all_intents.py --extend benchmarks/results/learning_all_intents.json \\
        --eval sft=benchmarks/results/learning_all_intents_eval/sft_n256 NAME=outputs/all_intents/eval/NAME \\
        --grpo NAME=outputs/all_intents/NAME --commands commands.json

``--extend`` with ``--sft outputs/all_intents/sft_nN`` adds a further point to the SFT curve, so long as the
baseline stays its best point (a new best would move the baseline, and every arm paired with it).

A ``--sft`` path may also be a curve saved as JSON, ``benchmarks/results/sft_curve_all_intents.json``: its points
stand for the runs, so re-assembling needs only the runs made since (each count once).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any

from common import ROOT, machine, read_report, write_result

ENV = "customer_service/all_intents_holdout"
POLICIES = ("base", "sft", "grpo", "oracle")
ARMS = {"grpo": "group_based_per_turn", "grpo_episode": "group_based"}
COMPARISONS = (("grpo", "sft"), ("sft", "base"), ("grpo", "base"))
TARGETS = {"grpo_vs_sft": 0.10, "absolute_success": 0.60, "max_turns_rate": 0.20}
SUCCESS_CHECK = ("Strict success (pipeline/envs/customer_service/env.py): the sandbox ends in the task's expected "
                 "state, no SOP rule is broken, and every required fact is told after a tool showed the goal's "
                 "order (a status guessed after failed lookups is not told). The SFT val curve, the GRPO runs' "
                 "rewards and val success, and every held-out evaluation here were scored by it.")


def sft_point(run: Path) -> dict[str, Any]:
    """One point of the SFT curve from a ``turnwise sft`` output directory."""
    from pipeline.demo import whole_run_time

    result = _read_json(run / "sft_result.json", "run `turnwise sft --output_dir` there first")
    curve = _read_json(Path(result["val_curve"]) if Path(result["val_curve"]).is_file() else run / "val_curve.json",
                       "the SFT run writes it after each epoch")
    best = next(r for r in curve["curve"] if r["epoch"] == result["best_epoch"])
    return {"n_demos": result["demos"], "output_dir": str(_rel(run)), "best_epoch": result["best_epoch"],
            "best_val_success": result["best_val_success"], "best_val_reward": best.get("val/reward/mean"),
            "best_val_completion": best.get("val/completion"), "val_tasks": curve["val_tasks"],
            "tokens": {"total": result["tokens"], "assistant_trained": result["assistant_tokens"]},
            "curve": curve["curve"], "wall_time_s": whole_run_time(result)}


def sft_points(path: Path) -> list[dict[str, Any]]:
    """The SFT curve's points a ``--sft`` path gives: one from a ``turnwise sft`` output directory, or every point
    of a curve saved as JSON (``benchmarks/results/sft_curve_all_intents.json``, whose runs' output directories
    need not exist any more)."""
    if not path.is_file():
        return [sft_point(path)]
    saved = _read_json(path, "give a saved SFT curve or a `turnwise sft --output_dir` directory", flag="--sft ")
    points = saved.get("points") if isinstance(saved, dict) else None
    keys = ("n_demos", "best_epoch", "best_val_success", "best_val_reward", "val_tasks", "curve", "wall_time_s")
    if not isinstance(points, list) or not all(isinstance(p, dict) and all(k in p for k in keys) for p in points):
        raise SystemExit(f"--sft {path}: expected a saved SFT curve, a JSON object whose 'points' are each a point "
                         f"with {', '.join(keys)}; give a `turnwise sft --output_dir` directory or such a file.")
    return points


def curve_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curve's points in order of count, each count once, all validated on as many tasks (or their val
    success is not comparable, and neither is the choice of the best)."""
    points = sorted(points, key=lambda p: p["n_demos"])
    counts = [p["n_demos"] for p in points]
    if len(set(counts)) < len(counts):
        raise SystemExit(f"--sft: the curve would hold a count twice ({', '.join(map(str, counts))}); "
                         "give each count once.")
    if len({p["val_tasks"] for p in points}) > 1:
        raise SystemExit("--sft: the points were validated on different numbers of tasks (" + ", ".join(
            f"N={p['n_demos']}: {p['val_tasks']}" for p in points) + "); re-run the odd ones with the curve's "
            "--val_limit, so that their val success compares.")
    return points


def best_point(points: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The baseline: the point with the highest val success; a tie goes to the higher val reward, then to
    more demonstrations (the tie rule of the epochs: more data at equal success). Returns it and why."""
    ranked = sorted(points, key=lambda p: (p["best_val_success"], p["best_val_reward"] or 0.0, p["n_demos"]))
    best = ranked[-1]
    where = f"{best['best_val_success']:.3f} at epoch {best['best_epoch']} on {best['val_tasks']} val tasks"
    ties = [p for p in points if p is not best and p["best_val_success"] == best["best_val_success"]]
    others = [p for p in points if p is not best and p not in ties]
    if ties:
        why = (f"N={best['n_demos']} ties N={', N='.join(str(p['n_demos']) for p in ties)} for the highest val "
               f"success, {where}; the tie goes to the higher val reward at the kept epoch ("
               + ", ".join(f"N={p['n_demos']}: {p['best_val_reward']:.3f}" for p in [best, *ties]) + ").")
    else:
        why = f"N={best['n_demos']} has the highest val success, {where}."
    if others:
        why += " Below it: " + ", ".join(f"N={p['n_demos']}: {p['best_val_success']:.3f}" for p in others) + "."
    return best, why


def load_reports(specs: dict[str, Path]) -> dict[str, Any]:
    """Each policy's report, rebuilt from the trajectories its ``turnwise eval --out`` directory logged, or,
    for a directory that keeps only its ``report.json`` (as the committed ones do), from the episode records
    in it. The policies must have played the same task ids and seeds, or no pairing holds."""
    from pipeline.demo import whole_run_time
    from pipeline.envs import load_tasks
    from pipeline.evaluation import evaluate_trajectories
    from pipeline.trajectory import load_jsonl

    tasks = load_tasks(ENV, "test")
    reports = {}
    for name, path in specs.items():
        files = [path] if path.is_file() else sorted((path / "trajectories").glob("*.jsonl"))
        saved = path.is_dir() and not files and (path / "report.json").is_file()
        if len(files) != 1 and not saved:
            raise SystemExit(f"--eval {name}={path}: expected one trajectories/*.jsonl from a single-policy "
                             f"`turnwise eval --out`, found {len(files)}; give the .jsonl file instead.")
        if saved:  # report.json read once: read_report keeps its config as played under "evaluated"
            report = read_report(name, path)
            played = {"config": report.config["evaluated"], "metrics": report.metrics}
        else:
            report = evaluate_trajectories(load_jsonl(files[0]), tasks, label=name)
            played = json.loads((path / "report.json").read_text())["policies"][0] if path.is_dir() else {}
        report.config.update(source=str(_rel(path / "report.json" if saved else files[0])),
                             evaluated=played.get("config", {}),
                             wall_time_s=whole_run_time(played.get("metrics", {})))
        reports[name] = report
    ids = {name: [(e["task_id"], e["seed"]) for e in r.episodes] for name, r in reports.items()}
    if len({tuple(sorted(v)) for v in ids.values()}) != 1:
        raise SystemExit("the policies were not evaluated on the same task ids and seeds: " + ", ".join(
            f"{name} {len(v)} episodes" for name, v in ids.items()) + "; re-run with the same --limit and --seed.")
    return reports


def per_intent(reports: dict[str, Any], comparisons: dict[str, Any]) -> dict[str, Any]:
    """Per intent: each policy's success (and how many of its episodes ran out of turns), and each paired
    difference with its interval, resampling that intent's tasks only."""
    intents = sorted({label for r in reports.values() for label in r.metrics["by_intent"]})
    table = {}
    for label in intents:
        row: dict[str, Any] = {"n_tasks": max(r.metrics["by_intent"].get(label, {}).get("n", 0)
                                              for r in reports.values())}
        for name, report in reports.items():
            own = report.metrics["by_intent"].get(label, {})
            row[name] = {"success": own.get("success"), "max_turns_rate": own.get("max_turns_rate")}
        for name, c in comparisons.items():
            row[name] = _interval(c.by_intent[label]) if label in c.by_intent else None
        table[label] = row
    return table


def advantage_comparison(reports: dict[str, Any], results: dict[str, dict[str, Any]], n_boot: int,
                         seed: int) -> dict[str, Any]:
    """Turn-level against episode-level advantages: their test success paired episode by episode, and the
    steps each arm trained for (the same, with the same rollouts per step, for the comparison to mean
    anything: the commands in ``recipe`` show the rest of each arm's settings)."""
    from pipeline.demo import delta_summary, policy_summary, whole_run_time
    from pipeline.evaluation import compare

    c = compare(reports["grpo"], reports["grpo_episode"], n_boot=n_boot, seed=seed)
    arms = {}
    for name, advantage in ARMS.items():
        result = results[name]
        arms[name] = {"advantage": advantage, **policy_summary(reports[name]), "steps": result.get("steps"),
                      "wall_time_s": whole_run_time(result), "best_val": result.get("best_val"),
                      "output_dir": result.get("output_dir")}
    steps = {name: arm["steps"] for name, arm in arms.items()}
    winner = ("group_based_per_turn" if c.ci_low > 0 else "group_based" if c.ci_high < 0
              else "neither (the interval includes 0)")
    return {"arms": arms, "delta_turn_vs_episode": delta_summary(c), "winner": winner,
            "equal_steps": len(set(steps.values())) == 1, "steps": steps,
            "per_intent": {label: _interval(d) for label, d in c.by_intent.items()}}


def further_arms(reports: dict[str, Any], grpo_runs: dict[str, Path], n_boot: int, seed: int) -> dict[str, Any]:
    """The GRPO runs evaluated besides the headline's policies and the two advantage arms: each against SFT."""
    from pipeline.demo import delta_summary, policy_summary, whole_run_time
    from pipeline.evaluation import compare

    arms = {}
    for name in (n for n in reports if n not in POLICIES and n not in ARMS):
        result = _grpo_result(grpo_runs, name)
        c = compare(reports[name], reports["sft"], n_boot=n_boot, seed=seed)
        arms[name] = {**policy_summary(reports[name]), "steps": result.get("steps"),
                      "wall_time_s": whole_run_time(result), "best_val": result.get("best_val"),
                      "output_dir": result.get("output_dir"), "delta_vs_sft": delta_summary(c),
                      "per_intent_vs_sft": {label: _interval(d) for label, d in c.by_intent.items()}}
    return arms


def assemble(sft_runs: list[Path], evals: dict[str, Path], grpo_runs: dict[str, Path], n_boot: int = 10_000,
             seed: int = 0, note: str = "") -> dict[str, Any]:
    """The result; ``note`` (``recipe_note``) says what the recipe's commands do not: what was reused, what shared
    the cores, anything a reader re-running it should know."""
    from pipeline.demo import delta_summary, policy_summary, training_signals, whole_run_time
    from pipeline.evaluation import compare

    missing = [name for name in POLICIES if name not in evals]
    if missing:
        raise SystemExit(f"--eval lacks {', '.join(missing)}: give NAME=DIR for each of {', '.join(POLICIES)}.")
    points = curve_points([p for path in sft_runs for p in sft_points(path)])
    best, why = best_point(points)
    reports = load_reports(evals)
    comparisons = {f"{a}_vs_{b}": compare(reports[a], reports[b], n_boot=n_boot, seed=seed) for a, b in COMPARISONS}
    headline = comparisons["grpo_vs_sft"]
    meets = headline.difference >= TARGETS["grpo_vs_sft"] and headline.ci_low > 0
    arms = [name for name in ARMS if name == "grpo" or (name in evals and name in grpo_runs)]
    results = {name: _grpo_result(grpo_runs, name) for name in arms}
    grpo = results["grpo"]
    log = _log_history(grpo, grpo_runs["grpo"])
    first = reports["grpo"].metrics
    result: dict[str, Any] = {name: policy_summary(reports[name]) for name in POLICIES}
    result.update({f"delta_{name}": delta_summary(c) for name, c in comparisons.items()})
    result.update({
        "statement": headline.statement(),
        "meets_10_points": meets,
        "targets": {
            "grpo_vs_sft_at_least_0.10_with_ci_low_above_0": meets,
            "grpo_success_at_least_0.60": first["success"] >= TARGETS["absolute_success"],
            "grpo_max_turns_rate_under_0.20": first["max_turns_rate"] < TARGETS["max_turns_rate"],
        },
        "n_tasks": first["n_tasks"], "episodes_per_task": first["n"], "split": "test", "eval_tasks": ENV,
        "eval_settings": {name: r.config["evaluated"] for name, r in reports.items()},
        "stage_times_s": {"sft_curve": sum(p["wall_time_s"] for p in points), "sft_best": best["wall_time_s"],
                          "grpo": whole_run_time(grpo),
                          "eval": {name: r.config["wall_time_s"] for name, r in reports.items()}},
        "sft_val_curve": {"n_demos": best["n_demos"], "curve": best["curve"], "best_epoch": best["best_epoch"]},
        "grpo_signals": training_signals(log),
        "foothold": grpo.get("foothold"),
        "sft_curve": {"points": points, "best_n_demos": best["n_demos"], "why": why},
        "per_intent": per_intent(reports, comparisons),
        "report": str(report_root(evals)),
        "success_check": SUCCESS_CHECK,
        "recipe_note": note,
        "model": "smollm2-135m",
        "machine": machine(),
    })
    if "grpo_episode" in results:
        result["advantage_comparison"] = advantage_comparison(reports, results, n_boot, seed)
    if any(name not in POLICIES and name not in ARMS for name in reports):
        result["further_arms"] = further_arms(reports, grpo_runs, n_boot, seed)
    result["wall_time_s"] = total_time(result["stage_times_s"])
    return result


def report_root(evals: dict[str, Path]) -> Path:
    """Where the evaluations' reports are: the directory that holds every ``--eval`` directory (or file)."""
    # resolved, since commonpath refuses a mix of relative and absolute paths
    dirs = [(path if path.is_dir() else path.parent).resolve() for path in evals.values()]
    return _rel(Path(os.path.commonpath(dirs)))


def total_time(stage_times: dict[str, Any]) -> float:
    """The result's ``wall_time_s``: the SFT curve, the headline GRPO arm and every evaluation."""
    stages = [stage_times["sft_curve"], stage_times["grpo"] or 0.0, *(v or 0.0 for v in stage_times["eval"].values())]
    return round(sum(stages), 1)


def extend(result: dict[str, Any], evals: dict[str, Path], grpo_runs: dict[str, Path], n_boot: int = 10_000,
           seed: int = 0) -> dict[str, Any]:
    """An assembled result with further GRPO runs added under ``further_arms``, each paired with SFT, without
    the pieces the rest of the result came from (the SFT curve's and the earlier arms' output directories):
    only SFT's evaluation (``sft=DIR``, the directory committed beside the result will do) and each new run's
    evaluation and output directory. The new runs' evaluation times join ``stage_times_s``."""
    if "sft" not in evals:
        raise SystemExit("--extend pairs each further run with SFT: give --eval sft=DIR too (the SFT policy's "
                         "`turnwise eval --out` directory).")
    taken = sorted(set(evals) & (set(POLICIES) | set(ARMS)) - {"sft"})
    if taken:
        raise SystemExit(f"--extend adds further runs only; {', '.join(taken)} {'is' if len(taken) == 1 else 'are'} "
                         "not one. Re-assemble without --extend to change the headline's policies.")
    if len(evals) < 2:
        raise SystemExit("--extend needs a further run to add: give --eval NAME=DIR and --grpo NAME=DIR for it "
                         "beside --eval sft=DIR.")
    reports = load_reports(evals)
    if reports["sft"].metrics["success"] != result["sft"]["success"]:
        raise SystemExit(f"--eval sft={evals['sft']} scores {reports['sft'].metrics['success']:.3f}, but the result's "
                         f"SFT scores {result['sft']['success']:.3f}: give the SFT evaluation the result was built on.")
    out = copy.deepcopy(result)
    out.setdefault("further_arms", {}).update(further_arms(reports, grpo_runs, n_boot, seed))
    for name in reports:
        if name != "sft":
            out["stage_times_s"]["eval"][name] = reports[name].config["wall_time_s"]
    out["wall_time_s"] = total_time(out["stage_times_s"])
    return out


def extend_sft_curve(result: dict[str, Any], sft_runs: list[Path]) -> dict[str, Any]:
    """An assembled result with more points on its SFT curve (a count run after the result was assembled). The
    baseline must stay the best point: a new best would move it, and everything paired with it (SFT's
    evaluation, the GRPO arms that started from its adapter) would have to be made again, so that is refused.
    The new points' training times join ``stage_times_s``."""
    new = [p for path in sft_runs for p in sft_points(path)]
    points = curve_points([*result["sft_curve"]["points"], *new])
    best, why = best_point(points)
    if best["n_demos"] != result["sft_curve"]["best_n_demos"]:
        raise SystemExit(f"--sft: with N={best['n_demos']} the curve's best point moves ({why}). The baseline moves "
                         "with it: evaluate that adapter on the held-out set, run GRPO from it, and re-assemble "
                         "the result without --extend.")
    out = copy.deepcopy(result)
    out["sft_curve"].update(points=points, why=why)
    out["stage_times_s"]["sft_curve"] = round(out["stage_times_s"]["sft_curve"] + sum(p["wall_time_s"] for p in new), 1)
    out["wall_time_s"] = total_time(out["stage_times_s"])
    return out


def _grpo_result(runs: dict[str, Path], name: str) -> dict[str, Any]:
    if name not in runs:
        raise SystemExit(f"--grpo lacks {name}=DIR (the `turnwise train --output_dir` of that arm).")
    return _read_json(runs[name] / "grpo_result.json", "the GRPO run writes it when it finishes")


def _log_history(result: dict[str, Any], run: Path) -> list[dict[str, Any]]:
    """A GRPO run's training log: where its ``grpo_result.json`` says, or beside that file (a run's summaries
    committed apart from its output directory, which did not survive), or none."""
    recorded = [Path(result["log_history"])] if result.get("log_history") else []
    for path in (*recorded, run / "log_history.json"):
        if path.is_file():
            return _read_json(path, "the GRPO run writes it as it finishes; copy it again from the run")
    return []


def _read_json(path: Path, hint: str, flag: str = "") -> Any:
    """A piece's JSON file, or an error that names it (after ``flag``, the option that gave it) and says what to do."""
    if not path.is_file():
        raise SystemExit(f"{flag}{path} does not exist: {hint}.")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise SystemExit(f"{flag}{path}: not a JSON file ({exc}); {hint}.") from None


def _interval(d: dict[str, Any]) -> dict[str, Any]:
    """A per-intent paired difference (`Comparison.by_intent`) as the result keeps it."""
    return {k: d[k] for k in ("difference", "ci_low", "ci_high", "n_pairs")}


def _rel(path: Path) -> Path:
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _named(values: list[str], flag: str) -> dict[str, Path]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} {value!r}: give NAME=PATH, e.g. {flag} sft=outputs/all_intents/eval/sft.")
        out[name] = Path(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", type=Path, nargs="+",
                        help="the SFT curve's output directories, or a curve saved as JSON (its points); with "
                             "--extend, further points to add to its curve")
    parser.add_argument("--extend", type=Path, default=None, metavar="RESULT.json",
                        help="add the further GRPO runs given by --eval/--grpo NAME=DIR (with --eval sft=DIR for the "
                             "pairing) and the SFT points given by --sft to this assembled result, and write it back "
                             "under --name")
    parser.add_argument("--eval", nargs="+", default=[], metavar="NAME=DIR",
                        help=f"each policy's `turnwise eval --out` directory: {', '.join(POLICIES)}, grpo_episode, "
                             "and any further GRPO run (with its --grpo of the same name)")
    parser.add_argument("--grpo", nargs="+", default=[], metavar="NAME=DIR",
                        help="each GRPO arm's output_dir: grpo (turn-level), grpo_episode (episode-level), and "
                             "each further run's")
    parser.add_argument("--commands", type=Path, default=None,
                        help="a JSON file mapping each piece to the command that ran it (kept as 'recipe')")
    parser.add_argument("--note", default=None,
                        help="kept as 'recipe_note': what the commands do not say (a reused stage, a run that shared "
                             "the cores); with --extend, replaces the result's note")
    parser.add_argument("--name", default="learning_all_intents")
    parser.add_argument("--bootstrap", type=int, default=10_000)
    args = parser.parse_args()
    commands = json.loads(args.commands.read_text()) if args.commands else None
    if args.extend is not None:
        if not args.sft and not args.eval:
            parser.error("--extend needs something to add: --sft DIR (a point of the SFT curve) or --eval/--grpo "
                         "NAME=DIR (a further GRPO run).")
        result = _read_json(args.extend, "give the result file --extend adds to")
        if args.sft:
            result = extend_sft_curve(result, args.sft)
        if args.eval or args.grpo:
            result = extend(result, _named(args.eval, "--eval"), _named(args.grpo, "--grpo"), n_boot=args.bootstrap)
        result["recipe"] = {**(result.get("recipe") or {}), **(commands or {})}
        if args.note is not None:
            result["recipe_note"] = args.note
    else:
        if not (args.sft and args.eval and args.grpo):
            parser.error("--sft, --eval and --grpo are required: the SFT curve's output directories, each policy's "
                         "evaluation and each GRPO arm's output directory.")
        result = assemble(args.sft, _named(args.eval, "--eval"), _named(args.grpo, "--grpo"), n_boot=args.bootstrap,
                          note=args.note or "")
        result["recipe"] = commands
    path = write_result(args.name, result)
    print(f"{path}: {result['statement']}")


if __name__ == "__main__":
    main()
