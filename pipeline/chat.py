"""Chat format and the tool-call protocol.

Messages use the HF/OpenAI chat format, ``{"role": ..., "content": str}``. An assistant calls a tool by
writing ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; results come back as ``tool``
messages whose content is a JSON object. Everything a model writes is untrusted: this module turns
malformed calls into :class:`ToolCallError` values that environments hand back to the agent as
tool-error messages, so a bad generation costs the agent a turn instead of crashing a rollout.

Hostile text is bounded, not trusted:

- **Linear time.** :func:`scan_tagged` finds ``<tag>...</tag>`` blocks in one left-to-right pass, so
  parsing a message costs time proportional to its length whatever it holds (unclosed tags, thousands
  of tags, nested tags). Tool calls and SOP final outputs are both read through it.
- **A size cap per assistant message**, :data:`MAX_MESSAGE_CHARS` (65,536 characters). An honest turn
  never comes near it: 65,536 characters is about 16,000 tokens of English (about 4 characters a
  token), twice the default per-episode token budget (``max_total_tokens`` 8,192) and over 80 times the
  largest per-turn budget a shipped recipe sets (``max_new_tokens`` 192). The cap is enforced where
  messages enter: ``Environment.step`` answers a longer message with a ``message_too_long`` tool error
  without reading it, and the logged-conversation reader (:mod:`rewards.logged`) refuses the line,
  naming the file, line and message.
- **Strict JSON** (:func:`loads_untrusted`). A tool call's JSON may not hold ``NaN`` or ``Infinity`` (a
  NaN amount passes every ``amount > limit`` check), numbers out of float range, integers longer than
  :data:`MAX_INT_DIGITS` digits, duplicate keys (two readers could disagree on which one counts) or
  nesting deeper than :data:`MAX_JSON_DEPTH`. Each becomes an ``invalid_json`` tool error that says
  what was wrong; nothing raises.
- **Bounded echoes.** Error messages quote what the model wrote (a tool name, an argument) clipped to a
  few dozen characters, so a huge name cannot make the environment's answer huge.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

#: Most tool calls one assistant message may carry; more is treated as spam and rejected.
MAX_CALLS_PER_MESSAGE = 4

#: Most characters one assistant message may have (see the module docstring for why this size).
MAX_MESSAGE_CHARS = 65_536

#: Deepest nesting of objects and arrays a tool call's JSON may have; honest calls use 3 or 4 levels.
MAX_JSON_DEPTH = 32

#: Most digits an integer in a tool call's JSON may have (a 64-bit integer has at most 20).
MAX_INT_DIGITS = 100

#: Longest tool name a call may give (tool names are identifiers such as ``get_order``).
MAX_TOOL_NAME_CHARS = 128

#: How much of a model-written value an error message quotes.
_ECHO_CHARS = 60

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
    ``unknown_tool``, ``invalid_arguments``, ``rejected`` (the tool refused, e.g. by policy),
    ``tool_exception`` (the tool itself raised, or returned a result that cannot be sent as JSON) and
    ``message_too_long`` (the message exceeds :data:`MAX_MESSAGE_CHARS` and was not read).
    """

    kind: str
    message: str
    name: str | None = None


class ToolError(Exception):
    """Raised by a tool for an expected, explainable failure (not found, refused by policy, ...)."""


def echo(value: Any, limit: int = _ECHO_CHARS) -> str:
    """``repr`` of a model-written value, clipped so that an error message stays short.

    >>> echo("get_order")
    "'get_order'"
    >>> echo("x" * 1000, limit=5)
    "'xxxxx'... (1000 characters)"
    """
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------------
# Tagged blocks
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaggedBlocks:
    """The ``<tag>...</tag>`` blocks of a text, as :func:`scan_tagged` finds them.

    ``bodies`` are the closed blocks' contents, in order. ``unbalanced`` is true when a tag stands
    outside them: a closing tag with no opening tag before it, or an opening tag that is never closed.
    """

    bodies: list[str]
    unbalanced: bool


