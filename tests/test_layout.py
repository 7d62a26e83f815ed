"""The package's shape: maskdm's modules import one way (no cycles, lazy imports counted), and only
the MLflow side knows MLflow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "maskdm"
#: The modules that talk to MLflow (docs/design.md): lineage and runs, the dataset inputs a stage
#: logs, the report, the registry and the driver. The rest of the library is plain torch/numpy.
MLFLOW_SIDE = {"tracking", "dataset_inputs", "report", "registry", "driver"}


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(maskdm modules, top-level packages) that ``path`` imports anywhere, function bodies included."""
    modules, packages = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            packages.add(parts[0])
            if parts[0] == "maskdm":
                modules |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                packages.add(parts[0])
                if parts[0] == "maskdm" and len(parts) > 1:
                    modules.add(parts[1])
    return modules, packages


def module_graph() -> dict[str, set[str]]:
    files = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in imports_of(path)[0] if m in files and m != name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_maskdm_modules_import_one_way():
    graph = module_graph()
    assert {"models", "latent", "driver", "report"} <= set(graph)  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("name", sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"))
def test_only_the_mlflow_side_imports_mlflow(name):
    _, packages = imports_of(PACKAGE / f"{name}.py")
    assert ("mlflow" in packages) == (name in MLFLOW_SIDE), name
