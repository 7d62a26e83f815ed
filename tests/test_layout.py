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
#: The architecture, bottom up (docs/design.md's picture): a module imports only from its own
#: package or from a lower layer; ``method`` and ``evaluation`` are siblings, neither imports the other.
LAYERS = {
    "errors": 0, "warm_start": 0, "masks": 0.5,
    "ddpm": 1,
    "method": 2, "evaluation": 2,
    "liveness": 3, "tracking": 3, "dataset_inputs": 3, "speed_report": 3, "report": 3, "registry": 3, "driver": 3,
}


def module_name(path: Path) -> str:
    """``maskdm/ddpm/models.py`` -> ``models``; ``maskdm/driver/plan.py`` -> ``driver.plan``; ``maskdm/driver/__init__.py`` -> ``driver``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"}


def imports_of(path: Path, known: set[str] = frozenset()) -> tuple[set[str], set[str]]:
    """(maskdm modules, top-level packages) that ``path`` imports anywhere, function bodies included.
    ``from maskdm.driver import launch`` names the module ``driver.launch`` where that is one of ``known``."""
    modules, packages = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            packages.add(parts[0])
            if parts[0] == "maskdm":
                base = ".".join(parts[1:])
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    modules.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                packages.add(parts[0])
                if parts[0] == "maskdm" and len(parts) > 1:
                    modules.add(".".join(parts[1:]))
    return modules - {""}, packages


def module_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    # A submodule's import of its own package's __init__ is how Python imports packages, not a cycle.
    return {name: {m for m in imports_of(path, known)[0] if m in files and m != name and not name.startswith(m + ".")}
            for name, path in files.items()}


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
    assert {"ddpm.models", "ddpm.latent", "driver", "report"} <= set(graph)  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_driver_report_registry_and_tracking_are_packages_of_modules_with_one_job_each():
    graph = module_graph()
    assert {"driver.presets", "driver.plan", "driver.launch", "driver.sweep"} <= set(graph)
    assert "driver.plan" in graph["driver.launch"] and "driver.launch" in graph["driver.sweep"]
    assert {"report.runs", "report.scores", "report.table", "report.markdown", "report.curves", "report.files"} <= set(graph)
    assert "report.table" in graph["report.files"] and "report.runs" in graph["report.scores"]
    assert {"registry.pyfunc", "registry.candidates", "registry.promotion"} <= set(graph)
    assert {"registry.pyfunc", "registry.candidates"} <= graph["registry.promotion"]
    assert {"tracking.lineage", "tracking.stage_runs", "tracking.side_runs", "tracking.dead_runs", "tracking.demo_model"} <= set(graph)
    assert "tracking.lineage" in graph["tracking.stage_runs"]


def test_every_module_sits_in_a_layer_and_imports_only_downward():
    graph = module_graph()
    unplaced = sorted(m for m in graph if m.split(".")[0] not in LAYERS)
    assert not unplaced, f"modules outside the layers of docs/design.md: {unplaced}"
    upward = sorted(
        (a, b) for a in graph for b in graph[a]
        if a.split(".")[0] != b.split(".")[0] and LAYERS[a.split(".")[0]] <= LAYERS[b.split(".")[0]]
        and not (LAYERS[a.split(".")[0]] == 3 == LAYERS[b.split(".")[0]])  # the MLflow side uses itself
    )
    assert not upward, f"imports that do not point down the layers: {upward}"
    # The folders are the layers: the three library layers are packages.
    assert {"ddpm.models", "ddpm.training", "method.maskpro", "method.pruning", "evaluation.fid"} <= set(graph)


def test_the_layer_check_sees_an_upward_import(monkeypatch):
    """The check above on a graph where ddpm imports from method: it must fail."""
    graph = {"ddpm.training": {"method.pruning"}, "method.pruning": {"masks"}, "masks": set()}
    bad = [(a, b) for a in graph for b in graph[a]
           if a.split(".")[0] != b.split(".")[0] and LAYERS[a.split(".")[0]] <= LAYERS[b.split(".")[0]]]
    assert bad == [("ddpm.training", "method.pruning")]


@pytest.mark.parametrize("name", sorted(module_files()))
def test_only_the_mlflow_side_imports_mlflow(name):
    _, packages = imports_of(module_files()[name])
    if "mlflow" in packages:
        assert name.split(".")[0] in MLFLOW_SIDE, name