def scan_tagged(text: str, open_tag: str, close_tag: str) -> TaggedBlocks:
    """Find the ``open_tag ... close_tag`` blocks of ``text`` in one left-to-right pass.

    Each opening tag is closed by the first closing tag after it (the non-greedy regex
    ``open(.*?)close`` pairs them the same way), so a body may contain a further opening tag, which the
    body's own parser then rejects. An opening tag that is never closed makes the text unbalanced and
    ends the scan. Time is linear in ``len(text)``: every character is looked at a bounded number of
    times, whatever the text holds.

    >>> scan_tagged("a <t>1</t> b <t>2</t>", "<t>", "</t>")
    TaggedBlocks(bodies=['1', '2'], unbalanced=False)
    >>> scan_tagged("</t> <t>1</t> <t>open", "<t>", "</t>")
    TaggedBlocks(bodies=['1'], unbalanced=True)
    """
    if not open_tag or not close_tag:
        raise ValueError("scan_tagged needs a non-empty opening and closing tag.")
    bodies: list[str] = []
    unbalanced = False
    pos, n_open, n_close = 0, len(open_tag), len(close_tag)
    while True:
        start = text.find(open_tag, pos)
        # A closing tag between the previous block and this opening tag (or the end) closes nothing.
        if text.find(close_tag, pos, len(text) if start < 0 else start + n_close - 1) >= 0:
            unbalanced = True
        if start < 0:
            break
        end = text.find(close_tag, start + n_open)
        if end < 0:
            unbalanced = True  # never closed; any later opening tag is unclosed too
            break
        bodies.append(text[start + n_open : end])
        pos = end + n_close
    return TaggedBlocks(bodies, unbalanced)


# ---------------------------------------------------------------------------------------------------
# JSON a model wrote
# ---------------------------------------------------------------------------------------------------


class _Rejected(ValueError):
    """A JSON text that decodes, but holds something a tool call may not (NaN, a duplicate key, ...)."""


def _reject_constant(name: str) -> Any:
    raise _Rejected(f"{name} is not a number a tool accepts; write a finite number")


def _checked_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Rejected(f"the number {echo(text)} is out of range")
    return value


def _checked_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _Rejected(f"an integer with {digits} digits; numbers have at most {MAX_INT_DIGITS}")
    return int(text)


