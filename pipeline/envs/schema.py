"""Errors, field checks and the JSONL reader shared by task files, logs and the domains' payload validators.

A domain's ``check_payload`` raises :class:`FieldError` naming the field (``payload.db.today``); the task
loader turns it into a :class:`TaskFileError` that also names the file and the line, so a hand-edited or
generated file fails at load time with the place to fix, not halfway through a training run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.chat import DuplicateKeyError

#: The most characters of a problem an error message carries: a value quoted from a hostile file (a
#: megabyte-long id) is cut in the middle, so the message keeps its start and its advice.
MAX_PROBLEM_CHARS = 600


def clip_problem(problem: str, limit: int = MAX_PROBLEM_CHARS) -> str:
    """``problem`` cut in the middle to at most about ``limit`` characters.

    >>> clip_problem("duplicate task id " + "x" * 50 + " (first on line 1)", limit=30)
    'duplicate task id xxx [... 41 characters ...]line 1)'
    """
    if len(problem) <= limit:
        return problem
    head, tail = limit * 2 // 3, limit // 3
    return f"{problem[:head]} [... {len(problem) - head - tail} characters ...]{problem[-tail:]}"


class TaskFileError(ValueError):
    """A task file (or task folder) that cannot be used; the message names the file, line and field."""

    def __init__(self, path: Path | str, line: int | None, field: str | None, problem: str) -> None:
        where = f"{path}" + (f", line {line}" if line is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {clip_problem(problem)}")
        self.path, self.line, self.field = path, line, field


class FieldError(Exception):
    """A field of one task row that is missing or wrong; ``field`` is its dotted path in the row."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


def require(row: Any, key: str, kind: type | tuple[type, ...], prefix: str = "") -> Any:
    """``row[key]``, checked to be of ``kind`` (a bool is not an int, a float must be finite); raises
    :class:`FieldError`.

    >>> require({"n": 3}, "n", int)
    3
    >>> require({"n": True}, "n", int, "payload.")
    Traceback (most recent call last):
    ...
    pipeline.envs.schema.FieldError: must be int, got bool
    """
    name = f"{prefix}{key}"
    if not isinstance(row, dict) or key not in row:
        raise FieldError(name, "is missing")
    value = row[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise FieldError(name, f"must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError(name, f"must be a finite number, got {value}")
    return value


class JsonLinesError(ValueError):
    """A line of a JSONL file that is not UTF-8 or not JSON; the message names the file and the line."""

    def __init__(self, path: Path | str, lineno: int, problem: str) -> None:
        super().__init__(f"{path}, line {lineno}: {problem}")
        self.path, self.lineno, self.problem = path, lineno, problem


def read_json_lines(path: Path | str,
                    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, decoded JSON)`` for each non-blank line of a JSONL file, decoded with ``object_pairs_hook``.

    Raises :class:`JsonLinesError` naming the file and line for a line that is not UTF-8 or not JSON (including
    JSON nested too deeply for Python to decode, an integer too long to convert, or what the hook refuses).
    """
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise JsonLinesError(path, lineno, f"is not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                                   f"{exc.start + 1}: {exc.reason}); save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line, object_pairs_hook=object_pairs_hook)
            except json.JSONDecodeError as exc:
                raise JsonLinesError(path, lineno, f"not valid JSON ({exc.msg} at column {exc.colno}).") from None
            except RecursionError:
                raise JsonLinesError(path, lineno, "the JSON is nested too deeply to read.") from None
            except DuplicateKeyError as exc:  # from a unique_keys hook
                raise JsonLinesError(path, lineno, f"{exc}; a row gives each key once.") from None
            except ValueError as exc:  # Python's integer-conversion limit, a key the hook refuses, ...
                raise JsonLinesError(path, lineno, f"not valid JSON ({str(exc)[:200]}).") from None
