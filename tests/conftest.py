"""One real MLflow server (SQLite backend, 127.0.0.1) for the whole test session: every
training run the tests start logs to it over HTTP through $MLFLOW_TRACKING_URI, and it is
stopped by PID at the end. Tests that need the pipeline to start its own server remove
the variable from their subprocess's environment."""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def mlflow_tracking_uri(tmp_path_factory):
    from orchestration.mlflow.server import local_server, stop_local_server

    state = tmp_path_factory.mktemp("mlflow-session")
    uri = local_server(state)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    stop_local_server(state)
