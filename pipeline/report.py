"""Evaluation reports for people: Markdown, and one self-contained HTML page with plots and transcripts.

The numbers come from :mod:`pipeline.evaluation`; this module only lays them out. Several reports
(a candidate, its base, reference policies such as the oracle) share one table, so a reader sees what
"good" looks like next to what changed. The HTML page embeds its plots as base64 PNGs (no external
files, so it can be mailed or attached to a job) and shows the transcripts on which the candidate and
the base disagree: a candidate that wins by gaming its training reward shows it there first.

:func:`save_report` writes one policy's report (``report.json``, ``report.md``, ``trajectories.jsonl``);
:func:`write_report` writes several side by side, with the HTML page. Evaluation itself never renders:
this module imports :mod:`pipeline.evaluation`, never the other way round.

matplotlib draws the plots. It is an optional dependency (``pip install 'turnwise[report]'``),
imported only when a plot is drawn, and used through its object API with the Agg canvas, so rendering
touches no global pyplot state and needs no display.

Like evaluation, this module never imports ``rewards``: reward totals, when a caller has them, come in
as plain numbers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.chat import ToolCall, parse_tool_calls, parse_tool_message
from pipeline.evaluation import Comparison, EvalReport
from pipeline.trajectory import Trajectory, atomic_write_text, save_jsonl

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'turnwise[report]'"

#: Rows of the metrics table, in order; pass@j / pass^j rows are inserted after ``success``.
METRIC_ROWS = ("success", "completion", "correct_given_completed", "max_turns_rate", "max_tokens_rate",
               "truncation_rate", "truncated_turns_rate", "violation_rate", "turns_mean", "tokens_mean",
               "episode_tokens_mean", "tool_calls_mean", "tool_errors_mean", "n_tasks", "n_episodes")

#: Rewards as a caller gives them: per report label, one total per trajectory, in ``report.trajectories`` order.
Rewards = Mapping[str, Sequence[float | None]]


class MissingReportDependency(ImportError):
    """matplotlib, needed for the HTML report's plots, is not installed."""


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def metric_rows(reports: Sequence[EvalReport]) -> list[tuple[str, list[str]]]:
    """``(metric, [value per report])`` rows of the main table; a metric a report lacks shows ``n/a``."""
    ks = sorted({j for r in reports for j in r.metrics.get("ks", [r.metrics.get("k", 1)])})
    keys = [METRIC_ROWS[0], *(f"pass@{j}" for j in ks), *(f"pass^{j}" for j in ks), *METRIC_ROWS[1:]]
    return [(key, [_fmt(r.metrics.get(key)) for r in reports]) for key in keys]


def _count_rows(reports: Sequence[EvalReport], key: str) -> list[tuple[str, list[str]]]:
    """One row per name: each report's count, ``n/a`` for a report saved before it kept that count."""
    names = sorted({name for r in reports for name in r.metrics.get(key, {})})
    return [(name, [_fmt(r.metrics[key].get(name, 0)) if key in r.metrics else "n/a" for r in reports])
            for name in names]


def _rate_rows(reports: Sequence[EvalReport], key: str) -> list[tuple[str, list[str]]]:
    names = sorted({name for r in reports for name in r.metrics.get(key, {})})
    return [(name, [_fmt(r.metrics.get(key, {}).get(name)) for r in reports]) for name in names]


def _intent_rows(reports: Sequence[EvalReport]) -> list[tuple[str, list[str]]]:
    names = sorted({name for r in reports for name in r.metrics["by_intent"]})
    rows = []
    for name in names:
        cells = []
        for r in reports:
            row = r.metrics["by_intent"].get(name)
            cells.append(f"{row['success']:.3f} (n={row['n']})" if row else "n/a")
        rows.append((name, cells))
    return rows


def _intent_count_rows(reports: Sequence[EvalReport], key: str) -> list[tuple[str, list[str]]]:
    """One row per intent: each report's ``key`` counts for that intent (``get_order 42, track_shipment 39``),
    most frequent first; ``none`` when there were none, ``n/a`` when a report lacks the intent or predates the
    per-intent counts. Empty with one intent, where the whole-report table already says it."""
    names = sorted({name for r in reports for name in r.metrics["by_intent"]})
    if len(names) < 2:
        return []

    def cell(row: dict | None) -> str:
        if row is None or key not in row:
            return "n/a"
        counts = sorted(row[key].items(), key=lambda item: (-item[1], item[0]))
        return ", ".join(f"{name} {count}" for name, count in counts) or "none"

    return [(name, [cell(r.metrics["by_intent"].get(name)) for r in reports]) for name in names]


