"""The package's layout rules, read from its source text with `ast` (nothing of it is imported).

Every ``.py`` file under ``nni_fedexit/`` is a module; every import in it counts, the ones inside
functions too (absolute ``nni_fedexit.x`` ones and relative ones, ``importlib.import_module`` with
a literal name as well). The rules:

(a) no import cycle among the package's modules (imports under ``if TYPE_CHECKING:`` never run,
    so they are left out of this graph only);
(b) no name with a single leading underscore imported from another package module
    (``from nni_fedexit.x import _y``, ``from nni_fedexit.x import _module``);
(c) ``click`` only in ``nni_fedexit/job/cli.py``, and no package module imports that one;
(d) ``flwr`` only under ``nni_fedexit/federated/backends/flower/``;
(e) the maths modules (reward, controller, aggregators, objectives) import neither NNI's
    experiment machinery (``nni.nas.experiment``) nor ``flwr`` nor ``click``.

Import graph of ``from M import n``: an edge to the module ``M.n`` where that is a package module
(``from nni_fedexit.federated import settings``), else to ``M`` (a name ``M`` defines or re-exports).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "nni_fedexit"
PACKAGE_DIR = ROOT / PACKAGE

CLI = "nni_fedexit.job.cli"
FLOWER = "nni_fedexit.federated.backends.flower"
MATHS = ["nni_fedexit/search/reward.py", "nni_fedexit/search/controller.py",
         "nni_fedexit/federated/aggregators/*.py", "nni_fedexit/federated/objectives/*.py"]
NOT_IN_MATHS = ["nni.nas.experiment", "flwr", "click"]


@dataclasses.dataclass(frozen=True)
class Import:
    """One imported module (and, for ``from M import a, b``, the names taken from it)."""

    importer: str  # the module whose source holds the import statement
    path: str  # that module's file, relative to the repository
    line: int
    module: str  # absolute name of the module imported from
    names: tuple[str, ...] = ()  # ``from module import names``; empty for ``import module``
    type_checking: bool = False  # under ``if TYPE_CHECKING:``: never runs

    def where(self) -> str:
        what = f"from {self.module} import {', '.join(self.names)}" if self.names else f"import {self.module}"
        return f"{self.path}:{self.line} ({self.importer}: {what})"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def within(module: str, prefix: str) -> bool:
    """``module`` is ``prefix`` or one of its submodules."""
    return module == prefix or module.startswith(prefix + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module of ``from <level dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(source: str, importer: str, path: str, is_package: bool) -> list[Import]:
    """Every import of one module's source, in functions and under conditions too."""
    tree = ast.parse(source, filename=path)
    found: list[Import] = []

    def visit(node: ast.AST, type_checking: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_checking)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(importer, path, node.lineno, alias.name, (), type_checking))
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(importer, is_package, node.level, node.module)
            found.append(Import(importer, path, node.lineno, module, tuple(a.name for a in node.names), type_checking))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append(Import(importer, path, node.lineno, node.args[0].value, (), type_checking))
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking)

    visit(tree, False)
    return found


def package_imports(package_dir: Path = PACKAGE_DIR, root: Path = ROOT) -> dict[str, list[Import]]:
    """Module name -> its imports, for every .py file of the package."""
    modules: dict[str, list[Import]] = {}
    unreadable = []
    for file in sorted(package_dir.rglob("*.py")):
        name, rel = module_name(file, root), file.relative_to(root).as_posix()
        try:
            modules[name] = imports_of(file.read_text(encoding="utf-8"), name, rel, file.name == "__init__.py")
        except (SyntaxError, UnicodeDecodeError) as exc:
            unreadable.append(f"{rel}: {exc}")
    assert not unreadable, "package modules that do not parse:\n" + "\n".join(unreadable)
    return modules


def targets(imp: Import, modules: Iterable[str]) -> list[str]:
    """The package modules one import statement names (see the module docstring)."""
    known = set(modules)
    if imp.names:
        subs = [f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in known]
        plain = [n for n in imp.names if f"{imp.module}.{n}" not in known]
        return subs + ([imp.module] if plain and imp.module in known else [])
    # ``import a.b.c``: the deepest package module of that dotted name
    parts = imp.module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return [".".join(parts[:end])]
    return []


def import_graph(modules: Mapping[str, list[Import]]) -> dict[str, dict[str, Import]]:
    """importer -> {imported package module: the first statement that imports it} (run-time imports only)."""
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for importer, imps in modules.items():
        for imp in imps:
            if imp.type_checking:
                continue
            for target in targets(imp, modules):
                if target != importer:
                    graph[importer].setdefault(target, imp)
    return graph


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
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# ---- the checker itself ------------------------------------------------------------------------


