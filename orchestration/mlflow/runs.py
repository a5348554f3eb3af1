"""Which MLflow run a run folder continues: `<run_dir>/mlflow_run.json` names it, and a
resumed run may change how long, where and how it runs and reports, never what it trains.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from lzn.errors import UserError

from orchestration.folder import MLFLOW_RUN
from orchestration.mlflow.pending import warn

RUN_FILE = MLFLOW_RUN  # in the run folder
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def param_value(value: str) -> str:
    # MLflow refuses params over 6000 characters; the full config is in config.yaml anyway.
    return value if len(value) <= MAX_PARAM_LENGTH else value[:MAX_PARAM_LENGTH - 3] + "..."


RefusedChanges = Callable[[dict, dict], list]  # (old params, new params) -> ["key: old -> new", ...]


def resume_changes(run, params: dict[str, str], run_file: Path, refused_changes: RefusedChanges) -> dict[str, str]:
    """Changed params of a resumed run: {key: new value} of those a run may change without
    becoming another experiment (how long and where it runs, how it reports and is evaluated;
    logged as lzn.resumed.* tags). `refused_changes` names the others (orchestration.run's), which
    raise a UserError: MLflow keeps a run's params fixed, and they would be another experiment."""
    changed = {k: v for k, v in params.items() if k in run.data.params and run.data.params[k] != v}
    refused = refused_changes(run.data.params, params)
    if refused:
        raise UserError(f"resuming MLflow run {run.info.run_id} from {run_file.parent} with changed settings "
                        f"(MLflow keeps a run's params fixed): {'; '.join(refused)}. Restore them, or choose "
                        "another run_name= to start a new run.")
    return changed


def check_resumable(uri: str, run_dir: str | Path, params: dict[str, str], refused_changes: RefusedChanges) -> None:
    """On the driver, before any worker starts: a run folder whose MLflow run would refuse
    `params` fails here with a clear message (a worker would fail the same way, retried)."""
    from mlflow import MlflowClient

    run_file = Path(run_dir) / RUN_FILE
    if not run_file.exists():
        return
    try:
        stored_run(MlflowClient(uri.rstrip("/")), run_file, uri, {k: param_value(str(v)) for k, v in params.items()},
                   refused_changes)
    except ValueError:
        raise
    except Exception as e:  # unreachable now: the training process waits for it (tracking.open_timeout_s)
        warn(f"could not check {run_file} against {uri} ({type(e).__name__}); the run will retry")


def stored_run(client, run_file: Path, uri: str, params: dict[str, str], refused_changes: RefusedChanges):
    """The run that <run_dir>/mlflow_run.json names, and the resumable changes `params` make
    to it (`resume_changes`, which refuses the others)."""
    from mlflow.exceptions import MlflowException

    stored = json.loads(run_file.read_text())
    try:
        run = client.get_run(stored["run_id"])
    except MlflowException as e:
        raise RuntimeError(f"{run_file} names run {stored['run_id']} (logged to {stored['uri']}), which "
                           f"{uri} cannot give: {e}. Point tracking.uri at {stored['uri']}, or delete "
                           f"{run_file} to log this run folder as a new run.") from e
    return run, resume_changes(run, params, run_file, refused_changes)


def find_or_create_experiment(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created if missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "active":
        raise UserError(f"MLflow experiment {name!r} on {uri} is deleted: restore it or choose "
                        "another tracking.experiment")
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id
