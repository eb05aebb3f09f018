"""Tests for pipeline/report.py: Markdown and text tables, the self-contained HTML page, its plots and
transcripts, and the clear error when matplotlib is missing."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import struct
import sys
from pathlib import Path

import pytest

from pipeline.envs import load_tasks, oracle_policy
from pipeline.evaluation import compare, evaluate
from pipeline.report import (
    INSTALL_HINT,
    MissingReportDependency,
    make_plots,
    plot_training_curves,
    render_html,
    render_markdown,
    render_text,
    rewards_from_metadata,
    save_report,
    transcript_html,
    write_report,
)
from pipeline.trajectory import load_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chatty(task):
    """A weak scripted policy: small talk every turn, so every episode fails."""
    return lambda messages: "Our store was founded in 1998. <b>Bold</b> & proud."


def half_oracle(task):
    """The oracle on tasks whose id ends in an even digit, small talk on the others."""
    return oracle_policy(task) if int(task.id[-1]) % 2 == 0 else chatty(task)


@pytest.fixture(scope="module")
def reports():
    tasks = load_tasks("customer_service", "val")[:6]
    base = evaluate(oracle_policy, tasks, n=2, max_turns=12, label="base")
    tuned = evaluate(half_oracle, tasks, n=2, max_turns=12, label="tuned")
    reference = evaluate(oracle_policy, tasks, n=2, max_turns=12, label="oracle")
    for report, role in ((tuned, "candidate"), (base, "base"), (reference, "reference")):
        report.config["role"] = role
    return tuned, base, reference, compare(tuned, base, n_boot=500)


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_markdown_puts_every_policy_in_one_table(reports) -> None:
    tuned, base, reference, comparison = reports
    text = render_markdown([tuned, base, reference], comparison)
    assert text.startswith("# Evaluation: tuned vs base vs oracle")
    assert "| metric | tuned | base | oracle |" in text
    success = next(line for line in text.splitlines() if line.startswith("| success |"))
    assert success == f"| success | {tuned.metrics['success']:.3f} | 1.000 | 1.000 |"
    for row in ("| pass@2 |", "| pass^2 |", "| correct_given_completed |", "| max_turns_rate |", "| tokens_mean | n/a"):
        assert row in text
    assert comparison.statement() in text
    assert f"| tuned passes | {comparison.both_pass} | {comparison.candidate_only} |" in text
    assert "## Success by intent" in text and "## Per task" in text
    # the paired difference per intent, one row for each intent the six val tasks cover
    assert len(comparison.by_intent) > 1
    assert "| intent | tasks | tuned | base | difference | 95% CI |" in text
    for name, row in comparison.by_intent.items():
        assert (f"| {name} | {row['n_tasks']} | {row['candidate_success']:.3f} | {row['base_success']:.3f} | "
                f"{row['difference']:+.3f} | {row['ci_low']:+.3f} to {row['ci_high']:+.3f} |") in text


def _md_section(text: str, title: str) -> dict[str, list[str]]:
    """A Markdown section's table as ``{first cell: [the other cells]}``."""
    lines = text.split(f"## {title}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    return {row[0]: row[1:] for row in rows}


def _counts(cell: str) -> dict[str, int]:
    """``"get_order 4, verify_identity 2"`` as a dict, in the cell's order."""
    return {name: int(n) for name, n in (item.rsplit(" ", 1) for item in cell.split(", "))}


def test_markdown_shows_where_each_intent_fails(reports) -> None:
    """Per intent, the tools each policy called and how its episodes ended: a tool one intent needs and a
    policy never calls shows there, where the whole-report counts mix it with the other intents."""
    _, _, reference, _ = reports
    tasks = load_tasks("customer_service", "val")[:6]
    silent = evaluate(chatty, tasks, n=1, max_turns=3, label="silent")
    text = render_markdown([silent, reference])
    intents = sorted(reference.metrics["by_intent"])
    assert len(intents) > 1
    tools = _md_section(text, "Tool calls that ran, by intent (count)")
    assert sorted(tools) == intents
    for name, (silent_cell, oracle_cell) in tools.items():
        assert silent_cell == "none"  # small talk calls no tool
        assert _counts(oracle_cell) == reference.metrics["by_intent"][name]["tool_calls"]
        assert list(_counts(oracle_cell).values()) == sorted(_counts(oracle_cell).values(), reverse=True)
    # A tool the domain does not have fails under the name the policy gave it, escaped like any data.
    guess = '<tool_call>{"name": "find|order", "arguments": {}}</tool_call>'
    guesser = evaluate(lambda task: lambda messages: guess, tasks, n=1, max_turns=2, label="guesser")
    guessed = render_markdown([guesser, reference])
    failed = _md_section(guessed, "Failed tool calls by intent, by the tool named (count)")
    for name, (guesser_cell, oracle_cell) in failed.items():
        assert guesser_cell == f"find\\|order {guesser.metrics['by_intent'][name]['tool_errors']['unknown_tool']}"
        assert oracle_cell == "none"
    for name, (silent_cell, oracle_cell) in _md_section(text, "Stop reasons by intent (count)").items():
        assert _counts(oracle_cell) == {"resolved": reference.metrics["by_intent"][name]["n"]}
        assert set(_counts(silent_cell)) <= {"max_turns", "user_left"}
        assert sum(_counts(silent_cell).values()) == silent.metrics["by_intent"][name]["n"]
    # A report written before the per-intent counts existed shows n/a; one intent alone gets no such table.
    old = json.loads(json.dumps(reference.metrics))
    for row in old["by_intent"].values():
        del row["tool_calls"]
    del old["failed_calls"]
    older = dataclasses.replace(reference, metrics=old)
    text = render_markdown([guesser, older])
    assert all(row == ["none", "n/a"] for row in _md_section(text, "Tool calls that ran, by intent (count)").values())
    assert _md_section(text, "Failed tool calls, by the tool named (count)") == {
        "find\\|order": [str(guesser.metrics["tool_errors"]["unknown_tool"]), "n/a"]}
    single = evaluate(oracle_policy, load_tasks("customer_service/order_status", "val")[:2], n=1, label="one")
    text = render_markdown([single])
    assert "## Tool calls that ran (count)" in text and "## Success by intent" in text
    assert not re.search(r"^## .*by intent.* \(count\)$", text, re.M)


def test_text_table_is_aligned_for_a_terminal(reports) -> None:
    tuned, base, _, comparison = reports
    lines = render_text([tuned, base], comparison).splitlines()
    assert lines[0].split() == ["tuned", "base"]
    assert len({len(line) for line in lines[: lines.index("")]}) == 1
    assert lines[-1] == comparison.statement()


def test_html_is_self_contained_with_plots_and_disagreeing_transcripts(reports) -> None:
    tuned, base, reference, comparison = reports
    page = render_html([tuned, base, reference], comparison)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # self-contained: every image is inline, nothing is fetched
    assert not re.findall(r'(?:src|href)="(?!data:|#)', page)
    images = _images(page)
    assert len(images) == 2 and all(img.startswith(PNG_MAGIC) for img in images)
    assert 'alt="success_by_intent"' in page and 'alt="turns_histogram"' in page
    assert 'alt="reward_vs_success"' not in page  # no rewards given
    assert comparison.statement() in page.replace("&#x27;", "'")
    assert "<h3>By intent (paired)</h3>" in page
    assert all(f"<tr><td>{name}</td><td>{row['n_tasks']}</td>" in page for name, row in comparison.by_intent.items())
    failing = [c for c, b in comparison.disagreements if not c.outcome.success]
    assert failing, "the fixture must make the tuned policy fail where the base passes"
    assert f"tuned fails, base passes ({len(failing)})" in page
    assert f"{failing[0].task_id}, seed {failing[0].seed}" in page
    # model text is escaped, never interpreted
    assert "&lt;b&gt;Bold&lt;/b&gt; &amp; proud." in page and "<b>Bold</b>" not in page


def test_reward_plot_appears_only_when_rewards_are_given(reports) -> None:
    tuned, base, _, _ = reports
    rewards = {"tuned": [1.0 if e["success"] else 0.2 for e in tuned.episodes], "base": [0.9] * len(base.episodes)}
    plots = make_plots([tuned, base], rewards)
    assert list(plots) == ["success_by_intent", "turns_histogram", "reward_vs_success"]
    assert all(png.startswith(PNG_MAGIC) for png in plots.values())
    assert 'alt="reward_vs_success"' in render_html([tuned, base], rewards=rewards, plots=plots)
    with pytest.raises(ValueError, match="one total per trajectory"):
        make_plots([tuned], {"tuned": [1.0]})


def test_rewards_are_read_from_logged_metadata_never_computed(reports) -> None:
    tuned = reports[0]
    trajectories = [t for t in tuned.trajectories[:3]]
    assert rewards_from_metadata(trajectories) is None
    trajectories[0].metadata["reward"] = 0.5
    trajectories[1].metadata["reward"] = {"total": 2, "per_turn": [1, 1]}
    try:
        assert rewards_from_metadata(trajectories) == [0.5, 2.0, None]
    finally:
        for t in trajectories:
            t.metadata.pop("reward", None)


def test_transcripts_show_roles_tool_calls_results_and_errors() -> None:
    task = load_tasks("customer_service", "val")[0]
    good = evaluate(oracle_policy, [task]).trajectories[0]
    page = transcript_html(good)
    assert '<span class="pass">success</span>' in page and "system prompt (" in page
    assert "&rarr; calls <b>verify_identity</b>" in page and "tool result: verify_identity" in page
    assert 'class="msg user"' in page and "assistant, turn 0" in page

    def rude(task):
        return lambda messages: '<tool_call>{"name": "cancel_order", "arguments": {"order_id": "W1"}}</tool_call>'

    bad = evaluate(rude, [task], max_turns=2).trajectories[0]
    page = transcript_html(bad)
    assert '<span class="fail">failure</span>' in page and "stop reason <b>max_turns</b>" in page
    assert 'class="msg tool error"' in page and "tool error: cancel_order" in page


def test_write_report_writes_json_markdown_html_plots_and_trajectories(tmp_path: Path, reports) -> None:
    tuned, base, reference, comparison = reports
    paths = write_report(tmp_path, [tuned, base, reference], comparison)
    data = json.loads(paths["json"].read_text())
    assert [p["config"]["policy"] for p in data["policies"]] == ["tuned", "base", "oracle"]
    assert data["comparison"]["significant"] == comparison.significant
    assert data["policies"][0]["episodes"] == tuned.episodes
    assert paths["markdown"].read_text() == render_markdown([tuned, base, reference], comparison)
    assert (tmp_path / "plots" / "turns_histogram.png").read_bytes().startswith(PNG_MAGIC)
    assert _images(paths["html"].read_text())[1] == (tmp_path / "plots" / "turns_histogram.png").read_bytes()
    assert len((tmp_path / "trajectories" / "tuned.jsonl").read_text().splitlines()) == len(tuned.trajectories)
    with pytest.raises(ValueError, match="distinct"):
        write_report(tmp_path / "again", [tuned, tuned])


def test_save_report_writes_one_policys_json_markdown_and_trajectories(tmp_path: Path, reports) -> None:
    tuned = reports[0]
    paths = save_report(tuned, tmp_path / "tuned")
    assert sorted(p.name for p in (tmp_path / "tuned").iterdir()) == ["report.json", "report.md", "trajectories.jsonl"]
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(tuned.to_dict()))
    assert paths["markdown"].read_text() == render_markdown([tuned])
    assert paths["markdown"].read_text().startswith("# Evaluation: tuned")
    saved = load_jsonl(paths["trajectories"])
    assert [(t.task_id, t.seed, t.messages) for t in saved] == [(t.task_id, t.seed, t.messages) for t in tuned.trajectories]


