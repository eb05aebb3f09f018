"""The reward audit: the checklist to pass on baseline rollouts before training on a reward.

A reward is validated on real outputs of the policy it will train, before training, because a reward
bug found after a run costs the run. The rollouts come from a model, a scripted policy (the oracle, a
:class:`~rewards.hacks.NoisyOracle` stand-in for an untrained model, a hacking policy) or a logged
trajectory file. The checks:

``in_range``
    every total, per-turn and component value is finite, and the total stays in the declared range
    without leaning on the clip (at most ``max_clipped_frac`` of rollouts clipped).
``scorer_errors``
    no scorer failed (a failure leaves a component out of the total; see :mod:`rewards.composite`).
``variance``
    rollouts of the same task get different rewards: groups with zero variance give GRPO no signal.
    Fails when more than ``max_zero_variance_frac`` of the groups have none (needs ``k >= 2``).
``disagreements``
    no rollout scores at or above ``high_reward`` while failing the strict check; each one is listed
    with the components that paid for it. This is the signature of reward hacking.
``leniency``
    the reward never credits an output format the strict evaluation rejects. Probes replay the oracle
    with its tool calls rewritten into near-miss formats the environment rejects (code fences, bare
    JSON, single quotes, an unclosed tag, function-call syntax). On every rejected turn, of the probes
    and of the rollouts, no component may contribute positively, and every probe must score below the
    oracle on the same task.
``hack_resistance`` (optional)
    each scripted hacking policy of :mod:`rewards.hacks` gets a lower mean reward than the oracle and no
    strict success.

Component statistics (mean, spread, how often non-zero or not applicable, correlation with strict
success) are reported for every scorer. :func:`audit` returns an :class:`AuditReport`; ``turnwise
audit`` prints it, writes ``audit.md`` and ``audit.json``, and exits non-zero when a check fails.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from pipeline.budgets import MAX_NEW_TOKENS, MAX_TOTAL_TOKENS, MAX_TURNS
from pipeline.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_tool_calls, ToolCall
from pipeline.trajectory import atomic_write_text
from rewards.base import TURN, RewardBreakdown, mean
from rewards.evidence import FORMAT_ERRORS, near_miss_call, tool_names, view_turn

if TYPE_CHECKING:
    from pipeline.envs.base import Task
    from pipeline.trajectory import Trajectory
    from rewards.composite import RewardFunction

logger = logging.getLogger(__name__)

PROBE_VARIANTS = ("code_fence", "bare_json", "single_quotes", "unclosed_tag", "function_syntax")


@dataclass
class AuditConfig:
    """Thresholds of the audit's checks."""

    high_reward: float = field(default=0.5, metadata={"help": "a failed rollout at or above this is a disagreement"})
    max_zero_variance_frac: float = field(default=0.5, metadata={"help": "most task groups allowed zero variance"})
    max_clipped_frac: float = field(default=0.01, metadata={"help": "most rollouts whose total may be clipped"})
    leniency_tasks: int = field(default=10, metadata={"help": "tasks to build format probes for (0: no probes)"})
    hacks: bool = field(default=False, metadata={"help": "run the hack-resistance check (needs tasks)"})
    hack_tasks: int = field(default=50, metadata={"help": "tasks per hacking policy in the hack-resistance check"})
    max_listed: int = field(default=20, metadata={"help": "most offending rollouts listed per check"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_zero_variance_frac <= 1.0:
            raise ValueError(f"max_zero_variance_frac is a fraction in [0, 1], got {self.max_zero_variance_frac}.")
        if not 0.0 <= self.max_clipped_frac <= 1.0:
            raise ValueError(f"max_clipped_frac is a fraction in [0, 1], got {self.max_clipped_frac}.")
        if self.leniency_tasks < 0 or self.hack_tasks < 1:
            raise ValueError("leniency_tasks must be >= 0 and hack_tasks >= 1.")
        if not math.isfinite(self.high_reward):
            raise ValueError(f"high_reward must be finite, got {self.high_reward}.")


@dataclass
class CheckResult:
    """One check: ``passed`` is ``None`` when it could not run (the summary says why)."""

    name: str
    passed: bool | None
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]


@dataclass
class AuditReport:
    reward: str
    source: str
    n_rollouts: int
    success_rate: float | None
    checks: list[CheckResult]
    components: list[dict[str, Any]]
    hacking_table: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if c.passed is False]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        out["failed_checks"] = self.failed_checks
        return out

    def to_text(self) -> str:
        success = "unknown" if self.success_rate is None else f"{self.success_rate:.3f}"
        lines = [f"Reward audit: {self.reward}", f"Rollouts: {self.n_rollouts} from {self.source}; strict success {success}",
                 "", "Checks:"]
        for c in self.checks:
            lines.append(f"  [{c.status}] {c.name}: {c.summary}")
            for item in c.details.get("listed", []):
                lines.append(f"      - {item}")
        lines += ["", "Components (per-episode value; turn scorers averaged over turns):",
                  f"  {'name':<20} {'level':<7} {'weight':>6} {'mean':>7} {'std':>6} {'min':>6} {'max':>6} "
                  f"{'nonzero':>7} {'n/a':>4} {'failed':>6} {'corr(success)':>13}"]
        for s in self.components:
            corr = "-" if s["corr_success"] is None else f"{s['corr_success']:+.2f}"
            if s["n"]:
                lines.append(f"  {s['name']:<20} {s['level']:<7} {s['weight']:>6.2f} {s['mean']:>+7.3f} {s['std']:>6.3f} "
                             f"{s['min']:>+6.2f} {s['max']:>+6.2f} {s['nonzero']:>7.2f} {s['not_applicable']:>4d} "
                             f"{s['failed']:>6d} {corr:>13}")
            else:
                lines.append(f"  {s['name']:<20} {s['level']:<7} {s['weight']:>6.2f} {'(never applied)':>30} "
                             f"{s['not_applicable']:>9d} {s['failed']:>6d}")
        if self.hacking_table:
            lines += ["", render_hacking_table(self.hacking_table)]
        lines += ["", "RESULT: " + ("PASS" if self.passed else "FAIL (" + ", ".join(self.failed_checks) + ")")]
        return "\n".join(lines)

    def save(self, out_dir: Path | str) -> dict[str, Path]:
        out_dir = Path(out_dir)
        paths = {"json": out_dir / "audit.json", "markdown": out_dir / "audit.md"}
        atomic_write_text(paths["json"], json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        text = self.to_text()
        # One code block whatever the text holds: a fence longer than any run of backticks in it (a logged
        # file's name or a task id could otherwise close the block and have a viewer render what follows).
        fence = "`" * max(3, 1 + max(map(len, re.findall(r"`+", text)), default=0))
        atomic_write_text(paths["markdown"], f"{fence}\n{text}\n{fence}\n")
        return paths


# ---------------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------------


def scripted_rollouts(policy: str | Callable[["Task", int], Callable[[list[dict]], str]], tasks: Sequence["Task"],
                      k: int = 1, seed: int = 0, max_turns: int = MAX_TURNS,
                      customer: str | None = None) -> list["Trajectory"]:
    """``k`` episodes per task (seeds ``seed .. seed+k-1``) of a scripted policy: a name
    (:func:`rewards.hacks.scripted_policies`) or a factory ``(task, seed) -> policy``. ``customer`` names the
    simulated customer (``llm:BACKEND``; default: the domain's scripted one)."""
    from pipeline.envs import make_env
    from pipeline.rollout import run_policy
    from rewards.hacks import policy_factory

    domain = tasks[0].domain if tasks else None
    factory = policy_factory(policy, domain) if isinstance(policy, str) else policy
    label = policy if isinstance(policy, str) else getattr(policy, "__name__", "scripted")
    out = []
    for task in tasks:
        for s in range(seed, seed + k):
            env = make_env(task, max_turns=max_turns, customer=customer)
            trajectory = run_policy(env, task, factory(task, s), seed=s)
            trajectory.metadata["policy"] = label
            out.append(trajectory)
    return out


def model_rollouts(model: str, tasks: Sequence["Task"], k: int = 2, seed: int = 0, temperature: float = 1.0,
                   max_turns: int = MAX_TURNS, max_new_tokens: int = MAX_NEW_TOKENS,
                   max_total_tokens: int = MAX_TOTAL_TOKENS, batch_size: int = 16, customer: str | None = None,
                   tool_calling: str = "auto") -> list["Trajectory"]:
    """``k`` sampled episodes per task from a model (a name, path or hub id), as training would see them
    (``customer`` and ``tool_calling`` as in :func:`pipeline.evaluation.evaluate`)."""
    from pipeline.envs import make_env
    from pipeline.models import load_model
    from pipeline.rollout import RolloutEngine
    from pipeline.rollout.backends.hf import HFBackend

    loaded, tokenizer = load_model(model)
    engine = RolloutEngine(HFBackend(loaded, tokenizer, temperature=temperature, seed=seed), tokenizer,
                           max_new_tokens=max_new_tokens, max_total_tokens=max_total_tokens, batch_size=batch_size,
                           tool_calling=tool_calling)
    episodes = [(task, s) for task in tasks for s in range(seed, seed + k)]
    trajectories = engine.run(lambda t: make_env(t, max_turns=max_turns, customer=customer), [t for t, _ in episodes],
                              [s for _, s in episodes])
    for trajectory in trajectories:
        trajectory.metadata.update(policy=model, temperature=temperature)
    return trajectories


def mangle_tool_calls(text: str, variant: str) -> str:
    """Rewrite every ``<tool_call>`` block into a near-miss format the strict parser rejects.

    >>> call = '<tool_call>{"name": "get_order", "arguments": {"order_id": "W1"}}</tool_call>'
    >>> mangle_tool_calls(call, "unclosed_tag")
    '<tool_call>{"name": "get_order", "arguments": {"order_id": "W1"}}'
    >>> mangle_tool_calls(call, "function_syntax")
    "get_order(order_id='W1')"
    """
    calls = [c for c in parse_tool_calls(text) if isinstance(c, ToolCall)]
    if not calls:
        return text
    out = []
    for c in calls:
        body = json.dumps({"name": c.name, "arguments": c.arguments})
        if variant == "code_fence":
            out.append(f"```json\n{body}\n```")
        elif variant == "bare_json":
            out.append(body)
        elif variant == "single_quotes":
            out.append(TOOL_CALL_OPEN + repr({"name": c.name, "arguments": c.arguments}) + TOOL_CALL_CLOSE)
        elif variant == "unclosed_tag":
            out.append(TOOL_CALL_OPEN + body)
        elif variant == "function_syntax":
            out.append(f"{c.name}(" + ", ".join(f"{k}={v!r}" for k, v in c.arguments.items()) + ")")
        else:
            raise ValueError(f"unknown probe variant {variant!r}; use one of {PROBE_VARIANTS}.")
    return "\n".join(out)


class FormatProbe:
    """The oracle with its tool calls rewritten by :func:`mangle_tool_calls` (a picklable policy)."""

    def __init__(self, task: "Task", variant: str) -> None:
        from pipeline.envs import oracle_policy

        self.oracle, self.variant = oracle_policy(task), variant

    def __call__(self, messages: list[dict]) -> str:
        return mangle_tool_calls(self.oracle(messages), self.variant)


def leniency_probes(tasks: Sequence["Task"], variants: Sequence[str] = PROBE_VARIANTS,
                    max_turns: int = MAX_TURNS) -> list["Trajectory"]:
    """One probe episode per task and variant; ``metadata["probe"]`` names the variant."""
    from pipeline.envs import make_env
    from pipeline.rollout import run_policy

    out = []
    for task in tasks:
        for variant in variants:
            trajectory = run_policy(make_env(task, max_turns=max_turns), task, FormatProbe(task, variant))
            trajectory.metadata.update(probe=variant, policy=f"probe:{variant}")
            out.append(trajectory)
    return out


def rejected_turns(trajectory: "Trajectory") -> list[int]:
    """Indices of turns whose tool-call attempt the strict protocol rejected (or never saw)."""
    out = []
    for turn in trajectory.turns:
        view = view_turn(turn)
        if any(k in FORMAT_ERRORS for k in view.error_kinds) or near_miss_call(view.text, tool_names(trajectory)):
            out.append(turn.index)
    return out


# ---------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------


def _known(t: "Trajectory") -> bool:
    return t.metadata.get("outcome_known", True) is not False


def _label(t: "Trajectory") -> str:
    return f"{t.task_id} seed {t.seed}" + (f" ({t.metadata['policy']})" if t.metadata.get("policy") else "")


def _episode_value(value: Any) -> float:
    return mean(value) if isinstance(value, list) else float(value)


def _top_components(reward: "RewardFunction", b: RewardBreakdown, n: int = 3) -> str:
    contributions = {name: reward.weight(name) * _episode_value(v) for name, v in b.components.items()}
    top = sorted(contributions.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k} {v:+.2f}" for k, v in top if v > 0) or "none positive"


def check_range(reward: "RewardFunction", breakdowns: Sequence[RewardBreakdown], config: AuditConfig) -> CheckResult:
    low, high = reward.config.range
    bad = []
    for i, b in enumerate(breakdowns):
        values = [b.total, b.terminal, *b.per_turn]
        for v in b.components.values():
            values += v if isinstance(v, list) else [v]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in values) or not low <= b.total <= high:
            bad.append(i)
    clipped = sum(b.clipped for b in breakdowns)
    frac = clipped / max(1, len(breakdowns))
    passed = not bad and frac <= config.max_clipped_frac
    return CheckResult("in_range", passed,
                       f"{len(breakdowns) - len(bad)}/{len(breakdowns)} totals finite and in [{low:g}, {high:g}]; "
                       f"{clipped} clipped ({frac:.1%}, limit {config.max_clipped_frac:.0%})",
                       {"out_of_range": bad, "clipped": clipped, "clipped_frac": frac})


