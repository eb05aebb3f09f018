"""Hostile reward configs and policy paths (rewards/composite.py, pipeline/plugins.py, pipeline/cli/).

A reward YAML or a ``--policy MODULE:FUNCTION`` flag names Python objects by import path. The promise
under test: a path runs nothing unless its target is declared (``@rewards.declare_scorer``,
``@pipeline.plugins.declare_policy_factory``); the only code a path can run before that check is the
named module's own import; every entry is checked before any scorer is instantiated; and a YAML file
cannot expand, nest or tag its way into a hang or an object.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from rewards import RewardConfigError, build_reward


@pytest.fixture
def module(tmp_path, monkeypatch):
    """Write an importable module into tmp_path; it is forgotten after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# -- issue 21, finding 4: a reward YAML can run any callable ----------------------------------------
def test_subprocess_popen_in_a_reward_yaml_runs_nothing(tmp_path):
    """``scorer: subprocess:Popen`` used to run the command, and only then was the config rejected."""
    proof = tmp_path / "popen-ran"
    config = write_yaml(tmp_path / "evil.yaml", f"""
        scorers:
          - {{scorer: "subprocess:Popen", params: {{args: [touch, "{proof}"]}}}}
        """)
    with pytest.raises(RewardConfigError, match=r"'subprocess:Popen' is not a declared scorer, so turnwise will "
                                                r"not call it\. If it is yours, decorate it with @rewards.declare_scorer"):
        build_reward(config)
    time.sleep(0.2)  # a spawned touch would have finished by now
    assert not proof.exists()


def test_turnwise_score_with_a_popen_reward_runs_nothing(tmp_path, capsys):
    proof = tmp_path / "score-popen-ran"
    config = write_yaml(tmp_path / "evil.yaml", f"""
        scorers:
          - {{scorer: "subprocess:Popen", params: {{args: [touch, "{proof}"]}}}}
        """)
    sample = Path(__file__).resolve().parents[2] / "data" / "logged" / "sample_conversations.jsonl"
    assert main(["score", str(sample), "--reward", str(config)]) == 1
    time.sleep(0.2)
    assert not proof.exists() and "is not a declared scorer" in capsys.readouterr().err


def test_policy_os_system_is_refused_before_anything_runs(capsys):
    """``--policy os:system`` used to call os.system with each task."""
    assert main(["eval", "--policy", "os:system", "--tasks", "val", "--limit", "1"]) == 1
    err = capsys.readouterr().err
    assert "cannot load the scripted policy: 'os:system' is not a declared policy factory" in err
    assert "@pipeline.plugins.declare_policy_factory" in err


def test_an_undeclared_policy_factory_is_never_called(module, tmp_path, capsys):
    proof = tmp_path / "factory-ran"
    name = module("sneaky_policies", f"""
        import pathlib

        def factory(task):
            pathlib.Path({str(proof)!r}).write_text("ran")
            return lambda messages: "hello"
        """)
    assert main(["eval", "--policy", f"{name}:factory", "--tasks", "val", "--limit", "1"]) == 1
    assert not proof.exists() and "is not a declared policy factory" in capsys.readouterr().err


def test_no_scorer_is_instantiated_before_every_entry_is_checked(monkeypatch):
    """A valid class entry before a hostile one: the class is not instantiated either."""
    import rewards.rules as rules

    made = []
    original = rules.ResponseLength.__init__

    def recording(self, *args, **kwargs):
        made.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(rules.ResponseLength, "__init__", recording)
    config = {"scorers": [{"scorer": "response_length", "params": {"max_chars": 600}},
                          {"scorer": "builtins:exec", "params": {}}]}
    with pytest.raises(RewardConfigError, match="'builtins:exec' is not a declared scorer"):
        build_reward(config)
    assert made == []
    build_reward({"scorers": config["scorers"][:1]})  # the valid entry alone builds, calling the class once
    assert made == [{"max_chars": 600}]


# -- declarations ------------------------------------------------------------------------------------
def test_a_declared_scorer_works_end_to_end(module, tmp_path):
    """How a user writes their own scorer now: decorate it, name it by path."""
    from pipeline.envs.base import Outcome
    from rewards.logged import from_chat

    name = module("my_scorers", """
        from rewards import declare_scorer

        @declare_scorer
        def says_thanks(trajectory, index):
            return 1.0 if "thank" in trajectory.turns[index].assistant.lower() else 0.0

        @declare_scorer
        class Bonus:
            name = "bonus"

            def __init__(self, amount: float = 0.5):
                self.amount = amount

            def __call__(self, trajectory):
                return self.amount if trajectory.outcome.success else 0.0
        """)
    config = write_yaml(tmp_path / "mine.yaml", f"""
        scorers:
          - {{scorer: "{name}:says_thanks", weight: 0.5}}
          - {{scorer: "{name}:Bonus", weight: 1.0, params: {{amount: 0.25}}}}
        """)
    reward = build_reward(config)
    trajectory = from_chat([{"role": "assistant", "content": "Thanks for waiting!"}],
                           outcome=Outcome(True, True, "resolved"))
    breakdown = reward(trajectory)
    assert breakdown.components == {"says_thanks": [1.0], "bonus": 0.25} and breakdown.total == 0.75


