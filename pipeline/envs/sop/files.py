"""Reading an SOP folder's files: each one inside the folder, a regular file, within a size cap, as UTF-8.

A folder is data that users download and share, so every name it uses (``sop.md``, ``toolspecs.json``,
the CSVs, ``tools.py``, an ``x-csv-lookup``'s ``file``) is resolved before it is read:

- the resolved path (symlinks followed) must lie inside the resolved folder: a link to
  ``/home/me/.aws/credentials``, an absolute path or ``../x.csv`` is refused, naming the file and the
  fix (copy the file into the folder);
- it must be a regular file: a directory, a device or a named pipe is refused without opening it for
  a blocking read;
- it is read at most once, up to its cap (:data:`CAPS`), and the bytes read are the bytes checked;
- text must be UTF-8 (a byte-order mark is accepted): other encodings fail naming the file, the line and
  the fix;
- JSON objects must not repeat a key, and nesting too deep for the reader is a clear error.

:class:`FileRecord` keeps each file's identity (device and inode) and digest, so that the loader can tell
when two names are the same file (a symlink or a hard link) or the same content (a copy): the test set
must never be served to the agent under another name.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.chat import DuplicateKeyError, unique_keys
from pipeline.envs.schema import TaskFileError

MiB = 1 << 20
#: Largest file read, by kind (bytes). An SOP is prose; specs and metadata are small JSON; test sets and
#: lookup tables are the biggest inputs; tools.py is code.
CAPS = {"text": 1 * MiB, "json": 8 * MiB, "csv": 64 * MiB, "code": 2 * MiB}
#: Most columns a CSV may have (SOP-Bench tables have tens).
MAX_COLUMNS = 2_000
#: Most data rows a CSV may have.
MAX_ROWS = 1_000_000
#: Longest CSV value, in characters (the csv module's own default limit, which is process-wide and left as is).
MAX_CELL = csv.field_size_limit()
#: Pandas' name for a header cell left empty (``Unnamed: 0`` for the index column pandas writes by default).
UNNAMED = "Unnamed: {}"


@dataclass(frozen=True)
class FileRecord:
    """A file that was read: where it is, what it is (device, inode) and its content's SHA-256."""

    name: str
    path: Path
    device: int
    inode: int
    sha256: str

    def same_file(self, other: "FileRecord") -> bool:
        """The same file under two names (a symlink or a hard link)."""
        return (self.device, self.inode) == (other.device, other.inode)

    def same_content(self, other: "FileRecord") -> bool:
        return self.same_file(other) or self.sha256 == other.sha256


@dataclass
class CsvTable:
    """A CSV file's rows as dicts of strings; ``lines[i]`` is the file line of ``rows[i]``.

    ``unnamed`` lists the header positions that were empty and got pandas' name (``Unnamed: 0``).
    """

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]
    record: FileRecord | None = None
    unnamed: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return self.path.name


