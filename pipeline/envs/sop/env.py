"""SOP-task environments: follow a standard operating procedure with tools, then give a structured answer.

Task: one row of an SOP folder (:mod:`pipeline.envs.sop.folder`, the SOP-Bench format). The agent reads
the SOP, the tool specs and the row's input columns; it calls tools through the usual ``<tool_call>``
protocol and finishes with ``<final_output>{json}</final_output>`` holding the output columns. There is
no simulated user: a message with neither a tool call nor a final output gets a short reminder, and the
episode otherwise runs until ``max_turns``.

The verdict (:class:`~pipeline.envs.base.Outcome`):

- ``fields``: each output column, right or wrong. A value is right when it equals the expected one
  after stripping whitespace and ignoring case (:func:`values_match`); the null-likes ``null``,
  ``None``, ``""`` and ``N/A`` all equal each other; a JSON number also matches the same number
  written as text (``12.5`` and ``"12.50"``). A missing field is wrong, even when the expected value
  is null-like (omitting is not answering). Extra fields are ignored. Keys match exactly, else
  ignoring case and surrounding whitespace.
- ``success``: a final output was parsed and every field is right.
- ``completed``: a final output was emitted and parsed. A malformed one (unclosed tag, no JSON object
  inside) still ends the episode, with ``completed`` false and the reason in ``details["parse_error"]``:
  the final output is a commitment, not a draft to retry.
- ``details["emitted"]`` (same as ``completed``) and ``details["field_accuracy"]`` are what the dense
  reward ``field_acc + format_coef * (emitted - 1)`` in ``rewards`` reads; evaluation reads only
  ``success``, ``completed`` and ``fields``.

Parsing the final output (:func:`parse_final_output`): when a message holds several complete
``<final_output>...</final_output>`` blocks, the last one counts, as in the public benchmark's parser
(a model that restates its answer means the restatement). An opening tag left unclosed after the last
complete block is ignored; a message with no complete block is malformed ("not closed"). The block's
body may be bare JSON, or JSON wrapped in prose or a code fence: the first ``{`` at which a JSON object
decodes is taken (at most :data:`MAX_JSON_STARTS` of them are tried). Python-style dicts (single
quotes) are not JSON and do not parse. A body longer than :data:`MAX_FINAL_CHARS` characters is
malformed. Parsing takes time linear in the message, whatever it holds.
The final output must be a message without tool calls: a message that calls tools is a tool turn, and
any final output in it is not read.

Tool schemas: with ``strict_tool_schema`` on (the default for folders without tools.py), a call that
breaks its spec's schema is refused; off (the default for folders with tools.py), it goes to the
folder's code. Either way, each mismatch is recorded in the step's ``info["schema_mismatches"]``
(``{"name", "problem", "refused"}``) and in ``Outcome.details["schema_mismatches"]`` with its turn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.chat import ToolCall, ToolCallError, first_json_object, format_tool_call, scan_tagged, validate_arguments
from pipeline.envs.base import STOP_FINAL_OUTPUT, Outcome, Task, Tool, ToolEnvironment
from pipeline.envs.sop.folder import SopFolder, load_folder
from pipeline.envs.sop.tasks import resolve_folder

FINAL_OPEN, FINAL_CLOSE = "<final_output>", "</final_output>"
#: Longest final-output body parsed, in characters; a longer one is malformed.
MAX_FINAL_CHARS = 65_536
#: Most ``{`` positions tried as the start of the JSON object in one body.
MAX_JSON_STARTS = 32
#: Values that all mean "no value" when scoring (compared after strip and casefold).
NULL_LIKES = frozenset({"", "null", "none", "n/a"})

INSTRUCTIONS = (
    "You are an operations agent. Process one case by following the standard operating procedure (SOP) below "
    "exactly. Use the tools to look up what you need; never guess a value that a tool can give you. There is no "
    "one to talk to: every reply must either call tools or give the final output."
)


# ---------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------


def normalize(value: Any) -> str | None:
    """A value as comparable text (stripped, case-folded), or ``None`` for a null-like value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True)
    else:
        text = str(value)
    text = text.strip().casefold()
    return None if text in NULL_LIKES else text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def values_match(expected: Any, actual: Any) -> bool:
    """Whether an output value equals the expected one (see the module docstring).

    >>> values_match("Approve_Repair", " approve_repair "), values_match("N/A", None), values_match("", "none")
    (True, True, True)
    >>> values_match("12.50", 12.5), values_match("007", "7"), values_match("deny", None)
    (True, False, False)
    """
    e, a = normalize(expected), normalize(actual)
    if e is None or a is None:
        return e is None and a is None
    if e == a:
        return True
    if _is_number(expected) or _is_number(actual):
        try:
            return float(e) == float(a)
        except ValueError:
            return False
    return False