@pytest.mark.parametrize("spec, says", [
    ("unittest.mock:sentinel", "is not a declared scorer"),  # answers every attribute name, even the marker's
    ("unittest.mock:MagicMock", "is not a declared scorer"),
    ("builtins:eval", "is not a declared scorer"),
    ("os:system", "is not a declared scorer"),
    ("os.path:join.__call__", "is not an import path"),
    ("../evil:f", "is not an import path"),
    (".relative:f", "is not an import path"),
    ("a:b:c", "is not an import path"),
    ("os:", "is not an import path"),
    (":system", "is not an import path"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
])
def test_hostile_scorer_paths_are_refused(spec, says):
    with pytest.raises(RewardConfigError, match=says):
        build_reward({"scorers": [{"scorer": spec}]})


def test_a_policy_factory_is_not_a_scorer(module):
    name = module("policies_only", """
        from pipeline.plugins import declare_policy_factory

        @declare_policy_factory
        def factory(task):
            return lambda messages: ""
        """)
    with pytest.raises(RewardConfigError, match=r"is not a declared scorer \(it is declared as a policy factory\)"):
        build_reward({"scorers": [{"scorer": f"{name}:factory"}]})


def test_a_module_getattr_is_not_asked_for_a_scorer(module, tmp_path):
    """A module-level ``__getattr__`` could make up any name (and run code doing it); it is not consulted."""
    proof = tmp_path / "getattr-ran"
    name = module("lazy_module", f"""
        import pathlib

        def __getattr__(name):
            pathlib.Path({str(proof)!r}).write_text(name)
            raise AttributeError(name)
        """)
    with pytest.raises(RewardConfigError, match="has no attribute 'anything'"):
        build_reward({"scorers": [{"scorer": f"{name}:anything"}]})
    assert not proof.exists()


# -- hostile YAML ----------------------------------------------------------------------------------
def test_a_python_object_tag_builds_nothing(tmp_path):
    proof = tmp_path / "tag-ran"
    config = write_yaml(tmp_path / "tag.yaml", f"""
        scorers:
          - !!python/object/apply:os.system ["touch {proof}"]
        """)
    with pytest.raises(RewardConfigError, match="not valid YAML .* no tags such as !!python/object"):
        build_reward(config)
    assert not proof.exists()


def test_a_billion_laughs_config_is_refused_at_once(tmp_path):
    """Nine lines of anchors name 4.8 million values; the error used to print them all (bad params ...)."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 7)]
    config = write_yaml(tmp_path / "laughs.yaml", "scorers:\n  - scorer: response_length\n    params:\n" +
                        "".join(f"      {line}\n" for line in lines))
    started = time.perf_counter()
    with pytest.raises(RewardConfigError, match="expands to more than 10,000 values"):
        build_reward(config)
    assert time.perf_counter() - started < 2


def test_an_anchor_that_contains_itself_is_refused(tmp_path):
    config = write_yaml(tmp_path / "loop.yaml", "scorers: &loop [*loop]\n")
    with pytest.raises(RewardConfigError, match="expands to more than"):
        build_reward(config)


def test_yaml_nested_too_deeply_is_refused(tmp_path):
    config = write_yaml(tmp_path / "deep.yaml", "scorers: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(RewardConfigError, match="nested too deeply|expands to more than"):
        build_reward(config)


def test_a_config_over_the_size_cap_is_not_read(tmp_path):
    config = tmp_path / "huge.yaml"
    config.write_text("scorers: [{scorer: tool_format}]\n" + "# padding\n" * 200_000)
    with pytest.raises(RewardConfigError, match=r"2,000,\d+ bytes; a reward config is at most 1,048,576"):
        build_reward(config)


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("scorers: [{scorer: tool_format, name: caf\xe9}]\n".encode("latin-1"))
    with pytest.raises(RewardConfigError, match=rf"{config}: not UTF-8 text \(byte 0xe9"):
        build_reward(config)


@pytest.mark.parametrize("entry, says", [
    ({"scorer": "tool_format", "weight": True}, "weight True is not a number"),
    ({"scorer": "tool_format", "weight": float("inf")}, "weight must be finite"),
    ({"scorer": "tool_format", "weight": "1e999"}, "weight must be finite"),
    ({"scorer": "tool_format", "name": ["a"]}, "'name' must be a string"),
    ({"scorer": "response_length", "params": ["max_chars", 5]}, "params must be a mapping"),
    ({"scorer": "response_length", "params": {"max chars": 5}}, "params keys are keyword-argument names"),
    ({"scorer": "response_length", "params": {1: 5}}, "params keys are keyword-argument names"),
    ({"scorer": ["tool_format"]}, "'scorer' must be a scorer name"),
    ({"scorer": "tool_format", "x" * 10_000: 1}, r"unknown key\(s\)"),
])
def test_hostile_entries_are_refused_with_a_short_message(entry, says):
    with pytest.raises(RewardConfigError, match=says) as error:
        build_reward({"scorers": [entry]})
    assert len(str(error.value)) < 600


@pytest.mark.parametrize("config, says", [
    ({"scorers": [{"scorer": "tool_format"}], "range": [True, 2]}, "range must be two numbers"),
    ({"scorers": [{"scorer": "tool_format"}], "range": "ab"}, "range must be two numbers"),
    ({"scorers": [{"scorer": "tool_format"}], "name": {"a": 1}}, "name must be a string"),
    ({"scorers": [{"scorer": "tool_format"}], 3: "x"}, r"unknown reward config key\(s\) \['3'\]"),
])
def test_hostile_top_level_fields_are_refused(config, says):
    with pytest.raises(RewardConfigError, match=says):
        build_reward(config)
