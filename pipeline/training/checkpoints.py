"""Checkpoints a resume can trust: each one is written, then marked; a resume takes the newest marked one.

transformers' ``Trainer`` writes ``checkpoint-N/`` file by file (weights, ``optimizer.pt``, ``scheduler.pt``,
RNG state, ``trainer_state.json``), and turnwise adds its estimator's state from ``on_save``. A job killed
in the middle (a spot interruption, a full disk, an S3 sync that stopped half way) leaves a torn or empty
directory, and transformers' ``get_last_checkpoint`` picks the highest ``N`` whatever it holds: the run
then fails on every restart, or resumes silently with a fresh optimizer when ``optimizer.pt`` is missing.

So a checkpoint counts only once it is complete:

- :class:`CheckpointMarker`, the last ``on_save`` callback, waits for every process, then writes
  ``turnwise_checkpoint.json`` (:data:`MARKER`) into the checkpoint: its step and every file in it with
  its size, written to a temporary name, synced, then renamed, so the marker itself is never half there.
  The marker also records the run's wall time up to that save (``wall_time_s``), earlier parts of a run
  that kills split included, so that a resumed run reports the whole run's time (:func:`recorded_wall_time`),
  and what training draws its tasks from (``draws``, :func:`draw_record`).
- :func:`latest_complete_checkpoint` walks ``checkpoint-N`` directories from the highest ``N`` down and
  returns the first whose marker matches what is on disk (every listed file present, a regular file
  inside the checkpoint, with the recorded size), whose ``trainer_state.json`` is JSON at step ``N``, and
  which holds optimizer state. Every checkpoint it passes over is named in a warning with the reason.

A checkpoint written by a turnwise without markers is passed over too (with the reason): resuming from
a directory nobody vouched for is what this module exists to stop.

A resume continues the trainer's sampler where the checkpoint left it: after step ``N`` it skips the batches
the first ``N`` steps drew from the shuffled draw list. With other tasks, splits, limits, intent weights or
seed, that list is another one, and the resumed steps would silently draw other tasks than the run planned
(some twice, some never). :func:`check_same_draws` refuses such a resume and names what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pipeline.trajectory import recorded_seconds

if TYPE_CHECKING:
    from trl import GRPOTrainer

logger = logging.getLogger(__name__)

MARKER = "turnwise_checkpoint.json"  # in each checkpoint-N/ once everything in it is on disk
MARKER_FORMAT = 1
CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-([0-9]+)$")  # as transformers writes them: ASCII digits
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")  # transformers' OPTIMIZER_NAME and OPTIMIZER_NAME_BIN


def checkpoint_files(checkpoint: Path) -> dict[str, int]:
    """Every regular file under ``checkpoint`` (the marker aside), as ``{relative posix path: size}``."""
    files: dict[str, int] = {}
    for root, dirs, names in os.walk(checkpoint):  # never follows a symlinked directory
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            relative = path.relative_to(checkpoint).as_posix()
            if relative == MARKER or relative.startswith(f"{MARKER}.") or path.is_symlink() or not path.is_file():
                continue
            files[relative] = path.stat().st_size
    return files


def write_marker(checkpoint: Path, step: int, wall_time_s: float | None = None,
                 draws: dict[str, Any] | None = None) -> Path:
    """Mark ``checkpoint`` complete: its step and files (and the run's wall time so far and its draw record, when
    given), written to a temporary name, synced, then renamed."""
    record = {"format": MARKER_FORMAT, "step": int(step), "files": checkpoint_files(checkpoint)}
    if wall_time_s is not None:
        record["wall_time_s"] = round(float(wall_time_s), 1)
    if draws is not None:
        record["draws"] = draws
    tmp = checkpoint / f"{MARKER}.tmp"
    with tmp.open("w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())  # the marker's content is on disk before its name says the checkpoint is done
    os.replace(tmp, checkpoint / MARKER)
    try:
        fd = os.open(checkpoint, os.O_RDONLY)
    except OSError:  # a filesystem that cannot open directories: the rename is as durable as it gets
        return checkpoint / MARKER
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return checkpoint / MARKER


def checkpoint_step(path: Path) -> int | None:
    """``N`` for a path named ``checkpoint-N``; None for any other name (``checkpoint-abc``, ``checkpoint--1``)."""
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` (a ``checkpoint-N`` directory) cannot be resumed from, or None when it is complete."""
    step = checkpoint_step(path)
    if step is None:
        return f"its name is not {PREFIX_CHECKPOINT_DIR}-<step>"
    if path.is_symlink():
        return ("it is a symbolic link; turnwise resumes only from checkpoints written into the output directory "
                "itself")
    if not path.is_dir():
        return "it is not a directory"
    marker = path / MARKER
    if marker.is_symlink() or not marker.is_file():
        return (f"it has no {MARKER}: it was never finished (the run stopped while writing it) or was written "
                "by a turnwise without completion markers")
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"its {MARKER} cannot be read as JSON ({type(exc).__name__})"
    files = record.get("files") if isinstance(record, dict) else None
    if (not isinstance(record, dict) or record.get("format") != MARKER_FORMAT or not isinstance(files, dict)
            or not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in files.items())):
        return f"its {MARKER} is not a turnwise checkpoint marker (format {MARKER_FORMAT} with a files table)"
    if type(record.get("step")) is not int or record["step"] != step:
        return f"its {MARKER} was written for step {record.get('step')!r}, not {step}"
    root = path.resolve()
    for relative, size in files.items():
        parts = Path(relative).parts
        if not relative or Path(relative).is_absolute() or ".." in parts:
            return f"its {MARKER} names {relative!r}, which is not a path inside the checkpoint"
        file = path / relative
        if file.is_symlink() or not file.is_file():
            return f"{relative} is missing (or is not a regular file)"
        if root not in file.resolve().parents:
            return f"{relative} resolves outside the checkpoint"
        actual = file.stat().st_size
        if actual != size:
            return f"{relative} is {actual} bytes, but {size} were written (the file is torn or was replaced)"
    if TRAINER_STATE not in files:
        return f"it has no {TRAINER_STATE}"
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"its {TRAINER_STATE} cannot be read as JSON ({type(exc).__name__})"
    if not isinstance(state, dict) or state.get("global_step") != step:
        found = state.get("global_step") if isinstance(state, dict) else None
        return f"its {TRAINER_STATE} is at step {found!r}, not {step}"
    if not has_optimizer_state(files):
        return (f"it holds no optimizer state ({' or '.join(OPTIMIZER_FILES)}, or DeepSpeed's or FSDP's sharded "
                "optimizer files): resuming from it would restart the optimizer from scratch")
    return None


