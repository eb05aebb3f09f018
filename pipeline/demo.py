"""The whole pipeline in one run: prepare the model, SFT warm start, multi-turn GRPO, held-out evaluation.

``turnwise demo`` (the README's ``make demo``) runs ``configs/demo.yaml``: narrowed to one intent, it shows
learning (SFT+GRPO against the base model on held-out tasks) in about 13 minutes on a 2-core CPU (24 on a
host 1.8x slower); ``turnwise demo --config configs/cpu_full.yaml`` is the longer run that measures GRPO
against SFT. A *pipeline recipe* is a YAML mapping with shared keys and one section per stage:

```yaml
model_name_or_path: smollm2-135m   # shared by every stage
output_dir: outputs/demo           # stages write to <output_dir>/sft, /grpo, /report
seed: 0
tasks: ...                         # a domain spec, directory or .jsonl (default: the default domain)
customer: llm:hf:smollm2-135m      # optional: the simulated customer of every stage (default: scripted)
description: ...                   # optional: what the run shows and where it is narrowed; printed with its result
sft:  {...}   # `turnwise sft` options (pipeline.sft.SFTArguments, TRL SFTConfig, ModelConfig); omit to skip
grpo: {...}   # `turnwise train` options; starts from the SFT adapter when SFT ran; omit to skip
eval: {...}   # EvalStageArguments (`turnwise eval`'s EvalArguments, plus tasks, oracle, base): the held-out
              # evaluation of base, SFT-only and SFT+GRPO
```

Every stage section is parsed by the stage's own typed configs (`pipeline.config.parse_options`, as the
stage's command parses its flags) before anything runs, so a typo fails in a second, naming the section
and the key, not after the SFT. The evaluation runs every policy on the same tasks and seeds, compares
SFT+GRPO against SFT-only and the base (and SFT against the base) with paired-bootstrap 95% intervals, and
writes the report, which opens with the training curves (``report/plots/training_curves.png``), and
``summary.json`` (the numbers, the SFT val curve, the GRPO health signals, wall time, machine).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.budgets import check_count
from pipeline.config import EvalArguments, read_recipe

if TYPE_CHECKING:
    from pipeline.evaluation import Comparison, EvalReport

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO_ROOT / "configs" / "demo.yaml"
SHARED_KEYS = ("model_name_or_path", "output_dir", "seed", "tasks", "customer", "description")
STAGES = ("sft", "grpo", "eval")


@dataclass
class EvalStageArguments(EvalArguments):
    """The held-out evaluation at the end of a pipeline run (``eval:`` section): `EvalArguments`, and which
    task set and which policies besides the trained ones."""

    tasks: str | None = field(default=None, metadata={"help": "Task set of the evaluation (default: the recipe's "
                                                              "tasks), e.g. a fresh held-out set from another seed."})
    oracle: bool = field(default=True, metadata={"help": "Also evaluate the scripted oracle (what solved looks like)."})
    base: bool = field(default=True, metadata={"help": "Also evaluate the starting model without any adapter."})
    sft_only: bool = field(default=True, metadata={
        "help": "Also evaluate the SFT adapter alone when GRPO trained on top of it (the SFT+GRPO vs SFT-only "
                "comparison); without GRPO the SFT adapter is the trained policy and is always evaluated."})


def load_recipe(path: Path | str) -> dict[str, Any]:
    """A pipeline recipe as a mapping, read strictly (`pipeline.config.read_recipe`: a missing file, a directory,
    a key given twice, a list); fails on an unknown top-level key or a stage section that is not a mapping."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"Pipeline recipe {path} does not exist. Pass --config with one of configs/demo.yaml, "
                         "configs/cpu_full.yaml, or your own.")
    recipe = read_recipe(path, "Pipeline recipe")
    unknown = sorted(set(recipe) - set(SHARED_KEYS) - set(STAGES))
    if unknown:
        raise ValueError(f"Pipeline recipe {path}: unknown top-level key(s) {', '.join(unknown)}. Allowed: "
                         f"{', '.join(SHARED_KEYS)} and the stage sections {', '.join(STAGES)}; put stage options "
                         "inside their section.")
    for key in ("model_name_or_path", "output_dir", "tasks", "description"):
        if recipe.get(key) is not None and not isinstance(recipe[key], str):
            raise ValueError(f"Pipeline recipe {path}: {key} must be text, got {recipe[key]!r}.")
    if "seed" in recipe:
        check_count(recipe["seed"], f"Pipeline recipe {path}: seed", least=0, largest=2**32 - 1)
    for stage in STAGES:
        if recipe.get(stage) is not None and not isinstance(recipe[stage], dict):
            raise ValueError(f"Pipeline recipe {path}: section {stage!r} must be a mapping of options, not "
                             f"{type(recipe[stage]).__name__} {recipe[stage]!r}.")
    return recipe


