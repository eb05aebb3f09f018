"""Weighted composition of scorers, declared in YAML, with per-component reporting and error isolation.

A reward config lists named scorers with weights and parameters::

    range: [-1.0, 1.0]          # the total is clipped to this
    turn_aggregation: mean      # how turn scores add up over an episode: mean (default) or sum
    scorers:
      - {name: success, scorer: strict_success, weight: 0.6}
      - {name: tool_format, scorer: tool_format, weight: 0.1}
      - {name: politeness, scorer: politeness, weight: 0.0}   # weight 0: a metric only

``scorer`` is a name from :data:`SCORERS` or an import path ``"package.module:attr"``; ``params`` are
passed to a scorer class. An import path must name a scorer its author declared with
:func:`rewards.declare_scorer` (see :mod:`pipeline.plugins`): a config cannot make turnwise call
``subprocess:Popen``. Every entry is resolved and checked before any scorer class is instantiated. The
YAML is read with ``yaml.safe_load`` (no tags that build Python objects), at most
:data:`MAX_CONFIG_BYTES` bytes, and a config that expands to more than :data:`MAX_CONFIG_NODES` values
(anchors repeated into a "billion laughs", or an anchor that contains itself) is refused.

For one trajectory with ``T`` assistant turns::

    per_turn[t] = sum_k w_k * s_k(t) / T        (turn_aggregation: mean; "sum" drops the / T)
    terminal    = sum_j w_j * s_j
    total       = clip(sum_t per_turn[t] + terminal, *range)

Why turn scores are averaged by default: summed per-turn rewards grow with the number of turns, which
pays an agent for padding episodes when they are positive and for ending them early when they are
negative. The mean keeps the whole episode's shaping on one fixed scale.

Failures: a scorer that raises (or returns NaN, inf or a non-number) on a trajectory is **left out** of
that trajectory's total and recorded in ``RewardBreakdown.failed`` with its error, counted in
:attr:`RewardFunction.failures`, and logged. The total is not renormalised over the scorers that
worked: renormalising would let shaping terms stand in for a failed outcome term and inflate the
reward exactly where it is least trustworthy. An incomplete total is marked (``breakdown.ok`` is
``False``), never silently zero; ``on_error: raise`` turns failures into exceptions (for tests and
audits that must not tolerate them). A scorer that returns ``None`` does not apply to the trajectory
(it is listed in ``not_applicable``), which is not a failure.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import reprlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from pipeline.plugins import SCORER, NotDeclaredError, load_declared
from rewards.base import (
    EPISODE,
    TURN,
    RewardBreakdown,
    RewardValueError,
    as_score,
    bind_tasks,
    scorer_level,
    scorer_name,
)

if TYPE_CHECKING:
    from pipeline.envs.base import Task
    from pipeline.trajectory import Trajectory

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "rewards"

#: Scorers by the short name a config may use. Values are import paths, so that naming a scorer never
#: imports what another one needs (the reward model needs torch; rule scorers do not).
SCORERS: dict[str, str] = {
    # per-turn rules
    "tool_format": "rewards.rules:tool_format",
    "tool_errors": "rewards.rules:tool_errors",
    "policy_violation": "rewards.rules:policy_violation",
    "redundant_request": "rewards.rules:RedundantRequest",
    "unsupported_claim": "rewards.rules:UnsupportedClaim",
    "response_length": "rewards.rules:ResponseLength",
    "politeness": "rewards.rules:Politeness",
    "repetition": "rewards.rules:Repetition",
    # terminal
    "strict_success": "rewards.outcome:strict_success",
    "partial_credit": "rewards.outcome:PartialCredit",
    "field_accuracy": "rewards.outcome:FieldAccuracy",
    "policy_compliance": "rewards.outcome:PolicyCompliance",
    "satisfaction": "rewards.outcome:CustomerSatisfaction",
    "turn_efficiency": "rewards.outcome:TurnEfficiency",
    # learned and judged (need a model; imported only when named)
    "reward_model": "rewards.model:RewardModelScorer",
    "judge": "rewards.judge:JudgeScorer",
    # deliberately hackable baselines, for audits and tests only (see rewards.naive)
    "naive_tool_calls": "rewards.naive:ToolCallAttempts",
    "naive_resolution_claim": "rewards.naive:resolution_claimed",
    "naive_turn_penalty": "rewards.naive:turn_penalty",
    "naive_customer_thanks": "rewards.naive:customer_thanks",
}

#: The default reward (also shipped as ``configs/rewards/default.yaml``; a test keeps the two equal).
#: Weights, and why:
#: - strict success dominates (0.6): no combination of other terms reaches the audit's "high reward"
#:   line (0.5) without it;
#: - partial credit (0.15) counts only environment-verified progress;
#: - policy compliance (0.2) is a penalty only, larger than any shaping gain a violation could buy;
#: - satisfaction (0.1) comes from the simulated customer, which checks the sandbox before thanking;
#: - efficiency (0.05) pays only on success;
#: - turn penalties (averaged over turns) sum to at most 0.5 in magnitude; politeness is 0.02.
DEFAULT_CONFIG: dict[str, Any] = {
    "name": "default",
    "description": "Strict success first; verified partial credit; penalty-only shaping averaged over turns.",
    "range": [-1.0, 1.0],
    "turn_aggregation": "mean",
    "on_error": "record",
    "scorers": [
        {"name": "success", "scorer": "strict_success", "weight": 0.6},
        {"name": "partial_credit", "scorer": "partial_credit", "weight": 0.15},
        {"name": "field_accuracy", "scorer": "field_accuracy", "weight": 0.15, "params": {"format_coef": 0.1}},
        {"name": "policy_compliance", "scorer": "policy_compliance", "weight": 0.2},
        {"name": "satisfaction", "scorer": "satisfaction", "weight": 0.1},
        {"name": "turn_efficiency", "scorer": "turn_efficiency", "weight": 0.05, "params": {"max_turns": 20}},
        {"name": "tool_format", "scorer": "tool_format", "weight": 0.1},
        {"name": "tool_errors", "scorer": "tool_errors", "weight": 0.05},
        {"name": "policy_violation", "scorer": "policy_violation", "weight": 0.1},
        {"name": "redundant_request", "scorer": "redundant_request", "weight": 0.05},
        {"name": "unsupported_claim", "scorer": "unsupported_claim", "weight": 0.1},
        {"name": "response_length", "scorer": "response_length", "weight": 0.05, "params": {"max_chars": 600}},
        {"name": "politeness", "scorer": "politeness", "weight": 0.02},
        {"name": "repetition", "scorer": "repetition", "weight": 0.05},
    ],
}


#: Largest reward config file read, in bytes (the shipped ones are under 2 KB).
MAX_CONFIG_BYTES = 1 << 20

#: Most values (mappings, lists and scalars, each time an anchor repeats them) a reward config may hold.
MAX_CONFIG_NODES = 10_000

_SHIPPED = frozenset(SCORERS.values())

_show = reprlib.Repr()
_show.maxstring, _show.maxother, _show.maxlevel = 60, 60, 3


class RewardConfigError(ValueError):
    """A reward config that cannot be built; the message says which entry and how to fix it."""


def resolve_scorer(spec: str) -> Any:
    """The object a scorer spec names: a key of :data:`SCORERS`, or ``"package.module:attr"`` naming a scorer
    declared with :func:`rewards.declare_scorer`. Nothing it names is called.

    >>> resolve_scorer("tool_format").__name__
    'tool_format'
    >>> resolve_scorer("subprocess:Popen")
    Traceback (most recent call last):
    ...
    rewards.composite.RewardConfigError: 'subprocess:Popen' is not a declared scorer, so turnwise will not call it. ...
    """
    if not isinstance(spec, str):
        raise RewardConfigError(f"a scorer is a name or an import path, got {_show.repr(spec)}.")
    path = SCORERS.get(spec, spec)
    if ":" not in path:
        raise RewardConfigError(f"Unknown scorer {_show.repr(spec)}. Use one of {', '.join(sorted(SCORERS))}, or an "
                                "import path like 'mypackage.scorers:my_scorer' to a scorer declared with "
                                "@rewards.declare_scorer.")
    if path not in _SHIPPED:
        try:
            return load_declared(path, SCORER)
        except NotDeclaredError as exc:
            raise RewardConfigError(str(exc)) from None
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardConfigError(f"Scorer {spec!r}: cannot import {module_name!r} ({exc}). Install what it needs or "
                                "fix the path.") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RewardConfigError(f"Scorer {spec!r}: module {module_name!r} has no attribute {attr!r}.") from None


@dataclass
class ScorerConfig:
    """One weighted scorer of a reward."""

    scorer: str = field(metadata={"help": "a name from rewards.composite.SCORERS, or 'package.module:attr'"})
    name: str = field(default="", metadata={"help": "metric key (rewards/<name>); default: the scorer's own name"})
    weight: float = field(default=1.0, metadata={"help": "weight in the total; 0 makes the scorer a metric only"})
    params: dict[str, Any] = field(default_factory=dict, metadata={"help": "keyword arguments of a scorer class"})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise RewardConfigError(f"scorer entry {_show.repr(self.scorer)}: 'name' must be a string, got "
                                    f"{_show.repr(self.name)}.")
        if not isinstance(self.scorer, str) or not self.scorer:
            raise RewardConfigError(f"scorer entry {self.name or '?'}: 'scorer' must be a scorer name or import path.")
        label = _show.repr(self.name or self.scorer)
        if isinstance(self.weight, bool):
            raise RewardConfigError(f"scorer {label}: weight {self.weight} is not a number.")
        try:
            self.weight = float(self.weight)
        except (TypeError, ValueError, OverflowError):
            raise RewardConfigError(f"scorer {label}: weight {_show.repr(self.weight)} is not a number.") from None
        if not math.isfinite(self.weight):
            raise RewardConfigError(f"scorer {label}: weight must be finite, got {self.weight}.")
        if not isinstance(self.params, dict):
            raise RewardConfigError(f"scorer {label}: params must be a mapping of keyword arguments, got "
                                    f"{type(self.params).__name__}.")
        bad = [k for k in self.params if not (isinstance(k, str) and k.isidentifier())]
        if bad:
            raise RewardConfigError(f"scorer {label}: params keys are keyword-argument names, got "
                                    f"{_show.repr(bad[0])}.")

    def resolve(self) -> Any:
        """The scorer function or class this entry names, checked (declared, params only for a class); not called."""
        target = resolve_scorer(self.scorer)
        if not inspect.isclass(target) and self.params:
            raise RewardConfigError(f"scorer {self.name!r} ({self.scorer}) is a function and takes no params; "
                                    "remove 'params' or use a scorer class.")
        return target

    def build(self, target: Any = None) -> Any:
        """The scorer: ``target`` (default: :meth:`resolve`) instantiated with ``params`` if it is a class."""
        target = self.resolve() if target is None else target
        if inspect.isclass(target):
            try:
                instance = target(**self.params)
            except TypeError as exc:
                raise RewardConfigError(f"scorer {self.name!r} ({self.scorer}): bad params "
                                        f"{_show.repr(self.params)}: {exc}.") from None
            except ValueError as exc:
                raise RewardConfigError(f"scorer {self.name!r} ({self.scorer}): {exc}") from None
        else:
            instance = target
        if not self.name:
            self.name = scorer_name(instance)
        try:
            scorer_level(instance)
        except TypeError as exc:
            raise RewardConfigError(str(exc)) from None
        return instance


@dataclass
class RewardConfig:
    """A reward: weighted scorers, the total's range, turn aggregation and error policy."""

    scorers: list[ScorerConfig] = field(metadata={"help": "the weighted scorers (see ScorerConfig)"})
    range: tuple[float, float] = field(default=(-1.0, 1.0), metadata={"help": "the total is clipped to [low, high]"})
    turn_aggregation: str = field(default="mean", metadata={"help": "'mean' (default) or 'sum' of turn scores"})
    on_error: str = field(default="record", metadata={"help": "'record' failed scorers in the breakdown, or 'raise'"})
    name: str = field(default="custom", metadata={"help": "a label for reports"})
    description: str = field(default="", metadata={"help": "what this reward is for"})

    def __post_init__(self) -> None:
        self.scorers = [s if isinstance(s, ScorerConfig) else ScorerConfig(**_entry(s)) for s in self.scorers]
        if not self.scorers:
            raise RewardConfigError("a reward needs at least one scorer under 'scorers'.")
        try:
            if isinstance(self.range, (str, bytes)) or any(isinstance(x, bool) for x in self.range):
                raise TypeError
            low, high = (float(x) for x in self.range)
        except (TypeError, ValueError, OverflowError):
            raise RewardConfigError(f"range must be two numbers [low, high], got {_show.repr(self.range)}.") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise RewardConfigError(f"range must be finite with low < high, got [{low}, {high}].")
        self.range = (low, high)
        if self.turn_aggregation not in ("mean", "sum"):
            raise RewardConfigError(f"turn_aggregation must be 'mean' or 'sum', got {_show.repr(self.turn_aggregation)}.")
        if self.on_error not in ("record", "raise"):
            raise RewardConfigError(f"on_error must be 'record' or 'raise', got {_show.repr(self.on_error)}.")
        for key in ("name", "description"):
            if not isinstance(getattr(self, key), str):
                raise RewardConfigError(f"{key} must be a string, got {_show.repr(getattr(self, key))}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RewardConfig":
        if not isinstance(data, Mapping):
            raise RewardConfigError(f"a reward config must be a mapping, got {type(data).__name__}.")
        _check_size(data)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise RewardConfigError(f"unknown reward config key(s) {_show.repr(unknown)}; known keys: {sorted(known)}.")
        if "scorers" not in data:
            raise RewardConfigError("a reward config needs a 'scorers' list.")
        if not isinstance(data["scorers"], list):
            raise RewardConfigError("'scorers' must be a list of {scorer, name, weight, params} entries.")
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: Path | str) -> "RewardConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reward config {path} not found; shipped configs are in {CONFIG_DIR}.")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise RewardConfigError(f"{path}: {size:,} bytes; a reward config is at most {MAX_CONFIG_BYTES:,}.")
        try:
            data = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise RewardConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                                    f"{exc.start}).") from None
        except yaml.YAMLError as exc:
            raise RewardConfigError(f"{path}: not valid YAML ({_show.repr(str(exc))[1:-1]}). Reward configs are plain "
                                    "YAML: mappings, lists, strings and numbers, no tags such as !!python/object.") from None
        except RecursionError:
            raise RewardConfigError(f"{path}: the YAML is nested too deeply to read.") from None
        try:
            return cls.from_dict(data or {})
        except RewardConfigError as exc:
            raise RewardConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["range"] = list(self.range)
        return out