def has_optimizer_state(files: dict[str, int]) -> bool:
    """Whether a checkpoint's files include optimizer state: transformers' ``optimizer.pt`` (or ``.bin``), FSDP's
    ``optimizer_*/`` shards, or DeepSpeed's ``global_step*/*optim_states.pt``."""
    for relative in files:
        parts = relative.split("/")
        if parts[-1] in OPTIMIZER_FILES or parts[0].startswith("optimizer") and len(parts) > 1:
            return True
        if parts[0].startswith("global_step") and parts[-1].endswith("optim_states.pt"):
            return True
    return False


def latest_complete_checkpoint(output_dir: str | Path,
                               warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (see :func:`checkpoint_problem`), or None.

    Each newer candidate passed over is reported through ``warn`` (default: this module's logger) with the
    reason, so a run that falls back to an older checkpoint says which one it skipped and why.
    """
    warn = warn or logger.warning
    directory = Path(output_dir)
    if not directory.is_dir():
        return None
    candidates = sorted(((step, path) for path in directory.iterdir()
                         if (step := checkpoint_step(path)) is not None), key=lambda item: item[0], reverse=True)
    for _, path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warn(f"not resuming from {path}: {problem}. Falling back to an earlier checkpoint.")
    return None


def read_marker(checkpoint: Path) -> dict[str, Any]:
    """``checkpoint``'s marker as a dict; empty when it cannot be read."""
    try:
        record = json.loads((Path(checkpoint) / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def recorded_wall_time(checkpoint: Path) -> float:
    """The run's wall time up to ``checkpoint`` as its marker recorded it; 0.0 for a marker without one (written
    by a turnwise that did not record it)."""
    return recorded_seconds(read_marker(checkpoint).get("wall_time_s"))


def draw_record(task_ids: Sequence[str], intent_weights: dict[str, int] | None, seed: int) -> dict[str, Any]:
    """What training draws from, as a checkpoint records it: the draw list's length and a digest of its task ids
    in order (which tasks, split, limit and intent weights made), the weights themselves, and the sampler's
    seed."""
    digest = hashlib.sha256("\n".join(task_ids).encode("utf-8")).hexdigest()
    return {"rows": len(task_ids), "sha256": digest, "intent_weights": intent_weights or None, "seed": seed}


def describe_draws(record: dict[str, Any]) -> str:
    """A draw record in words, for an error message."""
    weights = record.get("intent_weights")
    weighting = (f"intent_weights {' '.join(f'{k}={v}' for k, v in weights.items())}" if isinstance(weights, dict)
                 and weights else "no intent_weights")
    return f"{record.get('rows')} rows, {weighting}, seed {record.get('seed')}"


def check_same_draws(checkpoint: Path, draws: dict[str, Any]) -> None:
    """Refuse to resume from ``checkpoint`` when this run draws from another list than the one it was trained on
    (see the module docstring). A checkpoint without a draw record (written by an earlier turnwise) passes."""
    recorded = read_marker(checkpoint).get("draws")
    if not isinstance(recorded, dict) or (recorded.get("sha256"), recorded.get("seed")) == (draws["sha256"],
                                                                                          draws["seed"]):
        return  # the same list in the same shuffle (weights that change nothing, such as escalation=1, pass)
    before, now = describe_draws(recorded), describe_draws(draws)
    change = (f"from {before}, but this run draws from {now}" if before != now else
              f"from {before} as this run does, but from other tasks (their ids differ: another --tasks, "
              "--train_split or --train_limit)")
    raise ValueError(
        f"--resume: {checkpoint} was trained drawing {change}. "
        "A resume continues the sampler where the checkpoint stopped, so the remaining steps would draw other "
        "tasks than the run planned. Resume with the tasks, train_split, train_limit, intent_weights and seed "
        "the run started with, or train into a new --output_dir.")


class CheckpointMarker(TrainerCallback):
    """Marks each checkpoint complete once every process has written its part (see :func:`write_marker`).

    It must be the last ``on_save`` callback, after anything else that writes into the checkpoint (the
    estimator's state): :class:`~pipeline.training.grpo_trainer.TurnwiseGRPOTrainer` keeps it last when
    callbacks are added after it.

    Each marker records the run's wall time so far: this part's, from ``started`` (when the marker was made,
    or the part's start as :meth:`start_clock` sets it), plus ``earlier_s``, what the checkpoint this part
    resumed from recorded. A killed part counts up to its last checkpoint; the time after it is played again.
    """

    def __init__(self, trainer: "GRPOTrainer") -> None:
        self.trainer = trainer
        self.started = time.time()
        self.earlier_s = 0.0
        self.draws: dict[str, Any] | None = None  # what training draws from (draw_record), recorded in each marker

    def start_clock(self, started: float, resumed_from: Path | str | None = None) -> None:
        """Count this part's time from ``started``, on top of what the checkpoint ``resumed_from`` recorded."""
        self.started = started
        self.earlier_s = recorded_wall_time(Path(resumed_from)) if resumed_from is not None else 0.0

    @property
    def wall_time_s(self) -> float:
        """The run's wall time so far, earlier parts included."""
        return round(self.earlier_s + time.time() - self.started, 1)

    def on_save(self, args, state, control, **kwargs):
        self.trainer.accelerator.wait_for_everyone()  # DeepSpeed and FSDP write shards from every process
        if not args.should_save:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint.is_dir() and not checkpoint.is_symlink():
            write_marker(checkpoint, state.global_step, self.wall_time_s, self.draws)
