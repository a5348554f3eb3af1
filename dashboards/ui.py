"""`python -m dashboards.ui [--output-dir outputs]` (and `make ui`): the MLflow UI on the
project's tracking store, and where to click.

The UI is the tracking server itself (`mlflow server` serves the UI beside the REST API), so
there is nothing to run twice: with $MLFLOW_TRACKING_URI set, that server is the UI; without
it, the project's local server (SQLite in `<output_dir>/mlflow`, on 127.0.0.1) is started if
it is not running, exactly as the first training run would, and keeps running for later
commands. The command prints the URL, each experiment's page and its latest runs, and how to
stop the local server.
"""
from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path

from orchestration.mlflow.server import running_server
from orchestration.mlflow.tracker import TrackingConfig, resolve_tracking_uri


def store_uri(output_dir: str | Path = "outputs") -> str:
    """$MLFLOW_TRACKING_URI, else the local server of `<output_dir>/mlflow` (started when needed)."""
    return resolve_tracking_uri(TrackingConfig(), output_dir)


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout_s) as r:
            if r.status == 200:
                return
            problem = f"HTTP {r.status}"
    except OSError as e:
        problem = str(e)
    raise SystemExit(f"error: the MLflow server {uri} does not answer ({problem}): start it, or set "
                     "MLFLOW_TRACKING_URI to one that runs (unset, `make ui` starts the project's local server)")


# MLflow 3's UI opens an experiment in its GenAI view (traces, sessions); training runs live in
# its "Model training" view, which this query selects.
TRAINING_VIEW = "?workflowType=machine_learning"


def run_url(uri: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    """A run's page (`tab`: "artifacts", "model-metrics", ...)."""
    return f"{uri}/#/experiments/{experiment_id}/runs/{run_id}{'/' + tab if tab else ''}{TRAINING_VIEW}"


def experiment_url(uri: str, experiment_id: str) -> str:
    """An experiment's table of runs."""
    return f"{uri}/#/experiments/{experiment_id}/runs{TRAINING_VIEW}"


def overview(uri: str, runs_per_experiment: int = 3) -> str:
    """The experiments on `uri`, newest first, each with its page and its latest top-level runs."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = sorted(client.search_experiments(), key=lambda e: e.last_update_time or 0, reverse=True)
    lines = []
    for exp in experiments:
        latest = client.search_runs([exp.experiment_id], max_results=100, order_by=["attributes.start_time DESC"])
        runs = [r for r in latest if "mlflow.parentRunId" not in r.data.tags][:runs_per_experiment]  # sweeps, not trials
        if not runs and exp.name == "Default":
            continue
        lines.append(f"  {exp.name}: {experiment_url(uri, exp.experiment_id)}")
        for r in runs:
            lines.append(f"    {r.info.run_name or r.info.run_id} ({r.info.status.lower()}): "
                         f"{run_url(uri, exp.experiment_id, r.info.run_id)}")
    return "\n".join(lines) if lines else "  no experiments yet: `make sweep` or `make train` creates one"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.ui", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="outputs",
                        help="the project's outputs (its local MLflow store is <output-dir>/mlflow)")
    args = parser.parse_args(argv)
    uri = store_uri(args.output_dir)
    check_reachable(uri)
    print(f"MLflow UI: {uri}")
    print(overview(uri))
    state = Path(args.output_dir, "mlflow").resolve()
    if not os.environ.get("MLFLOW_TRACKING_URI") and running_server(state):
        print(f"The server keeps running in the background; stop it with: "
              f"{sys.executable} -m orchestration.mlflow.tracker stop --dir {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
