"""`make demo` from a fresh clone, timed with its setup: does the README's main job show learning in 15 minutes?

    python benchmarks/demo.py                   # clone HEAD into a temporary directory, `make demo` there
    python benchmarks/demo.py --clone DIR --log LOG --wall-s SECONDS
                                                # record a fresh-clone `make demo` that was timed by hand

Run it alone on the machine: the wall time is the measurement. The clone gets its own ``.venv/`` (pip's
download cache is whatever this machine has); the converted model comes from the user cache
(``~/.cache/turnwise`` or ``$TURNWISE_CACHE``) when an earlier run left it there, which ``model_cache``
in the result says. Writes ``benchmarks/results/demo.json``: the wall time with setup, the demo's own
stage times, what it printed after it finished, the held-out numbers and comparisons, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write_result

FINISHED = "turnwise demo finished in "


def printed_tail(log: str) -> str:
    """What ``turnwise demo`` printed after it finished (its last block of output)."""
    start = log.rfind(FINISHED)
    if start < 0:
        raise SystemExit(f"the log has no {FINISHED!r} line: the demo did not finish.")
    lines = log[start:].splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("summary: ")), len(lines) - 1)
    return "\n".join(lines[: end + 1])


def demo_result(clone: Path, log: str, wall_s: float, model_cache: str) -> dict:
    summary_path = clone / "outputs" / "demo" / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"{summary_path} does not exist: the demo did not finish in {clone}.")
    summary = json.loads(summary_path.read_text())
    keep = ("base", "sft", "grpo", "oracle", "delta_grpo_vs_base", "delta_grpo_vs_sft", "delta_sft_vs_base")
    demo_s = summary["wall_time_s"]
    return {
        "what": "`make demo` on a fresh clone (configs/demo.yaml), setup included, alone on the machine",
        "wall_time_s": round(wall_s, 1),
        "within_15_minutes": wall_s <= 15 * 60,
        "setup_s": round(wall_s - demo_s, 1),
        "demo_wall_time_s": demo_s,
        "stage_times_s": summary["stage_times_s"],
        "model_cache": model_cache,
        "printed": printed_tail(log),
        **{key: summary[key] for key in keep if key in summary},
        "n_tasks": summary["n_tasks"],
        "eval_tasks": summary.get("eval_tasks"),
        "description": summary.get("description"),
        "grpo_signals": summary.get("grpo_signals"),
        "recipe": (clone / "configs" / "demo.yaml").read_text(),
        "commit": subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "machine": summary["machine"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clone", type=Path, help="A fresh clone where `make demo` already ran (with --log and "
                                                   "--wall-s); default: clone HEAD and run it now.")
    parser.add_argument("--log", type=Path, help="What `make demo` printed, with --clone.")
    parser.add_argument("--wall-s", type=float, help="The wall time of that `make demo`, setup included.")
    parser.add_argument("--model-cache", choices=("warm", "cold"), default="warm",
                        help="Whether the converted model was already in the user cache (default: warm).")
    parser.add_argument("--conversion-s", type=float, help="With a warm cache: what converting the model into an "
                        "empty cache took, timed apart (`TURNWISE_CACHE=EMPTY_DIR turnwise model prepare`).")
    args = parser.parse_args()
    if args.clone is not None:
        if args.log is None or args.wall_s is None:
            parser.error("--clone needs --log and --wall-s.")
        log, wall_s, clone = args.log.read_text(), args.wall_s, args.clone
    else:
        clone = Path(tempfile.mkdtemp(prefix="turnwise-demo-")) / "turnwise"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        start = time.time()
        run = subprocess.run(["make", "demo"], cwd=clone, capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"})
        wall_s, log = time.time() - start, run.stdout + run.stderr
        if run.returncode != 0:
            sys.stderr.write(log[-4000:])
            raise SystemExit(f"`make demo` failed in {clone} (exit {run.returncode}).")
    result = demo_result(clone, log, wall_s, args.model_cache)
    if args.conversion_s is not None:
        result["model_conversion_s"] = args.conversion_s
        result["wall_time_with_conversion_s"] = round(wall_s + args.conversion_s, 1)
    path = write_result("demo", result)
    print(result["printed"])
    print(f"\n`make demo` from a fresh clone: {result['wall_time_s'] / 60:.1f} minutes, setup included "
          f"(setup {result['setup_s']:.0f} s); wrote {path}")


if __name__ == "__main__":
    main()
