"""The environment protocol and the one dialog loop every domain shares.

An episode is a conversation between the agent (the policy being trained) and an environment that
plays everything else: tools over a sandboxed backend, and a simulated user. ``reset`` gives the opening
messages, each ``step`` takes one assistant message and returns the environment's replies, and
``outcome`` gives the strict verdict that evaluation uses. A domain supplies a few hooks (its tools,
its user, its goal check); the loop itself lives here, once, so every domain gets the same tool-call
protocol, error handling and stop conditions.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from transformers.utils import get_json_schema

from pipeline.budgets import MAX_TURNS
from pipeline.chat import (
    ToolCall,
    ToolCallError,
    ToolError,
    echo,
    message_too_long,
    parse_tool_calls,
    tool_error_message,
    tool_result_message,
    tools_prompt,
    validate_arguments,
)

logger = logging.getLogger(__name__)

#: Stop reasons. ``completed`` is true for every reason except the budget ones.
STOP_RESOLVED = "resolved"  # the user's goals were met and the user closed the conversation
STOP_USER_LEFT = "user_left"  # the user's patience ran out
STOP_FINAL_OUTPUT = "final_output"  # the agent emitted its final answer (SOP tasks)
STOP_MAX_TURNS = "max_turns"  # the assistant-turn budget ran out
STOP_MAX_TOKENS = "max_tokens"  # the rollout engine's token budget ran out
BUDGET_STOPS = frozenset({STOP_MAX_TURNS, STOP_MAX_TOKENS})


@dataclass
class Task:
    """One episode specification.

    ``payload`` is domain-specific (a customer-service task carries its sandbox database, the
    simulated customer and the expected end state); the other fields are common to all domains.
    """

    id: str
    domain: str
    split: str
    intents: list[str]
    payload: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Task":
        return cls(**{k: row[k] for k in ("id", "domain", "split", "intents", "payload")})


@dataclass
class Step:
    """What the environment answers to one assistant message."""

    messages: list[dict]
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """The strict verdict on an episode. Evaluation reads this; rewards may too, but never decide it.

    ``violations`` holds ``"<rule>@<turn>"`` strings (turn = 0-based assistant turn index);
    ``details`` holds the evidence (which checks failed, violation records, state differences).
    """

    success: bool
    completed: bool
    stop_reason: str | None
    violations: list[str] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], where: str = "outcome") -> "Outcome":
        """An outcome from a JSON record, type-checked: ``"success": "false"`` is an error, not a success.

        Raises :class:`RecordError` naming the field (``where`` prefixes it, e.g. ``outcome.success``).

        >>> Outcome.from_dict({"success": "false", "completed": True, "stop_reason": "resolved"})
        Traceback (most recent call last):
        ...
        pipeline.envs.base.RecordError: outcome.success: expected true or false, got the string 'false'.
        """
        record = check_record(row, where, required=("success", "completed", "stop_reason"),
                              optional=("violations", "fields", "details"))
        check_type(record["success"], bool, f"{where}.success")
        check_type(record["completed"], bool, f"{where}.completed")
        check_type(record["stop_reason"], (str, type(None)), f"{where}.stop_reason")
        for i, violation in enumerate(check_type(record.get("violations", []), list, f"{where}.violations")):
            check_type(violation, str, f"{where}.violations[{i}]")
        for name, value in check_type(record.get("fields", {}), dict, f"{where}.fields").items():
            if isinstance(value, (str, list)):  # field_correct would read any non-empty one as right
                raise RecordError(f"{where}.fields.{name}: expected true or false (or a record with a boolean "
                                  f'"correct"), got {json_kind(value)}.')
            if isinstance(value, dict) and "correct" in value:
                check_type(value["correct"], bool, f"{where}.fields.{name}.correct")
        check_type(record.get("details", {}), dict, f"{where}.details")
        return cls(**record)


class RecordError(ValueError):
    """A record read from a file (an outcome, a trajectory, a logged conversation) is malformed.

    The message names the field, says what it holds and what it should hold; file readers add the
    file name and line.
    """


def json_kind(value: Any) -> str:
    """How a decoded JSON value reads in an error message.

    >>> json_kind("false"), json_kind(float("inf")), json_kind(None), json_kind([1])
    ("the string 'false'", 'Infinity', 'null', 'a list')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"the number {text if len(text) <= 40 else text[:40] + '...'}"
    if isinstance(value, str):
        shown = repr(value) if len(value) <= 60 else f"{value[:60]!r}... ({len(value)} characters)"
        return f"the string {shown}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "an object", type(None): "null"}


