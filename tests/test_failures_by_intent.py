"""benchmarks/failures_by_intent.py: policies side by side, intent by intent, rebuilt from their saved report.json
episode records alone (no trajectories, nothing played again)."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.envs import load_tasks, oracle_policy
from pipeline.envs.tasks import spread_over_intents
from pipeline.evaluation import evaluate
from pipeline.report import write_report


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("failures_by_intent")


def silent(task):
    return lambda messages: "Thanks for waiting, I am looking into it."


@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory):
    """`turnwise eval --out` directories of the oracle and of a policy that never calls a tool, on one held-out
    task per intent label; their trajectories are deleted, as the committed reports have none."""
    root = tmp_path_factory.mktemp("evals")
    tasks = spread_over_intents(load_tasks("customer_service/all_intents_holdout", "test"), 9)
    dirs = {}
    for name, policy in (("oracle", oracle_policy), ("silent", silent)):
        dirs[name] = root / name
        write_report(dirs[name], [evaluate(policy, tasks, max_turns=16, label=name)], html_page=False)
        shutil.rmtree(dirs[name] / "trajectories")
    return dirs


def _section(text: str, title: str) -> dict[str, list[str]]:
    lines = text.split(f"## {title}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines)}


def test_side_by_side_by_intent_from_report_json_alone(script, eval_dirs, tmp_path) -> None:
    out = script.main([f"mute={eval_dirs['silent']}", f"expert={eval_dirs['oracle'] / 'report.json'}",
                       "--out", str(tmp_path / "by_intent.md")])
    text = out.read_text()
    assert text.startswith("# Evaluation: mute vs expert")
    saved = json.loads((eval_dirs["oracle"] / "report.json").read_text())["policies"][0]
    by_intent = saved["metrics"]["by_intent"]
    assert len(by_intent) == 9
    assert _section(text, "Success by intent") == {name: ["0.000 (n=1)", "1.000 (n=1)"] for name in by_intent}
    tools = _section(text, "Tool calls that ran, by intent (count)")
    for name, (mute, expert) in tools.items():
        assert mute == "none"
        assert {item.rsplit(" ", 1)[0] for item in expert.split(", ")} == set(by_intent[name]["tool_calls"])
    assert "escalate_to_human 1" in tools["escalation"][1] and "update_shipping_address 1" in tools["address_change"][1]
    assert all(cells[1] == "resolved 1" for cells in _section(text, "Stop reasons by intent (count)").values())


def test_reports_that_cannot_be_compared_are_refused_by_name(script, eval_dirs, tmp_path, capsys) -> None:
    two = tmp_path / "two"
    two.mkdir()
    saved = json.loads((eval_dirs["oracle"] / "report.json").read_text())
    (two / "report.json").write_text(json.dumps({"policies": saved["policies"] * 2}))
    with pytest.raises(SystemExit, match=r"two/report.json holds 2 policies"):
        script.main([f"a={two}", "--out", str(tmp_path / "x.md")])
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"policies": [{"config": {}, "metrics": {}}]}))
    with pytest.raises(SystemExit, match=r"bare.json: no 'episodes' list"):
        script.main([f"a={bare}", "--out", str(tmp_path / "x.md")])
    fewer = tmp_path / "fewer.json"
    one = saved["policies"][0]
    fewer.write_text(json.dumps({"policies": [{**one, "episodes": one["episodes"][1:]}]}))
    with pytest.raises(SystemExit):
        script.main([f"a={eval_dirs['oracle']}", f"b={fewer}", "--out", str(tmp_path / "x.md")])
    assert "the reports cover different tasks" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()
