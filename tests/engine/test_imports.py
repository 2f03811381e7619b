"""The modules of engine/ import each other in one direction only: no import circles, lazy (function-level)
imports and TYPE_CHECKING imports included, so every module can be read (and tested) on top of the ones it uses."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine"


def engine_imports(root: Path = ENGINE) -> dict[str, set[str]]:
    """module name -> the engine modules it imports anywhere in its source (the package itself excluded)."""
    modules = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("engine.")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "engine":  # from engine import frames as fr
                    deps |= {a.name for a in node.names if a.name in modules}
                elif node.module.startswith("engine."):
                    deps.add(node.module.split(".")[1])
        graph[name] = deps & modules - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_find_cycle_sees_a_circle_and_a_clean_graph() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_engine_has_no_import_circle() -> None:
    graph = engine_imports()
    assert "weights" in graph and "render" in graph  # the walk found the modules
    assert find_cycle(graph) is None, f"import circle in engine/: {' -> '.join(find_cycle(graph) or [])}"
