"""The SOP-Bench folder format: read an SOP task folder, check it, and serve its tools.

One folder is one domain, laid out as in the public SOP-Bench benchmark:

- ``sop.txt`` or ``sop.md``: the procedure the agent must follow;
- ``toolspecs.json``: the tools, a list in Amazon Bedrock's ``toolSpec`` form (``name``,
  ``description`` and ``inputSchema.json``, a JSON schema of the arguments);
- ``test_set_with_outputs.csv``: one task per row, holding the input and the expected output columns;
- ``metadata.json`` (optional): ``output_columns`` and ``input_columns``; optionally ``name`` (default:
  the folder name), ``id_column`` (a column of unique row ids; default: the row's index),
  ``intent_column`` (the column evaluation breaks results down by; default: the domain name) and
  ``strict_tool_schema`` (see below);
- ``test_set_without_outputs.csv`` (optional): the same rows without the outputs;
- ``tools.py`` (optional): the tools' Python implementations, as module functions or as the methods of
  one class (SOP-Bench's ``...Manager`` classes), which is instantiated without arguments once per
  episode.

Columns, when metadata.json does not list them, are inferred as the public benchmark's folders need:

- ``output_columns``: the columns of ``test_set_with_outputs.csv`` that ``test_set_without_outputs.csv``
  lacks; else the benchmark's legacy answer column (``expected_output``, else ``final_decision``);
  else the error says which key to add;
- ``input_columns``: every column of the test set that is not an output, except an index column that
  pandas wrote (an empty header cell).

An empty header cell is read under pandas' name, ``Unnamed: <position>`` (``Unnamed: 0`` for the index
column ``DataFrame.to_csv`` writes), so metadata written against pandas' view of the file still works.

Tools: each toolSpec is one tool. Public methods of the tools class (or public module functions) that
no spec names are helpers: they are not exposed to the agent, and the load log lists them. A tool can
instead be declarative and need no code: its ``toolSpec`` carries an ``x-csv-lookup`` entry that maps
arguments to the columns of a CSV file in the folder and names the columns to return::

    "x-csv-lookup": {"file": "registrations.csv", "match": {"serial_number": "serial_number"},
                     "return": ["model_code", "warranty_end"]}

The first row whose ``match`` columns equal the arguments (compared as text, ignoring case and
surrounding whitespace) comes back as ``{column: value}``, an empty cell as ``null``; ``return`` may
instead map result keys to columns (``{"model": "model_code"}``). When no row matches, the agent gets
a tool error ("No record in registrations.csv matches serial_number='X'."). A lookup may read the test
set (under any name: a link or a copy of it counts as the test set) but never return an output column.

Schemas: with ``strict_tool_schema`` on, a call whose arguments break the spec's schema (a missing
required argument, a wrong type, a value outside an ``enum``) is refused with a tool error, as the
shipped domains do. Off, the call goes to the folder's own code, which enforces what it enforces, as
Amazon Bedrock does (it does not validate tool input). Either way the mismatch is recorded in the
step's ``info["schema_mismatches"]``. The default is on for folders without tools.py and off for
folders with one; ``metadata.json`` or ``make_env(..., strict_tool_schema=...)`` can set it. An argument
that the spec declares but the implementation does not take gets a tool error naming it.

``tools.py`` is arbitrary Python, so it is imported only under a trust grant for this folder and this
content of tools.py (:mod:`pipeline.envs.sop.trust`). Everything else, all the checks above included,
reads ``tools.py`` with :mod:`ast` and never runs it.

Every problem raises :class:`~pipeline.envs.schema.TaskFileError`, naming the file (and line or field)
and saying how to fix it, when the folder is loaded rather than halfway through a run;
:func:`inspect_folder` lists every problem at once, errors and warnings (``turnwise sop check``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.chat import ToolError
from pipeline.envs.base import Tool
from pipeline.envs.schema import TaskFileError
from pipeline.envs.sop.code import CodeTool, CodeTools, DispatchedTool, import_tools, read_code
from pipeline.envs.sop.files import CsvTable, FolderFiles, shares_a_row
from pipeline.envs.sop.trust import HOW_TO_TRUST, TOOLS_PY, TRUST_ENV, code_digest, env_grant

__all__ = ["CsvLookup", "CsvTable", "FolderCheck", "Problem", "SopFolder", "ToolSpec", "TRUST_ENV",
           "UntrustedToolsError", "inspect_folder", "load_folder"]

logger = logging.getLogger(__name__)

SOP_FILES = ("sop.txt", "sop.md")
TOOLSPECS, METADATA = "toolspecs.json", "metadata.json"
TEST_SET, TEST_INPUTS = "test_set_with_outputs.csv", "test_set_without_outputs.csv"
LOOKUP_KEY = "x-csv-lookup"
#: The public benchmark's answer columns, used when metadata.json names no outputs (in this order).
LEGACY_OUTPUTS = ("expected_output", "final_decision")
#: Deepest nesting of ``items`` allowed in an argument schema.
MAX_SCHEMA_DEPTH = 32
FORMAT_HELP = ("An SOP folder holds sop.txt (or sop.md), toolspecs.json and test_set_with_outputs.csv, usually "
               "metadata.json, and tools.py for tools that are not x-csv-lookup specs; see "
               "pipeline/envs/sop/folder.py.")

_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # Bedrock's rule for tool names
_JSON_TYPES = frozenset({"string", "integer", "number", "boolean", "array", "object", "null"})


class UntrustedToolsError(PermissionError):
    """The folder's tools need ``tools.py``, Python code that no trust grant covers."""


