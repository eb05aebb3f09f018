"""The tasks of an SOP folder: one task per row of its test set, split by a stable hash of the row id.

A task's ``payload`` holds the folder (repo-relative when it is inside the repository, so task files work
on any checkout), the domain name, the row id, the row's input columns and its expected output columns.
``sop:PATH`` (or ``sop/NAME`` for a folder shipped under ``data/sop/``) names a folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.envs.base import Task
from pipeline.envs.schema import FieldError, require
from pipeline.envs.sop.folder import SopFolder, load_folder
from pipeline.envs.tasks import DATA_ROOT, check_split

PREFIX = "sop:"
#: Share of rows per split, assigned by a stable hash of the row id (adding rows never moves old ones).
SPLIT_SHARES = {"train": 0.70, "val": 0.15, "test": 0.15}


def resolve_folder(spec: str | Path) -> Path:
    """An SOP folder from ``sop:PATH`` (or PATH): as given, else under the repo root, else under data/sop/."""
    text = str(spec)
    text = text[len(PREFIX):] if text.startswith(PREFIX) else text
    path = Path(text).expanduser()
    for candidate in (path, DATA_ROOT.parent / path, DATA_ROOT / "sop" / path):
        if candidate.is_dir():
            return candidate.resolve()
    shipped = sorted(p.name for p in (DATA_ROOT / "sop").iterdir() if p.is_dir()) if (DATA_ROOT / "sop").is_dir() else []
    raise FileNotFoundError(f"No SOP folder {text!r}. Pass sop:PATH with PATH a folder in the SOP-Bench format"
                            + (f"; shipped: {', '.join(f'sop:data/sop/{n}' for n in shipped)}." if shipped else "."))


def split_of(row_id: str) -> str:
    """The split of a row, from a stable hash of its id (:data:`SPLIT_SHARES`)."""
    u = int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big") / 2**64
    total = 0.0
    for split, share in SPLIT_SHARES.items():
        total += share
        if u < total:
            return split
    return "test"


def _portable(path: Path) -> str:
    """A folder inside the repository as a repo-relative path (task files then work on any checkout)."""
    try:
        return path.relative_to(DATA_ROOT.parent).as_posix()
    except ValueError:
        return str(path)


def folder_tasks(folder: SopFolder) -> list[Task]:
    """One task per CSV row, in file order. Ids are ``<name>-<row id>`` (the id column, else the row index)."""
    tasks = []
    for index, row in enumerate(folder.table.rows):
        row_id = row[folder.id_column].strip() if folder.id_column else str(index)
        intent = row[folder.intent_column].strip() if folder.intent_column else folder.name
        payload = {"folder": _portable(folder.path), "name": folder.name, "row_id": row_id,
                   "inputs": {c: row[c] for c in folder.input_columns},
                   "expected": {c: row[c] for c in folder.output_columns}}
        tasks.append(Task(id=f"{folder.name}-{row_id}", domain="sop", split=split_of(row_id),
                          intents=[intent or folder.name], payload=payload))
    return tasks


def load_sop_tasks(spec: str | Path, split: str | None = None) -> list[Task]:
    """The tasks of an SOP folder (``sop:PATH``); ``split`` picks train/val/test, ``None`` gives all rows."""
    check_split(split)
    tasks = folder_tasks(load_folder(resolve_folder(spec)))
    return [t for t in tasks if split is None or t.split == split]


def check_sop_payload(payload: dict) -> None:
    """The schema of an SOP task's payload, for task files (JSONL) holding SOP tasks."""
    for key in ("folder", "name", "row_id"):
        require(payload, key, str, "payload.")
    for key in ("inputs", "expected"):
        require(payload, key, dict, "payload.")
    if not payload["expected"]:
        raise FieldError("payload.expected", "must hold at least one output field")
