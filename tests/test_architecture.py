"""The shape of the code: imports flow one way (CLI and service -> product -> models, geometry, occlusion, data), with
no cycles, and no function grows past 60 lines without saying why. Read from the source, so it also sees imports
written inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: What each layer may import (besides itself). ``top`` is the ``fromface`` package (version, lazy exports).
LOWER = ["errors", "data", "faces", "occlusion", "models", "storage"]
ALLOWED = {
    "top": {"errors"},
    "errors": set(),
    "storage": {"errors"},
    "data": {"errors"},
    "faces": {"errors", "data"},
    "occlusion": {"errors", "data", "faces"},
    "models": {"errors", "data", "faces", "occlusion"},
    "inference": {*LOWER},
    "evaluation": {*LOWER, "inference"},
    "training": {*LOWER, "inference", "evaluation", "top"},
    "serve": {*LOWER, "inference"},
    "cli": {*LOWER, "inference", "evaluation", "training", "serve", "top"},
}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return "top" if len(parts) == 1 else parts[1]


def import_graph(root: Path = SRC / "fromface") -> dict[str, set[str]]:
    """Module -> the fromface modules it imports anywhere in the file (top level and inside functions)."""
    files = {module_name(p, root.parent): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:  # `from fromface.models import weights` imports a module, not a name
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if candidate in files else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[module] = {m for m in found if m in files and m != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts
                  if layer(dst) != layer(src) and layer(dst) not in ALLOWED[layer(src)])


def test_every_package_has_a_layer():
    assert {layer(m) for m in import_graph()} <= set(ALLOWED)


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_imports_flow_one_way():
    assert upward_imports(import_graph()) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "fromface" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "fromface"


def test_the_check_sees_cycles_and_upward_imports_inside_functions(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "", "faces/__init__.py": "", "inference/__init__.py": "",
        "faces/a.py": "def f():\n    from fromface.inference.b import g\n",
        "inference/b.py": "from fromface.faces import a\n",
    })
    graph = import_graph(pkg)
    assert graph["fromface.faces.a"] == {"fromface.inference.b"}
    assert graph["fromface.inference.b"] == {"fromface.faces.a"}
    assert find_cycle(graph) in (["fromface.faces.a", "fromface.inference.b", "fromface.faces.a"],
                                 ["fromface.inference.b", "fromface.faces.a", "fromface.inference.b"])
    assert upward_imports(graph) == ["fromface.faces.a -> fromface.inference.b"]


@pytest.mark.parametrize("path", sorted((SRC / "fromface").rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_long_functions_say_why(path):
    """A function over 60 lines carries ``# long: <reason>`` on its ``def`` lines."""
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
            header = "\n".join(lines[node.lineno - 1: node.body[0].lineno - 1])
            assert "# long: " in header, f"{path}:{node.lineno} {node.name} is over 60 lines with no reason"
