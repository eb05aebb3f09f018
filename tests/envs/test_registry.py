"""Tests for pipeline/envs/registry.py: domains as plugins.

The toy library domain below is defined in this file alone (two tools, one intent, a scripted patron and
an oracle) and registered with one call; turnwise's own source knows nothing of it. It then loads tasks,
plays episodes, trains one GRPO step and is evaluated through the same entry points as the shipped
domains.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.chat import format_tool_call, parse_tool_message
from pipeline.envs import (
    Domain,
    Outcome,
    Task,
    TaskFileError,
    ToolEnvironment,
    UnknownDomainError,
    default_domain,
    domains,
    get_domain,
    load_tasks,
    make_env,
    oracle_policy,
    register_domain,
    unregister_domain,
)
from pipeline.envs.base import STOP_RESOLVED, STOP_USER_LEFT, collect_tools, tool
from pipeline.envs.schema import FieldError, require
from pipeline.rollout import run_policy

REPO_ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------------
# A toy domain, written as a third party would write it
# ---------------------------------------------------------------------------------------------------

BOOKS = {"Dune": "B1", "Emma": "B2", "Ulysses": "B3", "Beloved": "B4"}


class LibraryTools:
    def __init__(self, reserved: set[str]) -> None:
        self.reserved = reserved

    @tool()
    def find_book(self, title: str) -> dict[str, Any]:
        """Find a book by its title.

        Args:
            title: The book's title.
        """
        if title not in BOOKS:
            raise ValueError(f"no book titled {title!r}")
        return {"book_id": BOOKS[title], "available": BOOKS[title] not in self.reserved}

    @tool(mutates=True)
    def reserve_book(self, book_id: str) -> dict[str, Any]:
        """Reserve a book for the patron.

        Args:
            book_id: The id find_book returned.
        """
        self.reserved.add(book_id)
        return {"book_id": book_id, "reserved": True}


class LibraryEnv(ToolEnvironment):
    """The patron wants one book reserved, and to be told so; success needs both."""

    def _setup(self, task: Task, seed: int) -> list[dict]:
        self.reserved: set[str] = set()
        self.told = False
        self.patience = 3
        return [{"role": "user", "content": f"Hello, please reserve {task.payload['title']} for me."}]

    def _tools(self):
        return collect_tools(LibraryTools(self.reserved))

    def _system_prompt(self) -> str:
        return "You are a librarian. Tools: find_book(title), reserve_book(book_id)."

    def _on_message(self, text: str):
        done = BOOKS[self.task.payload["title"]] in self.reserved
        if done and "reserved" in text.lower():
            self.told = True
            return [{"role": "user", "content": "Thank you, goodbye."}], STOP_RESOLVED
        self.patience -= 1
        if self.patience <= 0:
            return [{"role": "user", "content": "Never mind."}], STOP_USER_LEFT
        return [{"role": "user", "content": "Is it reserved?"}], None

    def _judge(self, stop_reason):
        done = BOOKS[self.task.payload["title"]] in self.reserved
        return Outcome(success=done and self.told, completed=stop_reason in (STOP_RESOLVED, STOP_USER_LEFT),
                       stop_reason=stop_reason, details={"state_match": done})


class LibraryOracle:
    def __init__(self, task: Task) -> None:
        self.title = task.payload["title"]

    def __call__(self, messages: list[dict]) -> str:
        results = {body["tool"]: body for body in map(parse_tool_message, messages) if body}
        if "find_book" not in results:
            return format_tool_call("find_book", {"title": self.title})
        if "reserve_book" not in results:
            return format_tool_call("reserve_book", {"book_id": results["find_book"]["result"]["book_id"]})
        return f"{self.title} is reserved for you."


def check_library_payload(payload: dict) -> None:
    if require(payload, "title", str, "payload.") not in BOOKS:
        raise FieldError("payload.title", f"{payload['title']!r} is not in the catalogue")


def library_tasks(argument: str | None, split: str | None) -> list[Task]:
    splits = {"Dune": "train", "Emma": "train", "Ulysses": "val", "Beloved": "test"}
    return [Task(id=f"lib-{title}", domain="toy_library", split=s, intents=["reserve"], payload={"title": title})
            for title, s in splits.items() if split is None or s == split]


TOY = Domain(name="toy_library", make_env=lambda source=None, **kw: LibraryEnv(**kw), load_tasks=library_tasks,
             check_payload=check_library_payload, oracle_policy=LibraryOracle)


@pytest.fixture
def toy():
    register_domain(TOY, replace=True)
    yield TOY
    unregister_domain(TOY.name)


# ---------------------------------------------------------------------------------------------------
# The toy domain through turnwise's entry points
# ---------------------------------------------------------------------------------------------------


def test_a_domain_registered_from_a_test_file_plays_through_the_framework(toy, tmp_path):
    tasks = load_tasks("toy_library", "train")
    assert [t.id for t in tasks] == ["lib-Dune", "lib-Emma"]
    trajectory = run_policy(make_env(tasks[0]), tasks[0], oracle_policy(tasks[0]))
    assert trajectory.outcome.success and trajectory.outcome.stop_reason == STOP_RESOLVED
    assert [t.info["kind"] for t in trajectory.turns] == ["tool_calls", "tool_calls", "message"]
    # its task rows round-trip through a task file, checked by the domain's own validator
    rows = [dict(t.to_dict()) for t in tasks]
    (tmp_path / "lib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [t.id for t in load_tasks(str(tmp_path / "lib.jsonl"))] == ["lib-Dune", "lib-Emma"]
    rows[1]["payload"]["title"] = "Nope"
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskFileError, match=r"bad.jsonl, line 2, field 'payload.title': 'Nope' is not in the catalogue"):
        load_tasks(str(tmp_path / "bad.jsonl"))


def test_a_toy_domain_trains_one_grpo_step_and_evaluates(toy, tiny_model_dir, tmp_path):
    from trl import GRPOConfig, ModelConfig

    from pipeline.config import TaskArguments
    from pipeline.evaluation import evaluate
    from pipeline.training import RolloutConfig, train

    task_args = TaskArguments(tasks="toy_library", val_limit=1, foothold_tasks=0)
    rollout_config = RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=4000)  # tiny model: short turns
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_alpha=8,
                             lora_target_modules=["q_proj", "v_proj"])
    grpo_args = GRPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, num_generations=2,
                           max_steps=1, logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                           beta=0.0, learning_rate=1e-2)
    result = train(task_args, rollout_config, grpo_args, model_args)
    assert result["steps"] == 1
    sample = json.loads(next((tmp_path / "run" / "samples").glob("step-*.jsonl")).read_text().splitlines()[0])
    assert sample["task_id"] in {"lib-Dune", "lib-Emma"}
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()

    report = evaluate(oracle_policy, load_tasks("toy_library", "test"))
    assert report.metrics["success"] == 1.0 and report.per_task[0]["task_id"] == "lib-Beloved"
    untrained = evaluate(str(tmp_path / "run" / "adapter"), load_tasks("toy_library", "test"), max_turns=2,
                         max_new_tokens=4)
    assert untrained.metrics["n_episodes"] == 1 and untrained.metrics["success"] == 0.0


def test_the_framework_names_no_domain():
    """The framework files know domains only through the registry (the domain packages name themselves)."""
    framework = [*sorted((REPO_ROOT / "pipeline").glob("*.py")), *sorted((REPO_ROOT / "pipeline" / "cli").rglob("*.py")),
                 *sorted((REPO_ROOT / "rewards").rglob("*.py")),
                 *(REPO_ROOT / "pipeline" / "envs" / name for name in ("__init__.py", "tasks.py", "registry.py",
                                                                       "schema.py", "base.py"))]
    hits = [f"{p.relative_to(REPO_ROOT)}:{i}" for p in framework for i, line in
            enumerate(p.read_text().splitlines(), 1) if "customer_service" in line]
    assert hits == []


# ---------------------------------------------------------------------------------------------------
# The registry itself
# ---------------------------------------------------------------------------------------------------


def test_shipped_domains_are_found_and_one_is_the_default():
    assert {"customer_service", "sop"} <= set(domains())
    assert default_domain().name == "customer_service"
    assert get_domain("sop").default_reward == "sop"
    assert load_tasks(split="test") == load_tasks("customer_service", "test")


def test_unknown_names_fail_with_the_registered_ones_and_a_suggestion():
    with pytest.raises(UnknownDomainError, match="Unknown domain 'nope'. Registered: customer_service, sop"):
        get_domain("nope")
    with pytest.raises(FileNotFoundError, match="No task set 'customer_servce'. Did you mean 'customer_service'?"):
        load_tasks("customer_servce")
    with pytest.raises(ValueError, match="Unknown environment 'customer_servce'"):
        make_env("customer_servce")


def test_a_second_domain_with_a_taken_name_is_refused(toy):
    with pytest.raises(ValueError, match="already registered"):
        register_domain(Domain(name="toy_library", make_env=lambda source=None, **kw: LibraryEnv(**kw)))
    with pytest.raises(ValueError, match="must be an identifier"):
        Domain(name="bad name", make_env=lambda source=None, **kw: None)
    with pytest.raises(TypeError, match="takes a Domain record"):
        register_domain("toy_library")


def test_a_task_row_naming_no_registered_domain_fails_at_load(tmp_path):
    row = {"id": "x1", "domain": "customer_servce", "split": "test", "intents": ["a"], "payload": {}}
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(TaskFileError, match=r"line 1, field 'domain': names no registered domain \('customer_servce'\)"):
        load_tasks(str(tmp_path / "t.jsonl"))


def test_module_attr_spec_imports_a_third_party_domain(tmp_path, monkeypatch):
    (tmp_path / "my_domain_pkg.py").write_text(
        "from pipeline.envs import Domain, Task\n"
        "def tasks(argument, split):\n"
        "    return [Task(id='m1', domain='module_domain', split='test', intents=['x'], payload={})]\n"
        "def make_domain():\n"
        "    return Domain(name='module_domain', make_env=lambda source=None, **kw: None, load_tasks=tasks)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert [t.id for t in load_tasks("my_domain_pkg:make_domain", "test")] == ["m1"]
        assert get_domain("module_domain").name == "module_domain"
        with pytest.raises(UnknownDomainError, match="has no attribute 'missing'"):
            load_tasks("my_domain_pkg:missing")
        with pytest.raises(UnknownDomainError, match="importing it as a module failed"):
            load_tasks("no_such_module_xyz:make")
    finally:
        unregister_domain("module_domain")


def test_an_entry_point_registers_a_domain(tmp_path):
    """A distribution's ``turnwise.domains`` entry point is found without any import by the user."""
    site = tmp_path / "site"
    (site / "ep_domain_pkg").mkdir(parents=True)
    (site / "ep_domain_pkg" / "__init__.py").write_text(
        "from pipeline.envs import Domain\nDOMAIN = Domain(name='ep_domain', make_env=lambda source=None, **kw: None)\n")
    dist = site / "ep_domain_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-domain-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[turnwise.domains]\nep_domain = ep_domain_pkg:DOMAIN\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pipeline.envs import domains; "
            "print(sorted(domains()))")
    out = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, check=True).stdout
    assert "ep_domain" in out and "customer_service" in out


def test_shipped_names_win_over_folders_of_the_same_name(tmp_path, monkeypatch):
    """A ./customer_service, ./sop or ./default folder in the working directory never shadows a shipped name;
    ./NAME still reaches the folder."""
    for name in ("customer_service", "sop", "default"):
        (tmp_path / name).mkdir()
    (tmp_path / "customer_service" / "test.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    assert len(load_tasks("customer_service", "test")) == 122
    assert len(load_tasks("sop:data/sop/warranty_claims", "test")) > 0
    from rewards import build_reward

    assert build_reward("sop").config.name == "sop" and build_reward("default").config.name == "default"
    with pytest.raises(TaskFileError, match="holds no tasks"):  # the explicit path is the folder
        load_tasks("./customer_service", "test")