@dataclass
class Plan:
    """The parsed stages of a pipeline recipe, with every output path resolved."""

    model: str
    output_dir: Path
    seed: int
    tasks: str
    sft: tuple | None  # (SFTArguments, SFTConfig, ModelConfig)
    grpo_section: dict | None
    eval: EvalStageArguments
    customer: str | None = None  # every stage's simulated customer (None: the domain's scripted one)
    description: str | None = None  # what the run shows and where it is narrowed (the recipe's own words)


def plan(recipe: dict[str, Any], output_dir: Path | None = None, model: str | None = None,
         seed: int | None = None, customer: str | None = None) -> Plan:
    """Parse every stage of ``recipe`` (flags ``output_dir``, ``model``, ``seed``, ``customer`` override its shared
    keys)."""
    from pipeline.config import parse_options
    from pipeline.models import DEFAULT_MODEL
    from pipeline.sft import parse_sft_args

    out = Path(output_dir or recipe.get("output_dir") or "outputs/demo")
    model = model or recipe.get("model_name_or_path") or DEFAULT_MODEL
    seed = recipe.get("seed", 0) if seed is None else seed
    tasks = recipe.get("tasks")  # None: the default domain's shipped tasks
    from pipeline.envs import check_customer_spec

    customer = check_customer_spec(customer or recipe.get("customer"))
    shared = {"customer": customer} if customer is not None else {}
    sft = None
    if recipe.get("sft") is not None:
        sft = parse_sft_args([], config={**recipe["sft"], "model_name_or_path": model, "output_dir": str(out / "sft"),
                                         "seed": seed, "tasks": tasks, **shared}, where="the recipe's sft: section")
    grpo_section = None
    if recipe.get("grpo") is not None:
        grpo_section = {**recipe["grpo"], "model_name_or_path": model, "output_dir": str(out / "grpo"), "seed": seed,
                        "tasks": tasks, **shared}
        parse_grpo(grpo_section)  # fail fast on a bad option, before the SFT runs
    [eval_args] = parse_options((EvalStageArguments,), [], prog="turnwise eval", recipe=recipe.get("eval") or {},
                                where="the recipe's eval: section", recipe_flag=False)
    return Plan(model, out, seed, tasks, sft, grpo_section, eval_args, customer, recipe.get("description"))


def parse_grpo(section: dict[str, Any], adapter: str | None = None):
    """``(TaskArguments, RolloutConfig, GRPOConfig, ModelConfig)`` of a ``grpo:`` section."""
    from trl import GRPOConfig, ModelConfig

    from pipeline.config import TaskArguments, parse_options
    from pipeline.training import RolloutConfig

    config = {**section, "adapter": adapter} if adapter else section
    return parse_options((TaskArguments, RolloutConfig, GRPOConfig, ModelConfig), [], prog="turnwise train",
                         recipe=config, where="the recipe's grpo: section", recipe_flag=False)


