"""Where each policy of a held-out comparison fails, intent by intent, from saved reports alone.

``turnwise eval --out DIR`` writes ``DIR/report.json`` with one record per episode (its stop reason, tool calls,
tool errors, violations and success checks). This script reads those records for several policies, computes
their metrics again with this version of :mod:`pipeline.evaluation` (``EvalReport.from_dict``; nothing is played
again, and no trajectory file is needed) and writes one Markdown report with the policies side by side: the
metrics, success by intent, and per intent the stop reasons, tool calls, tool errors and violations. A tool that
one intent needs and a policy never calls shows there, where the whole-report counts mix the intents::

    python benchmarks/failures_by_intent.py --out benchmarks/results/learning_all_intents_eval/by_intent.md \\
        base=benchmarks/results/learning_all_intents_eval/base sft=... grpo=... oracle=...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT

from pipeline.evaluation import EvalReport
from pipeline.report import render_markdown
from pipeline.trajectory import atomic_write_text


def read_report(name: str, path: Path) -> EvalReport:
    """The one policy in ``path`` (a ``turnwise eval --out`` directory or its ``report.json``), labelled ``name``."""
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
    report.config.update(policy=name, source=f"{report.config.get('policy', '?')} (in {shown})")
    report.config.pop("role", None)  # each was evaluated alone: "candidate" says nothing side by side
    return report


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", metavar="NAME=DIR", help="a policy's label and its report directory")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown file to write")
    args = parser.parse_args(argv)
    reports = []
    for spec in args.reports:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"{spec!r}: give NAME=DIR, e.g. sft=outputs/eval/sft")
        reports.append(read_report(name, Path(path)))
    tasks = [{e["task_id"] for e in r.episodes} for r in reports]
    if any(t != tasks[0] for t in tasks):
        parser.error("the reports cover different tasks; compare reports of the same task set.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, render_markdown(reports))
    print(f"wrote {args.out} ({len(reports)} policies, {len(tasks[0])} tasks)")
    return args.out


if __name__ == "__main__":
    main()
