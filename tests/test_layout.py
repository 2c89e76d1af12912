"""The package's layout rules.

The layers and the import bans are import-linter contracts (``[tool.importlinter]`` in
pyproject.toml; ``lint-imports`` prints them): the job on top, then the NNI layer, then the stages
(federated, search), exits and training, space and data, the building blocks; the maths modules
import neither NNI nor Lightning nor Flower nor click; ``click`` only in ``nni_fedexit/job/cli.py``
and nothing imports the CLI; ``flwr`` only under ``nni_fedexit/federated/backends/flower/``.

Two rules import-linter does not state are checked here, on grimp's import graph (import-linter's
own; imports inside functions count, and so do imports under ``if TYPE_CHECKING:``: they never run,
but two modules that name each other are still one knot for a reader):
(a) no import cycle among the package's modules; (b) no name with a single leading underscore
imported from another package module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "nni_fedexit"
PACKAGE_DIR = ROOT / PACKAGE
#: the contracts of pyproject.toml, by id
CONTRACTS = ("layers", "maths", "cli", "flwr")


def test_import_linter_contracts_are_kept():
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in out.stdout, out.stdout[-3000:]


def test_every_contract_is_configured():
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert tuple(c["id"] for c in contracts) == CONTRACTS


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components: every group of nodes that reach each other (a cycle),
    as one cycle path through the group (first node repeated at the end); a node with an edge to
    itself is a cycle too. Sorted, so the report is stable."""
    edges = {node: sorted(set(out)) for node, out in graph.items()}
    for out in list(edges.values()):
        for node in out:
            edges.setdefault(node, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in edges[node]:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return sorted(_cycle_through(c, edges) for c in components)


def _cycle_through(component: list[str], edges: Mapping[str, list[str]]) -> list[str]:
    """A shortest cycle from the component's first node back to it (breadth first)."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in edges[node]:
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return path[::-1] + [start]
                if nxt in members and nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{component} is not a cycle")  # pragma: no cover - Tarjan gave a component


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_find_cycles_finds_a_hand_made_cycle_and_nothing_in_a_tree():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}, "f": {"f"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["f", "f"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}) == []
    # two separate cycles, one of them reached only through the other's members
    assert find_cycles({"x": ["y"], "y": ["x", "p"], "p": ["q"], "q": ["p"]}) == [["p", "q", "p"], ["x", "y", "x"]]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    found = grimp.build_graph(PACKAGE, cache_dir=None, exclude_type_checking_imports=False)
    assert len(found.modules) > 10, f"only {sorted(found.modules)} found"
    return found


def test_no_import_cycle_among_package_modules(graph):
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    cycles = find_cycles(edges)
    lines = []
    for cycle in cycles:
        lines.append("import cycle: " + " -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            lines.extend(f"    {a}:{d['line_number']} {d['line_contents']}" for d in graph.get_import_details(importer=a, imported=b))
    assert not cycles, f"{len(cycles)} import cycle(s) among the package's modules:\n" + "\n".join(lines)


def test_no_private_name_is_imported_from_another_package_module():
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        importer = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
                names = [a.name for a in node.names if _private(a.name) and importer not in (node.module, f"{node.module}.{a.name}")]
                names += [p for p in node.module.split(".") if _private(p)] if node.module != importer else []
            elif isinstance(node, ast.Import):
                names = [p for a in node.names if a.name.split(".")[0] == PACKAGE for p in a.name.split(".") if _private(p)]
            else:
                continue
            if names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} takes the private {', '.join(names)}")
    assert not found, "private names imported from other package modules:\n" + "\n".join(found)
