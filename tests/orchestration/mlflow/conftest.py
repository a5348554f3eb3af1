"""A local MLflow server of each test module's own (SQLite behind `mlflow server`), stopped
by PID when the module ends."""
import pytest

from orchestration.mlflow.server import local_server, stop_local_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("mlflow-server")
    uri = local_server(state)
    yield uri
    assert stop_local_server(state)
