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