def check_errors(reward: "RewardFunction", breakdowns: Sequence[RewardBreakdown]) -> CheckResult:
    failures: dict[str, int] = {}
    examples: dict[str, str] = {}
    for b in breakdowns:
        for name, error in b.failed.items():
            failures[name] = failures.get(name, 0) + 1
            examples.setdefault(name, error)
    listed = [f"{name}: {count} failure(s), e.g. {examples[name]}" for name, count in failures.items()]
    return CheckResult("scorer_errors", not failures,
                       f"{sum(failures.values())} scorer failures in {len(breakdowns)} rollouts",
                       {"failures": failures, "listed": listed})


def check_variance(trajectories: Sequence["Trajectory"], breakdowns: Sequence[RewardBreakdown],
                   config: AuditConfig, eps: float = 1e-9) -> CheckResult:
    groups: dict[str, list[float]] = {}
    for t, b in zip(trajectories, breakdowns):
        groups.setdefault(t.task_id, []).append(b.total)
    multi = {k: v for k, v in groups.items() if len(v) >= 2}
    if not multi:
        return CheckResult("variance", None, "needs at least 2 rollouts per task (use --k 2 or more)")
    zero = sorted(k for k, v in multi.items() if max(v) - min(v) <= eps)
    frac = len(zero) / len(multi)
    return CheckResult("variance", frac <= config.max_zero_variance_frac,
                       f"{len(zero)}/{len(multi)} task groups ({frac:.0%}) have zero reward variance "
                       f"(limit {config.max_zero_variance_frac:.0%}); mean within-group std "
                       f"{mean([statistics.pstdev(v) for v in multi.values()]):.3f}",
                       {"zero_variance_groups": zero, "zero_variance_frac": frac, "groups": len(multi)})