def _task_rows(reports: Sequence[EvalReport]) -> list[tuple[str, list[str]]]:
    tables = [{row["task_id"]: row for row in r.per_task} for r in reports]
    ids = list(dict.fromkeys(tid for r in reports for tid in (row["task_id"] for row in r.per_task)))
    rows = []
    for tid in ids:
        first = next(t[tid] for t in tables if tid in t)
        cells = [f"{t[tid]['successes']}/{t[tid]['n']} ({', '.join(t[tid]['stop_reasons'])})" if tid in t else "n/a"
                 for t in tables]
        rows.append((f"{tid} [{'+'.join(first['intents'])}]", cells))
    return rows


def _sections(reports: Sequence[EvalReport]) -> list[tuple[str, str, list[tuple[str, list[str]]]]]:
    """``(title, first column, rows)`` for every table both renderings show, in order."""
    return [
        ("Metrics", "metric", metric_rows(reports)),
        ("Success by intent", "intent", _intent_rows(reports)),
        ("Success checks (each must hold for success)", "check", _rate_rows(reports, "checks")),
        ("Per-field accuracy", "field", _rate_rows(reports, "field_accuracy")),
        ("Violations by rule (count)", "rule", _count_rows(reports, "violations")),
        ("Tool calls that ran (count)", "tool", _count_rows(reports, "tool_calls")),
        ("Tool errors (count)", "kind", _count_rows(reports, "tool_errors")),
        ("Failed tool calls, by the tool named (count)", "tool", _count_rows(reports, "failed_calls")),
        ("Stop reasons (count)", "stop reason", _count_rows(reports, "stop_reasons")),
        ("Stop reasons by intent (count)", "intent", _intent_count_rows(reports, "stop_reasons")),
        ("Tool calls that ran, by intent (count)", "intent", _intent_count_rows(reports, "tool_calls")),
        ("Failed tool calls by intent, by the tool named (count)", "intent",
         _intent_count_rows(reports, "failed_calls")),
        ("Tool errors by intent (count)", "intent", _intent_count_rows(reports, "tool_errors")),
        ("Violations by intent (count)", "intent", _intent_count_rows(reports, "violations")),
        ("Per task (successes/episodes and stop reasons)", "task", _task_rows(reports)),
    ]


def _heading(reports: Sequence[EvalReport]) -> str:
    return "Evaluation: " + " vs ".join(r.label for r in reports)


def _runs(reports: Sequence[EvalReport]) -> list[tuple[str, list[str]]]:
    def seeds(r: EvalReport) -> str:
        c = r.config
        if "seed" in c:
            return f"{c['seed']}..{c['seed'] + c.get('n', 1) - 1}"
        return ", ".join(map(str, c.get("seeds", [])[:8]))

    rows = [
        ("role", [str(r.config.get("role", "")) for r in reports]),
        ("source", [str(r.config.get("source", "")) for r in reports]),
        ("tasks x samples", [f"{r.metrics['n_tasks']} x {r.metrics['n']}" for r in reports]),
        ("seeds", [seeds(r) for r in reports]),
        ("turn / token budgets", [f"{r.config.get('max_turns', 'n/a')} turns, {r.config.get('max_new_tokens', 'n/a')} "
                                  "tokens/turn" for r in reports]),
    ]
    return [(name, cells) for name, cells in rows if any(cells)]


_MD_SPECIAL = re.compile(r"([\\`\[\]|])")


def md_text(text: Any) -> str:
    r"""``text`` (a label, task id, intent, tool or rule name: anything that came from data) as inert Markdown.

    Markdown passes raw HTML through, so ``<script>`` in a logged task id would run in a viewer that renders
    the file; ``&``, ``<`` and ``>`` become entities, as ``report.html`` escapes them. Backslashes, backticks,
    brackets and pipes are escaped (no code spans, links or extra table columns), and line breaks become
    spaces (a table row is one line).

    >>> md_text("<script>alert(1)</script> | [x](javascript:y)")
    '&lt;script&gt;alert(1)&lt;/script&gt; \\| \\[x\\](javascript:y)'
    """
    text = html.escape(str(text), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.splitlines()))