def final_output_body(text: str) -> tuple[str | None, str | None]:
    """The body of the last complete ``<final_output>`` block, or ``(None, why not)``; linear in ``text``
    (:func:`pipeline.chat.scan_tagged`, the scanner tool calls are read with).

    >>> final_output_body("<final_output>a</final_output> <final_output>b</final_output>")
    ('b', None)
    >>> final_output_body("<final_output>a</final_output><final_output>b")
    ('a', None)
    >>> final_output_body("<final_output>" * 3)
    (None, '<final_output> is not closed with </final_output>')
    """
    bodies = scan_tagged(text, FINAL_OPEN, FINAL_CLOSE).bodies
    if bodies:
        return bodies[-1], None
    if FINAL_OPEN in text:
        return None, f"{FINAL_OPEN} is not closed with {FINAL_CLOSE}"
    return None, f"no {FINAL_OPEN} block"


def parse_final_output(text: str) -> tuple[dict | None, str | None]:
    """The JSON object in a message's last ``<final_output>`` block, or ``(None, why not)`` (see the module doc).

    The object is read as every model-written JSON is (:func:`pipeline.chat.first_json_object`: strict,
    bounded, never raising), trying at most ``MAX_JSON_STARTS`` opening braces.
    """
    body, problem = final_output_body(text)
    if body is None:
        return None, problem
    if len(body) > MAX_FINAL_CHARS:
        return None, f"the {FINAL_OPEN} block holds {len(body):,} characters; at most {MAX_FINAL_CHARS:,} are read"
    value, _ = first_json_object(body, max_starts=MAX_JSON_STARTS)
    if value is None:
        return None, f"no JSON object inside {FINAL_OPEN}"
    return value, None


def _find_key(answer: dict, name: str) -> str | None:
    if name in answer:
        return name
    wanted = name.strip().casefold()
    return next((k for k in answer if isinstance(k, str) and k.strip().casefold() == wanted), None)


def score_fields(expected: dict[str, Any], answer: dict | None) -> dict[str, dict[str, Any]]:
    """Per output field: ``{"expected", "actual", "present", "correct"}``; ``answer`` None scores all wrong."""
    records = {}
    for name, want in expected.items():
        key = _find_key(answer, name) if answer is not None else None
        got = answer[key] if key is not None else None
        records[name] = {"expected": want, "actual": got, "present": key is not None,
                         "correct": key is not None and values_match(want, got)}
    return records


# ---------------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------------


def _tools_section(schemas: list[dict]) -> str:
    # The same listing as pipeline.chat.tools_prompt, without its "text goes to the customer" line.
    lines = ["# Tools", "To call a tool, reply with only a tool call, written exactly like this:",
             format_tool_call("tool_name", {"arg": "value"}), "The result comes back in a tool message.",
             "Available tools (JSON schema):"]
    for schema in schemas:
        fn = schema["function"]
        lines.append(json.dumps({k: fn[k] for k in ("name", "description", "parameters")}, separators=(",", ":")))
    return "\n".join(lines)


def _final_example(columns: list[str]) -> str:
    return FINAL_OPEN + json.dumps({c: "..." for c in columns}) + FINAL_CLOSE


