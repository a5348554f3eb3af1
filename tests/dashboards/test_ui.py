"""`make ui`: the MLflow UI on the project's own store, started on 127.0.0.1 when none runs,
and its experiment and run pages rendering in a real headless Chromium, artifacts included."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from dashboards.ui import run_url
from tests.dashboards.store import make_sweep_store

ROOT = Path(__file__).resolve().parents[2]


def make_ui(output_dir: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), "ui", f"OUTPUT_DIR={output_dir}"], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture
def local_store(tmp_path):
    """No $MLFLOW_TRACKING_URI: `make ui` starts the project's server under <output_dir>/mlflow,
    stopped by its recorded PID afterwards."""
    from orchestration.mlflow.server import stop_local_server

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    yield tmp_path / "outputs", env
    stop_local_server(tmp_path / "outputs" / "mlflow")


def test_make_ui_serves_the_project_store(local_store, page):
    output_dir, env = local_store
    first = make_ui(output_dir, env)
    assert first.returncode == 0, first.stdout + first.stderr
    uri = re.search(r"MLflow UI: (http://127\.0\.0\.1:\d+)", first.stdout).group(1)
    assert "no experiments yet" in first.stdout
    assert (output_dir / "mlflow" / "mlflow.db").exists()  # the SQLite store, not ./mlruns
    store = make_sweep_store(uri)
    again = make_ui(output_dir, env)  # reuses the running server and lists what is in it
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"MLflow UI: {uri}" in again.stdout
    experiment_url = f"{uri}/#/experiments/{store.experiment_id}/runs?workflowType=machine_learning"
    assert f"{store.experiment}: {experiment_url}" in again.stdout
    assert "stop it with:" in again.stdout

    pg = page.page
    pg.goto(experiment_url)
    for name in ("sweep-smoke", "rf-seed0"):  # the runs table of the training view
        pg.get_by_text(name, exact=True).first.wait_for(timeout=90_000)
    assert f"sweep-smoke (finished): {run_url(uri, store.experiment_id, store.parent_run_id)}" in again.stdout
    pg.goto(run_url(uri, store.experiment_id, store.runs["t0"], "artifacts"))
    pg.get_by_text("plots", exact=True).first.click(timeout=90_000)
    for name in ("samples.png", "latent_zones.png", "loss_curves.png"):
        pg.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
    pg.get_by_text("samples.png", exact=True).first.click()
    pg.wait_for_function("() => [...document.images].some(i => i.src.startsWith('blob:') && i.complete "
                         "&& i.naturalWidth > 0)", timeout=60_000)
    width = pg.evaluate("() => [...document.images].find(i => i.src.startsWith('blob:')).naturalWidth")
    assert width == 180  # the logged PNG itself (3 in at 60 dpi), decoded by the browser
    assert not [e for e in page.errors if e.startswith("uncaught")]
    pg.screenshot(path=str(output_dir / "ui-artifacts.png"))


def test_make_ui_refuses_a_dead_server(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # discard port: nothing answers
    done = make_ui(tmp_path, env)
    assert done.returncode != 0
    assert "the MLflow server http://127.0.0.1:9 does not answer" in done.stderr
