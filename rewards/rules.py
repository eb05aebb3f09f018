"""Rule-based per-turn scorers: each turn scorer is ``(trajectory, index) -> float``.

Design: **turn scores are penalties, not payments.** Every scorer here is 0 for a turn that does its
job and negative for a turn that breaks a rule (a malformed call, a failed call, a policy violation, a
question already answered, a claim nothing supports, an empty or overlong reply, a repeated message).
The one exception, politeness, is worth at most a small positive weight and nothing when stuffed. The
reason is reward hacking: a positive per-turn payment (per tool call, per polite phrase, per
"resolved") is a reward the agent can collect without solving the task, just by producing more of
it. Positive reward comes from the outcome (:mod:`rewards.outcome`), which the environment checks.

The composite (:mod:`rewards.composite`) averages turn scores over the episode by default, so shaping
cannot be farmed by making episodes longer nor dodged by making them shorter.

Every scorer reads the conversation itself (assistant text, ``tool`` messages, the customer's messages;
see :mod:`rewards.evidence`), so it works on trajectories rebuilt from logged chats. Scorers that can use
the task's sandbox database take it through ``bind(tasks)``.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any, Mapping

from pipeline.chat import ToolCall, has_tool_call_markup
from rewards.base import Score
from rewards.evidence import (
    FORMAT_ERRORS,
    CompiledRules,
    Evidence,
    compiled,
    evidence_before,
    item_sums,
    json_dumps,
    near_miss_call,
    rules_for,
    tool_names,
    view_turn,
    walk_values,
)

if TYPE_CHECKING:
    from pipeline.envs.base import Task
    from pipeline.trajectory import Trajectory

__all__ = ["tool_format", "tool_errors", "policy_violation", "RedundantRequest", "UnsupportedClaim",
           "ResponseLength", "Politeness", "Repetition"]


def _outcome_known(trajectory: "Trajectory") -> bool:
    return trajectory.metadata.get("outcome_known", True) is not False


# ---------------------------------------------------------------------------------------------------
# Tool use
# ---------------------------------------------------------------------------------------------------


def tool_format(trajectory: "Trajectory", index: int) -> Score:
    """-1 when the turn tries to call a tool in a format the strict protocol rejects, else 0.

    Rejected means what the environment rejects: unbalanced tags, invalid JSON, a call without a name,
    too many calls, an unknown tool, arguments that fail the schema, or a call written outside the
    ``<tool_call>`` tags (a code fence, bare JSON), which the environment sends to the customer as text.
    Matching the strict parser exactly is the point: a reward more lenient than the evaluation pays for
    outputs that the evaluation counts as failures.

    >>> from rewards.logged import from_chat
    >>> t = from_chat([{"role": "user", "content": "Hi"},
    ...                {"role": "assistant", "content": '<tool_call>{"name": "get_order"</tool_call>'},
    ...                {"role": "assistant", "content": '```json\\n{"name": "get_order", "arguments": {}}\\n```'},
    ...                {"role": "assistant", "content": "How can I help?"}])
    >>> [tool_format(t, i).value for i in range(3)]
    [-1.0, -1.0, 0.0]
    """
    view = view_turn(trajectory.turns[index])
    bad = sorted({k for k in view.error_kinds if k in FORMAT_ERRORS})
    if bad:
        return Score(-1.0, "rejected tool call: " + ", ".join(bad))
    if near_miss_call(view.text, tool_names(trajectory)):
        return Score(-1.0, "tool call outside <tool_call> tags")
    return Score(0.0)


def tool_errors(trajectory: "Trajectory", index: int) -> Score:
    """Minus the fraction of the turn's well-formed calls that the tool refused or failed on; 0 otherwise.

    Successful calls earn nothing: paying per successful call is paying for tool-call spam.

    >>> from rewards.logged import from_chat
    >>> t = from_chat([{"role": "user", "content": "Hi"},
    ...     {"role": "assistant", "content": '<tool_call>{"name": "get_order", "arguments": {"order_id": "W1"}}</tool_call>'},
    ...     {"role": "tool", "content": '{"ok": false, "tool": "get_order", "error": "Identity not verified.", "error_type": "rejected"}'}])
    >>> tool_errors(t, 0)
    Score(value=-1.0, reason='get_order: rejected')
    """
    view = view_turn(trajectory.turns[index])
    if not view.results:
        return Score(0.0)
    failed = [r for r in view.results if not r.ok and (r.error_type or "error") not in FORMAT_ERRORS]
    if not failed:
        return Score(0.0)
    return Score(-len(failed) / len(view.results), ", ".join(f"{r.name}: {r.error_type}" for r in failed))


def policy_violation(trajectory: "Trajectory", index: int) -> Score | None:
    """-1 when the environment recorded a policy (SOP) violation on this turn, else 0.

    Violations come from ``Outcome.violations`` (``"<rule>@<turn>"``); ``None`` when the outcome is
    unknown (a logged chat without a task).

    >>> from pipeline.envs.base import Outcome
    >>> from rewards.logged import from_chat
    >>> t = from_chat([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
    ...               outcome=Outcome(False, True, "user_left", violations=["identity_verification@1"]))
    >>> policy_violation(t, 0).value, policy_violation(t, 1)
    (0.0, Score(value=-1.0, reason='identity_verification'))
    """
    if not _outcome_known(trajectory):
        return None
    rules = [v.rsplit("@", 1)[0] for v in trajectory.outcome.violations
             if v.rsplit("@", 1)[-1].isdigit() and int(v.rsplit("@", 1)[-1]) == index]
    return Score(-1.0, ", ".join(rules)) if rules else Score(0.0)


# ---------------------------------------------------------------------------------------------------
# Asking again
# ---------------------------------------------------------------------------------------------------

def requested_keys(text: str, rules: CompiledRules | None = None) -> list[str]:
    """The pieces of customer information a message asks for, by the domain's request patterns
    (default: the default domain's; there ``email``, ``zip``, ``order_id`` and ``address``).

    >>> requested_keys("Could you give me your email and zip code? Thanks.")
    ['email', 'zip']
    >>> requested_keys("I have updated your email.")
    []
    """
    rules = rules or compiled(rules_for())
    if rules.request_cue is None:
        return []
    asked: list[str] = []
    for sentence in re.split(r"(?<=[.!?\n])\s+", text):
        if rules.request_cue.search(sentence):
            asked += [k for k, p in rules.request_keys if p.search(sentence) and k not in asked]
    return asked


def _values(pattern: re.Pattern | None, texts: list[str]) -> set[str]:
    if pattern is None:
        return set()
    return {m.group(0).lower().rstrip(".") for t in texts for m in pattern.finditer(t)}


class RedundantRequest:
    """-1 when the turn asks for information the customer already gave, else 0.

    A request for an email, zip code, order number or address is redundant when the customer's earlier
    messages already contain one and the answer to this turn brings no new value (a second order number
    for a second request is a legitimate question; the same email again is not). Asking for everything
    every turn is a cheap way to look busy; customers hate it.

    >>> from rewards.logged import from_chat
    >>> t = from_chat([{"role": "user", "content": "Hi, my email is a@b.co and zip 12345."},
    ...                {"role": "assistant", "content": "Could you give me your email and zip code?"},
    ...                {"role": "user", "content": "I already told you: a@b.co"}])
    >>> RedundantRequest()(t, 0)
    Score(value=-1.0, reason='asked again for email, zip')
    """

    name = "redundant_request"

    def __init__(self) -> None:
        self.tasks: Mapping[str, Any] = {}

    def bind(self, tasks: Mapping[str, "Task"]) -> None:
        self.tasks = tasks

    def __call__(self, trajectory: "Trajectory", index: int) -> Score:
        view = view_turn(trajectory.turns[index])
        if not view.is_message:
            return Score(0.0)
        rules = compiled(rules_for(trajectory, self.tasks))
        keys = requested_keys(view.text, rules)
        if not keys:
            return Score(0.0)
        before = evidence_before(trajectory, index).user_text
        redundant = []
        for key in keys:
            pattern = rules.request_values.get(key)
            given = _values(pattern, before)
            if given and not (_values(pattern, view.replies) - given):
                redundant.append(key)
        return Score(-1.0, "asked again for " + ", ".join(redundant)) if redundant else Score(0.0)


# ---------------------------------------------------------------------------------------------------
# Unsupported claims
# ---------------------------------------------------------------------------------------------------

_MONEY = re.compile(r"\$\s?(\d[\d,]*(?:\.\d{1,2})?)")
_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")


class UnsupportedClaim:
    """-1 when a customer-facing message states an order fact that nothing seen so far supports, else 0.

    Checked claims: completed actions ("has been cancelled", "I've refunded", "your issue is resolved"),
    which need a successful result of the matching tool earlier in the episode; dollar amounts, tracking
    numbers, ticket ids and dates, which must appear in a tool result, in the customer's messages or the
    system prompt (the policy's limits) or, when the task is bound, in the sandbox database; and order
    statuses ("is still processing", "has shipped"), which must match a status a tool result or the
    database shows. The amount check accepts sums over an order's items (a refund of two items). Negated and proposed actions ("can no longer be
    cancelled", "shall I refund") are not claims.

    This is the scorer that catches "declare it done without doing it", the cheapest hack against a
    customer simulator that believes what it is told.

    >>> from rewards.logged import from_chat
    >>> t = from_chat([{"role": "user", "content": "Cancel order W1000001 please."},
    ...                {"role": "assistant", "content": "Your order has been cancelled and $120.00 refunded."},
    ...                {"role": "user", "content": "Thanks."}])
    >>> UnsupportedClaim()(t, 0)
    Score(value=-1.0, reason='unsupported cancellation claim; $120.00 not in any tool result or the database')
    """

    name = "unsupported_claim"

    def __init__(self, use_database: bool = True) -> None:
        self.use_database = use_database
        self.tasks: Mapping[str, Any] = {}

    def bind(self, tasks: Mapping[str, "Task"]) -> None:
        self.tasks = tasks

    def __getstate__(self) -> dict:
        return {"use_database": self.use_database, "tasks": self.tasks}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["use_database"])
        self.tasks = state["tasks"]

    def _database(self, trajectory: "Trajectory") -> Any:
        task = self.tasks.get(trajectory.task_id) if self.use_database else None
        return None if task is None else task.payload.get("db")

    def __call__(self, trajectory: "Trajectory", index: int) -> Score:
        view = view_turn(trajectory.turns[index])
        if not view.is_message or not view.text.strip():
            return Score(0.0)
        evidence = evidence_before(trajectory, index)
        rules = compiled(rules_for(trajectory, self.tasks))
        problems = self.problems(view.text, evidence, self._database(trajectory), rules)
        return Score(-1.0, "; ".join(problems)) if problems else Score(0.0)

    def problems(self, text: str, evidence: Evidence, database: Any = None,
                 rules: CompiledRules | None = None) -> list[str]:
        """The unsupported claims in ``text`` given the evidence (and the domain's rules), as readable reasons."""
        rules = rules or compiled(rules_for())
        problems = []
        for kind, pattern, tools in rules.action_claims:
            if pattern.search(text) and not evidence.succeeded(tools):
                problems.append(f"unsupported {kind} claim")
        results = [r.result for r in evidence.ok_results]
        sources: list[Any] = results + ([database] if database is not None else [])
        strings = {str(v).lower() for src in sources for v in walk_values(src) if isinstance(v, str)}
        user = " ".join(evidence.user_text + evidence.system_text).lower()
        numbers = {round(float(v), 2) for src in sources for v in walk_values(src)
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numbers |= {s for src in sources for s in item_sums(src)}
        numbers |= {round(float(m.group(1).replace(",", "")), 2) for m in _MONEY.finditer(user)}
        for m in _MONEY.finditer(text):
            amount = round(float(m.group(1).replace(",", "")), 2)
            if not any(abs(amount - n) < 0.005 for n in numbers):
                problems.append(f"${amount:.2f} not in any tool result or the database")
        for what, pattern in (*rules.identifiers, ("date", _DATE)):
            for m in pattern.finditer(text):
                token = (m.group(1) if m.groups() else m.group(0)).lower()
                if token not in strings and token not in user and not any(token in s for s in strings):
                    problems.append(f"{what} {token} not in any tool result")
        support = rules.status_support
        statuses = {s for s in strings if s in support}
        for m in (rules.status.finditer(text) if rules.status is not None else ()):
            claimed = next(g for g in m.groups() if g).lower().replace("canceled", "cancelled")
            if not (support.get(claimed, {claimed}) & statuses):
                problems.append(f"status '{claimed}' not shown by any tool result")
        return list(dict.fromkeys(problems))


# ---------------------------------------------------------------------------------------------------
# Style: length, politeness, repetition
# ---------------------------------------------------------------------------------------------------


class ResponseLength:
    """0 within the length budget; below it (an empty reply) -1; above it, minus the overshoot fraction (floor -1).

    ``max_chars`` bounds what one assistant message may cost the customer to read (or the context to
    hold); ``min_chars`` makes an empty or whitespace reply a penalised turn rather than a free pass.

    >>> from rewards.logged import from_chat
    >>> t = from_chat([{"role": "assistant", "content": ""}, {"role": "assistant", "content": "x" * 150},
    ...                {"role": "assistant", "content": "Sure."}])
    >>> [ResponseLength(max_chars=100)(t, i).value for i in range(3)]
    [-1.0, -0.5, 0.0]
    """

    name = "response_length"

    def __init__(self, max_chars: int = 600, min_chars: int = 1) -> None:
        if max_chars < 1 or min_chars < 0 or min_chars > max_chars:
            raise ValueError(f"need 0 <= min_chars <= max_chars and max_chars >= 1, got min_chars={min_chars}, "
                             f"max_chars={max_chars}.")
        self.max_chars, self.min_chars = max_chars, min_chars

    def __call__(self, trajectory: "Trajectory", index: int) -> Score:
        text = trajectory.turns[index].assistant or ""
        n = len(text.strip())
        if n < self.min_chars:
            return Score(-1.0, "empty reply")
        if n > self.max_chars:
            return Score(-min(1.0, (n - self.max_chars) / self.max_chars), f"{n} chars > {self.max_chars}")
        return Score(0.0)


_POLITE = re.compile(r"\b(please|thank(s| you)|sorry|apologi[sz]e|happy to help|glad to help|i understand|"
                     r"appreciate|my pleasure|you're welcome)\b", re.IGNORECASE)
_RUDE = re.compile(r"\b(stupid|idiot|shut up|not my problem|whatever|deal with it|figure it out yourself|"
                   r"stop wasting my time|i don't care|that's your problem|obviously)\b", re.IGNORECASE)


class Politeness:
    """+1 for a customer-facing message with one or two politeness markers, 0 with none, -1 when rude.

    Stuffing (``max_markers`` or more markers in one message) earns 0: politeness is worth a little
    only alongside content. Keep its weight small; it is a tie-breaker, not a goal.

    >>> from rewards.logged import from_chat
    >>> t = from_chat([{"role": "assistant", "content": "Could you please share the order number?"},
    ...                {"role": "assistant", "content": "Thank you! Sorry! I apologize! Happy to help!"},
    ...                {"role": "assistant", "content": "Not my problem."}])
    >>> [Politeness()(t, i).value for i in range(3)]
    [1.0, 0.0, -1.0]
    """

    name = "politeness"

    def __init__(self, max_markers: int = 3) -> None:
        self.max_markers = max_markers

    def __call__(self, trajectory: "Trajectory", index: int) -> Score:
        text = trajectory.turns[index].assistant or ""
        if has_tool_call_markup(text) or near_miss_call(text, tool_names(trajectory)):
            return Score(0.0)
        if _RUDE.search(text):
            return Score(-1.0, "rude")
        markers = len(_POLITE.findall(text))
        if markers >= self.max_markers:
            return Score(0.0, f"{markers} politeness markers (stuffing)")
        return Score(1.0 if markers else 0.0)


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w@.#$-]+", " ", text.lower()).split())


class Repetition:
    """-1 for a turn that repeats the previous message, echoes the customer, or repeats a successful call.

    Three ways to fill a turn without progress: saying the same thing again (near-duplicates count, at
    ``similarity`` or above), parroting the customer's last message back, and calling a tool again with
    the same arguments after it already succeeded.

    >>> from rewards.logged import from_chat
    >>> t = from_chat([{"role": "user", "content": "My parcel never arrived, can you help me?"},
    ...                {"role": "assistant", "content": "My parcel never arrived, can you help me?"},
    ...                {"role": "user", "content": "What?"},
    ...                {"role": "assistant", "content": "Let me check."},
    ...                {"role": "assistant", "content": "Let me check!"}])
    >>> [Repetition()(t, i).value for i in range(3)]
    [-1.0, 0.0, -1.0]
    """

    name = "repetition"

    def __init__(self, similarity: float = 0.9) -> None:
        if not 0.0 < similarity <= 1.0:
            raise ValueError(f"similarity must be in (0, 1], got {similarity}.")
        self.similarity = similarity

    def _similar(self, a: str, b: str) -> bool:
        a, b = _normalise(a), _normalise(b)
        if a == b:
            return True
        return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= self.similarity

    def __call__(self, trajectory: "Trajectory", index: int) -> Score:
        view = view_turn(trajectory.turns[index])
        earlier = [view_turn(t) for t in trajectory.turns[:index]]
        if view.is_message:
            previous = next((v for v in reversed(earlier) if v.is_message), None)
            if previous is not None and self._similar(view.text, previous.text):
                return Score(-1.0, "repeats the previous message")
            evidence = evidence_before(trajectory, index)
            last_user = evidence.user_text[-1] if evidence.user_text else None
            if last_user and view.text.strip() and self._similar(view.text, last_user):
                return Score(-1.0, "echoes the customer")
            return Score(0.0)
        done = {(r.name, json_dumps(r.arguments)) for v in earlier for r in v.results if r.ok and r.name}
        repeats = [c.name for c in view.calls if isinstance(c, ToolCall) and (c.name, json_dumps(c.arguments)) in done]
        return Score(-1.0, "repeats successful call(s): " + ", ".join(repeats)) if repeats else Score(0.0)
