"""Shared helpers for the benchmark scripts: machine description, result writing, and the worker processes
that keep each side of a comparison in its own process (so each side's peak memory is its own)."""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> dict:
    from pipeline.demo import machine as describe

    return describe()


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")


def set_threads(threads: int | None) -> None:
    """Fix torch's CPU threads when asked: its default collapses when other processes share the cores."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def write_result(name: str, result: dict) -> Path:
    from pipeline.trajectory import atomic_write_text

    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path


def matmul_flops(seconds: float = 2.0, n: int = 1024) -> float:
    """Sustained fp32 matmul FLOP/s on this machine (the compute roof)."""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def give_back_memory() -> None:
    """Return freed heap memory to the system (glibc's ``malloc_trim``), so an idle side does not sit on it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def start_worker(worker, side: str, args, **overrides):
    """``worker(side, args, conn)`` in a fresh (spawned) process; returns the process and the parent's end of the
    pipe. ``overrides`` replace attributes of ``args`` for this worker."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=worker, args=(side, argparse.Namespace(**{**vars(args), **overrides}), child))
    process.start()
    return process, parent


def receive(conn, side: str):
    """The worker's next answer; a worker that died (its traceback is printed above) ends the benchmark."""
    try:
        return conn.recv()
    except EOFError:
        raise SystemExit(f"the {side} worker exited early; its error is printed above.") from None


def read_report(name: str, path: Path):
    """The one policy in ``path`` (a ``turnwise eval --out`` directory or its ``report.json``), labelled ``name``:
    an ``EvalReport`` rebuilt from the saved episode records (``EvalReport.from_dict``), without trajectories.
    Its config as saved, before the relabelling, is kept under ``evaluated``."""
    from pipeline.evaluation import EvalReport

    file = path / "report.json" if path.is_dir() else path
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SystemExit(f"{name}={path}: cannot read {file} ({exc}); give a `turnwise eval --out` directory.")
    policies = saved.get("policies") if isinstance(saved, dict) else None
    if not isinstance(policies, list) or len(policies) != 1:
        found = len(policies) if isinstance(policies, list) else "no"
        raise SystemExit(f"{name}={path}: {file} holds {found} policies; give the report of a single-policy "
                         "`turnwise eval --out`.")
    try:
        report = EvalReport.from_dict(policies[0], where=str(file))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    shown = file.relative_to(ROOT) if file.is_relative_to(ROOT) else file
    report.config.update(policy=name, source=f"{report.config.get('policy', '?')} (in {shown})",
                         evaluated=dict(report.config))
    report.config.pop("role", None)  # each was evaluated alone: "candidate" says nothing side by side
    return report
