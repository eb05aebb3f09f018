"""The scorer protocols and the reward record every scorer feeds.

A reward here is a weighted sum of small, named **scorers**, each a plain callable with one of two
signatures:

- a :class:`TurnScorer` ``(trajectory, index) -> float`` scores assistant turn ``index`` (0-based) from
  everything the trajectory shows up to and including the environment's answer to it;
- an :class:`EpisodeScorer` ``(trajectory) -> float`` scores the whole episode, usually from the
  environment's strict :class:`~pipeline.envs.base.Outcome`.

A scorer may return a :class:`Score` instead of a bare float when it can say *why* (the audit and
``turnwise score`` show the reason next to the value), or ``None`` when it does not apply to this
trajectory (field accuracy on a task without output fields, an outcome scorer on a logged conversation
whose outcome is unknown). ``None`` is "not applicable", reported as such; it is never a failure and
never a silent zero.

The scorer's name is its metric key (``rewards/<name>``): a function's ``__name__``, or a class's
``name`` attribute, overridden by the ``name`` given in the reward config. Parameterised scorers are
small picklable classes, not closures, because rewards cross process boundaries under accelerate.
Scorers that can use the task (its sandbox database, its goals) implement ``bind(tasks)``; they must
still work, with less evidence, on a bare trajectory.

:class:`RewardBreakdown` is what a reward function returns (the contract in ``ARCHITECTURE.md``):
``per_turn`` (one float per assistant turn), ``terminal``, ``total`` and ``components``, plus the
failure record (``failed``) that keeps a broken scorer visible instead of silently zero.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, Union, runtime_checkable

if TYPE_CHECKING:
    from pipeline.envs.base import Task
    from pipeline.trajectory import Trajectory


@dataclass(frozen=True)
class Score:
    """A scorer's value with the reason for it.

    >>> Score(-1.0, "claimed $30.00, which no tool result shows")
    Score(value=-1.0, reason='claimed $30.00, which no tool result shows')
    """

    value: float
    reason: str = ""


ScoreLike = Union[float, int, bool, Score, None]


@runtime_checkable
class TurnScorer(Protocol):
    """Scores one assistant turn: ``(trajectory, index) -> float | Score | None``."""

    def __call__(self, trajectory: "Trajectory", index: int) -> ScoreLike: ...


@runtime_checkable
class EpisodeScorer(Protocol):
    """Scores a whole episode: ``(trajectory) -> float | Score | None``."""

    def __call__(self, trajectory: "Trajectory") -> ScoreLike: ...


class RewardValueError(ValueError):
    """A scorer produced a value that is not a finite number (NaN, inf, a string, ...)."""


TURN, EPISODE = "turn", "episode"


def scorer_level(scorer: Any) -> str:
    """``"turn"`` for a ``(trajectory, index)`` scorer, ``"episode"`` for a ``(trajectory)`` one.

    Decided from the call signature, so a plain function needs no registration or decorator.

    >>> def f(trajectory, index): return 0.0
    >>> def g(trajectory): return 0.0
    >>> scorer_level(f), scorer_level(g)
    ('turn', 'episode')
    """
    if not callable(scorer):
        raise TypeError(f"A scorer must be callable, got {type(scorer).__name__}.")
    params = [
        p for p in inspect.signature(scorer).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(params) == 1:
        return EPISODE
    if len(params) == 2:
        return TURN
    raise TypeError(
        f"Scorer {scorer_name(scorer)!r} takes {len(params)} required positional arguments; a scorer takes "
        "(trajectory) for an episode score or (trajectory, index) for a turn score."
    )


def scorer_name(scorer: Any) -> str:
    """The default metric key of a scorer: its ``name`` attribute, else its ``__name__``, else its class name."""
    return getattr(scorer, "name", None) or getattr(scorer, "__name__", None) or type(scorer).__name__


def as_score(value: ScoreLike, where: str) -> Score | None:
    """Check and normalise a scorer's return value; raise :class:`RewardValueError` on NaN, inf or junk.

    >>> as_score(0.5, "x"), as_score(None, "x"), as_score(True, "x")
    (Score(value=0.5, reason=''), None, Score(value=1.0, reason=''))
    >>> as_score(float("nan"), "scorer 'x' on turn 2")
    Traceback (most recent call last):
    ...
    rewards.base.RewardValueError: scorer 'x' on turn 2 returned nan; scorers must return a finite float (or None when they do not apply).
    """
    if value is None:
        return None
    score = value if isinstance(value, Score) else Score(value)  # type: ignore[arg-type]
    raw = score.value
    if not isinstance(raw, (int, float)) or isinstance(raw, complex):
        raise RewardValueError(f"{where} returned {raw!r} ({type(raw).__name__}); scorers must return a finite "
                               "float, a Score, or None when they do not apply.")
    if not math.isfinite(raw):
        raise RewardValueError(f"{where} returned {raw}; scorers must return a finite float (or None when they do "
                               "not apply).")
    return Score(float(raw), score.reason)


@dataclass
class RewardBreakdown:
    """One trajectory's reward, split the way training and audits need it.

    - ``per_turn``: one float per assistant turn, the weighted turn scorers (length = number of turns);
    - ``terminal``: the weighted episode scorers;
    - ``total``: ``sum(per_turn) + terminal`` clipped to the reward's declared range (``clipped`` says
      whether clipping changed it);
    - ``components``: each scorer's raw (unweighted) value, by name: a list with one value per turn for
      a turn scorer, a float for an episode scorer; scorers that did not apply or failed are absent;
    - ``failed``: ``{name: error}`` for scorers that raised on this trajectory (their weight is left out
      of the total, which is therefore incomplete: see :mod:`rewards.composite`);
    - ``not_applicable``: names of scorers that returned ``None``;
    - ``reasons``: ``{name: [reason, ...]}`` explanations scorers gave with their values.
    """

    per_turn: list[float]
    terminal: float
    total: float
    components: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    not_applicable: list[str] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    clipped: bool = False

    @property
    def ok(self) -> bool:
        """Whether every scorer ran (no entry in ``failed``)."""
        return not self.failed

    def __float__(self) -> float:
        return float(self.total)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "RewardBreakdown":
        return cls(**dict(row))

    def metrics(self) -> dict[str, float]:
        """Flat, namespaced metrics: ``rewards/total``, ``rewards/<name>`` (turn scorers: their mean), ``rewards/failed``.

        >>> RewardBreakdown([0.1, -0.1], 0.5, 0.5, {"tool_format": [0.0, -1.0], "success": 1.0}).metrics()
        {'rewards/total': 0.5, 'rewards/terminal': 0.5, 'rewards/tool_format': -0.5, 'rewards/success': 1.0, 'rewards/failed': 0.0}
        """
        out = {"rewards/total": self.total, "rewards/terminal": self.terminal}
        for name, value in self.components.items():
            out[f"rewards/{name}"] = mean(value) if isinstance(value, list) else float(value)
        out["rewards/failed"] = float(len(self.failed))
        return out


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def bind_tasks(scorer: Any, tasks: Mapping[str, "Task"] | None) -> None:
    """Give a scorer the task table if it wants one (it defines ``bind``)."""
    if tasks is not None and hasattr(scorer, "bind"):
        scorer.bind(tasks)
