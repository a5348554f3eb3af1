"""Hyperparameter sweeps on Ray Tune: every trial a Ray Train run of the training pipeline.

The pattern the installed Ray (Train V2) documents for Train inside Tune: a Tune function
trainable per trial builds a `TorchTrainer` (`orchestration.ray.train.fit_on_ray`) whose
`RunConfig` carries `ray.tune.integration.ray_train.TuneReportCallback`, so what the
workers `ray.train.report` at each checkpoint (here: the sweep's metric, evaluated on the EMA
model by every worker, each a share of its units) reaches Tune's scheduler. ASHA stops poor trials at checkpoints; Optuna
(`sweep.search=optuna`) proposes configs instead of random sampling.
`max_concurrent_trials` is derived from the cluster's CPUs (and GPUs) and each trial's
workers, so a trial never starts before its workers can, and none waits holding resources.

MLflow: the sweep is a parent run (its config, the leaderboard, the best config as a
ready-to-run task YAML); every trial's training run is nested under it (`mlflow.parentRunId`)
with its params, metrics and artifacts as a single run has them. Everything lives in
<output_dir>/<task>/sweeps/<sweep.name>/: Tune's state (tune/), one run folder per trial
(trials/<trial id>/), the leaderboard. Re-running the same command after the driver died
restores the Tuner there: finished trials are kept, unfinished ones resume from their last
checkpoint, and the parent run continues.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lzn.errors import UserError
from lzn.roles import Role
from orchestration.folder import RunFolder
from orchestration.ray.leaderboard import TrialRow, leaderboard
from orchestration.reporting import (
    FINAL, REPORT_INDEX, STEP, checkpoints_of, final_report, finished_result, tune_key,
)
from orchestration.run import RUN_ROLES, RayTrainerConfig, RunConfig, RunMeta

KINDS = ("choice", "uniform", "loguniform", "grid", "randint")
# Keys a sweep cannot vary: they decide where trials run, how long they are and what the
# metric means, which the sweep's concurrency, ASHA's budget and the leaderboard rely on.
# What a sweep may vary: what is trained (the model, how it is trained), never the task its
# metric is of, how long trials are, where they run or how they are evaluated (lzn.roles).
SWEEPABLE = (Role.MODEL, Role.TRAINING)
SEARCHES = ("random", "optuna")
SCHEDULERS = ("asha", "fifo")


@dataclass
class ParamSpec:
    """One dimension of the search space: choice/grid over `values`, uniform/loguniform over
    [low, high], randint over [low, high)."""

    kind: str = "choice"
    values: Optional[list[Any]] = None
    low: Optional[float] = None
    high: Optional[float] = None


@dataclass
class SweepConfig:
    name: str = "default"  # the sweep's folder and MLflow parent run name (the same name resumes it)
    metric: str = "eval/fid"  # a key of metrics.json
    mode: str = "min"  # min or max
    num_samples: int = 8  # trials (with grid dimensions: repeats of the grid)
    search: str = "random"  # random, or optuna (TPE)
    scheduler: str = "asha"  # asha (early stopping at checkpoints) or fifo (every trial to the end)
    grace_period: int = 1  # checkpoints a trial runs before ASHA may stop it
    reduction_factor: int = 2
    max_concurrent_trials: int = 0  # 0: as many as the cluster fits (trainer.* per trial)
    seed: int = 0  # of the search
    space: dict[str, ParamSpec] = field(default_factory=dict)  # config key -> how it varies
    # A generation sweep (objective=generation) also trains the RF baseline (objective=rf, the
    # same model without LZN) at the best trial's settings and budget (pipelines.sweep).
    baseline: bool = True


def validate_sweep(sweep: SweepConfig, base_params: dict[str, str]) -> None:
    """Every name and range, and every swept key a key of the task's config."""
    def one_of(what, value, known):
        if value not in known:
            raise UserError(f"{what}={value!r} is not known; expected one of {list(known)}")

    one_of("sweep.search", sweep.search, SEARCHES)
    one_of("sweep.scheduler", sweep.scheduler, SCHEDULERS)
    one_of("sweep.mode", sweep.mode, ("min", "max"))
    if sweep.num_samples < 1 or sweep.grace_period < 1 or sweep.reduction_factor < 2 or sweep.max_concurrent_trials < 0:
        raise UserError(f"need sweep.num_samples >= 1, grace_period >= 1, reduction_factor >= 2 and "
                        f"max_concurrent_trials >= 0; got {sweep.num_samples}, {sweep.grace_period}, "
                        f"{sweep.reduction_factor}, {sweep.max_concurrent_trials}")
    if not sweep.space:
        raise UserError("sweep.space is empty: nothing to search (pipelines/conf/sweep/<task>.yaml)")
    for key, spec in sweep.space.items():
        where = f"sweep.space.{key}"
        if key not in base_params:
            near = sorted(k for k in base_params if k.split(".")[-1] == key.split(".")[-1])
            raise UserError(f"{where}: {key!r} is not a key of the task's config" + (f" (did you mean {near}?)"
                                                                                    if near else ""))
        if RUN_ROLES.of(key) not in SWEEPABLE:
            raise UserError(f"{where}: {key!r} cannot be swept (it sets where trials run, how long they are or "
                            "what the metric means); set it for the whole sweep instead (ARGS=\"{key}=...\")")
        one_of(f"{where}.kind", spec.kind, KINDS)
        if spec.kind in ("choice", "grid"):
            if not spec.values:
                raise UserError(f"{where}: kind {spec.kind} needs a non-empty `values` list")
        else:
            if spec.low is None or spec.high is None or not spec.low < spec.high:
                raise UserError(f"{where}: kind {spec.kind} needs low < high, got low={spec.low}, high={spec.high}")
            if spec.kind == "loguniform" and spec.low <= 0:
                raise UserError(f"{where}: loguniform needs low > 0, got {spec.low}")
    if sweep.search == "optuna" and any(s.kind == "grid" for s in sweep.space.values()):
        raise UserError("sweep.search=optuna cannot take grid dimensions; use choice instead")


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """The Tune search space: one entry per swept key (dots kept in the names)."""
    from ray import tune

    out = {}
    for key, s in sweep.space.items():
        out[key] = {"choice": lambda: tune.choice(list(s.values)), "grid": lambda: tune.grid_search(list(s.values)),
                    "uniform": lambda: tune.uniform(s.low, s.high),
                    "loguniform": lambda: tune.loguniform(s.low, s.high),
                    "randint": lambda: tune.randint(int(s.low), int(s.high))}[s.kind]()
    return out


