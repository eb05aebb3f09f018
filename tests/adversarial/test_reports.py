"""Hostile names and hostile disks at the report boundary (pipeline/report.py, pipeline/cli/).

A report is read by people, in a terminal, a Markdown viewer or a browser, and names in it come from
data: task ids, intents, policy labels, tool names a model wrote. None of them may run as HTML or break
the layout. A report on disk is one run's: never parts of two. The tests named ``test_finding_*`` are
issue 21's findings; the rest are further hostile inputs.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path

import pytest

import pipeline.report as report_module
from pipeline.cli import main
from pipeline.envs import load_tasks, oracle_policy
from pipeline.evaluation import evaluate
from pipeline.report import render_html, render_markdown, write_report

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def tasks():
    return load_tasks("customer_service", "val")[:6]


def scripted(text: str):
    """A policy factory that always writes ``text``."""
    return lambda task: (lambda messages: text)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


# ===================================================================================================
# Issue 21's findings
# ===================================================================================================


def test_finding_a_full_disk_leaves_the_previous_report_whole(tmp_path, tasks, monkeypatch):
    """Out of space half way through, report.json covered 20 tasks and the trajectories file 3."""
    out = tmp_path / "report"
    write_report(out, [evaluate(oracle_policy, tasks, label="oracle")], html_page=False)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full_disk(trajectories, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(trajectories[0].to_dict()) + "\n")  # the first line fit, the rest did not
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_module, "save_jsonl", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_report(out, [evaluate(oracle_policy, tasks[:3], label="oracle")], html_page=False)
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the previous report, byte for byte, and nothing else (no staging files)
    [policy] = json.loads((out / "report.json").read_text())["policies"]
    assert policy["metrics"]["n_episodes"] == lines(out / "trajectories" / "oracle.jsonl") == 6


def test_finding_eval_checks_its_output_directory_before_the_evaluation(tmp_path, capsys, monkeypatch):
    """An unwritable --out used to fail after the whole evaluation, with the results lost."""
    import pipeline.evaluation

    monkeypatch.setattr(pipeline.evaluation, "evaluate", lambda *a, **k: pytest.fail("an episode was played"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for out, expected in ((blocker, "is a file; give a directory"), (blocker / "report", "cannot be written to")):
        assert main(["eval", "--policy", "oracle", "--tasks", "val", "--limit", "2", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"--out {out}" in err and expected in err and "Traceback" not in err


def test_finding_an_intent_named_with_dollars_is_plotted_as_written(tmp_path, tasks):
    """``$\\frac{$`` in an intent name broke matplotlib's mathtext, and no report.html was written."""
    odd = [dataclasses.replace(t, intents=[name]) for t, name in zip(tasks, ["$\\frac{$", "$_$", "$$", "price $5"])]
    paths = write_report(tmp_path / "out", [evaluate(oracle_policy, odd, label="$oracle$")])
    page = paths["html"].read_text()
    assert "$\\frac{$" in page and "$_$" in page and "price $5" in page
    assert (tmp_path / "out" / "plots" / "success_by_intent.png").stat().st_size > 1000


def test_finding_report_md_carries_no_live_html_from_conversations(tmp_path, capsys):
    """A logged conversation's task id, violation and stop reason reached report.md raw; report.html escaped them."""
    assert main(["eval", "--policy", "oracle", "--tasks", "val", "--limit", "2", "--out", str(tmp_path / "live")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "live" / "trajectories" / "oracle.jsonl").read_text().splitlines()]
    for row in rows:  # as a logger would have recorded a hostile conversation
        row["task_id"] = f"{row['task_id']}{SCRIPT}"
        row["outcome"].update(success=False, stop_reason=SCRIPT, violations=[f"{SCRIPT}@0"])
    logged = tmp_path / "logged.jsonl"
    logged.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["eval", "--trajectories", str(logged), "--out", str(tmp_path / "out")]) == 0
    for name in ("report.md", "report.html"):
        text = (tmp_path / "out" / name).read_text()
        assert "<script" not in text.lower(), name
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, name


# ===================================================================================================
# Further hostile names
# ===================================================================================================


def test_pipes_and_line_breaks_in_a_label_keep_every_table_row_one_row(tasks):
    label = "a | b\nc || d"
    markdown = render_markdown([evaluate(oracle_policy, tasks[:1], label=label)])
    for row in (line for line in markdown.splitlines() if line.startswith("|")):
        assert row.replace("\\|", "").count("|") == 3, row  # | name | value |: 3 unescaped pipes
    assert "a \\| b c \\|\\| d" in markdown