def _entry(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise RewardConfigError(f"each scorer entry must be a mapping like {{scorer: tool_format, weight: 0.1}}, got "
                                f"{_show.repr(entry)}.")
    unknown = sorted(map(str, set(entry) - {"scorer", "name", "weight", "params"}))
    if unknown:
        raise RewardConfigError(f"scorer entry {_show.repr(dict(entry))}: unknown key(s) {_show.repr(unknown)}; use "
                                "scorer, name, weight, params.")
    if "scorer" not in entry:
        raise RewardConfigError(f"scorer entry {_show.repr(dict(entry))} has no 'scorer'.")
    return dict(entry)


def _check_size(data: Any) -> None:
    """Refuse a config that expands to more than :data:`MAX_CONFIG_NODES` values.

    YAML anchors let a small file name one value many times (and an anchor can contain itself); every
    later step (building, printing, ``asdict``) walks the expansion. The walk stops at the limit, so it
    is cheap even on a "billion laughs" file.
    """
    stack, seen = [data], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES:
            raise RewardConfigError(f"the config expands to more than {MAX_CONFIG_NODES:,} values (YAML anchors "
                                    "repeated, or an anchor that contains itself); write the values out.")
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def load_config(config: "RewardConfig | Mapping[str, Any] | str | Path | None" = None) -> RewardConfig:
    """A :class:`RewardConfig` from ``None`` (the default), a mapping, a YAML path, or a shipped config's name."""
    if config is None:
        return RewardConfig.from_dict(DEFAULT_CONFIG)
    if isinstance(config, RewardConfig):
        return config
    if isinstance(config, Mapping):
        return RewardConfig.from_dict(config)
    text = str(config)
    if _shipped_name(text):  # a shipped name wins over a file or folder of that name in the working directory
        shipped = CONFIG_DIR / f"{text}.yaml"
        if shipped.is_file():
            return RewardConfig.from_yaml(shipped)
        if text == DEFAULT_CONFIG["name"]:  # installed without the configs/ folder
            return RewardConfig.from_dict(DEFAULT_CONFIG)
    return RewardConfig.from_yaml(Path(text).expanduser())


def _shipped_name(text: str) -> bool:
    """Whether a reward spec is a bare name (``sop``), not a path (``./sop``, ``my/reward.yaml``)."""
    return bool(text) and "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml")) \
        and text not in (".", "..")