def trial_config(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A copy of the task config `cfg` with a trial's values set at their dotted keys
    (dict fields such as optim.lr take new keys' values too)."""
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        if isinstance(node, dict):
            node[last] = value
            continue
        current = getattr(node, last)
        if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float) \
                and value.is_integer():
            value = int(value)
        setattr(node, last, value)
    return cfg


def concurrent_trials(sweep: SweepConfig, trainer: RayTrainerConfig, resources: dict[str, float], stream: bool,
                      autoscaling: bool = False) -> int:
    """How many trials fit at once: each takes num_workers x cpus_per_worker CPUs (and a GPU
    per worker), plus a CPU for Ray Data when it streams. Refuses a trial that cannot fit,
    unless the cluster autoscales (then sweep.max_concurrent_trials, or 1, until it grows)."""
    cpus = trainer.num_workers * trainer.cpus_per_worker + (1 if stream else 0)
    fit = math.floor(resources.get("CPU", 0) / cpus + 1e-9)
    if trainer.use_gpu:
        fit = min(fit, math.floor(resources.get("GPU", 0) / trainer.num_workers + 1e-9))
    if fit < 1:
        if autoscaling:
            return sweep.max_concurrent_trials or 1
        needs = (f"{trainer.num_workers} worker(s) x {trainer.cpus_per_worker:g} CPU"
                 + (" + 1 CPU for Ray Data's reads" if stream else "")
                 + (f" and {trainer.num_workers} GPU(s)" if trainer.use_gpu else ""))
        raise UserError(f"one trial needs {cpus:g} CPUs ({needs}); this Ray has {resources.get('CPU', 0):g} CPUs, "
                        f"{resources.get('GPU', 0):g} GPUs. Lower trainer.num_workers or trainer.cpus_per_worker")
    return min(fit, sweep.max_concurrent_trials) if sweep.max_concurrent_trials else fit


# ---------------------------------------------------------------------------- a trial
def run_trial(config: dict, spec: dict) -> None:
    """The Tune trainable: one Ray Train run of the task with this trial's values."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestration.ray.train import fit_on_ray

    # A trial's workers may wait for those of a stopped trial to go: Ray Train's 60 s default
    # is too short for that on a busy machine (an autoscaling cluster waits longer anyway).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(spec["cfg"], config)
    run_dir = Path(spec["sweep_dir"]) / "trials" / trial_id
    meta = copy.deepcopy(spec["meta"])
    if meta is not None:
        meta.run_name = f"{spec['name']}-{trial_id}"
        # the sweep's best config is trained (and registered) on its own
        meta.tracking = dataclasses.replace(meta.tracking, register_model=False)
        meta.tags = {**meta.tags, "mlflow.parentRunId": spec["parent_run_id"], "lzn.sweep": spec["name"],
                     "lzn.trial": trial_id, "lzn.run_dir": str(run_dir)}
    key = spec["metric"]
    done = finished_result(run_dir, key, cfg.train.iterations)
    if done is not None:  # trained and evaluated before the sweep's driver died: report, do not retrain
        step, value = done
        ray.tune.report(final_report(step, cfg.train, key, value))
        return
    # No bars in a trial: Tune's trial table is the sweep's one progress display.
    fit_on_ray(cfg, run_dir, meta, report_metric=key, report_mode=spec["mode"],
               callbacks=[TuneReportCallback()], progress=False)


# ------------------------------------------------------------------------------ the sweep
def _search(sweep: SweepConfig, concurrency: int):
    """The search algorithm, limited to `concurrency` trials at once (Tune applies
    max_concurrent_trials to Searchers only, not to its random/grid generator)."""
    if sweep.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as err:  # pragma: no cover - optuna is a dependency
            raise UserError(f"sweep.search=optuna needs the optuna package ({err})") from None
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(OptunaSearch(seed=sweep.seed), max_concurrent=concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrency)


def _scheduler(sweep: SweepConfig, cfg: RunConfig):
    """ASHA on the checkpoint index a trial reports (`report`: 1..n, n + 1 for the final
    result), which a resumed trial continues. ASHA puts rungs up to and including max_t, so
    max_t = n - 1 keeps every rung before the last checkpoint, and stop_last_trials=False lets
    a trial past max_t run on: a trial that trains to the end is always evaluated and recorded."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    n = checkpoints_of(cfg.train)
    if sweep.scheduler == "fifo" or n < 2:
        return FIFOScheduler()
    return ASHAScheduler(time_attr=REPORT_INDEX, max_t=n - 1, grace_period=min(sweep.grace_period, n - 1),
                         reduction_factor=sweep.reduction_factor, stop_last_trials=False)


def _rows(grid, cfg: RunConfig, sweep: SweepConfig, sweep_dir: Path) -> list[TrialRow]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial = metrics.get("trial_id") or Path(result.path).name
        params = {k: v for k, v in (result.config or {}).items()}
        steps = int(metrics.get(STEP, 0))
        status = "error" if result.error else ("finished" if metrics.get(FINAL) == 1 else "stopped early")
        run_id = RunFolder(sweep_dir / "trials" / str(trial)).mlflow_run_id()
        value = metrics.get(tune_key(sweep.metric))
        rows.append(TrialRow(str(trial), status, None if value is None else float(value), steps, params, run_id))
    return leaderboard(sweep, rows)


def run_sweep(cfg: RunConfig, sweep: SweepConfig, sweep_dir: str | Path, *, meta: RunMeta | None = None, parent_run_id: str | None = None,
              verbose: int = 1) -> list[TrialRow]:
    """Run (or resume) the sweep in `sweep_dir`; returns the leaderboard rows, best first.

    cfg: the task's run (backend, trainer.* per trial; checked by `validate_run`); meta: the trials' RunMeta
    (None: untracked), nested under MLflow run `parent_run_id`."""
    import ray
    from ray import tune

    from orchestration.ray.train import absolute_paths, init_ray, streams

    sweep_dir = Path(sweep_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    spec = {"cfg": absolute_paths(cfg), "sweep_dir": str(sweep_dir), "meta": meta, "name": sweep.name,
            "parent_run_id": parent_run_id, "metric": sweep.metric, "mode": sweep.mode}
    started = init_ray()
    try:
        concurrency = concurrent_trials(sweep, cfg.trainer, ray.cluster_resources(), streams(cfg.data),
                                        autoscaling=bool(os.environ.get("RAY_ADDRESS")))
        print(f"{concurrency} trial(s) at a time: each takes {cfg.trainer.num_workers} worker(s) x "
              f"{cfg.trainer.cpus_per_worker:g} CPU{' + 1 GPU' if cfg.trainer.use_gpu else ''}", file=sys.stderr)
        # The trial's driver only waits on its Ray Train run: its workers hold the resources.
        trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), {"CPU": 0, "memory": 2**20})
        storage = str(sweep_dir / "tune")
        if tune.Tuner.can_restore(storage):
            print(f"resuming the sweep in {storage}", file=sys.stderr, flush=True)
            tuner = tune.Tuner.restore(storage, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=search_space(sweep),
                tune_config=tune.TuneConfig(metric=tune_key(sweep.metric), mode=sweep.mode,
                                            num_samples=sweep.num_samples, search_alg=_search(sweep, concurrency),
                                            scheduler=_scheduler(sweep, cfg),
                                            trial_dirname_creator=lambda trial: trial.trial_id),
                run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=verbose,
                                          failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
        return _rows(grid, cfg, sweep, sweep_dir)
    finally:
        if started:
            ray.shutdown()


def wait_for_released(timeout_s: float = 120.0, poll_s: float = 0.5) -> list[str]:
    """Wait until none of this Ray job's placement groups holds resources (not removed, or its
    bundles still on a node), at most `timeout_s`;
    returns the ids of those still held. Ray removes a finished or stopped trial's groups (its
    Ray Train workers') asynchronously, seconds after Tune returns, and on a loaded machine
    longer: what this job runs next on the same cluster (the RF baseline) would wait for their
    CPUs, and Ray Train gives a worker group 60 s to start. A placement group's id ends with
    its job's id, so other jobs' groups on a shared cluster are not waited for."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    deadline = time.monotonic() + timeout_s
    while True:
        held = sorted({pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}
                      # a removed group's bundles leave the nodes' resources (CPU_group_<id>) a moment later
                      | {key.rsplit("_", 1)[-1] for key in ray.cluster_resources() if "_group_" in key})
        held = [pg_id for pg_id in held if pg_id.endswith(job)]
        if not held or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if held:
        print(f"[sweep] {len(held)} placement group(s) of the trials still held after {timeout_s:g} s "
              f"({', '.join(held)}): what runs next may wait for their resources", file=sys.stderr, flush=True)
    return held


def close_trial_runs(uri: str, parent_run_id: str, rows: list[TrialRow] | None) -> None:
    """Tag every child run with its trial's status, and end each trial's run as the sweep saw
    it: FAILED for an error; KILLED for one stopped early, whatever its worker's teardown
    wrote (a worker stopped by the scheduler may have ended its run FAILED first); KILLED too
    for a run the interrupted sweep left RUNNING. A finished trial's run keeps its status."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    status = {r.run_id: r.status for r in rows or [] if r.run_id}
    parent = client.get_run(parent_run_id)
    for child in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        run_id, state = child.info.run_id, status.get(child.info.run_id, "interrupted")
        client.set_tag(run_id, "lzn.sweep.status", state)
        end = {"error": "FAILED", "stopped early": "KILLED"}.get(state)
        if child.info.status == "RUNNING" and state != "finished":
            client.set_terminated(run_id, end or "KILLED")
        elif end is not None and child.info.status != end:  # keeps the time the run ended
            client.set_terminated(run_id, end, end_time=child.info.end_time)