def test_a_markdown_link_in_a_label_is_not_a_link(tasks):
    markdown = render_markdown([evaluate(oracle_policy, tasks[:1], label="[click](javascript:alert(1))")])
    assert "[click](javascript" not in markdown and "\\[click\\](javascript:alert(1))" in markdown


def test_backticks_and_html_entities_in_a_task_id_stay_text(tasks):
    task = dataclasses.replace(tasks[0], id="`rm -rf` &amp; <b>")
    markdown = render_markdown([evaluate(oracle_policy, [task], label="oracle")])
    assert "\\`rm -rf\\` &amp;amp; &lt;b&gt;" in markdown and "<b>" not in markdown


def test_a_label_made_of_html_is_escaped_in_the_page_title_and_tables(tasks):
    page = render_html([evaluate(oracle_policy, tasks[:1], label='"><img src=x onerror=alert(1)>')])
    assert "<img src=x" not in page and "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page


# ===================================================================================================
# Further hostile disks and paths
# ===================================================================================================


def test_a_new_report_replaces_every_part_of_the_old_one(tmp_path, tasks):
    """A report of other policies, without HTML, leaves no trajectories, plots or page of the previous one."""
    out = tmp_path / "report"
    write_report(out, [evaluate(oracle_policy, tasks[:2], label="first"), evaluate(oracle_policy, tasks[:2],
                                                                                   label="second")])
    assert (out / "report.html").exists() and (out / "plots").is_dir()
    (out / "notes.txt").write_text("mine")  # not part of a report: stays
    write_report(out, [evaluate(oracle_policy, tasks[:1], label="third")], html_page=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.json", "report.md", "trajectories"]
    assert [p.name for p in (out / "trajectories").iterdir()] == ["third.jsonl"]


def test_a_plot_that_fails_leaves_the_previous_report_and_no_staging_files(tmp_path, tasks, monkeypatch):
    out = tmp_path / "report"
    write_report(out, [evaluate(oracle_policy, tasks[:2], label="oracle")])
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def broken(*args, **kwargs):
        raise report_module.MissingReportDependency("matplotlib is not installed")

    monkeypatch.setattr(report_module, "make_plots", broken)
    with pytest.raises(report_module.MissingReportDependency):
        write_report(out, [evaluate(oracle_policy, tasks[:1], label="oracle")])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_a_report_directory_that_is_a_file_is_refused(tmp_path, tasks):
    path = tmp_path / "report"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        write_report(path, [evaluate(oracle_policy, tasks[:1], label="oracle")])
    assert path.read_text() == "x"


@pytest.mark.parametrize("argv, flag, expected", [
    (["score", "data/logged/sample_conversations.jsonl", "--out", "{dir}"], "--out", "is a directory; give a file name"),
    (["audit", "--limit", "1", "--k", "1", "--out", "{file}"], "--out", "is a file; give a directory"),
    (["rm", "train", "--limit", "2", "--output-dir", "{file}"], "--output-dir", "is a file; give a directory"),
    (["demo", "--output-dir", "{file}"], "--output-dir", "is a file; give a directory"),
], ids=["score_out_dir", "audit_out_file", "rm_output_file", "demo_output_file"])
def test_output_paths_of_the_wrong_kind_are_refused_before_any_work(tmp_path, capsys, monkeypatch, argv, flag,
                                                                   expected):
    import pipeline.demo
    import rewards.logged
    import rewards.model

    for module, name in ((rewards.logged, "score_conversations"), (rewards.model, "train_reward_model"),
                         (pipeline.demo, "run")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the command started its work"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    argv = [a.format(dir=tmp_path / "dir", file=tmp_path / "file") for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert flag in err and expected in err and "Traceback" not in err


def test_an_audit_report_stays_one_code_block_whatever_its_source_holds(tmp_path):
    """audit.md is a code block; a logged file's name with backticks used to close it and let HTML through."""
    from rewards.audit import AuditReport, CheckResult

    source = "logs/x.jsonl\n```\n" + SCRIPT + "\n````"
    report = AuditReport(reward="default", source=source, n_rollouts=1, success_rate=None,
                         checks=[CheckResult("range", True, "ok")], components=[])
    text = report.save(tmp_path)["markdown"].read_text().splitlines()
    fence = text[0]
    assert set(fence) == {"`"} and len(fence) > 4 and text[-1] == fence
    assert not any(line.startswith(fence) for line in text[1:-1])  # nothing inside closes the block
