"""infra/docker/Dockerfile read as text (no Docker engine in the tests): what it copies
exists in the build context, the base image is pinned, Ray is the driver's version, and the
project is installed with its dependencies from pyproject.toml."""
import re
import tomllib
from pathlib import Path

import pytest
import ray

ROOT = Path(__file__).resolve().parents[2]  # the build context: `docker build -f infra/docker/Dockerfile .`
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def args(steps) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)


def test_every_copy_source_exists_in_the_build_context(steps):
    copies = [a.split() for op, a in steps if op == "COPY"]
    assert copies, "the image copies the project"
    for words in copies:
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context {ROOT}"
    copied = {s.rstrip("/") for words in copies for s in words[:-1]}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= copied, "every package pyproject.toml installs is copied"


def test_the_base_image_is_pinned_and_has_cuda(steps):
    base = next(a for op, a in steps if op == "FROM")
    image = args(steps)["BASE_IMAGE"] if base == "${BASE_IMAGE}" else base
    assert "@sha256:" in image or re.search(r":\d+(\.\d+)+-cuda\d+(\.\d+)*", image), f"unpinned base image {image!r}"
    assert "latest" not in image and "cuda" in image


def test_ray_is_the_drivers_version_and_the_project_installs_from_pyproject(steps):
    assert args(steps)["RAY_VERSION"] == ray.__version__, "the node image's Ray must match the submitting driver's"
    runs = " ".join(a for op, a in steps if op == "RUN")
    assert 'ray[default,train,tune,data]==${RAY_VERSION}' in runs
    assert "pyproject.toml" in runs and re.search(r"pip install [^&]*-r ", runs)  # the dependencies...
    assert re.search(r"pip install (--no-deps )?\.(\s|$)", runs)  # ...and the project itself
    assert next(a for op, a in reversed(steps) if op == "WORKDIR") == "/opt/lzn"


def test_the_build_context_leaves_the_venv_outputs_and_data_out():
    ignored = set((DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split())
    assert {".venv", ".git", "outputs", "data"} <= ignored
