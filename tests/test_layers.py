"""The request path reads one way: serve/, the CLI and batch jobs -> LLM -> engine -> model. No module imports a
module that (directly or not) imports it back, and the core never imports a protocol."""

from __future__ import annotations

import ast
from pathlib import Path

import minicpmv

ROOT = Path(minicpmv.__file__).parent
CORE = ("minicpmv.llm", "minicpmv.engine", "minicpmv.output", "minicpmv.processing", "minicpmv.model")
FRONTS = ("minicpmv.serve", "minicpmv.cli", "minicpmv.chat")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the minicpmv modules it imports anywhere in its file (function-level imports too)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_the_core_imports_no_front_end():
    for name, targets in imports().items():
        if name.startswith(CORE):
            assert not [t for t in targets if t.startswith(FRONTS)], f"{name} imports {targets}"


def test_no_import_cycles():
    graph = imports()
    graph.pop("minicpmv", None)  # the package's lazy attribute imports (minicpmv.LLM) are not part of any path
    for g in graph.values():
        g.discard("minicpmv")
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else nxt
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
