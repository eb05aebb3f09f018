"""Conversation files in the formats teams already log: turnwise's own, OpenAI chat, and Bedrock Converse.

Everything that reads logged conversations (``turnwise score``, ``audit --logged``, ``sft --demos``,
``benchmarks/rejudge.py``) reads them through :func:`read_rows`, which turns each line into turnwise's own
shape: ``{"messages": [...], "task_id"?, "seed"?, "outcome"?, ...}`` with messages in the protocol the
environments, rewards and evaluation read (:mod:`pipeline.chat`). The formats, one JSON object per line:

``turnwise``
    ``messages`` of ``{"role", "content": str}``; a tool call is ``<tool_call>{json}</tool_call>`` text in an
    assistant message and its result a ``tool`` message holding the environment's JSON envelope
    (``{"tool", "ok", "result"}`` or ``{"tool", "ok": false, "error", "error_type"}``). A line may also be a
    whole trajectory record (``turns`` and ``outcome``, as ``turnwise eval --out`` writes them).
``openai``
    Chat Completions messages: ``content`` a string, ``null`` or an array of ``{"type": "text", "text"}``
    parts; roles ``system``, ``developer`` (read as system), ``user``, ``assistant`` (with ``tool_calls``:
    ``{"id", "type": "function", "function": {"name", "arguments": JSON text}}``) and ``tool`` (with the
    ``tool_call_id`` of a call of the assistant message before it).
``bedrock``
    Converse messages: ``role`` user or assistant, ``content`` a list of blocks (``text``, ``toolUse``
    ``{toolUseId, name, input}``, ``toolResult`` ``{toolUseId, content: [{json} | {text}], status}``;
    ``cachePoint`` and ``reasoningContent`` blocks are skipped), and the line's ``system`` list of
    ``{"text"}`` blocks.

Every format may carry turnwise's line fields (``task_id``, ``seed``, ``outcome``, and any other key, kept as
metadata). **Detection** is per file: a line is Bedrock if it has a ``system`` block list or content-block
lists without ``type``; OpenAI if a message has ``tool_calls``, ``tool_call_id``, the ``developer`` role or
content parts with a ``type``; turnwise if it is a trajectory record; and undecided if it is plain chat
(string contents only), which every format reads the same. The first decided line sets the file's format
and every line must fit it; ``format=`` (``--format``) forces one. A line that fits no format, or not the
file's, is an error naming the file, the line, the field and what was expected: never a silent mis-score.

**What conversion keeps.** A structured call becomes the protocol's canonical text
(:func:`pipeline.chat.join_tool_calls`) and a result the environment's envelope: the tool's name comes from
the call it answers, results are put in the order of the calls, an OpenAI result ``{"error": ...}`` and a
Bedrock ``status: "error"`` are failures, anything else succeeded. Writing (:func:`convert_row`) inverts
this: turnwise -> OpenAI or Bedrock -> turnwise gives back the very same messages, so every scorer reads
the same thing (tests/test_conversations.py). What a structured format cannot say is kept as text: an
assistant message whose calls are malformed stays text, and the environment's error for it is a result
without a call id, which a reader accepts only right after such a message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pipeline.chat import (
    ToolCall,
    ToolCallError,
    format_tool_call,
    has_tool_call_markup,
    join_tool_calls,
    loads_untrusted,
    parse_tool_message,
    split_tool_calls,
    tool_error_message,
    tool_result_message,
)
from pipeline.envs.base import RecordError, json_kind
from pipeline.envs.schema import JsonLinesError, read_json_lines

FORMATS = ("turnwise", "openai", "bedrock")
NAMES = {"turnwise": "turnwise", "openai": "OpenAI chat", "bedrock": "Bedrock Converse"}


def check_format(format: str | None, option: str = "--format") -> str | None:
    """``format`` if it is ``auto`` (or None: detect) or one of :data:`FORMATS`; ``ValueError`` naming ``option``."""
    if format not in (None, "auto", *FORMATS):
        raise ValueError(f"{option} must be auto (detect it) or one of {', '.join(FORMATS)}, got {format!r}.")
    return format

#: The error kind of a failed result in a log that does not say why (an OpenAI ``{"error": ...}``, a
#: Bedrock ``status: "error"``): a failure of the tool, not of the call's format.
EXTERNAL_ERROR = "tool_error"

_OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")
_BEDROCK_BLOCKS = ("text", "toolUse", "toolResult")
_BEDROCK_SKIPPED = ("cachePoint", "reasoningContent")
_ENVELOPE_KEYS = {True: {"tool", "ok", "result"}, False: {"tool", "ok", "error", "error_type"}}


class ConversationFormatError(RecordError):
    """A line that is not a conversation in the format it is read as (the message names the field)."""


def _fail(where: str, problem: str) -> None:
    raise ConversationFormatError(f"{where}: {problem}")


# ---------------------------------------------------------------------------------------------------
# Detection and reading
# ---------------------------------------------------------------------------------------------------


def detect_format(row: Any) -> str | None:
    """The format a line's shape says, or ``None`` when it fits every format (plain chat) or none (see module)."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        return None
    if "turns" in row and "outcome" in row:
        return "turnwise"
    if isinstance(row.get("system"), list):
        return "bedrock"
    for message in row["messages"]:
        if not isinstance(message, dict):
            continue
        if "tool_calls" in message or "tool_call_id" in message or message.get("role") == "developer":
            return "openai"
        content = message.get("content")
        blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
        if blocks:
            return "openai" if any("type" in b for b in blocks) else "bedrock"
    return None


