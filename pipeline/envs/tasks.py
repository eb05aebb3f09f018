"""Loading and checking task files.

Task sets are JSONL, one task per line (``data/<domain>/tasks/<split>.jsonl``). Every row is checked
against the common schema (``id``, ``domain``, ``split``, ``intents``, ``payload``) and then by its
domain's ``check_payload`` (see :mod:`pipeline.envs.registry`); a bad row raises :class:`TaskFileError`
naming the file, the line and the field, so a hand-edited or generated file fails at load time instead
of halfway through a training run.

``load_tasks(spec, split)`` takes a domain spec (``NAME``, ``NAME/VARIANT``, ``NAME:ARGUMENT``; the
domain loads its own tasks), a directory of ``<split>.jsonl`` files or one ``.jsonl`` file. A registered
domain name wins over a directory of the same name in the working directory; write ``./NAME`` for the
directory.
"""

from __future__ import annotations

import difflib
import itertools
from pathlib import Path
from typing import Any, Sequence

from pipeline.chat import unique_keys
from pipeline.envs.base import Task
from pipeline.envs.registry import UnknownDomainError, domains, get_domain, resolve
from pipeline.envs.schema import FieldError, JsonLinesError, TaskFileError, read_json_lines, require

DATA_ROOT = Path(__file__).resolve().parents[2] / "data"
SPLITS = ("train", "val", "test")

__all__ = ["DATA_ROOT", "SPLITS", "TaskFileError", "check_task_row", "load_split_files", "load_tasks",
           "read_task_file"]


