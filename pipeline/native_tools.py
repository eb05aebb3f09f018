"""Tool calls in a chat template's own format: which format a template uses, parsing it, and the messages it renders.

turnwise's environments and rewards read one protocol (:mod:`pipeline.chat`): an assistant message calls a
tool by writing ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. Models whose chat template
supports tools were trained on their own format instead, and are served behind OpenAI-compatible servers
with the matching tool parser (vLLM's ``--tool-call-parser``). So that an adapter trained here serves there
as it is, the rollout engine and SFT can render tools *natively*:

- the tool specs go to ``apply_chat_template(..., tools=...)`` (the environment leaves turnwise's tool
  instructions out of its system prompt);
- an assistant turn that calls tools is rendered as a message with ``tool_calls``, so the template writes
  the calls in its own format, and results come back as ``tool`` messages (with ``tool_call_id``);
- the model's sampled text is parsed in the template's format (:class:`ToolFormat`), and handed to the
  environment in the protocol's canonical spelling (:func:`pipeline.chat.join_tool_calls`). A malformed
  native call is still a call: the environment answers it with a tool error, as it does in text mode.

Two formats are known, named as vLLM names their parsers:

``hermes``
    Qwen2.5, Hermes and others: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` after
    optional text; several calls in a row.
``llama3_json``
    Llama 3.1 and 3.2: the whole message is ``{"name": ..., "parameters": {...}}`` (an optional
    ``<|python_tag|>`` before it; several calls separated by ``;``). The template renders one call per
    message and drops text beside it.

:func:`detect_tool_format` tells them apart by rendering a probe call through the template. A template
without tool support (the embedded SmolLM2's), or with a format not listed here, keeps the text protocol.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from pipeline.chat import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolCall,
    decode_json_prefix,
    has_tool_call_markup,
    join_tool_calls,
    parse_tool_calls,
    split_tool_calls,
)

logger = logging.getLogger(__name__)

#: The ``tool_calling`` settings: ``auto`` (native when the template supports tools), ``native`` (fail
#: when it does not) and ``text`` (turnwise's text protocol whatever the template).
TOOL_CALLING = ("auto", "native", "text")


def check_tool_calling(value: str, name: str = "tool_calling") -> str:
    """``value`` if it is one of :data:`TOOL_CALLING`; ``ValueError`` naming the setting as ``name`` if not.

    >>> check_tool_calling("json", "--tool-calling")
    Traceback (most recent call last):
    ValueError: --tool-calling must be one of auto, native, text, got 'json'.
    """
    if value not in TOOL_CALLING:
        raise ValueError(f"{name} must be one of {', '.join(TOOL_CALLING)}, got {value!r}.")
    return value


_PROBE_NAME = "turnwise_probe_tool"
_PROBE = {"type": "function", "function": {
    "name": _PROBE_NAME, "description": "A probe.",
    "parameters": {"type": "object", "properties": {"x": {"type": "string", "description": "A value."}},
                   "required": ["x"]}}}


@dataclass
class NativeReply:
    """What an assistant message says in a format: its text, its calls, and whether it tried to call.

    ``calls`` is ``None`` when the message is not a well-formed set of calls: plain text (``attempted``
    false), or a malformed call (``attempted`` true), which the environment must answer with a tool error.
    """

    content: str
    calls: list[ToolCall] | None
    attempted: bool


class ToolFormat:
    """How a template writes tool calls: parsing a sampled message, and the messages the template renders.

    The base class is turnwise's text protocol, which needs no conversion: a message is passed on as written.
    """

    name = "text"
    native = False
    #: Whether the template renders text beside calls, and more than one call per message.
    content_with_calls = True
    several_calls = True

    def parse(self, text: str) -> NativeReply:
        return NativeReply(text, None, has_tool_call_markup(text))

    def environment_text(self, text: str, reply: NativeReply) -> str:
        """The protocol text the environment reads for a sampled message (see :func:`pipeline.chat.join_tool_calls`)."""
        if reply.calls is not None:
            return join_tool_calls(reply.content, reply.calls)
        return text

    def can_render(self, content: str, calls: Sequence[ToolCall]) -> bool:
        """Whether the template renders this content and these calls as a ``tool_calls`` message, losing nothing."""
        return (self.content_with_calls or not content) and (self.several_calls or len(calls) == 1)

    def __repr__(self) -> str:
        return f"<tool format {self.name}>"


class HermesFormat(ToolFormat):
    """``<tool_call>`` blocks holding ``{"name", "arguments"}`` JSON, after optional text (Qwen2.5, Hermes)."""

    name = "hermes"
    native = True

    def parse(self, text: str) -> NativeReply:
        if not has_tool_call_markup(text):
            return NativeReply(text, None, False)
        start = text.find(TOOL_CALL_OPEN)
        if start < 0:  # a closing tag alone
            return NativeReply(text, None, True)
        parsed = parse_tool_calls(text)
        calls = [c for c in parsed if isinstance(c, ToolCall)]
        # Only whitespace may stand between and after the calls: text there is not part of any call.
        pieces = text[start:].split(TOOL_CALL_OPEN)[1:]
        outside = "".join(p.split(TOOL_CALL_CLOSE, 1)[1] if TOOL_CALL_CLOSE in p else p for p in pieces)
        if not calls or len(calls) != len(parsed) or outside.strip():
            return NativeReply(text, None, True)
        head = text[:start]
        return NativeReply(head[:-1] if head.endswith("\n") else head, calls, True)


class Llama3JsonFormat(ToolFormat):
    """A message that is ``{"name": ..., "parameters": {...}}`` JSON (Llama 3.1 and 3.2's JSON tool calling)."""

    name = "llama3_json"
    native = True
    content_with_calls = False
    several_calls = False
    python_tag = "<|python_tag|>"

    def parse(self, text: str) -> NativeReply:
        body = text.strip()
        tagged = body.startswith(self.python_tag)
        if tagged:
            body = body[len(self.python_tag):].lstrip()
        if not body.startswith("{"):
            return NativeReply(text, None, tagged)
        calls, pos = [], 0
        try:
            while pos < len(body):
                value, pos = decode_json_prefix(body, pos)
                calls.append(_llama_call(value))
                pos = len(body) - len(body[pos:].lstrip().removeprefix(";").lstrip())
        except ValueError:
            return NativeReply(text, None, True)
        return NativeReply("", calls, True)

    def environment_text(self, text: str, reply: NativeReply) -> str:
        if reply.calls is not None:
            return join_tool_calls("", reply.calls)
        if reply.attempted:
            # A call the format cannot read: handed on as a tool call whose JSON is broken, so the environment
            # answers it with a tool error (and counts it), as it answers a malformed call in text mode.
            return TOOL_CALL_OPEN + text.strip().removeprefix(self.python_tag) + TOOL_CALL_CLOSE
        return text


def _llama_call(value: Any) -> ToolCall:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        raise ValueError('a call is a JSON object with a string "name"')
    arguments = value.get("parameters", value.get("arguments"))
    if not isinstance(arguments, dict):
        raise ValueError('a call needs its "parameters" object')
    return ToolCall(value["name"], arguments)


TEXT = ToolFormat()
FORMATS: dict[str, ToolFormat] = {"hermes": HermesFormat(), "llama3_json": Llama3JsonFormat()}


# ---------------------------------------------------------------------------------------------------
# What a template supports
# ---------------------------------------------------------------------------------------------------


def _render(tokenizer, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def detect_tool_format(tokenizer) -> ToolFormat | None:
    """The native tool format of a tokenizer's chat template, or ``None`` when it has no tool support.

    The template renders a probe tool and one call of it; the text after the generation prompt is what a
    model trained on the template samples, and its shape names the format. A template that lists the
    tool but writes calls in a shape not in :data:`FORMATS` gives ``None`` too (with a warning), so the
    text protocol applies.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = {"role": "user", "content": "hello"}
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": _PROBE_NAME, "arguments": {"x": "1"}}}]}
    try:
        listed = _render(tokenizer, [user], [_PROBE], True)
        if _PROBE_NAME not in listed or _PROBE_NAME in _render(tokenizer, [user], None, True):
            return None
        written = _render(tokenizer, [user, call], [_PROBE], False)
    except Exception as exc:  # noqa: BLE001 - a template that cannot render tools does not support them
        logger.debug("the chat template cannot render a tool call (%s: %s): text protocol", type(exc).__name__, exc)
        return None
    if not written.startswith(listed):
        return None
    sampled = written[len(listed):]
    for fmt in FORMATS.values():
        reply = fmt.parse(sampled.split(tokenizer.eos_token)[0] if tokenizer.eos_token else sampled)
        if reply.calls and reply.calls[0].name == _PROBE_NAME and reply.calls[0].arguments == {"x": "1"}:
            return fmt
    logger.warning("the chat template supports tools, but writes calls in a format turnwise does not parse (%r); "
                   "using turnwise's text protocol", sampled[:120])
    return None


def resolve_tool_format(tokenizer, tool_calling: str = "auto") -> ToolFormat:
    """The :class:`ToolFormat` a setting of :data:`TOOL_CALLING` gives for a tokenizer (``TEXT`` for the text protocol)."""
    check_tool_calling(tool_calling)
    if tool_calling == "text":
        return TEXT
    fmt = detect_tool_format(tokenizer)
    if fmt is None:
        if tool_calling == "native":
            raise ValueError("tool_calling='native' needs a chat template with tool support (one that renders "
                             "apply_chat_template(..., tools=[...]) and assistant tool_calls in the hermes or "
                             "llama3_json format); this tokenizer's template has none. Use tool_calling='text' "
                             "(turnwise's <tool_call> protocol) or 'auto'.")
        return TEXT
    return fmt


# ---------------------------------------------------------------------------------------------------
# The messages a template renders
# ---------------------------------------------------------------------------------------------------


def call_id(turn: int, k: int) -> str:
    """The id of the ``k``-th call of assistant turn ``turn`` (what ``tool_call_id`` answers)."""
    return f"call_{turn}_{k}"


def tool_call_entries(calls: Sequence[ToolCall], turn: int) -> list[dict]:
    """``tool_calls`` entries in the form chat templates read (``arguments`` an object, not a JSON string)."""
    return [{"id": call_id(turn, k), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for k, c in enumerate(calls)]


def template_messages(messages: Sequence[dict], fmt: ToolFormat) -> list[dict]:
    """The conversation as a template with native tools renders it (``messages`` in turnwise's protocol).

    Each assistant message whose text is exactly the canonical spelling of its calls
    (:func:`pipeline.chat.split_tool_calls`), and which the template can write, becomes a message with
    ``tool_calls``; the ``tool`` messages that answer it, one per call, get the calls' ``tool_call_id``.
    Everything else is kept as it is. With the text protocol, ``messages`` is returned as is.
    """
    if not fmt.native:
        return [dict(m) for m in messages]
    out: list[dict] = []
    turn = 0
    i = 0
    while i < len(messages):
        message = dict(messages[i])
        i += 1
        if message.get("role") != "assistant":
            out.append(message)
            continue
        split = split_tool_calls(message.get("content") or "")
        answers = 0
        while i + answers < len(messages) and messages[i + answers].get("role") == "tool":
            answers += 1
        if split is not None and fmt.can_render(*split) and answers == len(split[1]):
            content, calls = split
            out.append({"role": "assistant", "content": content, "tool_calls": tool_call_entries(calls, turn)})
            for k in range(answers):
                out.append({**messages[i + k], "tool_call_id": call_id(turn, k)})
            i += answers
        else:
            out.append(message)
        turn += 1
    return out