def read_rows(path: Path | str, format: str | None = None) -> Iterator[tuple[int, dict | Any, str]]:
    """``(line number, row in turnwise's shape, format)`` for each line of a conversation file.

    ``format`` is one of :data:`FORMATS`, or ``None``/``"auto"`` to detect it (see the module docstring).
    Raises ``ValueError`` naming the file and line for anything that is not a conversation of the format. A
    row that is not an object with a ``messages`` list is yielded as it is, for the caller's own message.
    """
    path = Path(path)
    if check_format(format, "format") == "auto":
        format = None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file. Pass a JSONL file with one conversation per line.")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; it needs one conversation (a JSON object) per line.")
    rows = list(_json_lines(path))
    if not rows:
        raise ValueError(f"{path}: the file holds only blank lines; it needs one conversation per line.")
    chosen, decided_at = format, None
    if chosen is None:
        for lineno, row in rows:
            detected = detect_format(row)
            if detected is not None:
                chosen, decided_at = detected, lineno
                break
    for lineno, row in rows:
        fmt = chosen or "turnwise"
        try:
            detected = detect_format(row)
            if detected is not None and detected != fmt:
                raise ConversationFormatError(
                    f"this line is in the {NAMES[detected]} format, but " + (
                        f"--format says {fmt}; leave --format out to read the file as it is" if format else
                        f"line {decided_at} set the file's format to {NAMES[fmt]}; a file holds one format (convert "
                        "the line, or split the file)") + ".")
            yield lineno, to_turnwise_row(row, fmt), fmt
        except (KeyError, TypeError, ValueError) as exc:  # RecordError is a ValueError
            how = (f"read as {NAMES[fmt]}, as --format says" if format else
                   f"read as {NAMES[fmt]}, detected from line {decided_at}" if decided_at else
                   f"read as {NAMES[fmt]}")
            raise ValueError(f"{path}, line {lineno}: {exc} ({how})") from None


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        for lineno, row in read_json_lines(path):
            if lineno == 1 and isinstance(row, list) and row and all(isinstance(r, dict) and "messages" in r for r in row):
                raise ValueError(_array_hint(path))
            yield lineno, row
    except JsonLinesError as exc:
        if exc.lineno == 1 and exc.problem.startswith("not valid JSON") and _starts_with_bracket(path):
            raise ValueError(_array_hint(path)) from None
        raise


