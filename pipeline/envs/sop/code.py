"""An SOP folder's tools.py: read with :mod:`ast` without running it, and run only under a trust grant.

:func:`read_code` finds what tools.py defines: the public methods of the class that holds the tools
(SOP-Bench's ``...Manager``; a class's methods inherited from classes of the same module count), or
public module functions, each with its :class:`Signature`, plus the tools a class's ``process_tool_call``
routes by name to methods of other names. The loader compares them with the specs. :func:`import_tools`
executes exactly the bytes that were checked (and whose SHA-256 a grant names); the tool wrappers refuse
arguments the implementation does not take and turn results into plain JSON values.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.chat import ToolError
from pipeline.envs.schema import TaskFileError
from pipeline.envs.sop.files import FolderFiles, decode_utf8
from pipeline.envs.sop.trust import TOOLS_PY, code_digest

#: Public methods of a tools.py class that are plumbing, not tools (SOP-Bench's dispatcher).
DISPATCH_METHODS = frozenset({"process_tool_call"})


@dataclass(frozen=True)
class Signature:
    """The keyword parameters a function (or method, ``self`` dropped) takes."""

    line: int
    accepted: tuple[str, ...]  # names a call may pass by keyword
    required: tuple[str, ...]  # names without a default (positional-only ones included)
    var_keyword: bool  # it takes **kwargs

    def render(self, name: str) -> str:
        return f"{name}({', '.join(self.accepted)}{', **kwargs' if self.var_keyword else ''})"


def _signature(fn: ast.FunctionDef, method: bool) -> Signature:
    args = fn.args
    positional = list(args.posonlyargs) + list(args.args)
    decorators = {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}
    if method and positional and "staticmethod" not in decorators:
        positional = positional[1:]  # self, or cls for a classmethod
    posonly = {a.arg for a in args.posonlyargs}
    n_defaults = len(args.defaults)
    required = [a.arg for a in positional[: len(positional) - n_defaults]]
    required += [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
    accepted = [a.arg for a in positional if a.arg not in posonly] + [a.arg for a in args.kwonlyargs]
    return Signature(fn.lineno, tuple(accepted), tuple(required), args.kwarg is not None)


@dataclass
class CodeTools:
    """What tools.py defines: public functions, or the public methods of the one class holding the tools.

    ``definitions`` holds every public function or method (tools and helpers). ``dispatched`` names the
    tools that the class's ``process_tool_call`` routes by name (a string constant in its body) with no
    method of that name, as some of the public benchmark's folders do; they are called through it.
    ``sha256`` is the digest of the bytes that were checked, which a trust grant and the import must match.
    """

    path: Path
    class_name: str | None
    definitions: dict[str, Signature]
    sha256: str = ""
    dispatched: frozenset[str] = frozenset()


def _bases(node: ast.ClassDef, classes: dict[str, ast.ClassDef],
           seen: frozenset[str] = frozenset()) -> list[ast.ClassDef]:
    """The classes of the same module that ``node`` inherits from, nearest first."""
    found = []
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in classes and base.id not in seen | {node.name}:
            found.append(classes[base.id])
            found += _bases(classes[base.id], classes, seen | {node.name})
    return found


def _class_methods(node: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> dict[str, Signature]:
    """Public methods of a class, those inherited from classes of the same module included."""
    methods: dict[str, Signature] = {}
    for cls in reversed([node, *_bases(node, classes)]):  # the class's own definitions win
        for item in cls.body:
            public = isinstance(item, ast.FunctionDef) and not item.name.startswith("_")
            if public and item.name not in DISPATCH_METHODS:
                methods[item.name] = _signature(item, method=True)
    return methods


def _dispatched_names(node: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> set[str]:
    """The string constants in the class's ``process_tool_call`` (the tool names it routes)."""
    for cls in [node, *_bases(node, classes)]:
        for item in cls.body:
            if isinstance(item, ast.FunctionDef) and item.name in DISPATCH_METHODS:
                return {n.value for n in ast.walk(item) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return set()


def read_code(files: FolderFiles, spec_names: set[str]) -> CodeTools:
    path = files.root / TOOLS_PY
    data, _ = files.read_bytes(TOOLS_PY, "code")
    source = decode_utf8(data, path)
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise TaskFileError(path, exc.lineno, None, f"is not valid Python ({exc.msg}); fix the syntax.") from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise TaskFileError(path, None, None, f"cannot be parsed ({type(exc).__name__}); simplify it.") from None
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    holding: dict[str, tuple[dict[str, Signature], set[str]]] = {}
    for name, node in classes.items():
        if name.startswith("_"):
            continue
        methods = _class_methods(node, classes)
        routed = (_dispatched_names(node, classes) & spec_names) - methods.keys()
        if (methods.keys() | routed) & spec_names:
            holding[name] = methods, routed
    if len(holding) > 1:  # a base class and its subclass both hold tools: the subclass is the tools class
        inherited = {b.name for name in holding for b in _bases(classes[name], classes)}
        holding = {k: v for k, v in holding.items() if k not in inherited} or holding
    if len(holding) > 1:  # the public benchmark's loader takes the class whose name ends with Manager
        holding = {k: v for k, v in holding.items() if k.endswith("Manager")} or holding
    if len(holding) > 1:
        raise TaskFileError(path, None, None, f"defines tools in several classes ({', '.join(holding)}); keep them in "
                                              "one class, or write them as module-level functions.")
    if holding:
        name, (methods, routed) = next(iter(holding.items()))
        return CodeTools(path, name, methods, code_digest(data), frozenset(routed))
    functions = {n.name: _signature(n, method=False) for n in tree.body
                 if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    return CodeTools(path, None, functions, code_digest(data))


_MODULES: dict[tuple[Path, str], Any] = {}


def import_tools(path: Path, digest: str, data: bytes) -> Any:
    """Run tools.py's checked bytes as a module of its own (cached per file and content). Only called once trusted."""
    key = (path, digest)
    if key in _MODULES:
        return _MODULES[key]
    name = "turnwise_sop_tools_" + digest[:16]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module name
    try:
        exec(compile(data, str(path), "exec"), module.__dict__)  # noqa: S102 - trusted by grant, bytes as checked
    except Exception as exc:
        sys.modules.pop(name, None)
        raise TaskFileError(path, None, None, f"failed to import: {type(exc).__name__}: {exc}") from exc
    _MODULES[key] = module
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


@dataclass(frozen=True)
class CodeTool:
    """A tools.py tool as the agent calls it: arguments it does not take are refused, results made plain JSON.

    A small picklable class (not a closure): tools are built per episode and may cross process boundaries.
    """

    fn: Callable[..., Any]
    name: str
    signature: Signature

    def __call__(self, **arguments: Any) -> Any:
        if not self.signature.var_keyword:
            extra = [a for a in arguments if a not in self.signature.accepted]
            if extra:
                pronoun = "them" if len(extra) > 1 else "it"
                raise ToolError(f"{self.name} does not take {', '.join(map(repr, extra))}: {TOOLS_PY} implements it as "
                                f"{self.signature.render(self.name)}. Call it without {pronoun}.")
        return _plain(self.fn(**arguments))


@dataclass(frozen=True)
class DispatchedTool:
    """A tool the class's ``process_tool_call(tool_name, tool_input)`` routes (no method of its name)."""

    dispatch: Callable[[str, dict], Any]
    name: str

    def __call__(self, **arguments: Any) -> Any:
        return _plain(self.dispatch(self.name, dict(arguments)))