def run(recipe_path: Path | str = DEMO_RECIPE, output_dir: Path | None = None, model: str | None = None,
        seed: int | None = None, resume: bool = False, customer: str | None = None) -> dict[str, Any]:
    """Run a pipeline recipe: prepare, SFT, GRPO, evaluate. Returns the summary (also ``summary.json``).

    With ``resume``, a stage whose result file a previous run wrote (``sft/sft_result.json``,
    ``grpo/grpo_result.json``, each written last, atomically) is not run again, and an unfinished SFT or GRPO
    stage continues from its last checkpoint (SFT's: the last finished epoch). The evaluation always runs.
    """
    from pipeline.models import ALIASES, prepare_embedded_model
    from pipeline.sft import RESULT_FILE as SFT_RESULT
    from pipeline.training import RESULT_FILE as GRPO_RESULT
    from pipeline.training import train

    start = time.time()
    load_at_start = _load()
    p = plan(load_recipe(recipe_path), output_dir, model, seed, customer)
    p.output_dir.mkdir(parents=True, exist_ok=True)
    log_path = p.output_dir / "run.log"
    handler = _log_to(log_path)
    times: dict[str, float] = {}
    reused: dict[str, float | None] = {}  # stage -> wall time of the earlier run that finished it (--resume)
    summary: dict[str, Any] = {"recipe": str(recipe_path), "model": p.model, "output_dir": str(p.output_dir),
                               "seed": p.seed, "tasks": p.tasks, "customer": p.customer or "scripted",
                               "description": p.description, "paths": {"log": str(log_path)}}
    if p.description:
        logger.info("%s", p.description)
    try:
        t = time.time()
        if p.model in ALIASES:
            prepare_embedded_model(name=p.model)
        times["prepare"] = round(time.time() - t, 1)

        sft_adapter = None
        curves: dict[str, Any] = {}  # the training curves the report draws (pipeline.report.plot_training_curves)
        if p.sft is not None:
            from pipeline.sft import run_sft

            t = time.time()
            sft_result = _finished(Path(p.sft[1].output_dir) / SFT_RESULT) if resume else None
            if sft_result is None:
                p.sft[0].resume = p.sft[0].resume or resume  # continue from its last epoch checkpoint
                logger.info("stage sft: %d oracle demonstrations, up to %s epochs", p.sft[0].num_demos,
                            p.sft[1].num_train_epochs)
                sft_result = run_sft(*p.sft)
                times["sft"] = round(time.time() - t, 1)
            else:
                reused["sft"] = whole_run_time(sft_result)
            sft_adapter = sft_result["adapter"]
            summary["sft_result"] = sft_result
            summary["sft_val_curve"] = json.loads(Path(sft_result["val_curve"]).read_text())
            curves.update(sft_curve=summary["sft_val_curve"].get("curve"),
                          sft_logs=_read_log(sft_result["log_history"]))
            summary["paths"].update(sft_adapter=sft_adapter, sft_logs=sft_result["log_history"],
                                    sft_val_curve=sft_result["val_curve"])

        grpo_adapter = None
        if p.grpo_section is not None:
            t = time.time()
            task_args, rollout_config, grpo_args, model_args = parse_grpo(p.grpo_section, sft_adapter)
            if sft_adapter:
                model_args.use_peft = False  # the SFT adapter is the LoRA being trained
            grpo_result = _finished(Path(grpo_args.output_dir) / GRPO_RESULT) if resume else None
            if grpo_result is None:
                task_args.resume = task_args.resume or resume
                logger.info("stage grpo: %d steps from %s", grpo_args.max_steps, sft_adapter or p.model)
                grpo_result = train(task_args, rollout_config, grpo_args, model_args)
                times["grpo"] = round(time.time() - t, 1)
            else:
                reused["grpo"] = whole_run_time(grpo_result)
            grpo_adapter = grpo_result["adapter"]
            summary["grpo_result"] = {k: v for k, v in grpo_result.items()}
            curves["grpo_logs"] = json.loads(Path(grpo_result["log_history"]).read_text())
            summary["grpo_signals"] = training_signals(curves["grpo_logs"])
            summary["paths"].update(grpo_adapter=grpo_adapter, grpo_logs=grpo_result["log_history"],
                                    grpo_samples=grpo_result["samples"])

        t = time.time()
        summary.update(evaluate_policies(p, sft_adapter, grpo_adapter, {k: v for k, v in curves.items() if v}))
        times["eval"] = round(time.time() - t, 1)
    finally:
        logging.getLogger("pipeline").removeHandler(handler)
        logging.getLogger("rewards").removeHandler(handler)
        handler.close()
    summary["stage_times_s"] = times
    summary["wall_time_s"] = round(time.time() - start, 1)
    if reused:  # what the whole pipeline cost: this run plus the earlier runs of the stages it reused
        summary["reused_stage_times_s"] = reused
        summary["wall_time_total_s"] = round(summary["wall_time_s"] + sum(v or 0.0 for v in reused.values()), 1)
    summary["machine"] = {**machine(), "load_avg_at_start": load_at_start, "load_avg_at_end": _load()}
    from pipeline.trajectory import atomic_write_text

    summary["paths"]["summary"] = str(p.output_dir / "summary.json")
    atomic_write_text(p.output_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def evaluate_policies(p: Plan, sft_adapter: str | None, grpo_adapter: str | None,
                      curves: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate base, SFT-only and SFT+GRPO (those that ran) and the oracle on the same tasks and seeds; the
    report shows the training ``curves`` too (`pipeline.report.plot_training_curves`'s keyword arguments)."""
    from pipeline.envs import load_tasks, oracle_policy
    from pipeline.evaluation import compare, evaluate
    from pipeline.report import MissingReportDependency, plot_training_curves, write_report

    e = p.eval
    tasks = load_tasks(e.tasks or p.tasks, e.split)[: e.limit]
    budgets = dict(k=e.k, n=e.n, seed=p.seed, max_turns=e.max_turns, max_new_tokens=e.max_new_tokens,
                   max_total_tokens=e.max_total_tokens, batch_size=e.batch_size, customer=p.customer)
    sft_only = sft_adapter if e.sft_only or grpo_adapter is None else None
    policies = [("grpo", grpo_adapter, "SFT+GRPO" if sft_adapter else "GRPO"), ("sft", sft_only, "SFT only"),
                ("base", p.model if e.base else None, f"base ({p.model})")]
    reports = {}
    for key, source, label in policies:
        if source is not None:
            logger.info("stage eval: %s on %d %s tasks of %s", label, len(tasks), e.split, e.tasks or p.tasks)
            reports[key] = evaluate(source, tasks, label=label, **budgets)
    if e.oracle:
        reports["oracle"] = evaluate(oracle_policy, tasks, label="oracle", **budgets)
    comparisons = {}
    for cand, base in (("grpo", "sft"), ("sft", "base"), ("grpo", "base")):
        if cand in reports and base in reports:
            comparisons[f"{cand}_vs_{base}"] = compare(reports[cand], reports[base], n_boot=e.bootstrap, seed=p.seed)
    headline = next(iter(comparisons.values()), None)
    out = p.output_dir / "report"
    ordered = [reports[k] for k in ("grpo", "sft", "base", "oracle") if k in reports]
    try:
        extra = {"training_curves": plot_training_curves(**curves)} if curves and e.html else None
        paths = write_report(out, ordered, headline, html_page=e.html, extra_plots=extra)
    except MissingReportDependency as error:
        logger.warning("%s; writing the report without HTML.", error)
        paths = write_report(out, ordered, headline, html_page=False)
    result: dict[str, Any] = {key: policy_summary(r) for key, r in reports.items()}
    result.update({f"delta_{name}": delta_summary(c) for name, c in comparisons.items()})
    result["n_tasks"] = len(tasks)
    result["eval"] = asdict(e)
    result["eval_tasks"] = e.tasks or p.tasks
    result["report"] = {"html": str(paths.get("html", "")), "markdown": str(paths["markdown"]),
                        "json": str(paths["json"]), "training_curves": str(paths.get("plot:training_curves", ""))}
    return result


def policy_summary(report: EvalReport) -> dict[str, Any]:
    """The headline numbers of one policy's evaluation, as the summary and the learning results keep them."""
    keys = ("success", "completion", "turns_mean", "tool_calls_mean", "max_turns_rate", "truncation_rate")
    return {**{key: report.metrics[key] for key in keys}, "label": report.label}


def delta_summary(c: Comparison) -> dict[str, Any]:
    """A side-by-side comparison as the summary and the learning results keep it: the paired difference in
    success, its interval, and the sentence that says what it means."""
    return {"mean": c.difference, "ci_low": c.ci_low, "ci_high": c.ci_high, "significant": c.significant,
            "n_pairs": c.n_pairs, "statement": c.statement()}


def whole_run_time(record: dict[str, Any]) -> float | None:
    """A stage's wall time from its result file (or a report's metrics): every part of a run that ``--resume``
    split (``wall_time_total_s``), or ``wall_time_s`` when it ran in one piece or predates that record."""
    return record.get("wall_time_total_s", record.get("wall_time_s"))


def _read_log(path: str) -> list[dict[str, Any]] | None:
    """The SFT stage's log history (JSON), or None when its file is gone (a reused stage may lack it)."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def _finished(result_file: Path) -> dict[str, Any] | None:
    """The result a finished stage left in ``result_file``, or None when the stage has to run."""
    if not result_file.is_file():
        return None
    logger.info("--resume: reusing the finished stage in %s", result_file.parent)
    return json.loads(result_file.read_text())


def training_signals(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The signs of a bad GRPO run, from its log history: the training-reward and val-success series,
    and the mean zero-advantage-group, truncation and turn-budget-exhaustion fractions."""
    def series(key: str) -> list[float]:
        return [float(h[key]) for h in log_history if key in h]

    def mean(key: str) -> float | None:
        values = series(key)
        return sum(values) / len(values) if values else None

    return {"reward": series("rollout/reward/mean"), "success": series("rollout/success"),
            "val_success": series("val/success"), "zero_adv_groups_mean": mean("analysis/zero_adv_groups"),
            "truncated_frac_mean": mean("rollout/truncated_frac"), "max_turns_frac_mean": mean("rollout/max_turns_frac"),
            "turns_mean": mean("rollout/turns/mean")}


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _log_to(path: Path) -> logging.Handler:
    """Copy turnwise's log records (the CLI's level) into ``path`` for the run."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("pipeline", "rewards"):
        logging.getLogger(name).addHandler(handler)
    return handler