def check_disagreements(reward: "RewardFunction", trajectories: Sequence["Trajectory"],
                        breakdowns: Sequence[RewardBreakdown], config: AuditConfig) -> CheckResult:
    known = [(t, b) for t, b in zip(trajectories, breakdowns) if _known(t)]
    if not known:
        return CheckResult("disagreements", None, "no rollout has a known strict outcome")
    bad = [(t, b) for t, b in known if b.total >= config.high_reward and not t.outcome.success]
    bad.sort(key=lambda tb: -tb[1].total)
    listed = [f"{_label(t)}: reward {b.total:+.3f}, strict failure ({t.outcome.stop_reason}); paid by "
              f"{_top_components(reward, b)}" for t, b in bad[: config.max_listed]]
    low = [(t, b) for t, b in known if t.outcome.success and b.total < 0]
    return CheckResult("disagreements", not bad,
                       f"{len(bad)} rollouts score >= {config.high_reward:g} but fail the strict check; "
                       f"{len(low)} succeed with a negative reward",
                       {"high_reward_failures": [{"task_id": t.task_id, "seed": t.seed, "total": b.total}
                                                 for t, b in bad],
                        "negative_reward_successes": [{"task_id": t.task_id, "seed": t.seed, "total": b.total}
                                                      for t, b in low],
                        "listed": listed})