def check_type(value: Any, types: type | tuple[type, ...], where: str) -> Any:
    """``value`` if it has one of ``types`` (JSON's view: a bool is not an integer), else :class:`RecordError`."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        ok = False
    elif float in types and isinstance(value, float):
        ok = math.isfinite(value)
    else:
        ok = isinstance(value, types)
    if not ok:
        wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise RecordError(f"{where}: expected {wanted}, got {json_kind(value)}.")
    return value


def check_record(row: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
                 allow_unknown: bool = False) -> Mapping[str, Any]:
    """``row`` if it is a JSON object with the ``required`` keys (and, unless allowed, no others)."""
    if not isinstance(row, Mapping):
        raise RecordError(f"{where}: expected an object, got {json_kind(row)}.")
    missing = [k for k in required if k not in row]
    if missing:
        raise RecordError(f"{where}: missing field(s) {', '.join(missing)}.")
    if not allow_unknown:
        unknown = [str(k) for k in row if k not in required and k not in optional]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise RecordError(f"{where}: unknown field(s) {shown}; the fields are {', '.join(required + optional)}.")
    return row


def field_correct(value: Any) -> bool:
    """Whether one ``Outcome.fields`` entry is right: a bool, or a record with ``correct``, or with
    ``expected`` and ``actual`` (compared exactly). Evaluation and rewards both read fields through this.

    >>> field_correct(True), field_correct({"correct": False}), field_correct({"expected": "a", "actual": "a"})
    (True, False, True)
    """
    if isinstance(value, dict):
        if "correct" in value:
            return bool(value["correct"])
        if "expected" in value and "actual" in value:
            return value["expected"] == value["actual"]
    return bool(value)


@runtime_checkable
class Environment(Protocol):
    """What rollouts, evaluation and training rely on."""

    def reset(self, task: Task, seed: int = 0) -> list[dict]: ...

    def step(self, assistant_text: str) -> Step: ...

    def outcome(self) -> Outcome: ...


@dataclass
class Tool:
    """A typed Python function exposed to the agent; its JSON schema comes from its signature and docstring."""

    fn: Callable[..., Any]
    schema: dict = field(init=False)
    mutates: bool = False

    def __post_init__(self) -> None:
        self.schema = get_json_schema(self.fn)

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


def tool(mutates: bool = False) -> Callable:
    """Mark a method of a domain's tool class as a tool; ``mutates`` marks state-changing tools."""

    def mark(fn: Callable) -> Callable:
        fn.__turnwise_tool__ = {"mutates": mutates}
        return fn

    return mark