def _starts_with_bracket(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


def _array_hint(path: Path) -> str:
    return (f"{path}, line 1: the file is a JSON array, not JSONL; write one conversation (a JSON object) per line, "
            f"e.g. jq -c '.[]' {path.name} > {path.stem}.jsonl")


def to_turnwise_row(row: Any, format: str) -> Any:
    """A line in ``format`` as a line in turnwise's shape (messages in the protocol, other keys kept)."""
    if format == "turnwise" or not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        return row
    if format == "openai":
        extra = {k: v for k, v in row.items() if k != "messages"}
        return {"messages": from_openai(row["messages"]), **extra}
    extra = {k: v for k, v in row.items() if k not in ("messages", "system")}
    return {"messages": from_bedrock(row["messages"], row.get("system")), **extra}


# ---------------------------------------------------------------------------------------------------
# Tool results, all formats
# ---------------------------------------------------------------------------------------------------


def is_envelope(body: Any) -> bool:
    """Whether a decoded tool message is the environment's own envelope (a result or an error)."""
    return (isinstance(body, dict) and isinstance(body.get("ok"), bool) and set(body) == _ENVELOPE_KEYS[body["ok"]]
            and isinstance(body.get("tool"), (str, type(None))))


def _error(name: str | None, message: str, kind: str | None = None) -> str:
    return tool_error_message(ToolCallError(kind or EXTERNAL_ERROR, message, name))["content"]


def result_from_text(text: str, name: str | None) -> str:
    """The protocol's tool message content for a result logged as text (OpenAI's ``content``, a Bedrock text block).

    An envelope of the called tool is kept as written (a result of a call the log could not hold as one, with no
    name to check, only if it is an error); ``{"error": ...}`` (optionally with ``error_type``) is a failure;
    any other JSON is the result's value, and text that is not JSON is the result as a string. So a log cannot
    pass one tool's output off as another's.
    """
    body = parse_tool_message({"role": "tool", "content": text})
    if is_envelope(body) and (body["tool"] == name if name is not None else body["ok"] is False):
        return text
    if name is None:  # the environment's answer to a call it could not parse is an error, whatever it says
        return _error(None, text)
    value, problem = loads_untrusted(text)
    if problem is not None:
        return tool_result_message(name, text)["content"]
    if isinstance(value, dict) and isinstance(value.get("error"), str) and set(value) <= {"error", "error_type"} \
            and isinstance(value.get("error_type", ""), str):
        return _error(name, value["error"], value.get("error_type"))
    return tool_result_message(name, value)["content"]


def _call_text(name: str, arguments: dict | str) -> str:
    return format_tool_call(name, arguments)


def _arguments(value: Any, where: str) -> dict | str:
    """Call arguments as logged: an object, or JSON text of one; text that does not decode is kept (a malformed
    call, which the environment answers with a tool error)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        decoded, problem = loads_untrusted(value) if value.strip() else ({}, None)
        return decoded if problem is None and isinstance(decoded, dict) else value
    _fail(where, f"expected an object or JSON text of one, got {json_kind(value)}.")
    raise AssertionError  # unreachable


def _assistant_text(content: str, calls: Sequence[tuple[str, dict | str]]) -> str:
    """The protocol text of an assistant message: :func:`join_tool_calls`, also for malformed arguments."""
    if all(isinstance(args, dict) for _, args in calls):
        return join_tool_calls(content, [ToolCall(n, a) for n, a in calls])  # type: ignore[arg-type]
    return content + ("\n" if content and calls else "") + "".join(_call_text(n, a) for n, a in calls)


class _Answers:
    """Pairs tool results with the calls of the assistant message before them, in call order."""

    def __init__(self, out: list[dict], id_field: str) -> None:
        self.out, self.id_field = out, id_field
        self.calls: dict[str, tuple[str, int]] = {}
        self.answered: set[str] = set()
        self.unparsed = False  # the last assistant message tried to call tools the format could not hold
        self.run: list[tuple[int, dict]] = []

    def assistant(self, calls: dict[str, tuple[str, int]], text: str) -> None:
        self.close()
        self.calls = calls
        self.unparsed = not calls and has_tool_call_markup(text)

    def close(self) -> None:
        """A message that is not a result: results must follow their calls directly, so none may come now."""
        self.flush()
        self.calls, self.answered, self.unparsed = {}, set(), False

    def answer(self, call_id: Any, where: str, content: Callable[[str | None], str]) -> None:
        if call_id is None:
            if not self.unparsed:
                _fail(where, f"a tool result without {self.id_field}: each result answers a call of the assistant "
                         f"message right before it, by its {self.id_field}.")
            self.run.append((len(self.run), {"role": "tool", "content": content(None)}))
            return
        if not isinstance(call_id, str) or not call_id:
            _fail(f"{where}.{self.id_field}", f"expected the id of a call, got {json_kind(call_id)}.")
        if call_id not in self.calls:
            known = (f"the calls of the assistant message before it are {', '.join(repr(c) for c in self.calls)}"
                     if self.calls else "no assistant message right before it calls a tool")
            _fail(f"{where}.{self.id_field}", f"{call_id!r} answers no call: {known}.")
        if call_id in self.answered:
            _fail(f"{where}.{self.id_field}", f"{call_id!r} is answered twice.")
        self.answered.add(call_id)
        name, k = self.calls[call_id]
        self.run.append((k, {"role": "tool", "content": content(name)}))

    def flush(self) -> None:
        self.out += [m for _, m in sorted(self.run, key=lambda x: x[0])]
        self.run = []


# ---------------------------------------------------------------------------------------------------
# OpenAI chat
# ---------------------------------------------------------------------------------------------------


def _openai_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        _fail(where, f"expected a string, null or a list of content parts, got {json_kind(content)}.")
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict):
            _fail(f"{where}[{k}]", f'expected a content part {{"type": "text", "text": ...}}, got {json_kind(part)}.')
        kind = part.get("type")
        if kind not in ("text", "refusal"):
            _fail(f"{where}[{k}].type", f"content parts of type {json_kind(kind)} are not read: turnwise scores text "
                                        'conversations, whose parts are {"type": "text", "text": ...}.')
        text = part.get(kind)
        if not isinstance(text, str):
            _fail(f"{where}[{k}].{kind}", f"expected a string, got {json_kind(text)}.")
        texts.append(text)
    return "".join(texts)


def from_openai(messages: Sequence[Any], where: str = "messages") -> list[dict]:
    """OpenAI chat messages as protocol messages (see the module docstring)."""
    out: list[dict] = []
    answers = _Answers(out, "tool_call_id")
    for i, m in enumerate(messages):
        w = f"{where}[{i}]"
        if not isinstance(m, dict):
            _fail(w, f"expected a message object, got {json_kind(m)}.")
        role = m.get("role")
        if role == "function" or "function_call" in m:
            _fail(w, "the legacy function-calling format (function_call, role function); log tool_calls and role "
                     "tool messages instead.")
        if role not in _OPENAI_ROLES:
            _fail(f"{w}.role", f"expected one of {', '.join(_OPENAI_ROLES)}, got {json_kind(role)}.")
        text = _openai_text(m.get("content"), f"{w}.content")
        if role == "assistant" and not text and isinstance(m.get("refusal"), str):
            text = m["refusal"]
        if role == "tool":
            answers.answer(m.get("tool_call_id"), w, lambda name: result_from_text(text, name))
            continue
        if role != "assistant":
            answers.close()
            if "tool_calls" in m:
                _fail(f"{w}.tool_calls", f"only assistant messages call tools, this one is a {role} message.")
            out.append({"role": "system" if role == "developer" else role, "content": text})
            continue
        raw_calls = m.get("tool_calls") or []
        if not isinstance(raw_calls, list):
            _fail(f"{w}.tool_calls", f"expected a list of calls, got {json_kind(raw_calls)}.")
        calls, ids = [], {}
        for k, entry in enumerate(raw_calls):
            wk = f"{w}.tool_calls[{k}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("function"), dict):
                _fail(wk, 'expected {"id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}.')
            if entry.get("type", "function") != "function":
                _fail(f"{wk}.type", f'expected "function", got {json_kind(entry.get("type"))}.')
            call_id, name = entry.get("id"), entry["function"].get("name")
            if not isinstance(call_id, str) or not call_id:
                _fail(f"{wk}.id", f"expected the call's id (a string), got {json_kind(call_id)}.")
            if call_id in ids:
                _fail(f"{wk}.id", f"{call_id!r} is the id of an earlier call of the same message.")
            if not isinstance(name, str) or not name:
                _fail(f"{wk}.function.name", f"expected the tool's name, got {json_kind(name)}.")
            ids[call_id] = (name, k)
            calls.append((name, _arguments(entry["function"].get("arguments", {}), f"{wk}.function.arguments")))
        content = _assistant_text(text, calls)
        answers.assistant(ids, content)
        out.append({"role": "assistant", "content": content})
    answers.flush()
    return out


def to_openai(messages: Sequence[dict]) -> list[dict]:
    """Protocol messages as OpenAI chat messages; :func:`from_openai` gives ``messages`` back exactly."""
    out: list[dict] = []
    for item in _paired(messages):
        if item[0] == "message":
            out.append({"role": item[1]["role"], "content": item[1]["content"]})
        elif item[0] == "unparsed_result":
            out.append({"role": "tool", "content": item[1]["content"]})
        else:
            _, turn, content, calls, results = item
            entries = [{"id": _call_id(turn, k), "type": "function",
                        "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for k, c in enumerate(calls)]
            out.append({"role": "assistant", "content": content or None, "tool_calls": entries})
            for k, (call, result) in enumerate(zip(calls, results)):
                out.append({"role": "tool", "tool_call_id": _call_id(turn, k),
                            "content": _unwrapped_text(result["content"], call.name)})
    return out


def _unwrapped_text(content: str, name: str) -> str:
    """A result's content as OpenAI logs it (the value itself, or ``{"error", "error_type"}``), when reading it
    back gives the same message; else the envelope as it is."""
    body = parse_tool_message({"role": "tool", "content": content})
    if is_envelope(body) and body["tool"] == name:
        value = body["result"] if body["ok"] else {"error": body["error"], "error_type": body["error_type"]}
        candidate = json.dumps(value, sort_keys=True)
        if result_from_text(candidate, name) == content:
            return candidate
    return content


def _call_id(turn: int, k: int) -> str:
    return f"call_{turn}_{k}"


def _paired(messages: Sequence[dict]) -> Iterator[tuple]:
    """Protocol messages grouped for writing: ``("calls", turn, content, calls, results)`` for an assistant message
    whose calls are canonical and answered one result each, ``("unparsed_result", message)`` for a result of a
    call that could not be held as one, ``("message", message)`` for anything else."""
    i, turn, open_unparsed = 0, 0, False
    while i < len(messages):
        m = messages[i]
        i += 1
        role, content = m.get("role"), m.get("content") or ""
        if role == "tool":
            if not open_unparsed:
                raise ValueError(f"message {i - 1} is a tool result that answers no tool call (the assistant message "
                                 "before it calls none); OpenAI and Bedrock logs cannot hold it. Keep this "
                                 "conversation in turnwise's format.")
            yield ("unparsed_result", m)
            continue
        if role != "assistant":
            open_unparsed = False
            yield ("message", m)
            continue
        results = 0
        while i + results < len(messages) and messages[i + results].get("role") == "tool":
            results += 1
        split = split_tool_calls(content)
        if split is not None and results == len(split[1]):
            yield ("calls", turn, split[0], split[1], messages[i:i + results])
            i += results
            open_unparsed = False
        else:
            yield ("message", m)
            open_unparsed = has_tool_call_markup(content)
        turn += 1


# ---------------------------------------------------------------------------------------------------
# Bedrock Converse
# ---------------------------------------------------------------------------------------------------


def _blocks(content: Any, where: str) -> list[tuple[int, str, Any]]:
    if not isinstance(content, list):
        _fail(where, f"expected a list of content blocks ({{'text': ...}}, {{'toolUse': ...}}, "
                     f"{{'toolResult': ...}}), got {json_kind(content)}.")
    out = []
    for k, block in enumerate(content):
        if not isinstance(block, dict) or len(block) != 1:
            _fail(f"{where}[{k}]", "expected a content block: an object with one key, text, toolUse or toolResult.")
        (kind, value), = block.items()
        if kind in _BEDROCK_SKIPPED:
            continue
        if kind not in _BEDROCK_BLOCKS:
            _fail(f"{where}[{k}]", f"content blocks of type {kind!r} are not read: turnwise scores text conversations "
                                   f"(blocks {', '.join(_BEDROCK_BLOCKS)}).")
        out.append((k, kind, value))
    return out


def _text_block(value: Any, where: str) -> str:
    if not isinstance(value, str):
        _fail(f"{where}.text", f"expected a string, got {json_kind(value)}.")
    return value


def _bedrock_result(value: Any, where: str) -> tuple[Any, Callable[[str | None], str]]:
    if not isinstance(value, dict):
        _fail(f"{where}.toolResult", f"expected an object, got {json_kind(value)}.")
    status = value.get("status", "success")
    if status not in ("success", "error"):
        _fail(f"{where}.toolResult.status", f'expected "success" or "error", got {json_kind(status)}.')
    parts = value.get("content")
    if not isinstance(parts, list) or not parts:
        _fail(f"{where}.toolResult.content", "expected a non-empty list of {'json': ...} or {'text': ...} blocks.")
    values: list[tuple[str, Any]] = []
    for k, part in enumerate(parts):
        if not isinstance(part, dict) or len(part) != 1 or next(iter(part)) not in ("json", "text"):
            _fail(f"{where}.toolResult.content[{k}]", "expected {'json': value} or {'text': string}; turnwise reads "
                                                      "text and JSON results only.")
        (kind, item), = part.items()
        if kind == "text" and not isinstance(item, str):
            _fail(f"{where}.toolResult.content[{k}].text", f"expected a string, got {json_kind(item)}.")
        values.append((kind, item))

    def content(name: str | None) -> str:
        if len(values) == 1 and values[0][0] == "text":
            text = values[0][1]
            return _error(name, text) if status == "error" else result_from_text(text, name)
        value = values[0][1] if len(values) == 1 else [item for _, item in values]
        if status == "error":
            if isinstance(value, dict) and isinstance(value.get("error"), str):
                return _error(name, value["error"], value.get("error_type") if isinstance(value.get("error_type"), str)
                              else None)
            return _error(name, json.dumps(value, sort_keys=True))
        return tool_result_message(name, value)["content"]

    return value.get("toolUseId"), content


def from_bedrock(messages: Sequence[Any], system: Any = None, where: str = "messages") -> list[dict]:
    """Bedrock Converse messages (and the ``system`` blocks) as protocol messages (see the module docstring)."""
    out: list[dict] = []
    if system is not None:
        for k, kind, value in _blocks(system, "system"):
            if kind != "text":
                _fail(f"system[{k}]", "expected a {'text': ...} block.")
            out.append({"role": "system", "content": _text_block(value, f"system[{k}]")})
    answers = _Answers(out, "toolUseId")
    for i, m in enumerate(messages):
        w = f"{where}[{i}]"
        if not isinstance(m, dict):
            _fail(w, f"expected a message object, got {json_kind(m)}.")
        role = m.get("role")
        if role not in ("user", "assistant"):
            _fail(f"{w}.role", f"expected user or assistant (Converse keeps the system prompt apart), got {json_kind(role)}.")
        blocks = _blocks(m.get("content"), f"{w}.content")
        if role == "user":
            for k, kind, value in blocks:
                wk = f"{w}.content[{k}]"
                if kind == "toolUse":
                    _fail(wk, "a user message cannot call a tool (toolUse belongs to assistant messages).")
                if kind == "text":
                    answers.close()
                    out.append({"role": "user", "content": _text_block(value, wk)})
                else:
                    use_id, content = _bedrock_result(value, wk)
                    answers.answer(use_id, f"{wk}.toolResult", content)
            continue
        texts, calls, ids = [], [], {}
        for k, kind, value in blocks:
            wk = f"{w}.content[{k}]"
            if kind == "toolResult":
                _fail(wk, "an assistant message cannot hold a tool result (toolResult belongs to user messages).")
            if kind == "text":
                texts.append(_text_block(value, wk))
                continue
            if not isinstance(value, dict):
                _fail(f"{wk}.toolUse", f"expected an object, got {json_kind(value)}.")
            use_id, name = value.get("toolUseId"), value.get("name")
            if not isinstance(use_id, str) or not use_id:
                _fail(f"{wk}.toolUse.toolUseId", f"expected the call's id (a string), got {json_kind(use_id)}.")
            if use_id in ids:
                _fail(f"{wk}.toolUse.toolUseId", f"{use_id!r} is the id of an earlier call of the same message.")
            if not isinstance(name, str) or not name:
                _fail(f"{wk}.toolUse.name", f"expected the tool's name, got {json_kind(name)}.")
            ids[use_id] = (name, len(calls))
            calls.append((name, _arguments(value.get("input", {}), f"{wk}.toolUse.input")))
        content = _assistant_text("\n".join(texts), calls)
        answers.assistant(ids, content)
        out.append({"role": "assistant", "content": content})
    answers.flush()
    return out


def to_bedrock(messages: Sequence[dict]) -> dict[str, Any]:
    """Protocol messages as ``{"system": [...], "messages": [...]}`` in Converse's shape; :func:`from_bedrock` of
    it gives ``messages`` back exactly."""
    system: list[dict] = []
    out: list[dict] = []

    def user_block(block: dict) -> None:
        if out and out[-1]["role"] == "user":
            out[-1]["content"].append(block)
        else:
            out.append({"role": "user", "content": [block]})

    started = False
    for item in _paired(messages):
        if item[0] == "message" and item[1]["role"] == "system":
            if started:
                raise ValueError("a system message after the conversation started: Bedrock Converse holds the system "
                                 "prompt apart from the messages, so it cannot be placed there. Keep this conversation "
                                 "in turnwise's or OpenAI's format.")
            system.append({"text": item[1]["content"]})
            continue
        started = True
        if item[0] == "message" and item[1]["role"] == "assistant":
            out.append({"role": "assistant", "content": [{"text": item[1]["content"]}]})
        elif item[0] == "message":
            user_block({"text": item[1]["content"]})
        elif item[0] == "unparsed_result":
            user_block({"toolResult": {"content": [{"text": item[1]["content"]}]}})
        else:
            _, turn, content, calls, results = item
            blocks = [{"text": content}] if content else []
            blocks += [{"toolUse": {"toolUseId": _call_id(turn, k), "name": c.name, "input": c.arguments}}
                       for k, c in enumerate(calls)]
            out.append({"role": "assistant", "content": blocks})
            for k, (call, result) in enumerate(zip(calls, results)):
                user_block({"toolResult": _bedrock_result_block(_call_id(turn, k), result["content"], call.name)})
    return {"system": system, "messages": out}


def _bedrock_result_block(use_id: str, content: str, name: str) -> dict:
    body = parse_tool_message({"role": "tool", "content": content})
    if is_envelope(body) and body["tool"] == name:
        if body["ok"]:
            block = {"toolUseId": use_id, "content": [{"json": body["result"]}], "status": "success"}
        else:
            block = {"toolUseId": use_id, "content": [{"json": {"error": body["error"], "error_type": body["error_type"]}}],
                     "status": "error"}
        if _bedrock_result(block, "")[1](name) == content:
            return block
    return {"toolUseId": use_id, "content": [{"text": content}]}


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def convert_row(row: dict, format: str) -> dict:
    """A line in turnwise's shape (or a trajectory record) written in ``format``; other keys are kept."""
    if format not in FORMATS:
        raise ValueError(f"unknown conversation format {format!r}; use one of {', '.join(FORMATS)}.")
    if format == "turnwise":
        return dict(row)
    extra = {k: v for k, v in row.items() if k not in ("messages", "turns", "tokens", "metadata")}
    extra.update({k: v for k, v in (row.get("metadata") or {}).items() if k not in ("outcome_known", "replayed")})
    if format == "openai":
        return {"messages": to_openai(row["messages"]), **extra}
    return {**to_bedrock(row["messages"]), **extra}


def write_conversations(rows: Sequence[dict], path: Path | str, format: str) -> Path:
    """Write lines in turnwise's shape to ``path`` in ``format``, one JSON object per line (atomically)."""
    from pipeline.trajectory import atomic_write_text

    lines = []
    for i, row in enumerate(rows):
        try:
            lines.append(json.dumps(convert_row(row, format)) + "\n")
        except ValueError as exc:
            raise ValueError(f"conversation {i}: {exc}") from None
    atomic_write_text(path, "".join(lines))
    return Path(path)
