"""Terminal scorers: each is ``(trajectory) -> float`` and reads the environment's strict ``Outcome``.

Design: the outcome carries the reward. Strict success is the environment's own goal check (end state,
facts told, no violations), the same verdict evaluation uses, so it cannot be talked into a pass. The
other terminal scorers give a denser signal without opening a shortcut:

- **partial credit** counts only what the environment verified (expected state changes actually made,
  required facts actually told, output fields actually right) and takes back credit for changes that
  should not have happened;
- **policy compliance** is a penalty only;
- **customer satisfaction** is read from how the simulated customer ended the conversation (it checks
  the sandbox before saying goodbye, so being told "it's done" does not satisfy it);
- **turn efficiency** pays only on successful episodes: a reward for short episodes on its own teaches
  the agent to end conversations early, which a failed, short episode would otherwise collect.

Every scorer returns ``None`` (not applicable) when the trajectory's outcome is unknown
(``metadata["outcome_known"] is False``, e.g. a logged chat without a task), never a made-up 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from pipeline.budgets import MAX_TURNS
from pipeline.envs.base import field_correct  # re-exported: the fields convention is the environment's
from rewards.base import Score

if TYPE_CHECKING:
    from pipeline.envs.base import Task
    from pipeline.trajectory import Trajectory

__all__ = ["strict_success", "PartialCredit", "FieldAccuracy", "PolicyCompliance", "CustomerSatisfaction",
           "TurnEfficiency", "field_correct"]


def _known(trajectory: "Trajectory") -> bool:
    return trajectory.metadata.get("outcome_known", True) is not False


def strict_success(trajectory: "Trajectory") -> float | None:
    """1.0 when the environment's strict goal check passed, else 0.0.

    >>> from pipeline.envs.base import Outcome
    >>> from rewards.logged import from_chat
    >>> strict_success(from_chat([{"role": "assistant", "content": "Done."}], outcome=Outcome(True, True, "resolved")))
    1.0
    """
    if not _known(trajectory):
        return None
    return 1.0 if trajectory.outcome.success else 0.0


class PartialCredit:
    """The fraction of the task verifiably done: expected state changes made and required facts told.

    State: ``(changes_made - unexpected_changes) / changes_expected`` from ``Outcome.details``, where
    unexpected changes are differing state keys the task did not ask for (a refund of the wrong item
    takes credit back). Facts: the fraction of the task's required facts the agent told, which needs the
    task (``bind``) to know how many there are. The value is the mean of the parts that apply, in
    [-1, 1]; 0 when neither applies (nothing to change, task unknown).

    >>> from pipeline.envs.base import Outcome
    >>> from rewards.logged import from_chat
    >>> o = Outcome(False, True, "user_left", details={"changes_made": 1, "changes_expected": 2, "state_diff": {"a": 1}})
    >>> PartialCredit()(from_chat([{"role": "assistant", "content": "ok"}], outcome=o))
    Score(value=0.5, reason='state 1/2, 0 unexpected')
    """

    name = "partial_credit"

    def __init__(self, use_facts: bool = True) -> None:
        self.use_facts = use_facts
        self.tasks: Mapping[str, Any] = {}

    def bind(self, tasks: Mapping[str, "Task"]) -> None:
        self.tasks = tasks

    def __call__(self, trajectory: "Trajectory") -> Score | None:
        if not _known(trajectory):
            return None
        details = trajectory.outcome.details
        parts, reasons = [], []
        expected = details.get("changes_expected")
        if expected:
            made = int(details.get("changes_made", 0))
            missing = expected - made
            extra = max(0, len(details.get("state_diff", {})) - missing)
            parts.append(max(-1.0, min(1.0, (made - extra) / expected)))
            reasons.append(f"state {made}/{expected}, {extra} unexpected")
        task = self.tasks.get(trajectory.task_id) if self.use_facts else None
        if task is not None and "missing_facts" in details:
            total = sum(len(g.get("facts", [])) for g in task.payload.get("goals", []))
            if total:
                told = total - len(details["missing_facts"])
                parts.append(told / total)
                reasons.append(f"facts {told}/{total}")
        if not parts:
            return Score(0.0, "nothing verifiable to credit")
        return Score(sum(parts) / len(parts), "; ".join(reasons))


def _emitted(value: Any) -> bool:
    if isinstance(value, dict):
        if "emitted" in value:
            return bool(value["emitted"])
        if "actual" in value:
            return value["actual"] is not None
    return True


class FieldAccuracy:
    """Per-field accuracy with a small format term: ``field_acc + format_coef * (emitted - 1)``.

    ``field_acc`` is the fraction of ``Outcome.fields`` the strict check marks right, and ``emitted``
    says whether the agent produced its output at all. Where the environment reports one final output
    for the whole episode (``Outcome.details["emitted"]``, as SOP tasks do: a ``<final_output>`` block
    that parsed), ``emitted`` is that 0 or 1; otherwise it is the fraction of fields produced. A missing
    output costs ``format_coef``; a well-formatted but wrong output earns nothing, so the format term can
    only take reward away and never pays for a format the strict check rejects. ``None`` for tasks
    without output fields.

    >>> from pipeline.envs.base import Outcome
    >>> from rewards.logged import from_chat
    >>> fields = {"refund": {"expected": 28.0, "actual": 28.0}, "ticket": {"expected": "T1", "actual": None}}
    >>> FieldAccuracy(format_coef=0.1)(from_chat([], outcome=Outcome(False, True, "final_output", fields=fields)))
    Score(value=0.45, reason='1/2 fields right, 1/2 emitted')
    >>> no_output = Outcome(False, False, "max_turns", fields={"decision": False}, details={"emitted": False})
    >>> FieldAccuracy(format_coef=0.1)(from_chat([], outcome=no_output))
    Score(value=-0.1, reason='0/1 fields right, no final output')
    """

    name = "field_accuracy"

    def __init__(self, format_coef: float = 0.1) -> None:
        if not 0.0 <= format_coef <= 1.0:
            raise ValueError(f"format_coef must be in [0, 1] (a small penalty for a missing output), got {format_coef}.")
        self.format_coef = format_coef

    def __call__(self, trajectory: "Trajectory") -> Score | None:
        fields = trajectory.outcome.fields if _known(trajectory) else {}
        if not fields:
            return None
        right = sum(field_correct(v) for v in fields.values())
        n = len(fields)
        details = trajectory.outcome.details
        if "emitted" in details:  # one final output for the episode: a field cannot be "emitted" on its own
            emitted, said = float(bool(details["emitted"])), "final output" if details["emitted"] else "no final output"
        else:
            count = sum(_emitted(v) for v in fields.values())
            emitted, said = count / n, f"{count}/{n} emitted"
        value = right / n + self.format_coef * (emitted - 1.0)
        return Score(round(value, 6), f"{right}/{n} fields right, {said}")


class PolicyCompliance:
    """0 without policy violations, else ``-min(1, per_violation * count)``.

    >>> from pipeline.envs.base import Outcome
    >>> from rewards.logged import from_chat
    >>> o = Outcome(False, True, "user_left", violations=["identity_verification@1", "refund_limit@4"])
    >>> PolicyCompliance(per_violation=0.5)(from_chat([], outcome=o))
    Score(value=-1.0, reason='identity_verification@1, refund_limit@4')
    """

    name = "policy_compliance"

    def __init__(self, per_violation: float = 1.0) -> None:
        if per_violation <= 0:
            raise ValueError(f"per_violation must be positive (it is the penalty per violation), got {per_violation}.")
        self.per_violation = per_violation

    def __call__(self, trajectory: "Trajectory") -> Score | None:
        if not _known(trajectory):
            return None
        violations = trajectory.outcome.violations
        if not violations:
            return Score(0.0)
        return Score(-min(1.0, self.per_violation * len(violations)), ", ".join(violations))


class CustomerSatisfaction:
    """How the simulated customer ended the conversation, in [-1, 1].

    ``resolved`` (the customer checked that what it asked for was done and said goodbye) is
    ``1 - frustration_cost * frustration`` (floor 0.5); ``user_left`` (patience ran out) is -1; a budget
    stop (``max_turns``/``max_tokens``, the customer still waiting) is ``budget_value``. ``None`` for
    episodes without a customer (an SOP task's final output) or an unknown outcome.

    >>> from pipeline.envs.base import Outcome
    >>> from rewards.logged import from_chat
    >>> sat = CustomerSatisfaction()
    >>> [sat(from_chat([], outcome=Outcome(False, True, stop, details={"frustration": 2}))).value
    ...  for stop in ("resolved", "user_left", "max_turns")]
    [0.8, -1.0, -0.5]
    """

    name = "satisfaction"

    def __init__(self, frustration_cost: float = 0.1, budget_value: float = -0.5) -> None:
        self.frustration_cost, self.budget_value = frustration_cost, budget_value

    def __call__(self, trajectory: "Trajectory") -> Score | None:
        if not _known(trajectory):
            return None
        outcome = trajectory.outcome
        stop = outcome.stop_reason
        frustration = int(outcome.details.get("frustration", 0) or 0)
        if stop == "resolved":
            return Score(max(0.5, 1.0 - self.frustration_cost * frustration), f"resolved, frustration {frustration}")
        if stop == "user_left":
            return Score(-1.0, "the customer left")
        if stop in ("max_turns", "max_tokens"):
            goals, met = outcome.details.get("goals"), outcome.details.get("goals_met")
            return Score(self.budget_value, f"{stop}" + (f", {met}/{goals} goals met" if goals else ""))
        return None


class TurnEfficiency:
    """``1 - turns / max_turns`` on a strictly successful episode, 0 otherwise.

    Paid only on success so that it ranks good solutions by length and never makes a short failure
    better than a long success.

    >>> from pipeline.envs.base import Outcome
    >>> from rewards.logged import from_chat
    >>> t = from_chat([{"role": "assistant", "content": "a"}] * 5, outcome=Outcome(True, True, "resolved"))
    >>> TurnEfficiency(max_turns=20)(t)
    Score(value=0.75, reason='5 turns')
    """

    name = "turn_efficiency"

    def __init__(self, max_turns: int = MAX_TURNS) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1 (the episode's turn budget), got {max_turns}.")
        self.max_turns = max_turns

    def __call__(self, trajectory: "Trajectory") -> Score | None:
        if not _known(trajectory):
            return None
        if not trajectory.outcome.success:
            return Score(0.0, "not successful")
        turns = trajectory.num_turns
        return Score(max(0.0, 1.0 - turns / self.max_turns), f"{turns} turns")