def test_missing_matplotlib_names_the_extra_to_install(reports, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    tuned, base, _, comparison = reports
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(MissingReportDependency, match=re.escape(INSTALL_HINT)):
        render_html([tuned, base], comparison)
    # JSON and Markdown need no matplotlib
    paths = write_report(tmp_path, [tuned, base], comparison, html_page=False)
    assert "html" not in paths and paths["markdown"].exists()


def _png_width(png: bytes) -> int:
    return struct.unpack(">I", png[16:20])[0]  # the IHDR chunk's width


def test_training_curves_draw_one_panel_per_stage_that_ran() -> None:
    sft_curve = [{"epoch": 0, "val/success": 0.0}, {"epoch": 1, "val/success": 0.4}]
    sft_logs = [{"loss": 0.9, "epoch": 0.5, "step": 2}, {"loss": 0.3, "epoch": 1.0, "step": 4}]
    grpo_logs = [{"rollout/reward/mean": 0.2, "step": 1}, {"rollout/reward/mean": 0.5, "step": 2},
                 {"val/success": 0.5, "val/reward/mean": 0.4, "step": 2}]
    both = plot_training_curves(sft_curve, sft_logs, grpo_logs)
    grpo_only = plot_training_curves(grpo_logs=grpo_logs)
    sft_only = plot_training_curves(sft_curve, sft_logs)
    assert both.startswith(PNG_MAGIC) and grpo_only.startswith(PNG_MAGIC)
    assert _png_width(both) == 2 * _png_width(grpo_only) == 2 * _png_width(sft_only)
    assert sft_only != grpo_only
    with pytest.raises(ValueError, match="at least one training stage"):
        plot_training_curves(None, [], [])


def test_training_curves_plot_only_the_records_that_hold_the_value() -> None:
    """A log history mixes training, validation and summary records; a NaN (no valid rollout) is skipped."""
    from pipeline.report import _series

    logs = [{"step": 1, "rollout/reward/mean": 0.5}, {"step": 1, "val/success": 0.2},
            {"step": 2, "rollout/reward/mean": float("nan")}, {"step": 3, "rollout/reward/mean": -0.1},
            {"rollout/reward/mean": 1.0}, {"step": 4, "rollout/reward/mean": "n/a"}]
    assert _series(logs, "rollout/reward/mean", "step") == ([1.0, 3.0], [0.5, -0.1])
    assert _series(logs, "val/success", "step") == ([1.0], [0.2])


def test_write_report_puts_extra_plots_first_and_writes_them_as_files(tmp_path: Path, reports) -> None:
    tuned, base, _, comparison = reports
    curves = plot_training_curves(grpo_logs=[{"rollout/reward/mean": 0.2, "step": 1}])
    paths = write_report(tmp_path, [tuned, base], comparison, extra_plots={"training_curves": curves})
    assert paths["plot:training_curves"].read_bytes() == curves
    assert _images(paths["html"].read_text())[0] == curves