def render_markdown(reports: Sequence[EvalReport], comparison: Comparison | None = None) -> str:
    """The report as Markdown: the shared tables, plus the side-by-side result when there is one.

    Every string that came from data goes through :func:`md_text`, so the file carries no live HTML.
    """
    labels = [md_text(r.label) for r in reports]

    def table(first: str, rows: list[tuple[str, list[str]]]) -> list[str]:
        out = [f"| {md_text(first)} | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
        return out + [f"| {md_text(name)} | " + " | ".join(map(md_text, cells)) + " |" for name, cells in rows]

    lines = [f"# {md_text(_heading(reports))}", "", *table("run", _runs(reports)), ""]
    if comparison is not None:
        lines += ["## Side by side", "", md_text(comparison.statement()), "", *_comparison_table_md(comparison), ""]
    for title, first, rows in _sections(reports):
        if rows:
            lines += [f"## {title}", "", *table(first, rows), ""]
    return "\n".join(lines)


def _comparison_table_md(c: Comparison) -> list[str]:
    base, candidate = md_text(c.base), md_text(c.candidate)
    lines = [f"| | {base} passes | {base} fails |", "| --- | --- | --- |",
             f"| {candidate} passes | {c.both_pass} | {c.candidate_only} |",
             f"| {candidate} fails | {c.base_only} | {c.both_fail} |"]
    header, rows = _comparison_intent_rows(c)
    if len(rows) > 1:
        lines += ["", "| intent | " + " | ".join(map(md_text, header)) + " |", "| --- |" + " --- |" * len(header)]
        lines += [f"| {md_text(name)} | " + " | ".join(cells) + " |" for name, cells in rows]
    return lines


def _comparison_intent_rows(c: Comparison) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The paired difference per intent: the column names and one row per intent label. The reports show
    the table only when there is more than one intent."""
    pct = round(c.confidence * 100)
    header = ["tasks", c.candidate, c.base, "difference", f"{pct}% CI"]
    rows = [(name, [str(row["n_tasks"]), f"{row['candidate_success']:.3f}", f"{row['base_success']:.3f}",
                    f"{row['difference']:+.3f}", f"{row['ci_low']:+.3f} to {row['ci_high']:+.3f}"])
            for name, row in c.by_intent.items()]
    return header, rows


def render_text(reports: Sequence[EvalReport], comparison: Comparison | None = None) -> str:
    """The metrics table and the side-by-side sentence as plain text, for a terminal."""
    rows = [("", [r.label for r in reports]), *metric_rows(reports)]
    width = max(len(name) for name, _ in rows)
    cols = [max(len(row[1][i]) for row in rows) for i in range(len(reports))]
    lines = [f"  {name:>{width}}  " + "  ".join(f"{cell:>{w}}" for cell, w in zip(cells, cols)) for name, cells in rows]
    if comparison is not None:
        lines += ["", comparison.statement()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot), or a clear error naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingReportDependency(
            f"The HTML report draws its plots with matplotlib, which is not installed. Install it with "
            f"`{INSTALL_HINT}` (or `pip install matplotlib`), or skip the HTML report."
        ) from exc
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _color(i: int) -> str:
    return f"C{i % 10}"


def _plain(text: Any) -> str:
    """``text`` for a plot label: matplotlib reads ``$...$`` as mathtext, and an intent or policy name holding
    ``$`` would be typeset as maths, or fail to parse and take the whole page down with it."""
    return str(text).replace("$", r"\$")


def plot_success_by_intent(reports: Sequence[EvalReport]) -> bytes:
    """Grouped bars: success rate per intent, one bar per report (base against tuned, and references)."""
    intents = sorted({name for r in reports for name in r.metrics["by_intent"]})
    fig = _figure(max(6.0, 0.9 * len(intents) + 2), 4.6)
    ax = fig.add_subplot()
    width = 0.8 / len(reports)
    for i, r in enumerate(reports):
        xs = [x + (i - (len(reports) - 1) / 2) * width for x in range(len(intents))]
        ys = [r.metrics["by_intent"].get(name, {}).get("success") or 0.0 for name in intents]
        ax.bar(xs, ys, width, label=_plain(f"{r.label} ({r.metrics['success']:.2f} overall)"), color=_color(i))
    counts = {name: max(r.metrics["by_intent"].get(name, {}).get("n", 0) for r in reports) for name in intents}
    ax.set_xticks(range(len(intents)), [_plain(f"{name}\n(n={counts[name]})") for name in intents], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title("Success by intent")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=min(3, len(reports)), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_turns_histogram(reports: Sequence[EvalReport]) -> bytes:
    """Episodes per number of assistant turns, one bar group per report; solid = success, hatched = failure."""
    counts = [e["turns"] for r in reports for e in r.episodes]
    top = max(counts)
    turns = list(range(min(1, min(counts)), top + 1))
    fig = _figure(max(6.0, 0.35 * top + 2), 4.0 + 0.25 * len(reports))
    ax = fig.add_subplot()
    width = 0.8 / len(reports)
    for i, r in enumerate(reports):
        xs = [t + (i - (len(reports) - 1) / 2) * width for t in turns]
        wins = [sum(e["turns"] == t and e["success"] for e in r.episodes) for t in turns]
        losses = [sum(e["turns"] == t and not e["success"] for e in r.episodes) for t in turns]
        ax.bar(xs, wins, width, color=_color(i), label=_plain(f"{r.label}: success"))
        ax.bar(xs, losses, width, bottom=wins, color=_color(i), alpha=0.35, hatch="//", label=_plain(f"{r.label}: failure"))
    ax.set_xlabel("assistant turns in the episode")
    ax.set_ylabel("episodes")
    ax.set_title("Turns per episode")
    ax.set_xticks(turns if top <= 30 else turns[::2])
    # explicit: stacked bars of height 0 pin autoscaling at the tallest bar, clipping its top
    tallest = max(sum(e["turns"] == t for e in r.episodes) for r in reports for t in turns)
    ax.set_ylim(0, tallest * 1.08 + 0.5)
    # below the axes, so that it never hides a bar
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_reward_vs_success(reports: Sequence[EvalReport], rewards: Rewards) -> bytes:
    """Each episode's reward total against its strict success (jittered), per report.

    A reward that tracks success separates the two rows; overlap is where a policy can raise its reward
    without succeeding. The legend gives each report's mean reward on successes and failures.
    """
    import numpy as np

    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    jitter = np.random.default_rng(0)
    for i, r in enumerate(reports):
        values = rewards.get(r.label)
        if values is None:
            continue
        points = [(float(v), e["success"]) for v, e in zip(values, r.episodes) if v is not None]
        if not points:
            continue
        x = np.array([p[0] for p in points])
        ok = np.array([p[1] for p in points], dtype=bool)
        y = ok.astype(float) + (i - (len(reports) - 1) / 2) * 0.08 + jitter.uniform(-0.03, 0.03, len(points))
        means = " / ".join(f"{x[mask].mean():.2f}" if mask.any() else "n/a" for mask in (ok, ~ok))
        ax.scatter(x, y, s=14, alpha=0.6, color=_color(i),
                   label=_plain(f"{r.label} (mean reward success / failure: {means})"))
    ax.set_yticks([0, 1], ["failure", "success"])
    ax.set_ylim(-0.5, 1.5)
    ax.set_xlabel("reward total")
    ax.set_title("Reward against strict success")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _series(log_history: Sequence[Mapping[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    """``(xs, ys)`` of the log records that hold both ``x`` and a finite ``key``."""
    import math

    pairs = [(float(h[x]), float(h[key])) for h in log_history
             if isinstance(h.get(x), (int, float)) and isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_training_curves(sft_curve: Sequence[Mapping[str, Any]] | None = None,
                         sft_logs: Sequence[Mapping[str, Any]] | None = None,
                         grpo_logs: Sequence[Mapping[str, Any]] | None = None) -> bytes:
    """The training curves of a pipeline run, one panel per stage that ran.

    SFT: training loss (``sft_logs``, the trainer's log history) and validation success and reward per
    epoch (``sft_curve``, the records of ``val_curve.json``; epoch 0 is the starting model). GRPO: mean
    training reward per step and validation success and reward at each validation (``grpo_logs``).
    Success is on the right axis, from 0 to 1.
    """
    panels = [name for name, data in (("SFT", sft_curve or sft_logs), ("GRPO", grpo_logs)) if data]
    if not panels:
        raise ValueError("plot_training_curves needs the log of at least one training stage.")
    fig = _figure(5.2 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    from matplotlib.ticker import MaxNLocator

    def line(on, log, key, x, style, color, label) -> bool:  # a series the log lacks: no line, no legend entry
        xs, ys = _series(log or [], key, x)
        if xs:
            on.plot(xs, ys, style, color=_color(color), label=label)
        return bool(xs)

    for ax, name in zip(axes, panels):
        success_ax = ax.twinx()
        success_ax.set_ylim(-0.03, 1.03)
        success_ax.set_ylabel("val success")
        if name == "SFT":
            line(ax, sft_logs, "loss", "epoch", "-", 0, "train loss")
            rewards = line(ax, sft_curve, "val/reward/mean", "epoch", "s--", 2, "val reward (mean)")
            line(success_ax, sft_curve, "val/success", "epoch", "o-", 1, "val success")
            ax.set_xlabel("epoch")
            ax.set_ylabel("train loss / val reward" if rewards else "train loss")
        else:
            line(ax, grpo_logs, "rollout/reward/mean", "step", "o-", 0, "train reward (mean)")
            line(ax, grpo_logs, "val/reward/mean", "step", "s--", 2, "val reward (mean)")
            line(success_ax, grpo_logs, "val/success", "step", "o-", 1, "val success")
            ax.set_xlabel("GRPO step")
            ax.set_ylabel("reward")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not success_ax.lines:  # no validation in this stage: no empty success axis
            success_ax.set_axis_off()
        handles = [h for a in (ax, success_ax) for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="best")
        ax.set_title(f"{name} training")
        ax.grid(alpha=0.3)
    return _png(fig)


def make_plots(reports: Sequence[EvalReport], rewards: Rewards | None = None) -> dict[str, bytes]:
    """Every plot the HTML page shows, as PNG bytes by name (``reward_vs_success`` only with rewards)."""
    _check_rewards(reports, rewards)
    plots = {"success_by_intent": plot_success_by_intent(reports), "turns_histogram": plot_turns_histogram(reports)}
    if rewards and any(r.label in rewards for r in reports):
        plots["reward_vs_success"] = plot_reward_vs_success(reports, rewards)
    return plots


def _check_rewards(reports: Sequence[EvalReport], rewards: Rewards | None) -> None:
    for r in reports:
        if rewards and r.label in rewards and len(rewards[r.label]) != len(r.episodes):
            raise ValueError(f"rewards for {r.label!r}: got {len(rewards[r.label])} values for {len(r.episodes)} "
                             "episodes; give one total per trajectory, in report.trajectories order.")


def rewards_from_metadata(trajectories: Sequence[Trajectory]) -> list[float | None] | None:
    """Reward totals recorded in logged trajectories' ``metadata["reward"]`` (a number or ``{"total": x}``).

    ``None`` when no trajectory carries one. Nothing is computed: these are the numbers the logger wrote.
    """
    values: list[float | None] = []
    for t in trajectories:
        reward = t.metadata.get("reward")
        if isinstance(reward, dict):
            reward = reward.get("total")
        values.append(float(reward) if isinstance(reward, (int, float)) and not isinstance(reward, bool) else None)
    return values if any(v is not None for v in values) else None


# ---------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.verdict { font-size: 1.05em; padding: 0.6em 1em; border-left: 4px solid #888; background: #f7f7f7; }
.verdict.sig { border-color: #2a7; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0 1em; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.transcript { border: 1px solid #ddd; padding: 0.5em; font-size: 0.85em; overflow-x: auto; }
.msg { margin: 0.4em 0; padding: 0.3em 0.6em; border-radius: 4px; }
.msg .who { font-weight: 600; font-size: 0.8em; text-transform: uppercase; color: #555; }
.user { background: #eef4ff; } .assistant { background: #f2fbef; } .tool { background: #f6f6f6; }
.tool.error { background: #fdecec; } .system { background: #fffbe6; }
.violation { color: #b00; font-weight: 600; } .pass { color: #2a7; font-weight: 600; } .fail { color: #b00; font-weight: 600; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0.2em 0; font-size: 0.95em; }
summary { cursor: pointer; }
"""


def _table_html(first: str, labels: Sequence[str], rows: list[tuple[str, list[str]]]) -> str:
    head = f"<tr><th>{html.escape(first)}</th>" + "".join(f"<th>{html.escape(x)}</th>" for x in labels) + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for name, cells in rows
    )
    return f"<table>{head}{body}</table>"


def _img(name: str, png: bytes) -> str:
    return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _pretty(text: str, limit: int = 2000) -> str:
    return html.escape(text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more characters)")


_CALL_BLOCK = re.compile(r"<tool_call>.*?</tool_call>", re.DOTALL)


def transcript_html(trajectory: Trajectory) -> str:
    """One episode, readable: the outcome, then each message by role with tool calls and results decoded."""
    o = trajectory.outcome
    by_turn: dict[int, list[str]] = {}
    for v in o.violations:
        rule, _, turn = v.partition("@")
        by_turn.setdefault(int(turn) if turn.isdigit() else -1, []).append(rule)
    verdict = '<span class="pass">success</span>' if o.success else '<span class="fail">failure</span>'
    parts = [f"<p>{verdict}; stop reason <b>{html.escape(str(o.stop_reason))}</b>; {trajectory.num_turns} turns; "
             f"completed: {o.completed}"]
    if o.violations:
        parts.append(f'; <span class="violation">violations: {html.escape(", ".join(o.violations))}</span>')
    missing = o.details.get("missing_facts")
    if missing:
        parts.append(f"; facts never told: {html.escape(', '.join(map(str, missing)))}")
    if o.details.get("state_match") is False:
        parts.append("; end state differs from the expected one")
    parts.append("</p>")
    turn = 0
    for message in trajectory.messages:
        role, content = message.get("role", "?"), str(message.get("content", ""))
        if role == "system":
            parts.append(f'<details class="msg system"><summary class="who">system prompt ({len(content)} characters)'
                         f"</summary><pre>{html.escape(content)}</pre></details>")
        elif role == "assistant":
            flags = "".join(f' <span class="violation">[{html.escape(rule)}]</span>' for rule in by_turn.get(turn, []))
            body = []
            text = _CALL_BLOCK.sub("", content).strip()
            if text:
                body.append(f"<pre>{_pretty(text)}</pre>")
            for call in parse_tool_calls(content):
                if isinstance(call, ToolCall):
                    body.append(f"<div>&rarr; calls <b>{html.escape(call.name)}</b></div>"
                                f"<pre>{_pretty(json.dumps(call.arguments, indent=1))}</pre>")
                else:
                    body.append(f'<div class="violation">&rarr; malformed call ({html.escape(call.kind)}): '
                                f"{html.escape(call.message)}</div>")
            if not content.strip():
                body.append("<pre>(empty message)</pre>")
            parts.append(f'<div class="msg assistant"><div class="who">assistant, turn {turn}{flags}</div>'
                         f"{''.join(body)}</div>")
            turn += 1
        elif role == "tool":
            tool = parse_tool_message(message)
            if tool is None:
                parts.append(f'<div class="msg tool"><div class="who">tool</div><pre>{_pretty(content)}</pre></div>')
            elif tool.get("ok"):
                parts.append(f'<div class="msg tool"><div class="who">tool result: {html.escape(str(tool.get("tool")))}'
                             f"</div><pre>{_pretty(json.dumps(tool.get('result'), indent=1))}</pre></div>")
            else:
                parts.append(f'<div class="msg tool error"><div class="who">tool error: '
                             f"{html.escape(str(tool.get('tool')))} ({html.escape(str(tool.get('error_type')))})</div>"
                             f"<pre>{_pretty(str(tool.get('error')))}</pre></div>")
        else:
            parts.append(f'<div class="msg {html.escape(role)}"><div class="who">{html.escape(role)}</div>'
                         f"<pre>{_pretty(content)}</pre></div>")
    return f'<div class="transcript">{"".join(parts)}</div>'


def _disagreements_html(comparison: Comparison, intents: Mapping[str, list[str]], limit: int) -> str:
    c = comparison
    groups = [
        (f"{c.candidate} fails, {c.base} passes", [p for p in c.disagreements if not p[0].outcome.success]),
        (f"{c.candidate} passes, {c.base} fails", [p for p in c.disagreements if p[0].outcome.success]),
    ]
    parts = ["<h2>Where the two disagree</h2><p>Episodes with the same task and seed on which exactly one policy "
             "succeeded. Read the first group for regressions and reward hacking.</p>"]
    for title, pairs in groups:
        parts.append(f"<h3>{html.escape(title)} ({len(pairs)})</h3>")
        for cand, base in pairs[:limit]:
            summary = (f"{cand.task_id}, seed {cand.seed} [{'+'.join(intents.get(cand.task_id, []))}]: "
                       f"{c.candidate} {cand.outcome.stop_reason}, {c.base} {base.outcome.stop_reason}")
            parts.append(f"<details><summary>{html.escape(summary)}</summary><div class=\"pair\">"
                         f"<div><h4>{html.escape(c.candidate)}</h4>{transcript_html(cand)}</div>"
                         f"<div><h4>{html.escape(c.base)}</h4>{transcript_html(base)}</div></div></details>")
        if len(pairs) > limit:
            parts.append(f"<p>{len(pairs) - limit} more not shown; all trajectories are in the trajectories files.</p>")
    return "".join(parts)


def render_html(reports: Sequence[EvalReport], comparison: Comparison | None = None, rewards: Rewards | None = None,
                *, plots: Mapping[str, bytes] | None = None, extra_plots: Mapping[str, bytes] | None = None,
                max_transcripts: int = 10) -> str:
    """The whole report as one self-contained HTML page (plots inline as base64 PNG data URIs).

    ``rewards`` (optional) maps a report label to one reward total per trajectory, in
    ``report.trajectories`` order; with it the page shows reward against success. ``plots`` reuses
    plots already drawn by :func:`make_plots`; ``extra_plots`` (PNG bytes by name, such as
    :func:`plot_training_curves`) come first. At most ``max_transcripts`` disagreements per direction
    are rendered.
    """
    plots = {**(extra_plots or {}), **(dict(plots) if plots is not None else make_plots(reports, rewards))}
    labels = [r.label for r in reports]
    title = html.escape(_heading(reports))
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>{_CSS}</style></head>"
             f"<body><h1>{title}</h1>", _table_html("run", labels, _runs(reports))]
    if comparison is not None:
        cls = "verdict sig" if comparison.significant else "verdict"
        parts.append(f"<h2>Side by side</h2><p class=\"{cls}\">{html.escape(comparison.statement())}</p>")
        parts.append(_table_html("", [f"{comparison.base} passes", f"{comparison.base} fails"], [
            (f"{comparison.candidate} passes", [str(comparison.both_pass), str(comparison.candidate_only)]),
            (f"{comparison.candidate} fails", [str(comparison.base_only), str(comparison.both_fail)]),
        ]))
        header, rows = _comparison_intent_rows(comparison)
        if len(rows) > 1:
            parts.append("<h3>By intent (paired)</h3>" + _table_html("intent", header, rows))
    sections = _sections(reports)
    parts.append(f"<h2>{sections[0][0]}</h2>" + _table_html(sections[0][1], labels, sections[0][2]))
    parts.append("<h2>Plots</h2>")
    parts += [_img(name, png) for name, png in plots.items()]
    for section_title, first, rows in sections[1:-1]:
        if rows:
            parts.append(f"<h2>{html.escape(section_title)}</h2>" + _table_html(first, labels, rows))
    if comparison is not None:
        intents = {row["task_id"]: row["intents"] for r in reports for row in r.per_task}
        parts.append(_disagreements_html(comparison, intents, max_transcripts))
    section_title, first, rows = sections[-1]
    parts.append(f"<details><summary><b>{html.escape(section_title)}</b></summary>"
                 f"{_table_html(first, labels, rows)}</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "policy"


REPORT_ENTRIES = ("report.json", "report.md", "report.html", "plots", "trajectories", "trajectories.jsonl")
"""What a report is made of, in its directory: replaced together, so that no part of an older report stays."""


def save_report(report: EvalReport, out_dir: Path | str) -> dict[str, Path]:
    """Write one policy's report into ``out_dir`` as a unit (see :func:`write_report`); return the paths by name.

    ``report.json`` is :meth:`EvalReport.to_dict`; ``report.md`` is :func:`render_markdown` of the report
    alone; ``trajectories.jsonl`` holds its episodes. :func:`write_report` lays out several policies side
    by side instead.
    """

    def write(out: Path) -> dict[str, Path]:
        paths = {"json": out / "report.json", "markdown": out / "report.md", "trajectories": out / "trajectories.jsonl"}
        atomic_write_text(paths["json"], json.dumps(report.to_dict(), indent=2) + "\n")
        atomic_write_text(paths["markdown"], render_markdown([report]))
        save_jsonl(report.trajectories, paths["trajectories"])
        return paths

    return _write_as_unit(Path(out_dir), write)


def write_report(out_dir: Path | str, reports: Sequence[EvalReport], comparison: Comparison | None = None,
                 rewards: Rewards | None = None, *, html_page: bool = True,
                 extra_plots: Mapping[str, bytes] | None = None) -> dict[str, Path]:
    """Write the report for one or more policies into ``out_dir``, as a unit.

    ``report.json`` is ``{"policies": [<EvalReport.to_dict()>...], "comparison": {...} or null}``;
    ``report.md`` is :func:`render_markdown`; ``trajectories/<label>.jsonl`` holds each policy's
    episodes. With ``html_page``, ``report.html`` and ``plots/<name>.png`` (the same plots, as files)
    are written too; that needs matplotlib. ``extra_plots`` (PNG bytes by name, drawn by the caller, such
    as :func:`plot_training_curves`) join them, first. Returns the paths by name.

    Every file is written into a staging directory first, and only a complete report replaces the one
    ``out_dir`` held (by renames, which need no space), so a full disk or a failed plot leaves the previous
    report whole, never a ``report.json`` from one run beside trajectories from another.
    """
    labels = [r.label for r in reports]
    if len({_slug(label) for label in labels}) != len(labels):
        raise ValueError(f"report labels must be distinct (they name files and columns), got {labels}.")

    def write(out: Path) -> dict[str, Path]:
        paths: dict[str, Path] = {"json": out / "report.json", "markdown": out / "report.md"}
        payload = {"policies": [r.to_dict() for r in reports],
                   "comparison": comparison.to_dict() if comparison else None}
        atomic_write_text(paths["json"], json.dumps(payload, indent=2) + "\n")
        atomic_write_text(paths["markdown"], render_markdown(reports, comparison))
        for r in reports:
            paths[f"trajectories:{r.label}"] = out / "trajectories" / f"{_slug(r.label)}.jsonl"
            save_jsonl(r.trajectories, paths[f"trajectories:{r.label}"])
        if html_page:
            plots = {**(extra_plots or {}), **make_plots(reports, rewards)}
            for name, png in plots.items():
                paths[f"plot:{name}"] = out / "plots" / f"{name}.png"
                paths[f"plot:{name}"].parent.mkdir(parents=True, exist_ok=True)
                paths[f"plot:{name}"].write_bytes(png)
            paths["html"] = out / "report.html"
            atomic_write_text(paths["html"], render_html(reports, comparison, rewards, plots=plots))
        return paths

    paths = _write_as_unit(Path(out_dir), write)
    logger.info("wrote the evaluation report to %s", out_dir)
    return paths


def _write_as_unit(out: Path, write: Callable[[Path], dict[str, Path]]) -> dict[str, Path]:
    """Run ``write`` into a staging directory inside ``out``, then swap its files for the report ``out`` held.

    The staging directory sits inside ``out`` so that the swap is renames on one file system. The files
    of `REPORT_ENTRIES` that the new report does not have (``report.html`` when it has no HTML page) go
    too, so the directory never mixes two reports. If ``write`` fails, the staging directory is removed
    and ``out`` is left as it was.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"the report directory {out} is a file; give a directory.")
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        staged = write(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    previous = stage / ".previous"
    try:
        previous.mkdir()
        for name in REPORT_ENTRIES:
            if (out / name).exists() or (out / name).is_symlink():
                os.replace(out / name, previous / name)
        for entry in stage.iterdir():
            if entry != previous:
                os.replace(entry, out / entry.name)
    except OSError as exc:  # renames in one directory: this takes a file system gone wrong
        raise OSError(f"could not move the new report from {stage} into {out} ({exc}); the previous report's files "
                      f"are in {previous}.") from exc
    shutil.rmtree(stage, ignore_errors=True)
    return {name: out / path.relative_to(stage) for name, path in staged.items()}


__all__ = ["INSTALL_HINT", "MissingReportDependency", "Rewards", "make_plots", "metric_rows", "plot_reward_vs_success",
           "plot_success_by_intent", "plot_training_curves", "plot_turns_histogram", "render_html", "render_markdown",
           "render_text", "md_text", "rewards_from_metadata", "save_report", "transcript_html", "write_report"]
