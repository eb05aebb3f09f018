"""No import circles among turnwise's modules (benchmarks/import_graph.py), and the graph code itself
checked on small packages written here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def _load():
    spec = importlib.util.spec_from_file_location("import_graph", REPO_ROOT / "benchmarks" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


graph_code = _load()


def test_turnwise_has_no_import_circle():
    graph = graph_code.module_graph()
    assert {"pipeline.evaluation", "pipeline.report", "rewards.composite", "sagemaker_entry.train"} <= set(graph.files)
    found = graph_code.cycles(graph)
    assert not found, "import circles:\n" + "\n".join(graph_code.describe_cycle(graph, c) for c in found)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_every_kind_of_import_statement_makes_an_edge(tmp_path):
    """Top level, inside a function, under TYPE_CHECKING, relative, ``from pkg import submodule`` (an edge
    to the submodule) and ``from pkg import name`` (an edge to the package)."""
    root = write(tmp_path, {
        "pkg/__init__.py": "VERSION = 1\n",
        "pkg/a.py": "def f():\n    from pkg import b\n",
        "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import X\n",
        "pkg/c.py": "import pkg.a\nX = 1\n",
        "pkg/d.py": "from pkg import VERSION, a\nimport json\n",
        "pkg/sub/__init__.py": "from . import e\nfrom ..d import VERSION\n",
        "pkg/sub/e.py": "from pkg.sub import e\n",
    })
    graph = graph_code.module_graph(root, ["pkg"])
    assert graph.edges == {
        "pkg": {}, "pkg.a": {"pkg.b": 2}, "pkg.b": {"pkg.c": 3}, "pkg.c": {"pkg.a": 1},
        "pkg.d": {"pkg": 1, "pkg.a": 1}, "pkg.sub": {"pkg.sub.e": 1, "pkg.d": 2}, "pkg.sub.e": {},
    }
    assert graph_code.cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert graph_code.cycle_path(graph, ["pkg.a", "pkg.b", "pkg.c"]) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


def test_the_script_prints_the_circle_and_exits_1(tmp_path, capsys):
    root = write(tmp_path, {"p/__init__.py": "", "p/x.py": "import p.y\n", "p/y.py": "\n\ndef g():\n    import p.x\n"})
    assert graph_code.main(["--root", str(root), "--packages", "p"]) == 1
    out = capsys.readouterr().out
    assert "p.x -> p.y" in out
    assert "circle among p.x, p.y:\n  p.x -> p.y -> p.x\n    p/x.py:1 imports p.y\n    p/y.py:4 imports p.x" in out
    (root / "p" / "y.py").write_text("import json\n")
    assert graph_code.main(["--root", str(root), "--packages", "p", "--cycles"]) == 0
    assert "0 circle(s)" in capsys.readouterr().out


@pytest.mark.parametrize("package", ["pipeline", "rewards", "sagemaker_entry"])
def test_every_module_of_the_package_is_in_the_graph(package):
    graph = graph_code.module_graph()
    on_disk = {graph_code.module_name(p, REPO_ROOT) for p in (REPO_ROOT / package).rglob("*.py")}
    assert on_disk and on_disk <= set(graph.edges)