# ---------------------------------------------------------------------------------------------------
# Problems: errors (the folder cannot run) and warnings
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One finding about a folder; ``message`` names the file (line, field) and says how to fix it."""

    severity: str  # "error" | "warning"
    message: str
    error: TaskFileError | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, error: TaskFileError) -> "Problem":
        return cls("error", str(error), error)

    @classmethod
    def warn(cls, path: Path, line: int | None, where: str | None, problem: str) -> "Problem":
        return cls("warning", str(TaskFileError(path, line, where, problem)))


@dataclass(eq=False)
class FolderCheck:
    """What :func:`inspect_folder` found: the folder (``None`` when an error stops it) and every problem."""

    path: Path
    folder: "SopFolder | None"
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


class _Collector:
    """Runs checks, keeping each TaskFileError as a problem so that later checks still run."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def attempt(self, check: Callable[..., Any], *args: Any) -> Any:
        try:
            return check(*args)
        except TaskFileError as exc:
            self.problems.append(Problem.of(exc))
            return None

    def warn(self, path: Path, line: int | None, where: str | None, problem: str) -> None:
        self.problems.append(Problem.warn(path, line, where, problem))


# ---------------------------------------------------------------------------------------------------
# Declarative lookups
# ---------------------------------------------------------------------------------------------------


def _key(value: Any) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return str("" if value is None else value).strip().casefold()