class DuplicateKeyError(ValueError):
    """A JSON object that gives one key twice, which ``json.loads`` would keep the last of, silently."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the key {echo(key)} appears twice in one object")
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook`` for JSON whose keys must be unique (model-written tool calls, task
    files, SOP folders): raises :class:`DuplicateKeyError`.

    >>> json.loads('{"a": 1, "a": 2}', object_pairs_hook=unique_keys)
    Traceback (most recent call last):
    ...
    pipeline.chat.DuplicateKeyError: the key 'a' appears twice in one object
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


_STRICT = json.JSONDecoder(parse_float=_checked_float, parse_int=_checked_int, parse_constant=_reject_constant,
                           object_pairs_hook=unique_keys)


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """The nesting depth of decoded JSON (a scalar is 0, ``[]`` is 1), counted up to ``limit + 1``.

    Iterative, so it never recurses however deep the value is.

    >>> json_depth({"a": [1, {"b": 2}]}), json_depth(3)
    (3, 0)
    """
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _decode(text: str, start: int, depth_limit: int) -> tuple[Any, int]:
    """One strict JSON value at ``text[start:]`` (trailing text allowed); raises ``ValueError`` with a reason."""
    try:
        value, end = _STRICT.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at char {exc.pos}") from None
    except (_Rejected, DuplicateKeyError) as exc:
        raise ValueError(str(exc)) from None
    except RecursionError:
        raise ValueError(f"nested more than {depth_limit} levels deep") from None
    except ValueError as exc:  # anything else the decoder refuses (Python's own integer limits, ...)
        raise ValueError(str(exc)[:200]) from None
    if json_depth(value, depth_limit) > depth_limit:
        raise ValueError(f"nested more than {depth_limit} levels deep")
    return value, end


def loads_untrusted(text: str, depth_limit: int = MAX_JSON_DEPTH) -> tuple[Any, str | None]:
    """Decode a JSON text a model wrote: ``(value, None)``, or ``(None, why not)``. Never raises.

    Stricter than ``json.loads`` (see the module docstring): no NaN or Infinity, no out-of-range
    numbers, no integers over :data:`MAX_INT_DIGITS` digits, no duplicate keys, no nesting deeper than
    ``depth_limit``.

    >>> loads_untrusted('{"amount": 12.5}')
    ({'amount': 12.5}, None)
    >>> loads_untrusted('{"amount": NaN}')
    (None, 'NaN is not a number a tool accepts; write a finite number')
    """
    if not isinstance(text, str):
        return None, f"expected JSON text, got {type(text).__name__}"
    try:
        start = len(text) - len(text.lstrip(" \t\n\r"))
        value, end = _decode(text, start, depth_limit)
    except ValueError as exc:
        return None, str(exc)
    if text[end:].strip(" \t\n\r"):
        return None, f"Extra data at char {end}"
    return value, None


def first_json_object(text: str, max_starts: int = 16, depth_limit: int = MAX_JSON_DEPTH) -> tuple[dict | None, str | None]:
    """The first JSON object in ``text``, which may be wrapped in prose or a code fence. Never raises.

    Decoding is tried at each ``{`` in turn, at most ``max_starts`` of them, so the time stays linear in
    ``len(text)`` (decoding from every ``{`` of a hostile text would be quadratic). The decoding is that
    of :func:`loads_untrusted`. Returns ``(object, None)`` or ``(None, why not)``.

    >>> first_json_object('Decision: {"decision": "approve"} done')
    ({'decision': 'approve'}, None)
    >>> first_json_object("{'decision': 'approve'}")
    (None, 'no JSON object (Expecting property name enclosed in double quotes at char 1)')
    """
    last = "no '{' in the text"
    start = text.find("{")
    tried = 0
    while start >= 0 and tried < max_starts:
        tried += 1
        try:
            value, _ = _decode(text, start, depth_limit)
        except ValueError as exc:
            last = str(exc)
        else:
            if isinstance(value, dict):
                return value, None
        start = text.find("{", start + 1)
    if start >= 0:
        return None, f"no JSON object in the first {max_starts} places a '{{' starts one"
    return None, f"no JSON object ({last})"


# ---------------------------------------------------------------------------------------------------
# Tool calls
# ---------------------------------------------------------------------------------------------------


def has_tool_call_markup(text: str) -> bool:
    """True when the text tries to call a tool, even if the call is malformed."""
    return TOOL_CALL_OPEN in text or TOOL_CALL_CLOSE in text


def message_too_long(text: str) -> ToolCallError | None:
    """The error for an assistant message over :data:`MAX_MESSAGE_CHARS`, or ``None`` if it fits."""
    if len(text) <= MAX_MESSAGE_CHARS:
        return None
    return ToolCallError(
        "message_too_long",
        f"The message has {len(text):,} characters; an assistant message may have at most {MAX_MESSAGE_CHARS:,}. "
        "It was not read. Reply with a shorter message, or with only the tool call.",
    )


def parse_tool_calls(text: str) -> list[ToolCall | ToolCallError]:
    """Parse every ``<tool_call>`` block in an assistant message, in order.

    Returns an empty list for a plain message. Each block becomes a :class:`ToolCall` or a
    :class:`ToolCallError` saying what was wrong with it and how to write it instead. Never raises,
    and takes time linear in the length of the text (:func:`scan_tagged`, :func:`loads_untrusted`).
    """
    if not has_tool_call_markup(text):
        return []
    blocks = scan_tagged(text, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
    results: list[ToolCall | ToolCallError] = []
    if blocks.unbalanced:
        results.append(
            ToolCallError(
                "malformed_tag",
                f"Unbalanced tool-call tags. Write each call as {TOOL_CALL_OPEN}"
                '{"name": "<tool>", "arguments": {...}}' + f"{TOOL_CALL_CLOSE}.",
            )
        )
    if len(blocks.bodies) > MAX_CALLS_PER_MESSAGE:
        return results + [
            ToolCallError(
                "too_many_calls",
                f"{len(blocks.bodies)} tool calls in one message; at most {MAX_CALLS_PER_MESSAGE} are allowed.",
            )
        ]
    for body in blocks.bodies:
        results.append(_parse_one(body))
    return results


def _parse_one(body: str) -> ToolCall | ToolCallError:
    payload, problem = loads_untrusted(body)
    if problem is not None:
        nested = (f" A {TOOL_CALL_OPEN} block cannot hold another {TOOL_CALL_OPEN}: close each call with "
                  f"{TOOL_CALL_CLOSE} before starting the next." if TOOL_CALL_OPEN in body else "")
        return ToolCallError("invalid_json", f"The tool call is not valid JSON ({problem}).{nested}")
    if not isinstance(payload, dict):
        return ToolCallError("invalid_call", 'A tool call must be a JSON object: {"name": ..., "arguments": {...}}.')
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError("invalid_call", 'The tool call needs a string "name" field naming the tool.')
    if len(name) > MAX_TOOL_NAME_CHARS:
        return ToolCallError("invalid_call", f"The tool name {echo(name)} is too long; tool names have at most "
                                             f"{MAX_TOOL_NAME_CHARS} characters.", name=name[:_ECHO_CHARS])
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):  # some models double-encode the arguments object
        decoded, problem = loads_untrusted(arguments)
        if problem is None:
            arguments = decoded
    if not isinstance(arguments, dict):
        return ToolCallError("invalid_call", f'"arguments" of {echo(name)} must be a JSON object.', name=name)
    return ToolCall(name=name, arguments=arguments)


def validate_arguments(arguments: dict[str, Any], schema: dict) -> str | None:
    """Check call arguments against a function's JSON schema; return a message saying what is wrong.

    ``schema`` is the ``{"type": "function", "function": {...}}`` form that
    ``transformers.utils.get_json_schema`` produces. Quoted argument names and values are clipped.
    """
    params = schema["function"]["parameters"]
    properties: dict = params.get("properties", {})
    missing = [p for p in params.get("required", []) if p not in arguments]
    if missing:
        return f"Missing required argument(s): {', '.join(missing)}."
    unexpected = [a for a in arguments if a not in properties]
    if unexpected:
        shown = ", ".join(a if len(a) <= _ECHO_CHARS else echo(a) for a in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        return f"Unexpected argument(s): {shown}{more}. Accepted: {', '.join(properties) or 'none'}."
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
        return f"must be one of {spec['enum']}, got {echo(value)}."
    if isinstance(value, list) and "items" in spec:
        for i, item in enumerate(value):
            problem = _check_type(item, spec["items"])
            if problem:
                return f"item {i}: {problem}"
    return None


def tool_result_message(name: str, result: Any) -> dict:
    """The ``tool`` message for a successful call.

    Raises ``TypeError`` or ``ValueError`` when ``result`` cannot be written as JSON (a set, bytes, a
    value that contains itself); environments turn that into a ``tool_exception`` tool error.
    """
    return {"role": "tool", "content": json.dumps({"tool": name, "ok": True, "result": result}, sort_keys=True)}


def tool_error_message(error: ToolCallError) -> dict:
    """The ``tool`` message for a failed call; the agent reads it and can try again."""
    body = {"tool": error.name, "ok": False, "error": error.message, "error_type": error.kind}
    return {"role": "tool", "content": json.dumps(body, sort_keys=True)}


def parse_tool_message(message: dict) -> dict | None:
    """Decode a tool message written by :func:`tool_result_message` / :func:`tool_error_message`.

    ``None`` for anything else, including a tool message (say, in a logged conversation) whose content
    is not a JSON object or is nested too deeply to decode.
    """
    if not isinstance(message, dict) or message.get("role") != "tool":
        return None
    content = message.get("content")
    if not isinstance(content, str):
        return None
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; so is Python's integer limit
        return None
    return body if isinstance(body, dict) else None


def format_tool_call(name: str, arguments: dict[str, Any] | str) -> str:
    """Render a call the way the protocol expects a model to write it.

    ``arguments`` is normally an object; a string is kept as written (a native call whose arguments were
    not valid JSON), which the parser answers with an ``invalid_call`` tool error.
    """
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments}) + TOOL_CALL_CLOSE


def join_tool_calls(content: str, calls: list[ToolCall]) -> str:
    """The protocol text of a message that says ``content`` and makes ``calls``: the canonical spelling.

    Structured messages (an OpenAI ``tool_calls`` list, Bedrock ``toolUse`` blocks, a chat template's native
    calls) all become this text, so environments and rewards read one protocol. :func:`split_tool_calls`
    inverts it.

    >>> join_tool_calls("Let me check.", [ToolCall("get_order", {"order_id": "W1"})])
    'Let me check.\\n<tool_call>{"name": "get_order", "arguments": {"order_id": "W1"}}</tool_call>'
    """
    calls_text = "".join(format_tool_call(c.name, c.arguments) for c in calls)
    return content + ("\n" if content and calls else "") + calls_text


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]] | None:
    """``(content, calls)`` when ``text`` is exactly :func:`join_tool_calls` of them, else ``None``.

    ``None`` also for a message without calls, and for one whose calls are malformed or spelt another way
    (other spacing, text after a call): such a message is kept as text, as a tool-call parser of an
    OpenAI-compatible server keeps it, and answered with what the environment answered.

    >>> split_tool_calls('Sure.\\n<tool_call>{"name": "get_order", "arguments": {}}</tool_call>')
    ('Sure.', [ToolCall(name='get_order', arguments={})])
    >>> split_tool_calls('<tool_call>{"name":"get_order","arguments":{}}</tool_call>') is None
    True
    """
    start = text.find(TOOL_CALL_OPEN)
    if start < 0 or len(text) > MAX_MESSAGE_CHARS:
        return None
    calls = parse_tool_calls(text)
    if not calls or not all(isinstance(c, ToolCall) for c in calls):
        return None
    head = text[:start]
    content = head[:-1] if head.endswith("\n") else head
    return (content, calls) if join_tool_calls(content, calls) == text else None  # type: ignore[arg-type]


def decode_json_prefix(text: str, start: int = 0) -> tuple[Any, int]:
    """One strict JSON value at ``text[start:]`` and where it ends (trailing text allowed).

    The decoding of :func:`loads_untrusted`; raises ``ValueError`` saying what is wrong.
    """
    return _decode(text, start, MAX_JSON_DEPTH)


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
