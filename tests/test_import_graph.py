"""The import graph of `node/` and `coordinator/`, read from the source: no circles, and one direction.

Every import statement counts, wherever it stands: at module level, inside a function (a lazy
import) or under `if TYPE_CHECKING:`. Python tolerates a circle hidden by either, but the modules
of a circle can only be read, tested and changed together, which is what the split was for.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "coordinator")


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str  # module that imports
    target: str  # module imported
    line: int
    hidden: str = ""  # "lazy" (inside a function) or "TYPE_CHECKING"

    def where(self) -> str:
        return f"{module_path(self.source)}:{self.line}" + (f" ({self.hidden})" if self.hidden else "")


def module_path(module: str) -> str:
    path = ROOT / Path(*module.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT))


def modules() -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """The modules of `known` that one import statement in `module` loads by name."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in known:
                yield alias.name
        return
    if node.level:  # relative: from the module's own package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        origin = ".".join([*base, node.module] if node.module else base)
    else:
        origin = node.module or ""
    for alias in node.names:
        # `from node.api import manifests` loads node.api.manifests; `from node.gc import collect` loads node.gc.
        candidate = f"{origin}.{alias.name}"
        if candidate in known:
            yield candidate
        elif origin in known:
            yield origin


def import_edges() -> list[Edge]:
    found = modules()
    known = set(found)
    edges = []
    for module, path in found.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, hidden in _statements(tree, ""):
            for target in imported(node, module, path.name == "__init__.py", known):
                if target != module:
                    edges.append(Edge(module, target, node.lineno, hidden))
    return edges


def _statements(tree: ast.AST, hidden: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement under `tree`, with how it is hidden from a reader of the module's head."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, hidden
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _statements(child, hidden or "lazy")
        elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for branch in child.body:
                yield from _statements(ast.Module(body=[branch], type_ignores=[]), hidden or "TYPE_CHECKING")
            for branch in child.orelse:
                yield from _statements(ast.Module(body=[branch], type_ignores=[]), hidden)
        else:
            yield from _statements(child, hidden)


def tangles(edges: list[Edge]) -> list[list[str]]:
    """Every group of two or more modules that reach each other through imports (Tarjan), sorted."""
    graph: dict[str, list[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge.target)
        graph.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for target in graph[name]:
            if target not in index:
                connect(target)
                low[name] = min(low[name], low[target])
            elif target in on_stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == name:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            connect(name)
    return sorted(groups)


def circle_through(start: str, members: list[str], edges: list[Edge]) -> list[Edge]:
    """The shortest way from `start` back to itself through `members` (breadth first), as its imports."""
    inside = set(members)
    came: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for name in frontier:
            for edge in sorted((e for e in edges if e.source == name), key=lambda e: (e.target, e.line)):
                if edge.target not in inside or edge.target in came:
                    continue
                came[edge.target] = edge
                if edge.target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came[path[0].source])
                    return path
                following.append(edge.target)
        frontier = following
    raise AssertionError(f"no circle through {start} in {members}")


def describe(members: list[str], edges: list[Edge]) -> str:
    """The modules of one tangle, and the shortest circle through each of them (each circle once)."""
    lines = [f"  {len(members)} modules: " + ", ".join(module_path(m) for m in members)]
    seen: set[frozenset[tuple[str, str]]] = set()
    for member in members:
        circle = circle_through(member, members, edges)
        key = frozenset((e.source, e.target) for e in circle)
        if key in seen:
            continue
        seen.add(key)
        lines.append("    circle: " + " -> ".join(f"{e.where()}" for e in circle) + f" -> {module_path(member)}")
    return "\n".join(lines)


def test_node_and_coordinator_have_no_import_circle() -> None:
    edges = import_edges()
    found = tangles(edges)
    assert not found, "modules that import each other, lazy and TYPE_CHECKING imports included:\n" + "\n".join(
        describe(members, edges) for members in found
    )


def test_coordinator_never_imports_node() -> None:
    upward = [
        edge for edge in import_edges() if edge.source.startswith("coordinator") and edge.target.startswith("node")
    ]
    assert not upward, "coordinator/ imports node/:\n" + "\n".join(f"  {e.where()} imports {e.target}" for e in upward)


def test_the_circle_finder_sees_lazy_and_type_checking_imports() -> None:
    """The finder itself: a circle of three with a tail that is not part of it; imports however hidden."""
    edges = [Edge("a", "b", 1), Edge("b", "c", 2), Edge("c", "a", 3), Edge("c", "d", 4), Edge("d", "e", 5)]
    assert tangles(edges) == [["a", "b", "c"]]
    assert [(e.source, e.target) for e in circle_through("b", ["a", "b", "c"], edges)] == [
        ("b", "c"),
        ("c", "a"),
        ("a", "b"),
    ]
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from node import gc\n"
        "class Job:\n    def run(self):\n        from .api import tags\n"
    )
    known = {"node", "node.gc", "node.api", "node.api.tags"}
    loaded = [
        (list(imported(statement, "node.config", False, known)), hidden)
        for statement, hidden in _statements(ast.parse(source), "")
    ]
    assert loaded == [([], ""), (["node.gc"], "TYPE_CHECKING"), (["node.api.tags"], "lazy")]
