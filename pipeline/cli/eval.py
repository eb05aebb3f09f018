"""``turnwise eval``: strict external evaluation of a model, a scripted policy or logged trajectories.

Options: :class:`PolicyArguments` (what is evaluated, against what), `pipeline.config.EvalArguments` (the
split, episodes and budgets; a pipeline recipe's ``eval:`` section reads the same dataclass),
`pipeline.cli.options.TaskSetArguments`, `pipeline.cli.options.EpisodeArguments` and
`pipeline.cli.options.ThreadArguments`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pipeline.cli.options import EpisodeArguments, TaskSetArguments, ThreadArguments

HELP = "evaluate a model, a scripted policy or logged trajectories on a task split"
DESCRIPTION = (
    "Run n episodes per task and report strict success, pass@k, pass^k, completion, truncation and more. Uses the "
    "environment's goal check only, never the training reward. With --base, both run on the same tasks and seeds and "
    "the paired difference in success is reported with a paired-bootstrap 95% interval. A policy spec (for --base "
    "and --reference) is a model (alias, directory or hub id), 'oracle', MODULE:FUNCTION (a factory task -> policy) "
    "or a logged FILE.jsonl.")
EPILOG = """examples:
  turnwise eval --policy oracle --split test --limit 20
  turnwise eval --model outputs/tuned --base smollm2-135m --reference oracle --out reports/tuned
  turnwise eval --model outputs/tuned --base smollm2-135m --reference oracle --out reports/tuned --resume
  turnwise eval --trajectories logs/rollouts.jsonl --base logs/baseline.jsonl --out reports/logged"""

#: Scripted policies ``--policy``, ``--base`` and ``--reference`` know by name (a factory task -> policy
#: can also be named as ``MODULE:FUNCTION``, if it is declared with ``pipeline.plugins.declare_policy_factory``).
SCRIPTED_POLICIES = ("oracle",)

#: The directory under ``--out`` where each policy's finished episodes are saved until the report is written.
IN_PROGRESS = "in_progress"


@dataclass
class PolicyArguments:
    """What is evaluated (one of --model, --policy, --trajectories), what it is compared with, where the report goes."""

    one_of: ClassVar[tuple[str, ...]] = ("model", "policy", "trajectories")
    one_required: ClassVar[bool] = True

    model: str | None = field(default=None, metadata={"help": "The model to evaluate: alias, local directory or hub id."})
    policy: str | None = field(default=None, metadata={
        "help": "A scripted policy instead of a model: 'oracle' or MODULE:FUNCTION (a factory declared with "
                "@pipeline.plugins.declare_policy_factory)."})
    trajectories: str | None = field(default=None, metadata={
        "help": "Evaluate logged trajectories (FILE.jsonl) from their recorded outcomes; no model is run."})
    base: str | None = field(default=None, metadata={
        "help": "Side by side: compare against this policy spec on the same tasks and seeds."})
    reference: list[str] = field(default_factory=list, metadata={
        "help": "Reference policy specs shown in the same table, e.g. oracle (repeatable).", "action": "extend"})
    seed: int = field(default=0, metadata={"help": "First environment seed; also seeds the bootstrap."})
    out: Path | None = field(default=None, metadata={
        "help": "Write report.json, report.md, report.html, plots/ and trajectories/ into this directory. Finished "
                "episodes are saved in its in_progress/ as they end, until the report is written."})
    resume: bool = field(default=False, metadata={
        "help": "Continue a killed evaluation into the same --out: the episodes its in_progress/ holds are not "
                "played again. Give the options of the run being resumed."})

    def __post_init__(self) -> None:
        if self.resume and self.out is None:
            raise ValueError("--resume continues an evaluation from the episodes it saved in --out; give that --out.")
        if self.policy and self.policy not in SCRIPTED_POLICIES and ":" not in self.policy:
            raise ValueError(f"unknown scripted policy {self.policy!r}: use {', '.join(SCRIPTED_POLICIES)} or "
                             "MODULE:FUNCTION (a factory task -> policy); for a model, use --model.")


def register(subparsers) -> None:
    subparsers.add_parser("eval", add_help=False, help=HELP).set_defaults(run=run)


def parse(options: list[str]) -> tuple[PolicyArguments, "EvalArguments", TaskSetArguments, EpisodeArguments,
                                       ThreadArguments]:
    from pipeline.config import EvalArguments, parse_options

    return parse_options((PolicyArguments, EvalArguments, TaskSetArguments, EpisodeArguments, ThreadArguments), options,
                         prog="turnwise eval", description=DESCRIPTION, epilog=EPILOG, aliases={"--tasks": "split"})


def run(args: argparse.Namespace) -> int:
    from pipeline.cli.options import writable_dir
    from pipeline.cli.options import trusted

    who, how, task_set, episodes, threads = parse(args.options)
    threads.apply()
    for spec in (who.policy, who.base, *who.reference):  # checked before any task loads or any policy runs
        if spec and ":" in spec and not (spec.endswith(".jsonl") or Path(spec).is_file()):
            scripted_policy(spec)
    if who.out is not None:  # a full disk or a read-only path fails now, not after the evaluation
        writable_dir(who.out, "--out")
    with trusted(task_set):
        return evaluate(who, how, task_set, episodes)


def evaluate(who: PolicyArguments, how, task_set: TaskSetArguments, episodes: EpisodeArguments) -> int:
    from pipeline.evaluation import compare
    from pipeline.report import MissingReportDependency, render_text, rewards_from_metadata, write_report
    from pipeline.trajectory import load_jsonl

    logged = load_jsonl(who.trajectories) if who.trajectories else None
    tasks, ids = _eval_tasks(how, task_set, who.trajectories, logged)
    specs = [("candidate", who.model or who.policy or who.trajectories)]
    specs += [("base", who.base)] if who.base else []
    specs += [("reference", spec) for spec in who.reference]
    reports, labels = [], set()
    for role, spec in specs:
        journal = who.out / IN_PROGRESS / f"{len(reports) + 1}-{role}.jsonl" if who.out else None
        report = _evaluate_spec(spec, tasks, ids, who, how, task_set, episodes, journal)
        # The same spec twice (say, as base and as reference) still needs its own column and files.
        label = spec if spec not in labels else f"{spec} ({role} {len(reports) + 1})"
        labels.add(label)
        report.config.update(policy=label, role=role)
        reports.append(report)
    comparison = compare(reports[0], reports[1], n_boot=how.bootstrap, seed=who.seed) if who.base else None

    first = reports[0].metrics
    print(f"{len(reports)} {'policies' if len(reports) > 1 else 'policy'} on {first['n_tasks']} "
          f"{'logged' if logged is not None else how.split} tasks x {first['n']} episodes (k={how.k}, seed {who.seed}):")
    print(render_text(reports, comparison))
    if who.out:
        rewards = {r.label: v for r in reports if (v := rewards_from_metadata(r.trajectories)) is not None}
        missing = None
        try:
            paths = write_report(who.out, reports, comparison, rewards, html_page=how.html)
        except MissingReportDependency as error:
            missing = error
            paths = write_report(who.out, reports, comparison, html_page=False)
        shutil.rmtree(who.out / IN_PROGRESS, ignore_errors=True)  # the report's trajectories/ hold every episode
        if missing is not None:
            print(f"report: {paths['markdown']} (JSON and Markdown only)")
            print(f"turnwise: error: {missing}", file=sys.stderr)
            return 1
        print(f"report: {paths.get('html', paths['markdown'])}")
    return 0


def _eval_tasks(how, task_set: TaskSetArguments, source: str | None, logged: list | None) -> tuple[list, list[str]]:
    """The tasks live policies run on, and the task ids every policy is evaluated on, in order.

    Live runs take the split's first ``--limit`` tasks. Logged runs take the first ``--limit`` task ids of
    the file, matched by id against every split of the task set (for intents, and so that a live base can
    replay them); ids not in the task set are kept for the logged policy alone.
    """
    from pipeline.envs import load_tasks

    if logged is None:
        tasks = load_tasks(task_set.env, how.split)[: how.limit]
        return tasks, [t.id for t in tasks]
    if not logged:
        raise ValueError(f"{source} holds no trajectories.")
    ids = list(dict.fromkeys(t.task_id for t in logged))[: how.limit]
    by_id = {t.id: t for t in load_tasks(task_set.env)}
    return [by_id[i] for i in ids if i in by_id], ids


def _evaluate_spec(spec: str, tasks: list, ids: list[str], who: PolicyArguments, how, task_set: TaskSetArguments,
                   episodes: EpisodeArguments, journal: Path | None = None):
    """Evaluate one policy spec: a logged FILE.jsonl, a scripted policy, or a model (played episodes are saved in
    ``journal`` as they end)."""
    from pipeline.evaluation import evaluate, evaluate_trajectories
    from pipeline.trajectory import load_jsonl

    if spec.endswith(".jsonl") or Path(spec).is_file():
        wanted = set(ids)
        logged = [t for t in load_jsonl(spec) if t.task_id in wanted]
        if not logged:
            raise ValueError(f"{spec} has no trajectory for the {len(ids)} tasks being evaluated.")
        return evaluate_trajectories(logged, tasks, k=how.k, label=spec)
    if not tasks:
        raise ValueError(f"no task to run {spec} on: none of the logged task ids is in the {task_set.env} task set.")
    policy = scripted_policy(spec) if spec in SCRIPTED_POLICIES or ":" in spec else spec
    return evaluate(policy, tasks, k=how.k, seed=who.seed, n=how.n, max_turns=how.max_turns,
                    max_new_tokens=how.max_new_tokens, max_total_tokens=how.max_total_tokens,
                    batch_size=how.batch_size, label=spec, customer=episodes.customer,
                    tool_calling=episodes.tool_calling, journal=journal, resume=who.resume)


def scripted_policy(spec: str) -> Callable:
    """``oracle``, or ``MODULE:FUNCTION`` naming a factory ``task -> (messages -> str)`` that its module declares
    with ``@pipeline.plugins.declare_policy_factory`` (so that ``--policy os:system`` runs nothing)."""
    from pipeline.plugins import POLICY_FACTORY, NotDeclaredError, load_declared

    if spec == "oracle":
        from pipeline.envs import oracle_policy

        return oracle_policy
    try:
        return load_declared(spec, POLICY_FACTORY)
    except NotDeclaredError as exc:
        raise ValueError(f"cannot load the scripted policy: {exc}") from None