@dataclass
class CsvLookup:
    """A declarative tool: the first row of ``table`` whose ``match`` columns equal the arguments."""

    table: CsvTable
    match: dict[str, str]  # argument -> column
    returns: dict[str, str]  # result key -> column
    _index: dict[tuple[str, ...], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for i, row in enumerate(self.table.rows):
            self._index.setdefault(tuple(_key(row[c]) for c in self.match.values()), i)

    def __call__(self, **arguments: Any) -> dict[str, str | None]:
        i = self._index.get(tuple(_key(arguments.get(a)) for a in self.match))
        if i is None:
            wanted = ", ".join(f"{a}={arguments.get(a)!r}" for a in self.match)
            raise ToolError(f"No record in {self.table.path.name} matches {wanted}.")
        row = self.table.rows[i]
        return {k: row[c].strip() or None for k, c in self.returns.items()}


# ---------------------------------------------------------------------------------------------------
# Tool specs
# ---------------------------------------------------------------------------------------------------


@dataclass
class ToolSpec:
    """One entry of toolspecs.json; ``lookup`` is set for a declarative tool, else tools.py implements it."""

    name: str
    description: str
    parameters: dict
    lookup: CsvLookup | None = None
    index: int = 0  # its position in toolspecs.json, for messages

    @property
    def schema(self) -> dict:
        """The function-schema form the tool-call protocol uses (as ``transformers.utils.get_json_schema``)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    @property
    def lenient_schema(self) -> dict:
        """The schema checked before a call when ``strict_tool_schema`` is off: argument names only."""
        names = self.parameters.get("properties", {})
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": {n: {"nullable": True} for n in names}, "required": []}}}


class SpecTool(Tool):
    """A :class:`Tool` whose schema is a toolSpec's rather than one derived from a Python signature.

    ``schema`` is what the loop checks a call against (the spec's, or its lenient form when
    ``strict_tool_schema`` is off); ``spec_schema`` is the spec itself, which the agent reads.
    """

    def __init__(self, fn: Callable[..., Any], schema: dict, spec_schema: dict | None = None) -> None:
        self.fn, self.schema, self.mutates = fn, schema, False
        self.spec_schema = spec_schema or schema


class _SpecError(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


def _check_property(spec: Any, where: str, depth: int = 0) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise _SpecError(where, f"nests item schemas more than {MAX_SCHEMA_DEPTH} deep; flatten the argument")
    if not isinstance(spec, dict):
        raise _SpecError(where, f"must be a JSON schema object, got {type(spec).__name__}")
    kind = spec.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    unknown = [k for k in kinds if k not in _JSON_TYPES]
    if unknown:
        raise _SpecError(f"{where}.type", f"{unknown} is not a JSON schema type; use one of {sorted(_JSON_TYPES)}")
    if "enum" in spec and (not isinstance(spec["enum"], list) or not spec["enum"]):
        raise _SpecError(f"{where}.enum", "must be a non-empty list of allowed values")
    if "items" in spec:
        _check_property(spec["items"], f"{where}.items", depth + 1)


def _check_input_schema(schema: Any, where: str) -> dict:
    """A tool's argument schema must be an object schema whose ``required`` names its ``properties``."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise _SpecError(where, 'must be a JSON schema with "type": "object" listing the arguments in "properties"')
    properties = schema.setdefault("properties", {})
    if not isinstance(properties, dict):
        raise _SpecError(f"{where}.properties", "must map each argument name to its JSON schema")
    for name, spec in properties.items():
        _check_property(spec, f"{where}.properties.{name}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _SpecError(f"{where}.required", "must be a list of argument names")
    undeclared = [r for r in required if r not in properties]
    if undeclared:
        raise _SpecError(f"{where}.required", f"names {undeclared}, which are not in properties; declare them")
    return schema


@dataclass
class _Tables:
    """The CSV tables lookups read (by file name), and the test set they must not give away."""

    files: FolderFiles
    test_set: CsvTable | None
    outputs: list[str]
    by_name: dict[str, CsvTable] = field(default_factory=dict)

    def get(self, name: str, where: str) -> CsvTable:
        if name not in self.by_name:
            if not self.files.exists(name):
                raise _SpecError(where, f"{self.files.root / name} does not exist; add the file or fix the name")
            try:
                self.by_name[name] = self.files.read_csv(name)
            except TaskFileError as exc:
                raise _SpecError(where, f"names a file that cannot be used: {str(exc).rstrip('.')}") from None
        return self.by_name[name]

    def gives_away(self, table: CsvTable, column: str) -> bool:
        """Whether returning ``column`` of ``table`` hands the agent an expected output.

        True for an output column of the test set itself, of a link to it, of a copy of its bytes, or of a
        table with every one of its columns that holds one of its rows (a copy in another order, encoding or
        length). A table that merely shares an output's column name is not the test set: an SOP may well
        say that an output is a value a lookup returns.
        """
        if column not in self.outputs:
            return False
        test = self.test_set
        if test is None or table.name == TEST_SET:
            return True
        if table.record and test.record and table.record.same_content(test.record):
            return True
        return shares_a_row(table, test)


def _lookup_file(raw: dict, where: str) -> str:
    file = raw.get("file", TEST_SET)
    plain = (isinstance(file, str) and file.endswith(".csv") and "\x00" not in file and "/" not in file
             and "\\" not in file and file not in (".csv", "..csv") and not file.startswith("."))
    if not plain:
        raise _SpecError(f"{where}.file", f"must name a .csv file inside the folder (a plain file name such as "
                                          f"orders.csv, no directories), got {file!r}")
    return file


def _parse_lookup(raw: Any, where: str, parameters: dict, tables: _Tables) -> CsvLookup:
    if not isinstance(raw, dict):
        raise _SpecError(where, 'must be {"file": "...csv", "match": {"argument": "column"}, "return": ["column"]}')
    file = _lookup_file(raw, where)
    table = tables.get(file, f"{where}.file")
    match, returns = raw.get("match"), raw.get("return")
    if not isinstance(match, dict) or not match or not all(isinstance(v, str) for v in match.values()):
        raise _SpecError(f"{where}.match", 'must map each argument to the column it matches, e.g. {"order_id": "id"}')
    if isinstance(returns, list) and returns and all(isinstance(c, str) for c in returns):
        returns = {c: c for c in returns}
    if not isinstance(returns, dict) or not returns or not all(isinstance(c, str) for c in returns.values()):
        raise _SpecError(f"{where}.return", "must list the columns to return, or map result keys to columns")
    required = parameters.get("required", [])
    for argument in match:
        if argument not in required:
            raise _SpecError(f"{where}.match", f"matches on {argument!r}, which must be a required argument in "
                                               "inputSchema.json; declare it and list it in required")
    for part, columns in (("match", match.values()), ("return", returns.values())):
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise _SpecError(f"{where}.{part}", f"{missing} are not columns of {file} (its columns: "
                                                f"{', '.join(table.columns)}); fix the names")
    leaked = [c for c in returns.values() if tables.gives_away(table, c)]
    if leaked:
        alias = "" if file == TEST_SET else f" ({file} holds the test set's rows: a link to it or a copy of it)"
        raise _SpecError(f"{where}.return", f"returns {leaked}, expected outputs from metadata.json output_columns"
                                            f"{alias}, which would hand the agent the answer; return other columns")
    return CsvLookup(table, dict(match), dict(returns))


def _parse_spec(index: int, entry: Any, names: set[str], tables: _Tables) -> ToolSpec:
    wrapped = isinstance(entry, dict) and "toolSpec" in entry
    body = entry["toolSpec"] if wrapped else entry
    where = f"[{index}].toolSpec" if wrapped else f"[{index}]"
    if not isinstance(body, dict):
        raise _SpecError(where, 'must be an object with "name", "description" and "inputSchema"')
    name = body.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.match(name):
        raise _SpecError(f"{where}.name", f"must be 1-64 letters, digits, _ or -, got {name!r}")
    if name.startswith("__") and name.endswith("__"):
        raise _SpecError(f"{where}.name", f"{name!r} is a Python special name, which no tool may take; rename it")
    if name in names:
        raise _SpecError(f"{where}.name", f"{name!r} is declared twice; give each tool one spec")
    description = body.get("description")
    if not isinstance(description, str) or not description.strip():
        raise _SpecError(f"{where}.description", "must say what the tool does (the agent reads it)")
    input_schema = body.get("inputSchema")
    if not isinstance(input_schema, dict) or "json" not in input_schema:
        raise _SpecError(f"{where}.inputSchema", 'must be {"json": <JSON schema of the arguments>}')
    parameters = _check_input_schema(input_schema["json"], f"{where}.inputSchema.json")
    lookup = None
    if LOOKUP_KEY in body:
        lookup = _parse_lookup(body[LOOKUP_KEY], f"{where}.{LOOKUP_KEY}", parameters, tables)
    return ToolSpec(name, description.strip(), parameters, lookup, index)


def _read_specs(files: FolderFiles, tables: _Tables, found: _Collector) -> dict[str, ToolSpec] | None:
    path = files.root / TOOLSPECS
    raw = files.read_json(TOOLSPECS)
    if not isinstance(raw, list) or not raw:
        raise TaskFileError(path, None, None, 'must be a non-empty JSON list of {"toolSpec": {...}} entries.')
    specs: dict[str, ToolSpec] = {}
    complete = True
    for i, entry in enumerate(raw):
        try:
            spec = _parse_spec(i, entry, set(specs), tables)
        except _SpecError as exc:
            found.problems.append(Problem.of(TaskFileError(path, None, exc.field, f"{exc}.")))
            complete = False
            continue
        specs[spec.name] = spec
    return specs if complete else None


# ---------------------------------------------------------------------------------------------------
# tools.py against the specs (pipeline.envs.sop.code reads it)
# ---------------------------------------------------------------------------------------------------


def _check_implementations(root: Path, specs: dict[str, ToolSpec], code: CodeTools | None, found: _Collector) -> None:
    """Every spec needs one implementation; signatures that disagree with a spec are warnings."""
    defined = code.definitions if code else {}
    for name, spec in specs.items():
        if spec.lookup is not None:
            if name in defined:
                found.attempt(_raise, TaskFileError(code.path, defined[name].line, None,
                                                    f"{name} is also an {LOOKUP_KEY} tool in {TOOLSPECS}; keep one "
                                                    "implementation (delete the function or the lookup)."))
            continue
        if name not in defined and code is not None and name in code.dispatched:
            found.warn(code.path, None, None, f"class {code.class_name} has no method {name}; its process_tool_call "
                                              f"routes the tool, so turnwise calls it through process_tool_call and "
                                              "cannot check its arguments against the spec.")
            continue
        if name not in defined:
            if code is None:
                where = f"there is no {TOOLS_PY}"
            elif name.startswith("_"):
                where = f"{TOOLS_PY}'s names that start with _ are private, never tools; rename the tool"
            else:
                where = f"{TOOLS_PY} has no function or method {name}"
            found.attempt(_raise, TaskFileError(root / TOOLSPECS, None, f"[{spec.index}]",
                                                f"tool {name!r} has no implementation: {where}. Add an {LOOKUP_KEY} "
                                                f"to its toolSpec, or implement {name} in {TOOLS_PY}."))
            continue
        _signature_warnings(code, spec, found)
    helpers = sorted(n for n in defined if n not in specs)
    if helpers:
        owner = f"class {code.class_name}" if code.class_name else TOOLS_PY
        found.warn(code.path, None, None, f"{owner} has public helpers that no spec in {TOOLSPECS} names: "
                                          f"{', '.join(helpers)}. They are not tools: the agent never sees or calls "
                                          "them. Add a toolSpec to make one a tool, or start its name with _.")


def _raise(error: TaskFileError) -> None:
    raise error


def _signature_warnings(code: CodeTools, spec: ToolSpec, found: _Collector) -> None:
    signature = code.definitions[spec.name]
    shown = signature.render(spec.name)
    declared = spec.parameters["properties"]
    schema_required = set(spec.parameters.get("required", []))
    if not signature.var_keyword:
        for argument in declared:
            if argument in signature.accepted:
                continue
            if argument in schema_required:
                effect = ("every call that follows the schema fails. Add the parameter, or drop the argument from "
                          "the schema")
            else:
                effect = ("a call that passes it gets a tool error naming it. Add the parameter, or remove the "
                          "argument from the schema")
            found.warn(code.path, signature.line, None,
                       f"{shown} does not take {argument!r}, which its inputSchema in {TOOLSPECS} declares "
                       f"({'required' if argument in schema_required else 'optional'}); {effect}.")
    optional = [p for p in signature.required if p in declared and p not in schema_required]
    if optional:
        found.warn(code.path, signature.line, None,
                   f"{shown} requires {optional}, which its inputSchema in {TOOLSPECS} marks optional; a call that "
                   "omits them fails with a missing-argument error. List them in required, or give them defaults.")
    undeclared = [p for p in signature.required if p not in declared]
    if undeclared:
        found.warn(code.path, signature.line, None,
                   f"{shown} requires {undeclared}, which its inputSchema in {TOOLSPECS} does not declare; the agent "
                   "cannot pass them, so every call fails. Declare them, or give them defaults.")


# ---------------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------------


@dataclass
class SopFolder:
    """A checked SOP folder (see the module docstring). Build it with :func:`load_folder`."""

    path: Path
    name: str
    sop: str
    specs: dict[str, ToolSpec]
    input_columns: list[str]
    output_columns: list[str]
    table: CsvTable
    id_column: str | None = None
    intent_column: str | None = None
    code: CodeTools | None = None
    strict_tool_schema: bool = True
    helpers: list[str] = field(default_factory=list)
    inferred: dict[str, str] = field(default_factory=dict)  # column key -> how it was inferred

    @property
    def code_tools(self) -> list[str]:
        """The tools that tools.py implements (and that therefore need trust)."""
        return [name for name, spec in self.specs.items() if spec.lookup is None]

    def check_trust(self, trust_tools: bool | None = None) -> str | None:
        """The tools.py digest trust was granted for (``None``: no digest to hold it to, or nothing to trust).

        ``trust_tools`` True trusts this folder for the caller; False refuses; ``None`` looks for a grant in
        ``$TURNWISE_TRUST_TOOLS`` for this folder and this content of tools.py. Raises
        :class:`UntrustedToolsError` saying why and how to grant trust.
        """
        if not self.code_tools or trust_tools is True:
            return None
        tools_py = self.path / TOOLS_PY
        if trust_tools is False:
            why = "this environment was built with trust_tools=False"
        else:
            grant, why = env_grant(self.path)
            if grant is not None and grant.tools_sha256 == self.code.sha256:
                return grant.tools_sha256
            if grant is not None:
                why = (f"{TRUST_ENV} grants trust to this folder's tools.py as it was (SHA-256 "
                       f"{grant.tools_sha256[:12]}...), and it has changed since (now {self.code.sha256[:12]}...); "
                       "read it again, then grant trust again")
        raise UntrustedToolsError(
            f"{tools_py} is Python code, and turnwise runs a task folder's code only when you trust that folder "
            f"(tools that need it: {', '.join(self.code_tools)}); {why}. Read it first; to allow it, {HOW_TO_TRUST}. "
            f"To need no code, give each tool an {LOOKUP_KEY} in {TOOLSPECS} instead.")

    def bind_tools(self, trust_tools: bool | None = None, strict: bool | None = None) -> dict[str, Tool]:
        """This episode's tools; tools.py's class, if any, is instantiated afresh (no state is shared).

        ``strict`` (default: the folder's ``strict_tool_schema``) picks the schema the loop checks calls
        against: the spec's, or its lenient form (argument names only).
        """
        granted = self.check_trust(trust_tools)
        strict = self.strict_tool_schema if strict is None else strict
        implementation = self._implementation(granted) if self.code_tools else None
        tools: dict[str, Tool] = {}
        for name, spec in self.specs.items():
            if spec.lookup is not None:
                fn: Callable[..., Any] = spec.lookup
            elif name in self.code.definitions:
                fn = CodeTool(getattr(implementation, name), name, self.code.definitions[name])
            else:
                fn = DispatchedTool(implementation.process_tool_call, name)
            tools[name] = SpecTool(fn, spec.schema if strict else spec.lenient_schema, spec.schema)
        return tools

    def _implementation(self, granted: str | None) -> Any:
        files = FolderFiles(self.path)
        data, _ = files.read_bytes(TOOLS_PY, "code")
        digest = code_digest(data)
        if digest != self.code.sha256 or (granted is not None and digest != granted):
            raise UntrustedToolsError(f"{self.code.path} changed after it was checked (SHA-256 now {digest[:12]}...); "
                                      f"it is not run. Load the folder again, and grant trust again if you still "
                                      "trust it.")
        module = import_tools(self.code.path, digest, data)
        if self.code.class_name is None:
            return module
        try:
            return getattr(module, self.code.class_name)()
        except Exception as exc:
            raise TaskFileError(self.code.path, None, None, f"{self.code.class_name}() failed ({type(exc).__name__}: "
                                f"{exc}); the tool class is created with no arguments once per episode.") from exc


def _column_list(metadata: dict, key: str, path: Path) -> list[str]:
    value = metadata[key]
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise TaskFileError(path, None, key, "must be a non-empty list of column names of test_set_with_outputs.csv.")
    if len(set(value)) != len(value):
        raise TaskFileError(path, None, key, "lists a column twice; list each once.")
    return value


def _optional_column(metadata: dict, key: str, path: Path, table: CsvTable) -> str | None:
    value = metadata.get(key)
    if value is not None and (not isinstance(value, str) or value not in table.columns):
        shown = value if isinstance(value, str) and len(value) <= 80 else f"{str(value)[:80]}..."
        raise TaskFileError(path, None, key, f"{shown!r} is not a column of {TEST_SET} (its columns: "
                                             f"{', '.join(table.columns)}); fix it or leave it out.")
    return value


def _outputs(metadata: dict, meta_path: Path, table: CsvTable,
             without: CsvTable | None) -> tuple[list[str], str | None]:
    """The output columns and, when inferred, how (``None`` when metadata.json lists them)."""
    if "output_columns" in metadata:
        return _column_list(metadata, "output_columns", meta_path), None
    if without is not None:
        missing = [c for c in table.columns if c not in without.columns]
        if missing:
            return missing, f"the columns of {TEST_SET} that {TEST_INPUTS} lacks"
    legacy = next((c for c in LEGACY_OUTPUTS if c in table.columns), None)
    if legacy is not None:
        return [legacy], f"the public benchmark's answer column {legacy!r}"
    tried = (f"{TEST_INPUTS} has every column of {TEST_SET}" if without is not None
             else f"there is no {TEST_INPUTS} to compare with")
    raise TaskFileError(meta_path, None, "output_columns",
                        f"must be a non-empty list of the test set's expected-output columns; it is not given, and "
                        f"it cannot be inferred ({tried}, and there is no {' or '.join(LEGACY_OUTPUTS)} column). Add "
                        f"\"output_columns\": [...] to {METADATA}.")


def _columns(metadata: dict, meta_path: Path, table: CsvTable, without: CsvTable | None,
             found: _Collector) -> tuple[list[str], list[str], dict[str, str]] | None:
    inferred: dict[str, str] = {}
    outputs, how = _outputs(metadata, meta_path, table, without)
    if how:
        inferred["output_columns"] = how
    index_columns = {table.columns[i] for i in table.unnamed}
    if "input_columns" in metadata:
        inputs = _column_list(metadata, "input_columns", meta_path)
    else:
        inputs = [c for c in table.columns if c not in outputs and c not in index_columns]
        inferred["input_columns"] = "every column of the test set that is not an output" + (
            f" (the index column{'s' if len(index_columns) > 1 else ''} {sorted(index_columns)} left out)"
            if index_columns else "")
    both = [c for c in inputs if c in outputs]
    if both:
        raise TaskFileError(meta_path, None, "output_columns", f"{both} are also input_columns; the agent would see "
                                                               "the answer. A column is an input or an output.")
    for key, wanted in (("input_columns", inputs), ("output_columns", outputs)):
        absent = [c for c in wanted if c not in table.columns]
        if absent:
            raise TaskFileError(meta_path, None, key, f"{absent} are not columns of {TEST_SET} (its columns: "
                                                      f"{', '.join(table.columns)}); fix {METADATA} or the CSV header.")
    if not inputs:
        raise TaskFileError(meta_path, None, "input_columns", f"is empty: every column of {TEST_SET} is an output, "
                                                              "so the agent would get no case to work on. List the "
                                                              "inputs.")
    for key, how in inferred.items():
        listed = ", ".join(outputs if key == "output_columns" else inputs)
        found.warn(meta_path, None, key, f"not given; inferred as {how}: {listed}. List them in {METADATA} to make "
                                         "this explicit.")
    return inputs, outputs, inferred


def _check_ids(table: CsvTable, id_column: str) -> None:
    seen: dict[str, int] = {}
    for row, line in zip(table.rows, table.lines):
        row_id = row[id_column].strip()
        if not row_id or row_id in seen:
            problem = "is empty" if not row_id else f"repeats {row_id!r} (first on line {seen[row_id]})"
            raise TaskFileError(table.path, line, id_column, f"{problem}; the id_column needs a unique id per row.")
        seen[row_id] = line


def _data_warnings(table: CsvTable, inputs: list[str], specs: dict[str, ToolSpec], spec_path: Path,
                   found: _Collector) -> None:
    """Warnings about the rows: empty input cells, and input values an argument's enum does not allow."""
    for column in inputs:
        empty = [line for row, line in zip(table.rows, table.lines) if not row[column].strip()]
        if empty:
            found.warn(table.path, empty[0], column, f"is empty in {len(empty)} of {len(table.rows)} rows (first on "
                                                     f"line {empty[0]}); the agent gets an empty value for this input.")
    for spec in specs.values():
        for argument, schema in spec.parameters["properties"].items():
            if argument not in inputs or not isinstance(schema.get("enum"), list):
                continue
            allowed = {str(v) for v in schema["enum"]}
            outside = sorted({row[argument] for row in table.rows
                              if row[argument].strip() and row[argument] not in allowed})
            if outside:
                more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
                shown = ", ".join(repr(v) for v in outside[:5]) + more
                found.warn(spec_path, None, f"[{spec.index}].inputSchema.json.properties.{argument}.enum",
                           f"does not allow {shown}, which the test set's {argument} column holds; with "
                           "strict_tool_schema on, the agent cannot pass those values to "
                           f"{spec.name}. Add them to the enum, or turn strict_tool_schema off.")


def inspect_folder(path: str | Path) -> FolderCheck:
    """Check an SOP folder; list every problem at once (errors and warnings), never running tools.py."""
    path = Path(path)
    if not path.is_dir():
        error = TaskFileError(path, None, None, f"is not a directory. {FORMAT_HELP}")
        return FolderCheck(path, None, [Problem.of(error)])
    return _inspect(path.resolve(), _version(path.resolve()))


def _version(path: Path) -> tuple:
    entries = []
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return ()
    for name in names:
        try:
            info = os.stat(path / name)
        except (OSError, ValueError):
            entries.append((name, None))
            continue
        entries.append((name, info.st_mtime_ns, info.st_size, info.st_ino))
    return tuple(entries)


@lru_cache(maxsize=16)
def _inspect(path: Path, version: tuple) -> FolderCheck:
    files = FolderFiles(path)
    found = _Collector()
    sops = [name for name in SOP_FILES if files.exists(name)]
    missing = [name for name in (TOOLSPECS, TEST_SET) if not files.exists(name)]
    missing = (["sop.txt (or sop.md)"] if not sops else []) + missing
    if missing:
        found.attempt(_raise, TaskFileError(path, None, None, f"missing {', '.join(missing)}. {FORMAT_HELP}"))
    if len(sops) > 1:
        found.attempt(_raise, TaskFileError(path, None, None, "has both sop.txt and sop.md; keep one, so that it is "
                                                              "clear which procedure the agent reads."))

    table = found.attempt(files.read_csv, TEST_SET) if TEST_SET not in missing else None
    if table is not None and not table.rows:
        found.attempt(_raise, TaskFileError(table.path, None, None, "has no rows; add one task per row."))
        table = None
    if table is not None and table.unnamed:
        found.warn(table.path, 1, None, f"has {len(table.unnamed)} header cell(s) with no name, read as "
                                        f"{', '.join(repr(table.columns[i]) for i in table.unnamed)} (pandas' name for "
                                        "the index column it writes); name the column, or write the CSV with "
                                        "index=False.")
    without = found.attempt(files.read_csv, TEST_INPUTS) if files.exists(TEST_INPUTS) else None

    sop = found.attempt(files.read_text, sops[0]) if len(sops) == 1 else None
    if sop is not None:
        sop = sop.strip()
        if not sop:
            found.attempt(_raise, TaskFileError(path / sops[0], None, None, "is empty; write the procedure the agent "
                                                                            "must follow."))
        elif table is not None and files.records[sops[0]].same_content(table.record):
            found.attempt(_raise, TaskFileError(path / sops[0], None, None, f"is {TEST_SET} (a link or a copy of it): "
                                                "the agent would read the answers. Write the procedure in it."))
            sop = None

    meta_path = path / METADATA
    metadata = found.attempt(files.read_json, METADATA) if files.exists(METADATA) else {}
    if metadata is not None and not isinstance(metadata, dict):
        found.attempt(_raise, TaskFileError(meta_path, None, None, 'must be a JSON object with "output_columns" '
                                                                   'and, optionally, "input_columns".'))
        metadata = None
    name = strict = None
    if metadata is not None:
        name = metadata.get("name", path.name)
        if not isinstance(name, str) or not name.strip():
            found.attempt(_raise, TaskFileError(meta_path, None, "name", "must be a non-empty string (default: the "
                                                                         "folder name)."))
            name = None
        strict = metadata.get("strict_tool_schema")
        if strict is not None and not isinstance(strict, bool):
            found.attempt(_raise, TaskFileError(meta_path, None, "strict_tool_schema",
                                                "must be true or false (default: false when the folder has tools.py, "
                                                "else true)."))

    columns = id_column = intent_column = None
    if metadata is not None and table is not None:
        columns = found.attempt(_columns, metadata, meta_path, table, without, found)
        id_column = found.attempt(_optional_column, metadata, "id_column", meta_path, table)
        intent_column = found.attempt(_optional_column, metadata, "intent_column", meta_path, table)
        if id_column:
            found.attempt(_check_ids, table, id_column)

    outputs = columns[1] if columns else []
    specs = None
    if TOOLSPECS not in missing:
        tables = _Tables(files, table, outputs)
        specs = found.attempt(_read_specs, files, tables, found)
    code = None
    if files.exists(TOOLS_PY):
        code = found.attempt(read_code, files, set(specs or ()))
    if specs is not None and (code is not None or not files.exists(TOOLS_PY)):
        _check_implementations(path, specs, code, found)
    if specs is not None and columns is not None:
        _data_warnings(table, columns[0], specs, path / TOOLSPECS, found)

    errors = [p for p in found.problems if p.severity == "error"]
    if errors or None in (sop, name, table, columns, specs):
        if not errors:  # a check stopped without saying why: never hand back a half-read folder
            found.attempt(_raise, TaskFileError(path, None, None, f"could not be read completely. {FORMAT_HELP}"))
        return FolderCheck(path, None, found.problems)
    helpers = sorted(n for n in (code.definitions if code else {}) if n not in specs)
    folder = SopFolder(path, name, sop, specs, columns[0], columns[1], table, id_column, intent_column, code,
                       strict if strict is not None else code is None, helpers, columns[2])
    return FolderCheck(path, folder, found.problems)


def load_folder(path: str | Path) -> SopFolder:
    """Read and check an SOP folder (cached until one of its files changes); raises its first error.

    Warnings are logged once per version of the folder; ``turnwise sop check`` lists them all.
    """
    check = inspect_folder(path)
    if check.errors:
        raise check.errors[0].error
    _log_warnings(check)
    return check.folder


@lru_cache(maxsize=64)
def _log_warnings(check: FolderCheck) -> None:
    for warning in check.warnings:
        logger.warning("%s", warning.message)