def check_leniency(reward: "RewardFunction", trajectories: Sequence["Trajectory"],
                   breakdowns: Sequence[RewardBreakdown], probes: Sequence["Trajectory"],
                   probe_breakdowns: Sequence[RewardBreakdown], oracle_totals: Mapping[str, float]) -> CheckResult:
    offenders: list[str] = []
    n_rejected = 0
    for t, b in [*zip(probes, probe_breakdowns), *zip(trajectories, breakdowns)]:
        for i in rejected_turns(t):
            n_rejected += 1
            paying = [f"{name} {reward.weight(name) * v[i]:+.3f}" for name, v in b.components.items()
                      if reward.level(name) == TURN and reward.weight(name) * v[i] > 1e-12]
            if paying:
                offenders.append(f"{_label(t)} turn {i}: rejected format credited by " + ", ".join(paying))
    not_below = []
    for t, b in zip(probes, probe_breakdowns):
        oracle = oracle_totals.get(t.task_id)
        if oracle is not None and b.total >= oracle:
            not_below.append(f"{_label(t)}: probe {b.total:+.3f} >= oracle {oracle:+.3f}")
    n_probes = len(probes)
    if not n_rejected and not n_probes:
        return CheckResult("leniency", None, "no rejected-format turns and no probes (pass tasks to build probes)")
    passed = not offenders and not not_below
    return CheckResult("leniency", passed,
                       f"{len(offenders)} of {n_rejected} rejected-format turns credited; "
                       f"{len(not_below)} of {n_probes} format probes score at or above the oracle",
                       {"credited_turns": offenders, "probes_not_below_oracle": not_below,
                        "listed": (offenders + not_below)[:20]})