class SopEnv(ToolEnvironment):
    """Episodes over one row of an SOP folder (see the module docstring).

    ``folder`` (a path or ``sop:PATH``) is optional: each task names its own folder, and giving one here
    checks it (and the trust its tools need) up front. ``trust_tools=True`` trusts that folder's tools.py
    for this environment, and only that folder (so it needs ``folder``; ``make_env(task, trust_tools=True)``
    passes the task's); ``False`` refuses every tools.py; ``None`` looks for a grant in
    ``$TURNWISE_TRUST_TOOLS`` (:mod:`pipeline.envs.sop.trust`). ``strict_tool_schema`` overrides the
    folder's setting (see the module docstring).
    """

    name = "sop"

    def __init__(self, folder: str | Path | None = None, max_turns: int = 20, trust_tools: bool | None = None,
                 strict_tool_schema: bool | None = None) -> None:
        super().__init__(max_turns=max_turns)
        if trust_tools is True and folder is None:
            raise ValueError("trust_tools=True trusts one folder's tools.py: name it, as make_env('sop:PATH', "
                             "trust_tools=True) or make_env(task, trust_tools=True).")
        self.trust_tools = trust_tools
        self.strict_tool_schema = strict_tool_schema
        self.folder: SopFolder | None = None
        self.trusted_path: Path | None = None
        if folder is not None:
            self.folder = load_folder(resolve_folder(folder))
            if trust_tools is True:
                self.trusted_path = self.folder.path
            self.folder.check_trust(trust_tools)

    def _trust_for(self, folder: SopFolder) -> bool | None:
        """This environment's trust decision for a folder: explicit trust covers only the folder it named."""
        if self.trust_tools is True:
            return True if folder.path == self.trusted_path else None
        return self.trust_tools

    def _setup(self, task: Task, seed: int) -> list[dict]:
        self.folder = load_folder(resolve_folder(task.payload["folder"]))
        self.folder.check_trust(self._trust_for(self.folder))
        self.strict = self.folder.strict_tool_schema if self.strict_tool_schema is None else self.strict_tool_schema
        self.answer: dict | None = None
        self.final_tag = False
        self.parse_error: str | None = None
        self.reminders = 0
        self.schema_mismatches: list[dict] = []
        inputs = json.dumps(task.payload["inputs"], indent=1, ensure_ascii=False)
        return [{"role": "user", "content": f"Case inputs:\n{inputs}\n\nProcess this case by following the SOP, "
                                            f"then give the final output."}]

    def _tools(self) -> dict[str, Tool]:
        return self.folder.bind_tools(self._trust_for(self.folder), strict=self.strict)

    def _system_prompt(self) -> str:
        columns = list(self.task.payload["expected"])
        final = ("# Final output\nWhen the SOP is done, reply with only the final output: a JSON object with the "
                 f"fields {', '.join(columns)}, inside the tags, like this:\n{_final_example(columns)}\n"
                 "It ends the case and cannot be changed afterwards. If the SOP gives no value for a field, use null.")
        schemas = [spec.schema for spec in self.folder.specs.values()]  # the specs as written, whatever is enforced
        return f"{INSTRUCTIONS}\n\n# SOP\n{self.folder.sop}\n\n{_tools_section(schemas)}\n\n{final}"

    def _run_tools(self, calls: list[ToolCall | ToolCallError], turn: int, info: dict) -> list[dict]:
        """The shared loop's tool turn, plus each call's mismatches with its spec's schema in ``info``."""
        mismatches = []
        for call in calls:
            spec = self.folder.specs.get(call.name) if isinstance(call, ToolCall) else None
            problem = validate_arguments(call.arguments, spec.schema) if spec is not None else None
            if problem:
                mismatches.append({"name": call.name, "problem": problem, "refused": self.strict})
        messages = super()._run_tools(calls, turn, info)
        if mismatches:
            info["schema_mismatches"] = mismatches
            self.schema_mismatches.extend({"turn": turn, **m} for m in mismatches)
        return messages

    def _on_message(self, text: str) -> tuple[list[dict], str | None]:
        if FINAL_OPEN in text:
            self.final_tag = True
            self.answer, self.parse_error = parse_final_output(text)
            return [], STOP_FINAL_OUTPUT
        self.reminders += 1
        reminder = ("There is no one to talk to in this task, so that message was not read. Call a tool, or finish "
                    f"with the final output: {_final_example(list(self.task.payload['expected']))}")
        return [{"role": "user", "content": reminder}], None

    def _judge(self, stop_reason: str | None) -> Outcome:
        records = score_fields(self.task.payload["expected"], self.answer)
        fields = {name: r["correct"] for name, r in records.items()}
        emitted = self.answer is not None
        known = {_find_key(self.answer, name) for name in records} if emitted else set()
        return Outcome(
            success=emitted and all(fields.values()),
            completed=emitted,
            stop_reason=stop_reason,
            violations=[],
            fields=fields,
            details={
                "emitted": emitted,
                "final_output_tag": self.final_tag,
                "parse_error": self.parse_error,
                "field_accuracy": sum(fields.values()) / len(fields),
                "field_values": records,
                "missing_fields": [name for name, r in records.items() if not r["present"]],
                "extra_fields": [k for k in self.answer if k not in known] if emitted else [],
                "reminders": self.reminders,
                "schema_mismatches": list(self.schema_mismatches),
            },
        )