def test_find_cycles_finds_a_hand_made_cycle_and_nothing_in_a_tree():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}, "f": {"f"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["f", "f"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}) == []
    # two separate cycles, one of them reached only through the other's members
    assert find_cycles({"x": ["y"], "y": ["x", "p"], "p": ["q"], "q": ["p"]}) == [["p", "q", "p"], ["x", "y", "x"]]


def test_relative_imports_and_imports_in_functions_are_resolved(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .sub import thing\n")
    (pkg / "sub" / "__init__.py").write_text("from . import mod\nthing = 1\n")
    (pkg / "sub" / "mod.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import late\n"
        "def f():\n    from .. import _private\n    import importlib\n    importlib.import_module('pkg.sub')\n")
    (pkg / "late.py").write_text("import pkg.sub.mod\n")
    modules = package_imports(pkg, tmp_path)
    assert {(i.module, i.names) for i in modules["pkg.sub.mod"]} == {
        ("typing", ("TYPE_CHECKING",)), ("pkg", ("late",)), ("pkg", ("_private",)), ("importlib", ()), ("pkg.sub", ())}
    graph = import_graph(modules)
    assert {m: set(out) for m, out in graph.items()} == {
        "pkg": {"pkg.sub"}, "pkg.sub": {"pkg.sub.mod"}, "pkg.sub.mod": {"pkg", "pkg.sub"}, "pkg.late": {"pkg.sub.mod"}}
    # the TYPE_CHECKING import of pkg.late is left out: no cycle through it
    assert find_cycles(graph) == [["pkg", "pkg.sub", "pkg.sub.mod", "pkg"]]


# ---- the package -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict[str, list[Import]]:
    found = package_imports()
    assert len(found) > 10, f"only {sorted(found)} found under {PACKAGE_DIR}"
    return found


def test_no_import_cycle_among_package_modules(modules):
    graph = import_graph(modules)
    cycles = find_cycles(graph)
    lines = []
    for cycle in cycles:
        lines.append("import cycle: " + " -> ".join(cycle))
        lines.extend(f"    {graph[a][b].where()}" for a, b in zip(cycle, cycle[1:]))
    assert not cycles, f"{len(cycles)} import cycle(s) among the package's modules:\n" + "\n".join(lines)


def test_no_private_name_is_imported_from_another_package_module(modules):
    found = []
    for imps in modules.values():
        for imp in imps:
            if not within(imp.module, PACKAGE):
                continue
            # a name, or a submodule (`from nni_fedexit.x import _module`), of another module
            private = [n for n in imp.names if _private(n) and imp.importer not in (imp.module, f"{imp.module}.{n}")]
            if imp.module != imp.importer:  # import nni_fedexit.x._module, from nni_fedexit.x._module import y
                private += [p for p in imp.module.split(".") if _private(p)]
            if private:
                found.append(f"{imp.where()} takes the private {', '.join(private)} of {imp.module}")
    assert not found, "private names imported from other package modules:\n" + "\n".join(found)


def test_click_only_in_the_cli_and_nothing_imports_the_cli(modules):
    found = []
    for imps in modules.values():
        for imp in imps:
            if within(imp.module, "click") and imp.importer != CLI:
                found.append(f"{imp.where()} imports click (only {CLI} may)")
            if CLI in targets(imp, modules) and imp.importer != CLI:
                found.append(f"{imp.where()} imports {CLI}")
    assert not found, "click outside the command line:\n" + "\n".join(found)


def test_flwr_only_in_the_flower_backend(modules):
    found = [f"{imp.where()} imports flwr outside {FLOWER}"
             for imps in modules.values() for imp in imps
             if within(imp.module, "flwr") and not within(imp.importer, FLOWER)]
    assert not found, "flwr outside nni_fedexit/federated/backends/flower/:\n" + "\n".join(found)


def test_maths_modules_import_no_experiment_machinery_flower_or_click(modules):
    maths = sorted({module_name(f) for pattern in MATHS for f in ROOT.glob(pattern)})
    assert {"nni_fedexit.search.reward", "nni_fedexit.search.controller"} <= set(maths), maths
    found = []
    for name in maths:
        for imp in modules[name]:
            named = [imp.module] + [f"{imp.module}.{n}" for n in imp.names]
            bad = sorted({b for b in NOT_IN_MATHS for n in named if within(n, b)})
            if bad:
                found.append(f"{imp.where()} brings {', '.join(bad)} into a maths module")
    assert not found, "maths modules importing experiment machinery, flwr or click:\n" + "\n".join(found)
