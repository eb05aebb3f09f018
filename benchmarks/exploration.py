"""How often a policy's sampled rollouts take the actions a task needs: the exploration GRPO learns from.

GRPO reinforces what some rollout of a group did better than the others, so an action no rollout takes cannot
be learned, however many steps run. This script samples rollouts as training does (``--temperature``, not
evaluation's greedy decoding), ``--samples`` per task on ``--per_intent`` tasks of each intent, and reports per
intent and temperature:

- ``success``: the share of rollouts that succeeded (the strict check of ``turnwise eval``);
- ``mixed_groups``: the share of tasks whose rollouts did not all end alike (some succeeded, some did not): the
  groups where a success reward gives a non-zero advantage;
- ``tools``: for each tool the oracle calls on that intent's tasks, the share of rollouts that tried it (the call
  ran, or came back as an error naming it), beside the oracle's own share;
- ``turn_budget``: the share of rollouts that ran out of turns;
- ``per_task``: each task's successes and how many of its rollouts tried each of those tools.

``--greedy`` adds one greedy episode per task (how ``turnwise eval`` plays) as the reference, and
``--exclude_sft_demos N`` leaves out the train tasks an SFT run on N oracle demonstrations was shown solved
(``pipeline.sft.demonstration_plan``), so that a success is not a recalled demonstration. Nothing here is timed.
Example (the all-intent result's episode-level adapter, on train tasks its SFT never saw)::

    python benchmarks/exploration.py --model benchmarks/results/adapters/sft_grpo_episode_all_intents \\
        --intents escalation refund_denied address_change --per_intent 6 --samples 4 \\
        --temperature 0.8 1.2 --greedy --exclude_sft_demos 128 --name exploration_all_intents
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import Counter, defaultdict
from typing import Any, Collection, Sequence

from common import add_threads_option, machine, set_threads, write_result

from pipeline.envs import load_tasks, oracle_policy
from pipeline.envs.base import Task
from pipeline.envs.tasks import intent_label
from pipeline.evaluation import EvalReport, evaluate
from pipeline.sft import demonstration_plan


def pick_tasks(tasks: Sequence[Task], intents: Sequence[str], per_intent: int,
               leave_out: Collection[str] = ()) -> list[Task]:
    """The first ``per_intent`` tasks of each intent label in ``intents``, in the task set's order, leaving out
    the task ids in ``leave_out``."""
    by_label: dict[str, list[Task]] = defaultdict(list)
    for task in tasks:
        if task.id not in leave_out:
            by_label[intent_label(task.intents)].append(task)
    missing = [label for label in intents if not by_label.get(label)]
    if missing:
        raise SystemExit(f"--intents: no task with intent label {', '.join(missing)}; the task set has "
                         f"{', '.join(sorted(by_label))}.")
    return [task for label in intents for task in by_label[label][:per_intent]]


def tried(episode: dict[str, Any]) -> set[str]:
    """The tools an episode tried: the calls that ran and those that came back as errors naming a tool."""
    return set(episode["tool_calls"]) | set(episode.get("failed_calls", {}))


def summarize_exploration(report: EvalReport, oracle: EvalReport) -> dict[str, dict[str, Any]]:
    """Per intent label: success, mixed groups, the turn-budget share, and how often each oracle tool was tried.

    Success, the turn-budget share and each task's successes come from the report's own metrics (``by_intent``,
    ``per_task``); only which tools each rollout tried is counted here."""
    oracle_used: dict[str, Counter] = defaultdict(Counter)  # per label: oracle episodes that called each tool
    for e in oracle.episodes:
        oracle_used[intent_label(e["intents"])].update(set(e["tool_calls"]))
    tried_in: dict[str, Counter] = defaultdict(Counter)  # per task: rollouts that tried each tool
    for e in report.episodes:
        tried_in[e["task_id"]].update(tried(e))
    out = {}
    for label, own in report.metrics["by_intent"].items():
        needed = sorted(oracle.metrics["by_intent"][label]["tool_calls"])
        tasks = [t for t in report.per_task if intent_label(t["intents"]) == label]
        oracle_n = oracle.metrics["by_intent"][label]["n"]
        out[label] = {
            "rollouts": own["n"], "tasks": len(tasks), "success": own["success"],
            "mixed_groups": sum(0 < t["successes"] < t["n"] for t in tasks) / len(tasks),
            "turn_budget": own["max_turns_rate"],
            "tools": {tool: {"tried": sum(tried_in[t["task_id"]][tool] for t in tasks) / own["n"],
                             "oracle": oracle_used[label][tool] / oracle_n} for tool in needed},
            "per_task": {t["task_id"]: {"successes": t["successes"], "rollouts": t["n"],
                                        "tried": {tool: tried_in[t["task_id"]][tool] for tool in needed}}
                         for t in tasks},
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model name, directory or adapter directory")
    parser.add_argument("--env", default="customer_service", help="the task set (default: customer_service)")
    parser.add_argument("--split", default="train", help="the split to sample on (default: train, as GRPO does)")
    parser.add_argument("--intents", nargs="+", required=True, help="intent labels (multi for two-request tasks)")
    parser.add_argument("--per_intent", type=int, default=6, help="tasks per intent label")
    parser.add_argument("--samples", type=int, default=4, help="rollouts per task (GRPO's num_generations)")
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.8], help="sampling temperatures")
    parser.add_argument("--greedy", action="store_true", help="also one greedy episode per task, for reference")
    parser.add_argument("--exclude_sft_demos", type=int, default=0, metavar="N",
                        help="leave out the train tasks of an SFT run's N oracle demonstrations (`turnwise sft "
                             "--num_demos N`), so that no sampled task is one the policy was shown solved")
    parser.add_argument("--demo_seed", type=int, default=0, help="that SFT run's --demo_seed")
    parser.add_argument("--max_turns", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="exploration", help="the result's name under benchmarks/results/")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    if args.per_intent < 1 or args.samples < 2 or any(t <= 0 for t in args.temperature):
        parser.error("--per_intent must be at least 1, --samples at least 2 (a group), and each --temperature "
                     "above 0 (greedy decoding does not explore).")
    set_threads(args.threads)
    shown = {task.id for task, _ in demonstration_plan(load_tasks(args.env, "train"), args.exclude_sft_demos,
                                                        args.demo_seed)} if args.exclude_sft_demos else set()
    tasks = pick_tasks(load_tasks(args.env, args.split), args.intents, args.per_intent, leave_out=shown)

    from pipeline.models import load_model
    from pipeline.rollout import RolloutEngine
    from pipeline.rollout.backends import build_backend

    oracle = evaluate(oracle_policy, tasks, max_turns=args.max_turns, label="oracle")
    model, tokenizer = load_model(args.model)
    runs = {}
    settings = ([("greedy", 0.0, 1)] if args.greedy else []) + [(str(t), t, args.samples) for t in args.temperature]
    for name, temperature, samples in settings:
        engine = RolloutEngine(build_backend("hf", model, tokenizer, temperature=temperature, seed=args.seed),
                               tokenizer, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        start = time.time()
        report = evaluate(engine, tasks, n=samples, seed=args.seed, max_turns=args.max_turns,
                          max_new_tokens=args.max_new_tokens, label=name)
        runs[name] = {"by_intent": summarize_exploration(report, oracle), "wall_time_s": round(time.time() - start, 1)}
        print(f"{name}: " + "; ".join(
            f"{label} success {row['success']:.2f}, mixed groups {row['mixed_groups']:.2f}, tried "
            + ", ".join(f"{tool} {t['tried']:.2f}" for tool, t in row["tools"].items())
            for label, row in runs[name]["by_intent"].items()), flush=True)
    result = {"model": args.model, "env": args.env, "split": args.split, "intents": args.intents,
              "left_out_sft_demo_tasks": len(shown),
              "tasks": [t.id for t in tasks], "samples": args.samples, "max_turns": args.max_turns,
              "max_new_tokens": args.max_new_tokens, "seed": args.seed, "runs": runs,
              "command": "python benchmarks/exploration.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "machine": machine()}
    path = write_result(args.name, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
