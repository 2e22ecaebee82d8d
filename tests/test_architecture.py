"""The import graph, read from the source: layers point one way and nothing imports in a circle.

    transports (server.api, server.cli) -> tools -> the core (the rest of server) -> training_core, sandbox

Every import counts, those inside functions too: a cycle held together by a deferred import is still
a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "tools", "training_core", "sandbox")
TRANSPORTS = ("server.api", "server.cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _layer(module: str) -> str:
    if module.startswith(TRANSPORTS):
        return "transport"
    return {"server": "core", "tools": "tools", "training_core": "training_core", "sandbox": "sandbox"}[
        module.split(".")[0]]


ALLOWED = {
    "transport": {"transport", "tools", "core", "training_core"},
    "tools": {"tools", "core", "training_core"},
    "core": {"core", "training_core", "sandbox"},
    "training_core": {"training_core"},
    "sandbox": {"sandbox"},
}


def test_imports_point_from_the_transports_to_the_tools_to_the_core_to_training_core() -> None:
    wrong = [f"{source} imports {target}" for source, targets in _graph().items() for target in targets
             if _layer(target) not in ALLOWED[_layer(source)]]
    assert not wrong, "imports against the direction of the layers:\n" + "\n".join(sorted(wrong))


def test_no_module_imports_itself_through_others() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_core_packages_depend_on_each_other_without_a_circle() -> None:
    """store <- admission <- evaluation <- tuning <- workers, and so on: folders a newcomer can read in order."""
    packages: dict[str, set[str]] = {}
    for source, targets in _graph().items():
        if _layer(source) != "core":
            continue
        for target in targets:
            if _layer(target) == "core" and _package(target) != _package(source):
                packages.setdefault(_package(source), set()).add(_package(target))
    cycles = _cycles(packages)
    assert not cycles, "core packages that import each other:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (ROOT / Path(*parts)).is_dir() else module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one node, as one cycle through it (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found
