"""The quantization package imports without circles (function-level imports counted), and its in-place replay is
named with a trailing underscore."""

import ast
from pathlib import Path

import slimkit.quantization as quantization

PACKAGE = Path(quantization.__file__).parent
NAME = "slimkit.quantization"


def _module_name(path: Path) -> str:
    return NAME if path.name == "__init__.py" else f"{NAME}.{path.stem}"


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p) for p in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        edges = graph.setdefault(_module_name(path), set())
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges.update(t for t in targets if t in modules)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_quantization_has_no_import_circle():
    graph = _graph()
    assert {"slimkit.quantization.config", "slimkit.quantization.dynamic", "slimkit.quantization.ptq"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_circles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_replay_mutates_and_says_so():
    assert quantization.replay_ is quantization.replay  # ``replay`` stays for slimkit.history
    assert "replay_" in quantization.__all__