def collect_tools(obj: Any) -> dict[str, Tool]:
    """The tools of an object: its methods decorated with :func:`tool`, in definition order."""
    tools: dict[str, Tool] = {}
    for name in dir(type(obj)):
        attr = getattr(type(obj), name)
        meta = getattr(attr, "__turnwise_tool__", None)
        if meta is not None:
            tools[name] = Tool(getattr(obj, name), mutates=meta["mutates"])
    order = list(vars(type(obj)))
    return dict(sorted(tools.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def episode_rng(task_id: str, seed: int, stream: str = "") -> random.Random:
    """A random generator that depends only on the task, the seed and a stream name.

    Python's ``hash`` is salted per process, so a digest keeps episodes reproducible across runs.
    """
    digest = hashlib.sha256(f"{task_id}|{seed}|{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class ToolEnvironment:
    """The shared dialog loop: tool calls go to tools, other messages go to the simulated user.

    Subclasses implement the domain hooks below and do not override ``step``:

    - ``_setup(task, seed)``: build this episode's sandbox and user; return the opening messages
      after the system prompt.
    - ``_system_prompt()``: instructions, policy and the tool list.
    - ``_tools()``: the :class:`Tool` objects bound to this episode's sandbox.
    - ``_on_message(text)``: answer a non-tool assistant message; return ``(messages, stop_reason)``.
    - ``_judge(stop_reason)``: the strict :class:`Outcome`.
    - ``_before_tool(call, turn)``: optional; may refuse a call by raising :class:`ToolError`.

    ``tool_protocol`` says who tells the agent about the tools: ``"text"`` (the default) lists them in the
    system prompt with turnwise's ``<tool_call>`` protocol (:meth:`tools_section`); ``"native"`` leaves them
    out, because the model's chat template renders the specs (``tool_schemas``) itself. Either way
    ``step`` reads the protocol's text: the rollout engine parses a model's native calls into it.
    """

    def __init__(self, max_turns: int = MAX_TURNS) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}.")
        self.max_turns = max_turns
        self.task: Task | None = None
        self.turn = 0
        self.stop_reason: str | None = None
        self.tool_protocol = "text"
        self._tool_table: dict[str, Tool] = {}

    def set_tool_protocol(self, protocol: str) -> None:
        """``"text"`` or ``"native"`` (see the class docstring); takes effect at the next :meth:`reset`."""
        if protocol not in ("text", "native"):
            raise ValueError(f"tool protocol must be 'text' or 'native', got {protocol!r}.")
        self.tool_protocol = protocol

    def tools_section(self, schemas: list[dict] | None = None) -> str:
        """The system prompt's tool section: turnwise's protocol and the tool list, or ``""`` in native mode."""
        if self.tool_protocol == "native":
            return ""
        return tools_prompt(self.tool_schemas if schemas is None else schemas)

    # -- the loop -------------------------------------------------------------------------------
    def reset(self, task: Task, seed: int = 0) -> list[dict]:
        self.task, self.seed = task, seed
        self.turn = 0
        self.stop_reason = None
        opening = self._setup(task, seed)
        self._tool_table = self._tools()
        return [{"role": "system", "content": self._system_prompt()}, *opening]

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def step(self, assistant_text: str) -> Step:
        if self.task is None:
            return Step([], True, {"error": "step() called before reset(); call reset(task) first."})
        if self.done:
            return Step([], True, {"error": "the episode has ended; call reset() to start another."})
        assistant_text = _plain_text(assistant_text)
        turn = self.turn
        info: dict[str, Any] = {"turn": turn}
        too_long = message_too_long(assistant_text)
        calls = parse_tool_calls(assistant_text) if too_long is None else []
        if too_long is not None:  # not read at all: neither the tools nor the user see it
            info["kind"] = "too_long"
            info["tool_calls"], info["tool_errors"] = [], [_error_record(too_long)]
            messages, stop = [tool_error_message(too_long)], None
        elif calls:
            messages = self._run_tools(calls, turn, info)
            stop = None
        else:
            info["kind"] = "message"
            try:
                messages, stop = self._on_message(assistant_text)
            except Exception as exc:  # a broken simulator must not kill a training run
                logger.exception("user simulator failed on turn %d of task %s", turn, self.task.id)
                info["simulator_error"] = f"{type(exc).__name__}: {exc}"
                messages, stop = [], STOP_USER_LEFT
        self.turn += 1
        if stop is None and self.turn >= self.max_turns:
            stop = STOP_MAX_TURNS
        self.stop_reason = stop
        info["stop_reason"] = stop
        return Step(messages, stop is not None, info)

    def outcome(self) -> Outcome:
        if self.task is None:
            raise RuntimeError("outcome() called before reset(); call reset(task) first.")
        return self._judge(self.stop_reason)

    def mark_truncated(self) -> None:
        """Called by the rollout engine when the token budget ends the episode."""
        if not self.done:
            self.stop_reason = STOP_MAX_TOKENS

    @property
    def tool_schemas(self) -> list[dict]:
        return [t.schema for t in self._tool_table.values()]

    def _run_tools(self, calls: list[ToolCall | ToolCallError], turn: int, info: dict) -> list[dict]:
        info["kind"] = "tool_calls"
        info["tool_calls"], info["tool_errors"] = [], []
        messages = []
        for call in calls:
            result = self._call(call, turn) if isinstance(call, ToolCall) else call
            if not isinstance(result, ToolCallError):
                try:
                    message = tool_result_message(call.name, result)
                except (TypeError, ValueError, RecursionError) as exc:  # a set, bytes, a value holding itself
                    logger.warning("tool %s returned a result that is not JSON: %s: %s", call.name,
                                   type(exc).__name__, _describe(exc))
                    result = ToolCallError("tool_exception", f"{call.name} returned a result that cannot be sent "
                                           f"as JSON ({type(exc).__name__}: {echo(str(exc), 120)}).", call.name)
                else:
                    info["tool_calls"].append({"name": call.name, "arguments": call.arguments})
                    messages.append(message)
                    continue
            info["tool_errors"].append(_error_record(result))
            messages.append(tool_error_message(result))
        return messages

    def _call(self, call: ToolCall, turn: int) -> Any:
        spec = self._tool_table.get(call.name)
        if spec is None:
            known = ", ".join(self._tool_table)
            return ToolCallError("unknown_tool", f"Unknown tool {echo(call.name)}. Available tools: {known}.",
                                 call.name[:64])
        try:
            problem = validate_arguments(call.arguments, spec.schema)
            if problem:
                return ToolCallError("invalid_arguments", f"{call.name}: {problem}", call.name)
            self._before_tool(call, spec, turn)
            return spec.fn(**call.arguments)
        except ToolError as exc:  # its text may quote an argument: clipped like any echo of model text
            return ToolCallError("rejected", _describe(exc), call.name)
        except Exception as exc:  # noqa: BLE001 - tool bugs become tool errors, never escape
            logger.warning("tool %s raised %s: %s", call.name, type(exc).__name__, _describe(exc))
            return ToolCallError("tool_exception", f"{call.name} failed: {type(exc).__name__}: {_describe(exc)}",
                                 call.name)

    # -- domain hooks ---------------------------------------------------------------------------
    def _setup(self, task: Task, seed: int) -> list[dict]:
        raise NotImplementedError

    def _system_prompt(self) -> str:
        raise NotImplementedError

    def _tools(self) -> dict[str, Tool]:
        raise NotImplementedError

    def _on_message(self, text: str) -> tuple[list[dict], str | None]:
        raise NotImplementedError

    def _judge(self, stop_reason: str | None) -> Outcome:
        raise NotImplementedError

    def _before_tool(self, call: ToolCall, spec: Tool, turn: int) -> None:
        return None


def _plain_text(value: Any) -> str:
    """What ``step`` reads from a policy's reply: a plain ``str`` (a subclass's overrides are not trusted)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return str.__str__(value)
    try:
        return str.__str__(str(value))
    except Exception as exc:  # noqa: BLE001 - a policy's odd return value must not end the rollout
        return f"<a {type(value).__name__} that cannot be shown as text: {type(exc).__name__}>"


def _error_record(error: ToolCallError) -> dict[str, Any]:
    return {"kind": error.kind, "name": error.name, "message": error.message}


def _describe(exc: BaseException) -> str:
    """An exception's message for a tool error, clipped (a tool may echo a huge argument in it)."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - an exception whose __str__ raises still gets reported
        return "(no message)"
    return text if len(text) <= 500 else text[:500] + f"... ({len(text)} characters)"

