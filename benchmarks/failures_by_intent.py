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
from pathlib import Path

from common import read_report

from pipeline.report import render_markdown
from pipeline.trajectory import atomic_write_text


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
