"""Shared helpers for the benchmark scripts: machine description and result writing."""

from __future__ import annotations

import json
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
