"""Chat format and the tool-call protocol.

Messages use the HF/OpenAI chat format, ``{"role": ..., "content": str}``. An assistant calls a tool by
writing ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; results come back as ``tool``
messages whose content is a JSON object. Everything a model writes is untrusted: this module turns
malformed calls into :class:`ToolCallError` values that environments hand back to the agent as
tool-error messages, so a bad generation costs the agent a turn instead of crashing a rollout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)

#: Most tool calls one assistant message may carry; more is treated as spam and rejected.
MAX_CALLS_PER_MESSAGE = 4

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


@dataclass
class ToolCall:
    """A parsed, well-formed tool call (its arguments are not yet checked against a schema)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolCallError:
    """A tool call the environment could not run.

    ``kind`` is one of ``malformed_tag``, ``invalid_json``, ``invalid_call``, ``too_many_calls``,
    ``unknown_tool``, ``invalid_arguments``, ``rejected`` (the tool refused, e.g. by policy) and
    ``tool_exception`` (the tool itself raised).
    """

    kind: str
    message: str
    name: str | None = None


class ToolError(Exception):
    """Raised by a tool for an expected, explainable failure (not found, refused by policy, ...)."""


def has_tool_call_markup(text: str) -> bool:
    """True when the text tries to call a tool, even if the call is malformed."""
    return TOOL_CALL_OPEN in text or TOOL_CALL_CLOSE in text


def parse_tool_calls(text: str) -> list[ToolCall | ToolCallError]:
    """Parse every ``<tool_call>`` block in an assistant message, in order.

    Returns an empty list for a plain message. Each block becomes a :class:`ToolCall` or a
    :class:`ToolCallError` saying what was wrong with it and how to write it instead.
    """
    if not has_tool_call_markup(text):
        return []
    bodies = _TOOL_CALL_RE.findall(text)
    stripped = _TOOL_CALL_RE.sub("", text)
    results: list[ToolCall | ToolCallError] = []
    if TOOL_CALL_OPEN in stripped or TOOL_CALL_CLOSE in stripped:
        results.append(
            ToolCallError(
                "malformed_tag",
                f"Unbalanced tool-call tags. Write each call as {TOOL_CALL_OPEN}"
                '{"name": "<tool>", "arguments": {...}}' + f"{TOOL_CALL_CLOSE}.",
            )
        )
    if len(bodies) > MAX_CALLS_PER_MESSAGE:
        return results + [
            ToolCallError(
                "too_many_calls",
                f"{len(bodies)} tool calls in one message; at most {MAX_CALLS_PER_MESSAGE} are allowed.",
            )
        ]
    for body in bodies:
        results.append(_parse_one(body))
    return results


def _parse_one(body: str) -> ToolCall | ToolCallError:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        return ToolCallError("invalid_json", f"The tool call is not valid JSON ({exc.msg} at char {exc.pos}).")
    if not isinstance(payload, dict):
        return ToolCallError("invalid_call", 'A tool call must be a JSON object: {"name": ..., "arguments": {...}}.')
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError("invalid_call", 'The tool call needs a string "name" field naming the tool.')
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):  # some models double-encode the arguments object
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCallError("invalid_call", f'"arguments" of {name!r} must be a JSON object.', name=name)
    return ToolCall(name=name, arguments=arguments)


def validate_arguments(arguments: dict[str, Any], schema: dict) -> str | None:
    """Check call arguments against a function's JSON schema; return a message saying what is wrong.

    ``schema`` is the ``{"type": "function", "function": {...}}`` form that
    ``transformers.utils.get_json_schema`` produces.
    """
    params = schema["function"]["parameters"]
    properties: dict = params.get("properties", {})
    missing = [p for p in params.get("required", []) if p not in arguments]
    if missing:
        return f"Missing required argument(s): {', '.join(missing)}."
    unexpected = [a for a in arguments if a not in properties]
    if unexpected:
        return f"Unexpected argument(s): {', '.join(unexpected)}. Accepted: {', '.join(properties) or 'none'}."
    for key, value in arguments.items():
        problem = _check_type(value, properties[key])
        if problem:
            return f"Argument {key!r}: {problem}"
    return None


def _check_type(value: Any, spec: dict) -> str | None:
    if value is None:
        return None if spec.get("nullable") else "must not be null."
    expected = spec.get("type")
    if expected is None:
        return None
    types = expected if isinstance(expected, list) else [expected]
    allowed = tuple(t for name in types for t in _JSON_TYPES.get(name, (object,)))
    if isinstance(value, bool) and bool not in allowed:  # bool is an int subclass in Python
        return f"expected {'/'.join(types)}, got boolean."
    if not isinstance(value, allowed):
        return f"expected {'/'.join(types)}, got {type(value).__name__}."
    if "enum" in spec and value not in spec["enum"]:
        return f"must be one of {spec['enum']}, got {value!r}."
    if isinstance(value, list) and "items" in spec:
        for i, item in enumerate(value):
            problem = _check_type(item, spec["items"])
            if problem:
                return f"item {i}: {problem}"
    return None


def tool_result_message(name: str, result: Any) -> dict:
    """The ``tool`` message for a successful call."""
    return {"role": "tool", "content": json.dumps({"tool": name, "ok": True, "result": result}, sort_keys=True)}


def tool_error_message(error: ToolCallError) -> dict:
    """The ``tool`` message for a failed call; the agent reads it and can try again."""
    body = {"tool": error.name, "ok": False, "error": error.message, "error_type": error.kind}
    return {"role": "tool", "content": json.dumps(body, sort_keys=True)}


def parse_tool_message(message: dict) -> dict | None:
    """Decode a tool message written by :func:`tool_result_message` / :func:`tool_error_message`."""
    if message.get("role") != "tool":
        return None
    try:
        body = json.loads(message["content"])
    except (json.JSONDecodeError, TypeError):
        return None
    return body if isinstance(body, dict) else None


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """Render a call the way the protocol expects a model to write it."""
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments}) + TOOL_CALL_CLOSE


def tools_prompt(schemas: list[dict]) -> str:
    """The system-prompt section that lists the tools and explains the calling protocol."""
    lines = [
        "# Tools",
        "To call a tool, reply with only a tool call, written exactly like this:",
        TOOL_CALL_OPEN + '{"name": "tool_name", "arguments": {"arg": "value"}}' + TOOL_CALL_CLOSE,
        "The result comes back in a tool message. Text without a tool call is sent to the customer.",
        "Available tools (JSON schema):",
    ]
    for schema in schemas:
        fn = schema["function"]
        lines.append(json.dumps({k: fn[k] for k in ("name", "description", "parameters")}, separators=(",", ":")))
    return "\n".join(lines)


Policy = Callable[[list[dict]], str]
