"""A local MLflow server of each test module's own (SQLite behind `mlflow server`), for the tests of
tracking and of the sweep's MLflow runs, stopped by PID when the module ends; MLflow's HTTP retry
variables restored after a module that opens a RunTracker."""
import os

import pytest

from orchestration.mlflow.pending import FAST_FAIL_ENV
from orchestration.mlflow.server import local_server, stop_local_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("mlflow-server")
    uri = local_server(state)
    yield uri
    assert stop_local_server(state)


@pytest.fixture(scope="module")
def restore_http_env():
    """RunTracker.open sets MLflow's HTTP retry variables for the process; put them back."""
    saved = {k: os.environ.get(k) for k in FAST_FAIL_ENV}
    yield
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
