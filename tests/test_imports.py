"""No import circle among terdit-edge's modules, and the front-ends stay above the library.

Every ``import`` statement of every module counts, those inside functions too (a lazy import in a
circle still couples the two modules both ways; issue 26 found cli.py <-> scale/commands.py that way).
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import terdit_edge

PACKAGE = Path(terdit_edge.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("terdit_edge", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from .a import b`` names a.b when b is a module)."""
    # os.walk with followlinks: in a checkout terdit_edge/converters is a link to ../converters
    files = [Path(d) / f for d, _, names in os.walk(PACKAGE, followlinks=True) for f in names if f.endswith(".py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import terdit_edge.kernels.cpu` of a package's attribute
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "terdit_edge.frontends.cli" in graph and "terdit_edge.settings" in graph
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle_through_a_lazy_import():
    """The detector itself: the circle issue 26 removed (a function-level import back into the CLI)."""
    graph = import_graph()
    graph["terdit_edge.frontends.sample_commands"].add("terdit_edge.frontends.cli")
    assert ["terdit_edge.frontends.cli", "terdit_edge.frontends.sample_commands"] in cycles(graph)


def test_the_library_never_imports_a_front_end():
    graph = import_graph()
    library = [m for m in graph if not m.startswith("terdit_edge.frontends")]
    wrong = {m: sorted(t for t in graph[m] if t.startswith("terdit_edge.frontends")) for m in library}
    assert {m: t for m, t in wrong.items() if t} == {}
