"""The SOP-Bench folder format: read an SOP task folder, check it, and serve its tools.

One folder is one domain, laid out as in the public SOP-Bench benchmark:

- ``sop.txt`` or ``sop.md``: the procedure the agent must follow;
- ``toolspecs.json``: the tools, a list in Amazon Bedrock's ``toolSpec`` form (``name``,
  ``description`` and ``inputSchema.json``, a JSON schema of the arguments);
- ``metadata.json``: ``input_columns`` and ``output_columns``; optionally ``name`` (default: the folder
  name), ``id_column`` (a column of unique row ids; default: the row's index) and ``intent_column``
  (the column evaluation breaks results down by; default: the domain name);
- ``test_set_with_outputs.csv``: one task per row, holding the input and the expected output columns;
- ``tools.py`` (optional): the tools' Python implementations, as module functions or as the methods of
  one class (SOP-Bench's ``...Manager`` classes), which is instantiated without arguments once per
  episode.

A tool can instead be declarative and need no code: its ``toolSpec`` carries an ``x-csv-lookup`` entry
that maps arguments to the columns of a CSV file in the folder and names the columns to return::

    "x-csv-lookup": {"file": "registrations.csv", "match": {"serial_number": "serial_number"},
                     "return": ["model_code", "warranty_end"]}

The first row whose ``match`` columns equal the arguments (compared as text, ignoring case and
surrounding whitespace) comes back as ``{column: value}``, an empty cell as ``null``; ``return`` may
instead map result keys to columns (``{"model": "model_code"}``). When no row matches, the agent gets
a tool error ("No record in registrations.csv matches serial_number='X'.").

``tools.py`` is arbitrary Python, so it is imported only when the user says to trust it:
``trust_tools=True``, or ``TURNWISE_TRUST_TOOLS=1`` in the environment (which crosses into accelerate
workers; ``turnwise eval --trust-tools`` sets it). Everything else, the check that every spec has an
implementation and every implementation a spec included, reads ``tools.py`` with :mod:`ast` and never
runs it.

Every problem raises :class:`~pipeline.envs.schema.TaskFileError`, naming the file (and line or field)
and saying how to fix it, when the folder is loaded rather than halfway through a run.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache, wraps
from pathlib import Path
from typing import Any, Callable

from pipeline.chat import ToolError
from pipeline.envs.base import Tool
from pipeline.envs.schema import TaskFileError

TRUST_ENV = "TURNWISE_TRUST_TOOLS"
SOP_FILES = ("sop.txt", "sop.md")
TOOLSPECS, METADATA, TEST_SET, TOOLS_PY = "toolspecs.json", "metadata.json", "test_set_with_outputs.csv", "tools.py"
LOOKUP_KEY = "x-csv-lookup"
#: Public methods of a tools.py class that are plumbing, not tools (SOP-Bench's dispatcher).
DISPATCH_METHODS = frozenset({"process_tool_call"})
FORMAT_HELP = ("An SOP folder holds sop.txt (or sop.md), toolspecs.json, metadata.json and test_set_with_outputs.csv, "
               "and tools.py for tools that are not x-csv-lookup specs; see pipeline/envs/sop/folder.py.")

_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # Bedrock's rule for tool names
_JSON_TYPES = frozenset({"string", "integer", "number", "boolean", "array", "object", "null"})


class UntrustedToolsError(PermissionError):
    """The folder's tools need ``tools.py``, Python code that the user has not said to trust."""


