"""The module graph of turnwise's packages (pipeline, rewards, sagemaker_entry) and any import circle.

    python benchmarks/import_graph.py            # the graph, then any circle; exit status 1 on a circle
    python benchmarks/import_graph.py --cycles   # only the circles

A circle makes two modules impossible to read, test or move apart, and it turns the order of imports
into behaviour. So every import statement in a module counts, wherever it stands: at top level, inside a
function (a lazy import hides a circle from Python, not from a reader), or under ``if TYPE_CHECKING:``.
An edge goes to the module the statement names: ``import a.b`` and ``from a.b import name`` to ``a.b``,
except that ``from a import b`` goes to ``a.b`` when ``b`` is a module. Relative imports resolve against
the importing module's package. Importing ``a.b`` runs ``a/__init__.py`` first, but that is not counted
as an edge to ``a``: otherwise every package whose ``__init__`` re-exports a submodule would sit in a
circle with it. Only edges between modules of the three packages are kept.

A circle is a strongly connected component of more than one module; for each, its modules are printed,
then its shortest circle with the file and line of every import on it. ``tests/test_import_graph.py`` runs the same
code and fails on any circle.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "rewards", "sagemaker_entry")


@dataclass
class Graph:
    """``edges[module][imported] = line`` of the first statement that imports it; ``files[module]`` is the
    module's source file."""

    files: dict[str, Path] = field(default_factory=dict)
    edges: dict[str, dict[str, int]] = field(default_factory=dict)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules of ``known`` that one import statement names (see the module docstring)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: against the package of ``module``
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target for alias in node.names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in known:  # ``import a.b.attr``-like names: the longest module prefix
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def module_graph(root: Path = ROOT, packages: Sequence[str] = PACKAGES) -> Graph:
    """The import graph of every module under ``root/<package>`` for each of ``packages``."""
    graph = Graph()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            graph.files[module_name(path, root)] = path
    known = set(graph.files)
    for module, path in graph.files.items():
        edges = graph.edges.setdefault(module, {})
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for target in _imported(node, module, path.name == "__init__.py", known):
                if target != module:
                    edges[target] = min(edges.get(target, node.lineno), node.lineno)
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.edges.get(node, {})):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph.edges):
        if node not in index:
            visit(node)
    return sorted(found)


def cycle_path(graph: Graph, component: Sequence[str]) -> list[str]:
    """One circle through a component: a shortest path from its first module back to itself."""
    start, members = component[0], set(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph.edges[node]):
                if succ not in members or succ in parents:
                    continue
                parents[succ] = node
                if succ == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(parents[path[-1]])
                    return path[::-1]
                following.append(succ)
        frontier = following
    raise ValueError(f"{component} is not a circle of the graph")


def describe_cycle(graph: Graph, component: Sequence[str], root: Path = ROOT) -> str:
    """The component's modules, then its shortest circle with the file and line of each import on it."""
    path = cycle_path(graph, component)
    lines = [f"circle among {', '.join(component)}:", "  " + " -> ".join(path)]
    for a, b in zip(path, path[1:]):
        lines.append(f"    {graph.files[a].relative_to(root)}:{graph.edges[a][b]} imports {b}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", action="store_true", help="print only the circles")
    parser.add_argument("--root", type=Path, default=ROOT, help="the directory holding the packages")
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES))
    args = parser.parse_args(argv)
    graph = module_graph(args.root, args.packages)
    if not args.cycles:
        for module in sorted(graph.edges):
            print(f"{module} -> {', '.join(sorted(graph.edges[module])) or '(nothing)'}")
        print()
    found = cycles(graph)
    for component in found:
        print(describe_cycle(graph, component, args.root))
    print(f"{len(graph.files)} modules, {sum(map(len, graph.edges.values()))} imports, {len(found)} circle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
