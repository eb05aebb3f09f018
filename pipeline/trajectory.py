"""Turn and Trajectory records, and their JSONL / ``datasets`` round-trips.

A trajectory is everything later stages need from an episode: the conversation, the per-turn
environment replies and info (tool errors, stop reasons), the strict outcome, and, when a model
produced it, the token-level data the trainer consumes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipeline.envs.base import Outcome, RecordError, check_record, check_type, json_kind
from pipeline.envs.schema import read_json_lines


@dataclass
class Turn:
    """One assistant turn and what the environment answered.

    Token fields are filled by the rollout engine: ``completion_ids`` are exactly the sampled ids,
    ``logprobs`` their log-probabilities at sampling time (same length), ``truncated`` whether
    generation hit ``max_new_tokens``.
    """

    index: int
    assistant: str
    env_messages: list[dict]
    info: dict[str, Any] = field(default_factory=dict)
    completion_ids: list[int] | None = None
    logprobs: list[float] | None = None
    truncated: bool = False

    @classmethod
    def from_dict(cls, row: Any, where: str = "turn") -> "Turn":
        """A turn from a JSON record, type-checked; :class:`~pipeline.envs.base.RecordError` names the field."""
        record = check_record(row, where, required=("index", "assistant", "env_messages"),
                              optional=("info", "completion_ids", "logprobs", "truncated"))
        if check_type(record["index"], int, f"{where}.index") < 0:
            raise RecordError(f"{where}.index: expected a turn index (0 or more), got {record['index']}.")
        check_type(record["assistant"], str, f"{where}.assistant")
        check_messages(record["env_messages"], f"{where}.env_messages")
        check_type(record.get("info", {}), dict, f"{where}.info")
        for key, kind in (("completion_ids", int), ("logprobs", float)):
            if record.get(key) is not None:
                _check_items(check_type(record[key], list, f"{where}.{key}"), kind, f"{where}.{key}")
        check_type(record.get("truncated", False), bool, f"{where}.truncated")
        return cls(**record)


@dataclass
class TokenData:
    """The whole episode as one token sequence.

    ``input_ids`` (length T) is the rendered conversation; ``assistant_mask`` (T) is 1 on tokens the
    policy sampled and 0 on prompt/environment tokens; ``logprobs`` (T) holds sampling-time
    log-probabilities on assistant tokens and 0 elsewhere; ``turn_spans`` lists each assistant turn's
    ``[start, end)`` token range.
    """

    input_ids: list[int]
    assistant_mask: list[int]
    logprobs: list[float]
    turn_spans: list[tuple[int, int]]

    @classmethod
    def from_dict(cls, row: Any, where: str = "tokens") -> "TokenData":
        """Token data from a JSON record, type-checked (lengths agree; spans are ``[start, end)`` pairs)."""
        fields = ("input_ids", "assistant_mask", "logprobs", "turn_spans")
        record = check_record(row, where, required=fields)
        _check_items(check_type(record["input_ids"], list, f"{where}.input_ids"), int, f"{where}.input_ids")
        _check_items(check_type(record["assistant_mask"], list, f"{where}.assistant_mask"), int,
                     f"{where}.assistant_mask")
        _check_items(check_type(record["logprobs"], list, f"{where}.logprobs"), float, f"{where}.logprobs")
        lengths = {len(record[k]) for k in fields[:3]}
        if len(lengths) > 1:
            raise RecordError(f"{where}: input_ids, assistant_mask and logprobs must have one length, got "
                              f"{', '.join(str(len(record[k])) for k in fields[:3])}.")
        spans = []
        for i, span in enumerate(check_type(record["turn_spans"], list, f"{where}.turn_spans")):
            if not (isinstance(span, list) and len(span) == 2):
                raise RecordError(f"{where}.turn_spans[{i}]: expected [start, end], got {json_kind(span)}.")
            start, end = (check_type(x, int, f"{where}.turn_spans[{i}]") for x in span)
            if not 0 <= start <= end <= len(record["input_ids"]):
                raise RecordError(f"{where}.turn_spans[{i}]: [{start}, {end}] is not a span of the "
                                  f"{len(record['input_ids'])} tokens.")
            spans.append((start, end))
        return cls(list(record["input_ids"]), list(record["assistant_mask"]), list(record["logprobs"]), spans)


@dataclass
class Trajectory:
    task_id: str
    messages: list[dict]
    turns: list[Turn]
    outcome: Outcome
    seed: int = 0
    tokens: TokenData | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: Any) -> "Trajectory":
        """A trajectory from a JSON record (what :meth:`to_dict` writes), with every field type-checked.

        Raises :class:`~pipeline.envs.base.RecordError` naming the field, e.g. ``outcome.success`` or
        ``turns[2].assistant``. Keys it does not know are ignored.
        """
        record = check_record(row, "trajectory", required=("task_id", "messages", "turns", "outcome"),
                              allow_unknown=True)
        check_type(record["task_id"], str, "task_id")
        messages = check_messages(record["messages"], "messages")
        turns = [Turn.from_dict(t, f"turns[{i}]") for i, t in enumerate(check_type(record["turns"], list, "turns"))]
        tokens = record.get("tokens")
        return cls(
            task_id=record["task_id"],
            messages=messages,
            turns=turns,
            outcome=Outcome.from_dict(record["outcome"], "outcome"),
            seed=check_seed(record.get("seed", 0)),
            tokens=None if tokens is None else TokenData.from_dict(tokens),
            metadata=check_type(record.get("metadata", {}), dict, "metadata"),
        )


def recorded_seconds(value: Any) -> float:
    """A wall time a file recorded, as seconds: a finite, non-negative number, else 0.0 (absent or not a time)."""
    return float(value) if type(value) in (int, float) and math.isfinite(value) and value >= 0 else 0.0


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files owner-only; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_messages(messages: Any, where: str = "messages") -> list[dict]:
    """``messages`` if it is a list of chat messages (objects with a string ``role`` and ``content``)."""
    for i, message in enumerate(check_type(messages, list, where)):
        check_record(message, f"{where}[{i}]", required=("role", "content"), allow_unknown=True)
        check_type(message["role"], str, f"{where}[{i}].role")
        check_type(message["content"], str, f"{where}[{i}].content")
    return messages


def check_seed(seed: Any, where: str = "seed") -> int:
    """An episode seed read from a file: an integer (``Infinity``, ``1.5`` and ``"3"`` are errors)."""
    return check_type(seed, int, where)


def _check_items(values: list, kind: type, where: str) -> None:
    # One pass of type() checks; the slower check_type only runs to describe the first bad item.
    allowed = (int, float) if kind is float else (int,)
    for i, value in enumerate(values):
        if type(value) not in allowed or (kind is float and not math.isfinite(value)):
            check_type(value, kind, f"{where}[{i}]")
            raise RecordError(f"{where}[{i}]: expected a finite number, got {json_kind(value)}.")


def save_jsonl(trajectories: Iterable[Trajectory], path: Path | str) -> None:
    atomic_write_text(path, "".join(json.dumps(t.to_dict()) + "\n" for t in trajectories))


def append_jsonl(trajectory: Trajectory, path: Path | str) -> None:
    """Append one trajectory as a line and force it to disk before returning.

    A kill can tear only the line being written; :func:`drop_torn_line` removes such a line before the
    file is appended to again.
    """
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(trajectory.to_dict()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def drop_torn_line(path: Path | str) -> bool:
    """Cut a last line that has no newline (an append a kill interrupted) from ``path``; whether one was cut."""
    data = Path(path).read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    keep = data[: data.rfind(b"\n") + 1]
    try:
        atomic_write_text(path, keep.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {keep[exc.start]:#04x} at offset {exc.start}); it is not a "
                         "file turnwise wrote: move it away.") from None
    return True


def load_jsonl(path: Path | str) -> list[Trajectory]:
    """Read trajectories written by :func:`save_jsonl`; a bad line raises ``ValueError`` naming file, line and field."""
    out = []
    for lineno, row in read_json_lines(path):
        try:
            out.append(Trajectory.from_dict(row))
        except RecordError as exc:
            raise ValueError(f"{path}, line {lineno}: not a trajectory record: {exc}") from None
    return out


def to_dataset(trajectories: Iterable[Trajectory]):
    """A ``datasets.Dataset`` with one row per trajectory.

    Messages stay a structured column; nested records whose keys vary by domain (turn info, outcome
    details, token data) are stored as JSON strings so the Arrow schema is stable.
    """
    from datasets import Dataset

    rows = [
        {
            "task_id": t.task_id,
            "seed": t.seed,
            "messages": [{"role": m["role"], "content": m["content"]} for m in t.messages],
            "success": t.outcome.success,
            "record": json.dumps(t.to_dict()),
        }
        for t in trajectories
    ]
    return Dataset.from_list(rows)


def from_dataset(dataset) -> list[Trajectory]:
    return [Trajectory.from_dict(json.loads(row["record"])) for row in dataset]
