"""What a trajectory shows at a given turn: the evidence rule-based scorers check the agent against.

Scorers must work on any trajectory, including one rebuilt from a logged chat with no environment info,
so everything here is read from the messages themselves (the assistant's text, the ``tool`` messages
and the customer's messages), not from ``Turn.info``; ``info`` only adds the environment's own error
kinds when it is there.

What is domain knowledge (tool names, which tool supports which claim, statuses, identifiers, what the
agent asks the customer for) comes from the domain's :class:`~pipeline.envs.EvidenceRules`
(:func:`rules_for`): the trajectory's task's domain when the scorer is bound to tasks, else the default
domain's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from pipeline.chat import ToolCall, ToolCallError, has_tool_call_markup, parse_tool_calls, parse_tool_message
from pipeline.envs.registry import EvidenceRules, UnknownDomainError, default_domain, get_domain

if TYPE_CHECKING:
    from pipeline.envs.base import Task
    from pipeline.trajectory import Trajectory, Turn

#: Error kinds that mean the call was not written in the protocol's format (the strict parser or the
#: schema rejected it), as opposed to a well-formed call the tool refused or failed on.
FORMAT_ERRORS = frozenset({"malformed_tag", "invalid_json", "invalid_call", "too_many_calls", "unknown_tool",
                           "invalid_arguments"})

# A JSON object with a "name" and an "arguments" key outside <tool_call> tags: a call in a format the
# strict parser does not accept (a code fence, bare JSON, a <tool> tag), which the environment
# therefore sends to the customer as text.
_BARE_CALL = re.compile(r"""\{\s*["']name["']\s*:\s*["'][^"']+["']\s*,\s*["'](arguments|parameters|args)["']""")
_FUNCTION_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"


def rules_for(trajectory: "Trajectory | None" = None, tasks: "Mapping[str, Task] | None" = None) -> EvidenceRules:
    """The evidence rules of a trajectory's domain: its bound task's, its recorded ``metadata["domain"]``,
    else the default domain's (a logged chat with no task)."""
    task = tasks.get(trajectory.task_id) if tasks and trajectory is not None else None
    name = task.domain if task is not None else (trajectory.metadata.get("domain") if trajectory is not None else None)
    try:
        return get_domain(name).evidence if name else default_domain().evidence
    except UnknownDomainError:
        return default_domain().evidence


@dataclass(frozen=True)
class CompiledRules:
    """An :class:`~pipeline.envs.EvidenceRules` with its patterns compiled (see :func:`compiled`)."""

    action_claims: tuple[tuple[str, re.Pattern, frozenset[str]], ...]
    status: re.Pattern | None
    status_support: Mapping[str, frozenset[str]]
    identifiers: tuple[tuple[str, re.Pattern], ...]
    request_cue: re.Pattern | None
    request_keys: tuple[tuple[str, re.Pattern], ...]
    request_values: Mapping[str, re.Pattern]


_COMPILED: dict[int, tuple[EvidenceRules, CompiledRules]] = {}


def compiled(rules: EvidenceRules) -> CompiledRules:
    """``rules`` with every pattern compiled (case-insensitive), cached per rules object."""
    cached = _COMPILED.get(id(rules))
    if cached is not None and cached[0] is rules:
        return cached[1]
    flags = re.IGNORECASE
    out = CompiledRules(
        action_claims=tuple((kind, re.compile(p, flags), frozenset(tools)) for kind, p, tools in rules.action_claims),
        status=re.compile(rules.status_pattern, flags) if rules.status_pattern else None,
        status_support=dict(rules.status_support),
        identifiers=tuple((what, re.compile(p, flags)) for what, p in rules.identifier_patterns),
        request_cue=re.compile(rules.request_cue, flags) if rules.request_cue else None,
        request_keys=tuple((key, re.compile(p, flags)) for key, p in rules.request_keys.items()),
        request_values={key: re.compile(p) for key, p in rules.request_values.items()},
    )
    _COMPILED[id(rules)] = (rules, out)
    return out


def _function_syntax(names: tuple[str, ...]) -> re.Pattern | None:
    names = tuple(n for n in names if re.fullmatch(_FUNCTION_NAME, n))
    if not names:
        return None
    return re.compile(r"^\s*(" + "|".join(map(re.escape, sorted(set(names)))) + r")\s*\(", re.MULTILINE)


_SYNTAX: dict[tuple[str, ...], re.Pattern | None] = {}


def near_miss_call(text: str, tool_names: Iterable[str] | None = None) -> bool:
    """True when the text tries to call a tool in a format the strict parser does not see.

    ``tool_names`` are the tools a bare ``name(...)`` call counts for (default: the default domain's).

    >>> near_miss_call('```json\\n{"name": "get_order", "arguments": {"order_id": "W1"}}\\n```')
    True
    >>> near_miss_call('<tool_call>{"name": "get_order", "arguments": {}}</tool_call>')
    False
    >>> near_miss_call("Your order has shipped.")
    False
    >>> near_miss_call("lookup(serial='S1')"), near_miss_call("lookup(serial='S1')", ["lookup"])
    (False, True)
    """
    if has_tool_call_markup(text):
        return False
    if _BARE_CALL.search(text):
        return True
    names = tuple(tool_names) if tool_names is not None else default_domain().evidence.tool_names
    if names not in _SYNTAX:
        _SYNTAX[names] = _function_syntax(names)
    pattern = _SYNTAX[names]
    return bool(pattern is not None and pattern.search(text))


_LISTED_TOOL = re.compile(r'^\{"name":"(' + _FUNCTION_NAME + r')","description":', re.MULTILINE)


def tool_names(trajectory: "Trajectory", tasks: "Mapping[str, Task] | None" = None) -> tuple[str, ...]:
    """The tools a trajectory's agent could call: its domain's, those its system prompt lists, and those
    its tool messages name."""
    names = list(rules_for(trajectory, tasks).tool_names)
    for message in trajectory.messages:
        if message.get("role") == "system":
            names += _LISTED_TOOL.findall(str(message.get("content") or ""))
        elif message.get("role") == "tool":
            body = parse_tool_message(message)
            if body is not None and isinstance(body.get("tool"), str):
                names.append(body["tool"])
    return tuple(dict.fromkeys(names))


@dataclass
class ToolResult:
    """One tool message, paired with the call that produced it when the pairing is certain."""

    name: str | None
    arguments: dict[str, Any]
    ok: bool
    result: Any = None
    error_type: str | None = None


@dataclass
class TurnView:
    """One assistant turn, decoded."""

    index: int
    text: str
    calls: list[ToolCall | ToolCallError]
    results: list[ToolResult]
    replies: list[str]  # the customer's messages that answered this turn
    error_kinds: list[str]

    @property
    def is_message(self) -> bool:
        """A customer-facing message (no tool-call markup at all)."""
        return not has_tool_call_markup(self.text)


def opening_user_text(trajectory: "Trajectory") -> list[str]:
    """The customer's messages before the first assistant turn."""
    out = []
    for message in trajectory.messages:
        if message.get("role") == "assistant":
            break
        if message.get("role") == "user":
            out.append(str(message.get("content") or ""))
    return out


def view_turn(turn: "Turn") -> TurnView:
    text = turn.assistant if isinstance(turn.assistant, str) else ""
    calls = parse_tool_calls(text)
    bodies = [b for b in (parse_tool_message(m) for m in turn.env_messages) if b is not None]
    results: list[ToolResult] = []
    paired = len(bodies) == len(calls)
    for i, body in enumerate(bodies):
        call = calls[i] if paired else None
        args = call.arguments if isinstance(call, ToolCall) else {}
        results.append(ToolResult(body.get("tool"), args, bool(body.get("ok")), body.get("result"),
                                  body.get("error_type")))
    kinds = [e.get("kind", "error") for e in turn.info.get("tool_errors", [])] if turn.info else []
    if not kinds:
        kinds = [r.error_type or "error" for r in results if not r.ok]
    if not kinds:
        kinds = [c.kind for c in calls if isinstance(c, ToolCallError)]
    replies = [str(m.get("content") or "") for m in turn.env_messages if m.get("role") == "user"]
    return TurnView(turn.index, text, calls, results, replies, kinds)


@dataclass
class Evidence:
    """Everything established before a turn: what the customer said and what the tools returned."""

    user_text: list[str] = field(default_factory=list)
    results: list[ToolResult] = field(default_factory=list)
    system_text: list[str] = field(default_factory=list)  # the instructions and policy the agent was given

    @property
    def ok_results(self) -> list[ToolResult]:
        return [r for r in self.results if r.ok]

    def succeeded(self, tools: set[str] | frozenset[str]) -> bool:
        return any(r.name in tools for r in self.ok_results)


def evidence_before(trajectory: "Trajectory", index: int) -> Evidence:
    """The customer's messages and tool results from the opening up to (not including) turn ``index``."""
    system = [str(m.get("content") or "") for m in trajectory.messages if m.get("role") == "system"]
    evidence = Evidence(user_text=opening_user_text(trajectory), system_text=system)
    for turn in trajectory.turns[:index]:
        view = view_turn(turn)
        evidence.results += view.results
        evidence.user_text += view.replies
    return evidence


def walk_values(value: Any) -> Iterator[Any]:
    """Every scalar inside a JSON value (dict values and list items, recursively)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from walk_values(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk_values(v)
    else:
        yield value


def item_sums(record: Any, limit: int = 8) -> set[float]:
    """Sums of ``price * quantity`` over every subset of each ``items`` list in a record (amounts an agent
    may legitimately quote for a multi-item refund).

    >>> sorted(item_sums({"items": [{"price": 10.0, "quantity": 1}, {"price": 2.5, "quantity": 2}]}))
    [5.0, 10.0, 15.0]
    """
    out: set[float] = set()
    if isinstance(record, dict):
        items = record.get("items")
        if isinstance(items, list):
            prices = [float(i["price"]) * int(i.get("quantity", 1)) for i in items
                      if isinstance(i, dict) and isinstance(i.get("price"), (int, float))][:limit]
            for r in range(1, len(prices) + 1):
                for combo in combinations(prices, r):
                    out.add(round(sum(combo), 2))
        for v in record.values():
            out |= item_sums(v, limit)
    elif isinstance(record, list):
        for v in record:
            out |= item_sums(v, limit)
    return out


def json_dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