class RewardFunction:
    """``RewardFunction(trajectory) -> RewardBreakdown``; build it with :func:`build_reward`.

    Picklable (it holds the config, scorer objects and, if given, the task table), so it can cross
    process boundaries. ``failures`` counts, per scorer, the trajectories it failed on; ``calls`` counts
    trajectories scored.
    """

    __name__ = "turnwise_reward"

    def __init__(self, config: RewardConfig, tasks: Iterable["Task"] | Mapping[str, "Task"] | None = None) -> None:
        self.config = config
        self.tasks: dict[str, Task] | None = None
        if tasks is not None:
            self.tasks = dict(tasks) if isinstance(tasks, Mapping) else {t.id: t for t in tasks}
        self.scorers: list[tuple[str, float, str, Any]] = []
        names: set[str] = set()
        targets = [entry.resolve() for entry in config.scorers]  # every entry checked before any is instantiated
        for entry, target in zip(config.scorers, targets):
            scorer = entry.build(target)
            if entry.name in names:
                raise RewardConfigError(f"two scorers are named {entry.name!r}; give each a distinct 'name'.")
            names.add(entry.name)
            bind_tasks(scorer, self.tasks)
            self.scorers.append((entry.name, entry.weight, scorer_level(scorer), scorer))
        self.failures: Counter[str] = Counter()
        self.calls = 0

    @property
    def names(self) -> list[str]:
        return [name for name, *_ in self.scorers]

    def weight(self, name: str) -> float:
        return next(w for n, w, *_ in self.scorers if n == name)

    def level(self, name: str) -> str:
        return next(lv for n, _, lv, _ in self.scorers if n == name)

    def __call__(self, trajectory: "Trajectory") -> RewardBreakdown:
        self.calls += 1
        n_turns = len(trajectory.turns)
        scale = 1.0 / n_turns if (self.config.turn_aggregation == "mean" and n_turns) else 1.0
        per_turn = [0.0] * n_turns
        terminal = 0.0
        components: dict[str, Any] = {}
        failed: dict[str, str] = {}
        not_applicable: list[str] = []
        reasons: dict[str, list[str]] = {}
        for name, weight, level, scorer in self.scorers:
            try:
                if level == TURN:
                    scores = [as_score(scorer(trajectory, i), f"scorer {name!r} on turn {i}") for i in range(n_turns)]
                    if n_turns and all(s is None for s in scores):
                        not_applicable.append(name)
                        continue
                    values = [0.0 if s is None else s.value for s in scores]
                    why = [f"turn {i}: {s.reason}" for i, s in enumerate(scores) if s is not None and s.reason]
                else:
                    score = as_score(scorer(trajectory), f"scorer {name!r}")
                    if score is None:
                        not_applicable.append(name)
                        continue
                    values, why = score.value, [score.reason] if score.reason else []
            except Exception as exc:  # noqa: BLE001 - a broken scorer must not crash training
                if self.config.on_error == "raise":
                    raise
                error = f"{type(exc).__name__}: {exc}"
                failed[name] = error
                self.failures[name] += 1
                logger.warning("reward scorer %r failed on task %s (left out of this total): %s", name,
                               trajectory.task_id, error)
                continue
            components[name] = values
            if why:
                reasons[name] = why
            if level == TURN:
                for i, v in enumerate(values):
                    per_turn[i] += weight * v * scale
            else:
                terminal += weight * values
        raw = sum(per_turn) + terminal
        if not math.isfinite(raw):  # unreachable with checked scores and finite weights; kept as a guard
            raise RewardValueError(f"reward total is {raw} for task {trajectory.task_id}; check the weights.")
        low, high = self.config.range
        total = min(high, max(low, raw))
        return RewardBreakdown(per_turn=per_turn, terminal=terminal, total=total, components=components,
                               failed=failed, not_applicable=not_applicable, reasons=reasons, clipped=total != raw)

    def score_all(self, trajectories: Sequence["Trajectory"]) -> list[RewardBreakdown]:
        return [self(t) for t in trajectories]

    def metrics(self) -> dict[str, float]:
        """Failure counters: ``rewards/failures/<name>`` and ``rewards/failure_rate`` (failed scorer runs per trajectory)."""
        out = {f"rewards/failures/{name}": float(self.failures[name]) for name in self.names}
        out["rewards/failure_rate"] = sum(self.failures.values()) / max(1, self.calls)
        return out


def build_reward(config: "RewardConfig | Mapping[str, Any] | str | Path | None" = None,
                 tasks: Iterable["Task"] | Mapping[str, "Task"] | None = None) -> RewardFunction:
    """The reward function for a config (``None``: the default reward), optionally bound to tasks.

    With ``tasks``, scorers that can use the task (the unsupported-claim check reads the sandbox
    database, partial credit counts the task's required facts) do; without, they use only what the
    trajectory shows.

    >>> from pipeline.envs import load_tasks, make_env, oracle_policy
    >>> from pipeline.rollout import run_policy
    >>> task = load_tasks(split="test")[2]  # the default domain's test split
    >>> reward = build_reward()
    >>> breakdown = reward(run_policy(make_env(task), task, oracle_policy(task)))
    >>> round(breakdown.total, 3), breakdown.failed, len(breakdown.per_turn)
    (0.888, {}, 7)
    """
    return RewardFunction(load_config(config), tasks)
