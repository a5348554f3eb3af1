"""The layer rules of DESIGN.md, checked on the source: imports flow
pipelines -> orchestration -> lzn, and lzn stays a plain PyTorch library."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "lzn": {"ray", "mlflow", "hydra", "omegaconf", "submitit", "orchestration", "pipelines", "dashboards"},
    "orchestration": {"hydra", "omegaconf", "pipelines", "dashboards"},
    "dashboards": {"lzn"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_layer_rules(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    assert not {f: names for f, names in bad.items() if names}


PACKAGES = ("lzn", "orchestration", "pipelines", "dashboards")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(f): f for p in PACKAGES for f in sorted((ROOT / p).rglob("*.py"))}


def _import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source: at the top, inside
    functions, under TYPE_CHECKING. `from a import b` counts a.b when b is a module, else a."""
    modules = _project_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function():
    # The oracle: a -> b at the top, b -> c -> a inside functions, d apart.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_counts_imports_inside_functions():
    graph = _import_graph()
    # pipelines.stages.train imports orchestration.ray.train only inside train()
    assert "orchestration.ray.train" in graph["pipelines.stages.train"]


def test_no_import_cycles():
    assert _cycles(_import_graph()) == []


def test_entry_points_do_not_import_each_other():
    """What the commands share lives in pipelines.cli, pipelines.config and pipelines.stages."""
    graph = _import_graph()
    entry = {m for m, f in _project_modules().items()
             if m.startswith("pipelines.") and 'if __name__ == "__main__":' in f.read_text()}
    assert {"pipelines.train", "pipelines.sweep", "pipelines.evaluate", "pipelines.run"} <= entry
    assert {m: sorted(graph[m] & entry) for m in entry if graph[m] & entry} == {}
