"""Turn and Trajectory records, and their JSONL / ``datasets`` round-trips.

A trajectory is everything later stages need from an episode: the conversation, the per-turn
environment replies and info (tool errors, stop reasons), the strict outcome, and, when a model
produced it, the token-level data the trainer consumes.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipeline.envs.base import Outcome


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
    def from_dict(cls, row: dict[str, Any]) -> "Trajectory":
        tokens = row.get("tokens")
        if tokens is not None:
            tokens = TokenData(**{**tokens, "turn_spans": [tuple(s) for s in tokens["turn_spans"]]})
        return cls(
            task_id=row["task_id"],
            messages=row["messages"],
            turns=[Turn(**t) for t in row["turns"]],
            outcome=Outcome.from_dict(row["outcome"]),
            seed=row.get("seed", 0),
            tokens=tokens,
            metadata=row.get("metadata", {}),
        )


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


def save_jsonl(trajectories: Iterable[Trajectory], path: Path | str) -> None:
    atomic_write_text(path, "".join(json.dumps(t.to_dict()) + "\n" for t in trajectories))


def load_jsonl(path: Path | str) -> list[Trajectory]:
    out = []
    with Path(path).open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append(Trajectory.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}, line {lineno}: not a trajectory record ({exc}).") from None
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