def hacking_table(reward: "RewardFunction", tasks: Sequence["Task"], seed: int = 0,
                  max_turns: int = MAX_TURNS) -> list[dict[str, Any]]:
    """Mean total and strict successes of the oracle and every hacking policy over ``tasks``."""
    from rewards.hacks import hacks_for

    names = dict.fromkeys(name for task in tasks for name in hacks_for(task))
    rows = []
    for name in ("oracle", *names):
        trajectories = scripted_rollouts(name, tasks, k=1, seed=seed, max_turns=max_turns)
        totals = [reward(t).total for t in trajectories]
        rows.append({"policy": name, "mean_total": mean(totals), "min_total": min(totals), "max_total": max(totals),
                     "strict_successes": sum(t.outcome.success for t in trajectories), "episodes": len(trajectories),
                     "mean_turns": mean([t.num_turns for t in trajectories])})
    return rows


def render_hacking_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"  {'policy':<20} {'mean total':>10} {'min':>7} {'max':>7} {'strict successes':>17} {'turns':>6}"]
    for r in rows:
        lines.append(f"  {r['policy']:<20} {r['mean_total']:>+10.3f} {r['min_total']:>+7.3f} {r['max_total']:>+7.3f} "
                     f"{r['strict_successes']:>10d}/{r['episodes']:<6d} {r['mean_turns']:>6.1f}")
    return "Hacking table:\n" + "\n".join(lines)


def check_hacks(rows: Sequence[Mapping[str, Any]]) -> CheckResult:
    oracle = next(r for r in rows if r["policy"] == "oracle")
    bad = [r for r in rows if r["policy"] != "oracle"
           and (r["mean_total"] >= oracle["mean_total"] or r["strict_successes"] > 0)]
    listed = [f"{r['policy']}: mean {r['mean_total']:+.3f} vs oracle {oracle['mean_total']:+.3f}, "
              f"{r['strict_successes']} strict successes" for r in bad]
    return CheckResult("hack_resistance", not bad,
                       f"{len(rows) - 1 - len(bad)}/{len(rows) - 1} hacking policies score below the oracle "
                       f"({oracle['mean_total']:+.3f}) with no strict success", {"listed": listed})