def tools_trusted(trust_tools: bool | None = None) -> bool:
    """An explicit ``trust_tools`` wins; ``None`` reads ``$TURNWISE_TRUST_TOOLS`` (1/true/yes/on)."""
    if trust_tools is not None:
        return bool(trust_tools)
    return os.environ.get(TRUST_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


# ---------------------------------------------------------------------------------------------------
# CSV tables and declarative lookups
# ---------------------------------------------------------------------------------------------------


@dataclass
class CsvTable:
    """A CSV file's rows as dicts of strings; ``lines[i]`` is the file line of ``rows[i]``."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]


def read_csv(path: Path) -> CsvTable:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TaskFileError(path, None, None, f"is not UTF-8 text ({exc.reason}); save it as UTF-8.") from None
    reader = csv.reader(io.StringIO(text))
    try:
        columns = [c.strip() for c in next(reader)]
    except StopIteration:
        raise TaskFileError(path, None, None, "is empty; it needs a header row naming the columns.") from None
    except csv.Error as exc:
        raise TaskFileError(path, 1, None, f"is not valid CSV ({exc}).") from None
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates or "" in columns:
        problem = f"repeats the column(s) {duplicates}" if duplicates else "has a column with no name"
        raise TaskFileError(path, 1, None, f"the header {problem}; give every column a unique name.")
    rows, lines = [], []
    try:
        for values in reader:
            if not values or not any(v.strip() for v in values):
                continue
            if len(values) != len(columns):
                raise TaskFileError(path, reader.line_num, None, f"has {len(values)} values but the header has "
                                    f"{len(columns)} columns; quote values that contain commas.")
            rows.append(dict(zip(columns, values)))
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise TaskFileError(path, reader.line_num, None, f"is not valid CSV ({exc}).") from None
    return CsvTable(path, columns, rows, lines)


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

    @property
    def schema(self) -> dict:
        """The function-schema form the tool-call protocol uses (as ``transformers.utils.get_json_schema``)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


class SpecTool(Tool):
    """A :class:`Tool` whose schema is a toolSpec's rather than one derived from a Python signature."""

    def __init__(self, fn: Callable[..., Any], schema: dict) -> None:
        self.fn, self.schema, self.mutates = fn, schema, False


class _SpecError(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


def _check_property(spec: Any, where: str) -> None:
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
        _check_property(spec["items"], f"{where}.items")


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


def _parse_lookup(raw: Any, where: str, folder: Path, parameters: dict, tables: dict[str, CsvTable],
                  output_columns: list[str]) -> CsvLookup:
    if not isinstance(raw, dict):
        raise _SpecError(where, 'must be {"file": "...csv", "match": {"argument": "column"}, "return": ["column"]}')
    file = raw.get("file", TEST_SET)
    if not isinstance(file, str) or not file.endswith(".csv") or Path(file).is_absolute() or ".." in Path(file).parts:
        raise _SpecError(f"{where}.file", f"must name a .csv file inside the folder, got {file!r}")
    if file not in tables:
        if not (folder / file).is_file():
            raise _SpecError(f"{where}.file", f"{folder / file} does not exist; add the file or fix the name")
        tables[file] = read_csv(folder / file)
    table = tables[file]
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
    leaked = [c for c in returns.values() if file == TEST_SET and c in output_columns]
    if leaked:
        raise _SpecError(f"{where}.return", f"returns {leaked}, expected outputs from metadata.json output_columns, "
                                            "which would hand the agent the answer; return other columns")
    return CsvLookup(table, dict(match), dict(returns))


def _read_specs(path: Path, folder: Path, output_columns: list[str]) -> dict[str, ToolSpec]:
    raw = _read_json(path)
    if not isinstance(raw, list) or not raw:
        raise TaskFileError(path, None, None, 'must be a non-empty JSON list of {"toolSpec": {...}} entries.')
    specs: dict[str, ToolSpec] = {}
    tables: dict[str, CsvTable] = {}
    for i, entry in enumerate(raw):
        wrapped = isinstance(entry, dict) and "toolSpec" in entry
        body = entry["toolSpec"] if wrapped else entry
        where = f"[{i}].toolSpec" if wrapped else f"[{i}]"
        try:
            if not isinstance(body, dict):
                raise _SpecError(where, 'must be an object with "name", "description" and "inputSchema"')
            name = body.get("name")
            if not isinstance(name, str) or not _TOOL_NAME.match(name):
                raise _SpecError(f"{where}.name", f"must be 1-64 letters, digits, _ or -, got {name!r}")
            if name in specs:
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
                lookup = _parse_lookup(body[LOOKUP_KEY], f"{where}.{LOOKUP_KEY}", folder, parameters, tables,
                                       output_columns)
        except _SpecError as exc:
            raise TaskFileError(path, None, exc.field, f"{exc}.") from None
        specs[name] = ToolSpec(name, description.strip(), parameters, lookup)
    return specs


# ---------------------------------------------------------------------------------------------------
# tools.py, read without running it
# ---------------------------------------------------------------------------------------------------


@dataclass
class CodeTools:
    """What tools.py defines: public functions, or the public methods of the one class holding the tools."""

    path: Path
    class_name: str | None
    definitions: dict[str, ast.FunctionDef]


def _read_code(path: Path, spec_names: set[str]) -> CodeTools:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise TaskFileError(path, exc.lineno, None, f"is not valid Python ({exc.msg}); fix the syntax.") from None

    def public(nodes: list[ast.stmt]) -> dict[str, ast.FunctionDef]:
        return {n.name: n for n in nodes if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}

    classes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            methods = {k: v for k, v in public(node.body).items() if k not in DISPATCH_METHODS}
            if methods.keys() & spec_names:
                classes[node.name] = methods
    if len(classes) > 1:
        raise TaskFileError(path, None, None, f"defines tools in several classes ({', '.join(classes)}); keep them in "
                                              "one class, or write them as module-level functions.")
    if classes:
        name, methods = next(iter(classes.items()))
        return CodeTools(path, name, methods)
    return CodeTools(path, None, public(tree.body))


def _check_signature(code: CodeTools, spec: ToolSpec) -> None:
    """Every argument the schema declares must be a parameter of the implementation."""
    fn = code.definitions[spec.name]
    args = fn.args
    positional = [a.arg for a in args.posonlyargs + args.args]
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    if code.class_name and positional and not static:
        positional = positional[1:]  # self
    if args.kwarg is not None:
        return
    accepted = positional + [a.arg for a in args.kwonlyargs]
    unknown = [p for p in spec.parameters["properties"] if p not in accepted]
    if unknown:
        raise TaskFileError(code.path, fn.lineno, None, f"{spec.name}({', '.join(accepted)}) does not take {unknown}, "
                                                        f"which its inputSchema in {TOOLSPECS} declares; add the "
                                                        "parameters or remove them from the schema.")


def _check_implementations(folder: Path, specs: dict[str, ToolSpec], code: CodeTools | None) -> None:
    defined = code.definitions if code else {}
    for name, fn in defined.items():
        if name not in specs:
            raise TaskFileError(code.path, fn.lineno, None, f"{name} has no spec in {TOOLSPECS}; add a toolSpec for it, "
                                                            f"or rename it _{name} if it is a helper, not a tool.")
        if specs[name].lookup is not None:
            raise TaskFileError(code.path, fn.lineno, None, f"{name} is also an {LOOKUP_KEY} tool in {TOOLSPECS}; keep "
                                                            "one implementation (delete the function or the lookup).")
    for i, (name, spec) in enumerate(specs.items()):
        if spec.lookup is None and name not in defined:
            where = f"{TOOLS_PY} has no function or method {name}" if code else f"there is no {TOOLS_PY}"
            raise TaskFileError(folder / TOOLSPECS, None, f"[{i}]", f"tool {name!r} has no implementation: {where}. "
                                f"Add an {LOOKUP_KEY} to its toolSpec, or implement {name} in {TOOLS_PY}.")
        if spec.lookup is None:
            _check_signature(code, spec)


@lru_cache(maxsize=16)
def _import_tools(path: Path, mtime_ns: int) -> Any:
    """Import tools.py as a module of its own (cached per file version). Only called once trusted."""
    name = "turnwise_sop_tools_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise TaskFileError(path, None, None, f"failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def _plain(value: Any) -> Any:
    """A tool result as plain JSON values: numpy/pandas scalars unwrapped, NaN as null, dates as ISO text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _json_results(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def call(**arguments: Any) -> Any:
        return _plain(fn(**arguments))

    return call


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

    @property
    def code_tools(self) -> list[str]:
        """The tools that tools.py implements (and that therefore need trust)."""
        return [name for name, spec in self.specs.items() if spec.lookup is None]

    def check_trust(self, trust_tools: bool | None = None) -> None:
        """Raise :class:`UntrustedToolsError` when tools.py is needed and not trusted."""
        if self.code_tools and not tools_trusted(trust_tools):
            raise UntrustedToolsError(
                f"{self.path / TOOLS_PY} is Python code, and turnwise runs a task folder's code only when you trust "
                f"it (tools that need it: {', '.join(self.code_tools)}). Read it first; to allow it, pass "
                f"trust_tools=True to make_env, set {TRUST_ENV}=1 in the environment, or add --trust-tools to "
                f"`turnwise eval`, `train`, `audit` or `score`. To need no code, give each tool an {LOOKUP_KEY} in "
                f"{TOOLSPECS} instead.")

    def bind_tools(self, trust_tools: bool | None = None) -> dict[str, Tool]:
        """This episode's tools; tools.py's class, if any, is instantiated afresh (no state is shared)."""
        self.check_trust(trust_tools)
        implementation = self._implementation() if self.code_tools else None
        tools: dict[str, Tool] = {}
        for name, spec in self.specs.items():
            fn = spec.lookup if spec.lookup is not None else _json_results(getattr(implementation, name))
            tools[name] = SpecTool(fn, spec.schema)
        return tools

    def _implementation(self) -> Any:
        module = _import_tools(self.code.path, self.code.path.stat().st_mtime_ns)
        if self.code.class_name is None:
            return module
        try:
            return getattr(module, self.code.class_name)()
        except Exception as exc:
            raise TaskFileError(self.code.path, None, None, f"{self.code.class_name}() failed ({type(exc).__name__}: "
                                f"{exc}); the tool class is created with no arguments once per episode.") from exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskFileError(path, exc.lineno, None, f"is not valid JSON ({exc.msg}, column {exc.colno}).") from None


def _columns(metadata: dict, key: str, path: Path) -> list[str]:
    value = metadata.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise TaskFileError(path, None, key, "must be a non-empty list of column names of test_set_with_outputs.csv.")
    if len(set(value)) != len(value):
        raise TaskFileError(path, None, key, "lists a column twice; list each once.")
    return value


def _optional_column(metadata: dict, key: str, path: Path, table: CsvTable) -> str | None:
    value = metadata.get(key)
    if value is not None and (not isinstance(value, str) or value not in table.columns):
        raise TaskFileError(path, None, key, f"{value!r} is not a column of {TEST_SET} (its columns: "
                                             f"{', '.join(table.columns)}); fix it or leave it out.")
    return value


def load_folder(path: str | Path) -> SopFolder:
    """Read and check an SOP folder (cached until one of its files changes)."""
    path = Path(path)
    if not path.is_dir():
        raise TaskFileError(path, None, None, f"is not a directory. {FORMAT_HELP}")
    path = path.resolve()
    version = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in path.iterdir() if p.is_file()))
    return _load_folder(path, version)


@lru_cache(maxsize=16)
def _load_folder(path: Path, version: tuple) -> SopFolder:
    sops = [path / name for name in SOP_FILES if (path / name).is_file()]
    missing = [name for name in (TOOLSPECS, METADATA, TEST_SET) if not (path / name).is_file()]
    missing = (["sop.txt (or sop.md)"] if not sops else []) + missing
    if missing:
        raise TaskFileError(path, None, None, f"missing {', '.join(missing)}. {FORMAT_HELP}")
    if len(sops) > 1:
        raise TaskFileError(path, None, None, "has both sop.txt and sop.md; keep one, so that it is clear which "
                                              "procedure the agent reads.")
    sop = sops[0].read_text(encoding="utf-8").strip()
    if not sop:
        raise TaskFileError(sops[0], None, None, "is empty; write the procedure the agent must follow.")

    meta_path = path / METADATA
    metadata = _read_json(meta_path)
    if not isinstance(metadata, dict):
        raise TaskFileError(meta_path, None, None, 'must be a JSON object with "input_columns" and "output_columns".')
    inputs, outputs = _columns(metadata, "input_columns", meta_path), _columns(metadata, "output_columns", meta_path)
    both = [c for c in inputs if c in outputs]
    if both:
        raise TaskFileError(meta_path, None, "output_columns", f"{both} are also input_columns; the agent would see "
                                                               "the answer. A column is an input or an output.")
    name = metadata.get("name", path.name)
    if not isinstance(name, str) or not name:
        raise TaskFileError(meta_path, None, "name", "must be a non-empty string (default: the folder name).")
    table = read_csv(path / TEST_SET)
    if not table.rows:
        raise TaskFileError(table.path, None, None, "has no rows; add one task per row.")
    for key, wanted in (("input_columns", inputs), ("output_columns", outputs)):
        absent = [c for c in wanted if c not in table.columns]
        if absent:
            raise TaskFileError(meta_path, None, key, f"{absent} are not columns of {TEST_SET} (its columns: "
                                                      f"{', '.join(table.columns)}); fix {METADATA} or the CSV header.")
    id_column = _optional_column(metadata, "id_column", meta_path, table)
    intent_column = _optional_column(metadata, "intent_column", meta_path, table)
    if id_column:
        seen: dict[str, int] = {}
        for row, line in zip(table.rows, table.lines):
            row_id = row[id_column].strip()
            if not row_id or row_id in seen:
                problem = "is empty" if not row_id else f"repeats {row_id!r} (first on line {seen[row_id]})"
                raise TaskFileError(table.path, line, id_column, f"{problem}; the id_column needs a unique id per row.")
            seen[row_id] = line

    specs = _read_specs(path / TOOLSPECS, path, outputs)
    code = _read_code(path / TOOLS_PY, set(specs)) if (path / TOOLS_PY).is_file() else None
    _check_implementations(path, specs, code)
    return SopFolder(path, name, sop, specs, inputs, outputs, table, id_column, intent_column, code)
