"""What a trajectory shows at a given turn: the evidence rule-based scorers check the agent against.

Scorers must work on any trajectory, including one rebuilt from a logged chat with no environment info,
so everything here is read from the messages themselves (the assistant's text, the ``tool`` messages
and the customer's messages), not from ``Turn.info``; ``info`` only adds the environment's own error
kinds when it is there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Any, Iterator

from pipeline.chat import ToolCall, ToolCallError, has_tool_call_markup, parse_tool_calls, parse_tool_message

if TYPE_CHECKING:
    from pipeline.trajectory import Trajectory, Turn

#: Error kinds that mean the call was not written in the protocol's format (the strict parser or the
#: schema rejected it), as opposed to a well-formed call the tool refused or failed on.
FORMAT_ERRORS = frozenset({"malformed_tag", "invalid_json", "invalid_call", "too_many_calls", "unknown_tool",
                           "invalid_arguments"})

# A JSON object with a "name" and an "arguments" key outside <tool_call> tags: a call in a format the
# strict parser does not accept (a code fence, bare JSON, a <tool> tag), which the environment
# therefore sends to the customer as text.
_BARE_CALL = re.compile(r"""\{\s*["']name["']\s*:\s*["'][^"']+["']\s*,\s*["'](arguments|parameters|args)["']""")
_FUNCTION_SYNTAX = re.compile(r"^\s*(verify_identity|get_order|list_orders|track_shipment|get_product|cancel_order|"
                              r"refund_items|exchange_item|update_shipping_address|issue_store_credit|"
                              r"escalate_to_human)\s*\(", re.MULTILINE)


def near_miss_call(text: str) -> bool:
    """True when the text tries to call a tool in a format the strict parser does not see.

    >>> near_miss_call('```json\\n{"name": "get_order", "arguments": {"order_id": "W1"}}\\n```')
    True
    >>> near_miss_call('<tool_call>{"name": "get_order", "arguments": {}}</tool_call>')
    False
    >>> near_miss_call("Your order has shipped.")
    False
    """
    if has_tool_call_markup(text):
        return False
    return bool(_BARE_CALL.search(text) or _FUNCTION_SYNTAX.search(text))


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