def component_stats(reward: "RewardFunction", trajectories: Sequence["Trajectory"],
                    breakdowns: Sequence[RewardBreakdown]) -> list[dict[str, Any]]:
    success = [float(t.outcome.success) if _known(t) else None for t in trajectories]
    stats = []
    for name in reward.names:
        pairs = [(_episode_value(b.components[name]), s) for b, s in zip(breakdowns, success) if name in b.components]
        values = [v for v, _ in pairs]
        row: dict[str, Any] = {
            "name": name, "level": reward.level(name), "weight": reward.weight(name), "n": len(values),
            "not_applicable": sum(name in b.not_applicable for b in breakdowns),
            "failed": sum(name in b.failed for b in breakdowns),
            "mean": mean(values) if values else None, "std": statistics.pstdev(values) if values else None,
            "min": min(values) if values else None, "max": max(values) if values else None,
            "nonzero": (sum(abs(v) > 1e-12 for v in values) / len(values)) if values else None,
            "corr_success": _corr([(v, s) for v, s in pairs if s is not None]),
        }
        stats.append(row)
    return stats


def _corr(pairs: Sequence[tuple[float, float]]) -> float | None:
    if len(pairs) < 2:
        return None
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    sx, sy = statistics.pstdev(xs), statistics.pstdev(ys)
    if sx < 1e-12 or sy < 1e-12:
        return None
    mx, my = mean(xs), mean(ys)
    return sum((x - mx) * (y - my) for x, y in pairs) / (len(pairs) * sx * sy)


def audit(reward: "RewardFunction", trajectories: Sequence["Trajectory"], tasks: Sequence["Task"] | None = None,
          config: AuditConfig | None = None, source: str = "rollouts") -> AuditReport:
    """Run the checklist (module docstring) on ``trajectories``; ``tasks`` enable probes and the hack table."""
    config = config or AuditConfig()
    trajectories = list(trajectories)
    if not trajectories:
        raise ValueError("no rollouts to audit; pass a policy, a model or a non-empty logged file.")
    breakdowns = reward.score_all(trajectories)
    known = [t for t in trajectories if _known(t)]
    success_rate = mean([float(t.outcome.success) for t in known]) if known else None
    checks = [check_range(reward, breakdowns, config), check_errors(reward, breakdowns),
              check_variance(trajectories, breakdowns, config),
              check_disagreements(reward, trajectories, breakdowns, config)]
    by_id = {t.id: t for t in tasks or []}
    probe_tasks = [by_id[i] for i in dict.fromkeys(t.task_id for t in trajectories) if i in by_id]
    probe_tasks = probe_tasks[: config.leniency_tasks]
    probes = leniency_probes(probe_tasks) if probe_tasks else []
    oracle_totals = {t.task_id: reward(t).total for t in scripted_rollouts("oracle", probe_tasks)} if probe_tasks else {}
    checks.append(check_leniency(reward, trajectories, breakdowns, probes, reward.score_all(probes), oracle_totals))
    rows: list[dict[str, Any]] = []
    if config.hacks:
        if tasks:
            rows = hacking_table(reward, list(tasks)[: config.hack_tasks])
            checks.append(check_hacks(rows))
        else:
            checks.append(CheckResult("hack_resistance", None, "needs tasks to play the hacking policies on"))
    report = AuditReport(reward=reward.config.name, source=source, n_rollouts=len(trajectories),
                         success_rate=success_rate, checks=checks,
                         components=component_stats(reward, trajectories, breakdowns), hacking_table=rows,
                         config={"audit": asdict(config), "reward": reward.config.to_dict()})
    logger.info("reward audit of %s on %d rollouts: %s", reward.config.name, len(trajectories),
                "pass" if report.passed else "FAIL " + ", ".join(report.failed_checks))
    return report