def check_split(split: str | None) -> None:
    """Raise a clear error unless ``split`` is a known split (or ``None`` for all of them)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}, or None for all.")


def check_task_row(row: Any) -> Task:
    """Validate one decoded row and build its :class:`Task` (raises :class:`FieldError`)."""
    if not isinstance(row, dict):
        raise FieldError("<row>", f"each line must be a JSON object, got {type(row).__name__}")
    for key, kind in (("id", str), ("domain", str), ("split", str), ("intents", list), ("payload", dict)):
        require(row, key, kind)
    if not row["id"].strip():
        raise FieldError("id", "must not be empty")
    if row["split"] not in SPLITS:
        raise FieldError("split", f"is {row['split']!r}; use one of {', '.join(SPLITS)}")
    if not all(isinstance(i, str) and i for i in row["intents"]):
        raise FieldError("intents", "must be a list of non-empty strings")
    try:
        domain = get_domain(row["domain"])
    except UnknownDomainError:
        raise FieldError("domain", f"names no registered domain ({row['domain']!r}); registered: "
                                   f"{', '.join(sorted(domains()))}") from None
    if domain.check_payload is not None:
        domain.check_payload(row["payload"])
    return Task.from_dict(row)


def read_task_file(path: Path) -> list[Task]:
    """Every task of a JSONL file, checked; raises :class:`TaskFileError` naming the file, line and field."""
    if not path.is_file():
        raise TaskFileError(path, None, None, "file not found. Pass an existing task file or directory, or "
                                              "regenerate a shipped set with its data/<domain>/prepare.py.")
    tasks, seen = [], {}
    try:
        for lineno, row in read_json_lines(path, object_pairs_hook=unique_keys):
            try:
                task = check_task_row(row)
            except FieldError as exc:
                raise TaskFileError(path, lineno, exc.field, f"{exc}. Fix the row or regenerate the file.") from None
            if task.id in seen:
                raise TaskFileError(path, lineno, "id", f"duplicate task id {task.id!r} (first on line "
                                                        f"{seen[task.id]})")
            seen[task.id] = lineno
            tasks.append(task)
    except JsonLinesError as exc:
        raise TaskFileError(path, exc.lineno, None, exc.problem) from None
    if not tasks:
        raise TaskFileError(path, None, None, "holds no tasks (the file is empty); write one JSON task per line.")
    return tasks


def load_split_files(directory: Path, split: str | None = None) -> list[Task]:
    """The tasks of a directory of ``<split>.jsonl`` files: one split, or every split in order."""
    check_split(split)
    files = [directory / f"{s}.jsonl" for s in ((split,) if split else SPLITS)]
    return [task for f in files for task in read_task_file(f)]


#: The intent label of tasks with more than one intent; keeps a breakdown by intent a partition of the tasks.
MULTI_INTENT = "multi"


def intent_label(intents: Sequence[str]) -> str:
    """The breakdown bucket of a task: its intent, or ``"multi"`` for a multi-intent task."""
    return intents[0] if len(intents) == 1 else MULTI_INTENT


def spread_over_intents(tasks: Sequence[Task], limit: int | None) -> list[Task]:
    """``limit`` of ``tasks``, taken in turn from each intent, so that a small validation subset covers them all.

    Tasks are grouped by :func:`intent_label` (tasks with several intents form one group); the groups take
    turns in the order each first appears, and each keeps its tasks' order. A task set with one intent gives
    its first ``limit`` tasks, as slicing would; ``None`` or a ``limit`` past the end gives all.
    """
    tasks = list(tasks)
    if limit is None or limit >= len(tasks):
        return tasks
    groups: dict[str, list[Task]] = {}
    for task in tasks:
        groups.setdefault(intent_label(task.intents), []).append(task)
    spread = [task for row in itertools.zip_longest(*groups.values()) for task in row if task is not None]
    return spread[:limit]


def weight_intents(tasks: Sequence[Task], weights: dict[str, int]) -> list[Task]:
    """``tasks`` with each task of intent label ``L`` (:func:`intent_label`) repeated ``weights[L]`` times.

    Training draws its tasks from a shuffle of this list, so an intent of weight 3 is drawn three times as
    often as one of weight 1, and weight 0 leaves the intent out. An unnamed intent keeps weight 1, and the
    tasks keep their order. An intent the tasks do not have is an error that lists those they have, and so
    is a weighting that leaves no task.
    """
    tasks = list(tasks)
    present = sorted({intent_label(t.intents) for t in tasks})
    unknown = sorted(set(weights) - set(present))
    if unknown:
        raise ValueError(f"intent_weights names {', '.join(map(repr, unknown))}, which no training task has; the "
                         f"training tasks' intents are: {', '.join(present)}.")
    weighted = [task for task in tasks for _ in range(weights.get(intent_label(task.intents), 1))]
    if not weighted:
        raise ValueError("intent_weights gives every training intent weight 0, which leaves nothing to train on; "
                         "give at least one intent a weight of 1 or more.")
    return weighted


def load_tasks(path_or_name: str | Path | None = None, split: str | None = None) -> list[Task]:
    """Load tasks by domain spec, directory of split files or JSONL file (see the module docstring).

    ``None`` loads the default domain's shipped tasks. ``split`` picks ``train``/``val``/``test``;
    ``None`` loads every split.
    """
    check_split(split)
    resolved = resolve(None if path_or_name is None else str(path_or_name))
    if resolved is not None:
        domain, argument = resolved
        if domain.load_tasks is None:
            raise ValueError(f"The domain {domain.name!r} ships no task set; pass a .jsonl file or a directory of "
                             "<split>.jsonl files of its tasks.")
        return domain.load_tasks(argument, split)
    source = Path(str(path_or_name)).expanduser()
    if source.is_dir():
        return load_split_files(source, split)
    if source.is_file() or source.suffix == ".jsonl":
        return [t for t in read_task_file(source) if split is None or t.split == split]
    close = difflib.get_close_matches(str(path_or_name), list(domains()), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise FileNotFoundError(
        f"No task set {str(path_or_name)!r}.{hint} Pass a domain ({', '.join(sorted(domains()))}, or NAME:ARGUMENT "
        "such as sop:PATH for a task folder), a directory of <split>.jsonl files, or a .jsonl file.")