class FolderFiles:
    """The files of one folder, read safely (see the module docstring). ``root`` must be a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.records: dict[str, FileRecord] = {}

    # -- names ------------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        """Whether the folder has an entry ``name`` (a file, a directory, or a link, even a broken one)."""
        return os.path.lexists(self.root / name)

    def locate(self, name: str) -> Path:
        """The resolved path of entry ``name``; raises :class:`TaskFileError` unless it is a file inside the folder."""
        where = self.root / name
        try:
            real = where.resolve(strict=True)
        except FileNotFoundError:
            raise TaskFileError(where, None, None, "is a broken link (its target does not exist); replace the link "
                                                   "with the file itself.") from None
        except (OSError, RuntimeError) as exc:  # a symlink loop; a component that is not a directory
            raise TaskFileError(where, None, None, f"cannot be resolved ({type(exc).__name__}: {exc}); replace "
                                                   "it with a plain file.") from None
        if not real.is_relative_to(self.root):
            raise TaskFileError(where, None, None, f"resolves outside the folder (to {real}). Every file an SOP folder "
                                                   "uses must lie inside it; copy the file into the folder instead of "
                                                   "linking to it.")
        return real

    # -- bytes ------------------------------------------------------------------------------------
    def read_bytes(self, name: str, kind: str) -> tuple[bytes, Path]:
        """The bytes of file ``name`` (resolved inside the folder, regular, within ``CAPS[kind]``)."""
        where = self.root / name
        real = self.locate(name)
        cap = CAPS[kind]
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise TaskFileError(where, None, None, f"cannot be opened ({exc.strerror}); check that it is a readable "
                                                   "file.") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, pipe or socket)"
                raise TaskFileError(where, None, None, f"is {what}; it must be a plain file.")
            if info.st_size > cap:
                raise TaskFileError(where, None, None, f"is {info.st_size:,} bytes; an SOP folder's {kind} files may "
                                                       f"be at most {cap:,} bytes. Shrink it or split it.")
            with os.fdopen(os.dup(fd), "rb") as handle:
                data = handle.read(cap + 1)
        finally:
            os.close(fd)
        if len(data) > cap:  # it grew while being read
            raise TaskFileError(where, None, None, f"is larger than {cap:,} bytes, the cap for {kind} files.")
        self.records[name] = FileRecord(name, real, info.st_dev, info.st_ino, hashlib.sha256(data).hexdigest())
        return data, where

    # -- text, JSON, CSV --------------------------------------------------------------------------
    def read_text(self, name: str, kind: str = "text") -> str:
        data, where = self.read_bytes(name, kind)
        text = decode_utf8(data, where)
        nul = text.find("\x00")
        if nul != -1:
            raise TaskFileError(where, text.count("\n", 0, nul) + 1, None, "contains a NUL byte, which is not text; "
                                "remove it (the file may be binary, or UTF-16: save it as UTF-8).")
        return text

    def read_json(self, name: str) -> Any:
        text = self.read_text(name, "json")
        return parse_json(text, self.root / name)

    def read_csv(self, name: str) -> CsvTable:
        text = self.read_text(name, "csv")
        table = parse_csv(text, self.root / name)
        table.record = self.records[name]
        return table


def decode_utf8(data: bytes, where: Path) -> str:
    """UTF-8 text (a leading byte-order mark dropped); other encodings fail naming the file, line and fix."""
    try:
        return codecs.decode(data, "utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TaskFileError(where, line, None, f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                                               f"{exc.start} cannot be decoded: {exc.reason}). Save it as UTF-8, for "
                                               f"example with `iconv -f cp1252 -t utf-8 {where.name}`.") from None


def parse_json(text: str, where: Path) -> Any:
    """JSON with every object's keys unique; errors name the file (and line, or key) and the fix."""
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise TaskFileError(where, exc.lineno, None, f"is not valid JSON ({exc.msg}, column {exc.colno}).") from None
    except DuplicateKeyError as exc:
        raise TaskFileError(where, None, exc.key, "is given twice in one JSON object; JSON readers silently keep "
                                                  "only one of them, so give each key once.") from None
    except RecursionError:
        raise TaskFileError(where, None, None, "nests JSON objects or lists too deeply to read; flatten it.") from None
    except ValueError as exc:  # a number too long to convert, and the like
        raise TaskFileError(where, None, None, f"is not usable JSON ({exc}).") from None


def parse_csv(text: str, where: Path) -> CsvTable:
    """A CSV's header and rows, all text. Empty header cells get pandas' name, ``Unnamed: <position>``.

    Blank lines are skipped; a row with another number of values than the header is an error.
    """
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise TaskFileError(where, None, None, "is empty; it needs a header row naming the columns.") from None
    except csv.Error as exc:
        raise TaskFileError(where, 1, None, _csv_problem(exc)) from None
    if len(header) > MAX_COLUMNS:
        raise TaskFileError(where, 1, None, f"has {len(header):,} columns; an SOP table may have at most "
                                            f"{MAX_COLUMNS:,}. Keep the columns the SOP uses.")
    columns = [c.strip() for c in header]
    unnamed = tuple(i for i, c in enumerate(columns) if not c)
    for i in unnamed:
        columns[i] = UNNAMED.format(i)
    repeated = sorted(c for c, n in Counter(columns).items() if n > 1)
    if repeated:
        raise TaskFileError(where, 1, None, f"the header repeats the column(s) {repeated}; give every column a "
                                            "unique name.")
    rows, lines = [], []
    try:
        for values in reader:
            if not values or not any(v.strip() for v in values):
                continue
            if len(values) != len(columns):
                raise TaskFileError(where, reader.line_num, None, f"has {len(values)} values but the header has "
                                    f"{len(columns)} columns; quote values that contain commas.")
            if len(rows) == MAX_ROWS:
                raise TaskFileError(where, reader.line_num, None, f"has more than {MAX_ROWS:,} rows; split it.")
            rows.append(dict(zip(columns, values)))
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise TaskFileError(where, reader.line_num, None, _csv_problem(exc)) from None
    return CsvTable(where, columns, rows, lines, unnamed=unnamed)


def _csv_problem(exc: csv.Error) -> str:
    text = str(exc)
    if "field larger than field limit" in text:
        return (f"holds a value longer than {MAX_CELL:,} characters, the most one CSV value may hold; shorten it, or "
                "keep long documents out of the table.")
    return f"is not valid CSV ({text})."


def shares_a_row(table: CsvTable, other: CsvTable) -> bool:
    """Whether ``table`` has every column of ``other`` and holds one of its rows (compared on ``other``'s columns,
    stripped): a copy of it, in any column order, encoding or length."""
    if not other.rows or not set(other.columns) <= set(table.columns):
        return False
    rows = {tuple(row[c].strip() for c in other.columns) for row in other.rows}
    return any(tuple(row[c].strip() for c in other.columns) in rows for row in table.rows)
