"""`python -m pipelines.sweep task=<name> [scale=smoke] [sweep.num_samples=N] [sweep.search=optuna]
[sweep.scheduler=fifo] [trainer.num_workers=N] [key=value ...]` (and `make sweep TASK=...`):
a Ray Tune sweep of a task, every trial a Ray Train run, nested in MLflow.

The search space and the sweep's metric come from pipelines/conf/sweep/<task>.yaml
(orchestration.ray.tune.SweepConfig; choice, uniform, loguniform, grid, randint). Everything
lands in <output_dir>/<task>/sweeps/<sweep.name>/ (<scale> unless named); the same command
continues an interrupted sweep. At the end the leaderboard is printed and saved
(leaderboard.md, leaderboard.csv), and the best trial's config is written as a task file:
`python -m pipelines.train --config-dir <sweep folder> task=best_<task>` trains it.

A generation sweep (objective=generation) then trains the RF baseline, the same model without
LZN (objective=rf), at the best trial's settings and budget in <sweep folder>/baseline/, as
an MLflow run of the experiment tagged `lzn.sweep.baseline` = the parent run's id, so the
report (`make report`) shows RF beside RF + LZN, samples and FID (sweep.baseline=false: not).
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lzn.errors import UserError
from lzn.task import TaskConfig, validate_task
from orchestration.mlflow.tracker import RunTracker
from orchestration.ray.leaderboard import leaderboard_csv, leaderboard_markdown
from orchestration.ray.tune import (SweepConfig, close_trial_runs, run_sweep, trial_config, validate_sweep,
                                   wait_for_released)
from orchestration.run import RunConfig, as_run_config, refused_changes, run_params, validate_run
from pipelines.cli import guarded, print_header, run_meta
from pipelines.config import SweepRun, to_run_config, training_dcfg
from pipelines.stages.prepare import check_data


def check_values(cfg: RunConfig, sweep: SweepConfig) -> None:
    """Every listed value (choice, grid) and range end, set alone on the task, is a valid
    config: a bad one fails here, not as errored trials."""
    on_ray = {"backend": "ray"}  # every trial is a Ray Train run
    validate_run(trial_config(cfg, on_ray))  # the task itself first
    for key, spec in sweep.space.items():
        values = spec.values if spec.kind in ("choice", "grid") else [spec.low, spec.high]
        for value in values:
            try:
                validate_run(trial_config(cfg, {**on_ray, key: value}))
            except ValueError as e:
                raise UserError(f"sweep.space.{key}: the value {value!r} makes an invalid trial: {e}") from None


def smoke_space(cfg: SweepRun) -> list[str]:
    """scale=smoke keeps the search space but not the paper's batch sizes: they are fixed at
    the smoke batch, so a smoke sweep stays a CPU job. Returns notes for the user."""
    space = cfg.sweep.space
    if cfg.scale != "smoke" or "train.batch_size" not in space:
        return []
    space["train.batch_size"] = dataclasses.replace(space["train.batch_size"], kind="choice",
                                                    values=[cfg.train.batch_size], low=None, high=None)
    return [f"scale=smoke: train.batch_size fixed at {cfg.train.batch_size} (the space's sizes are full-scale)"]


def write_results(cfg: SweepRun, rows, sweep_dir: Path) -> dict[str, Path]:
    out = {"leaderboard.md": sweep_dir / "leaderboard.md", "leaderboard.csv": sweep_dir / "leaderboard.csv"}
    title = f"# Sweep {cfg.sweep.name!r} of {cfg.name}: {cfg.sweep.metric} ({cfg.sweep.mode})\n\n"
    out["leaderboard.md"].write_text(title + leaderboard_markdown(cfg.sweep, rows))
    out["leaderboard.csv"].write_text(leaderboard_csv(cfg.sweep, rows))
    best = next((r for r in rows if r.status == "finished" and r.value is not None), None)
    if best is not None:
        path = sweep_dir / "task" / f"best_{cfg.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(best_task_yaml(cfg, best))
        out["best_task.yaml"] = path
    return out


def best_task_yaml(cfg: SweepRun, row) -> str:
    """The best trial as a task file (pipelines/conf/task/ format): every value of the task."""
    best = trial_config(cfg, row.params)
    task = TaskConfig(**{f.name: getattr(best, f.name) for f in dataclasses.fields(TaskConfig)})
    task.name = cfg.name
    values = OmegaConf.to_container(OmegaConf.structured(task))
    for machine_specific in ("shards_dir", "root", "prepare"):  # where the data lies is the user's
        values["data"].pop(machine_specific)
    changed = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.params.items())
    return (f"# @package _global_\n# Best finished trial {row.trial} of sweep {cfg.sweep.name!r}: "
            f"{cfg.sweep.metric} = {row.value:.6g} ({changed}).\n"
            f"# Train it: python -m pipelines.train --config-dir <this file's folder>/.. task=best_{cfg.name}\n"
            + OmegaConf.to_yaml(values))


BASELINE_TAG = "lzn.sweep.baseline"  # on the RF run: the id of the sweep's parent run
# objective swept -> (its baseline without LZN, the module groups the baseline does not have)
BASELINE_OF = {"generation": ("rf", ("encoder",))}


def baseline_config(task_cfg: RunConfig, sweep: SweepConfig, params: dict | None = None) -> RunConfig | None:
    """The baseline run of a sweep of `task_cfg` (None: its objective has none, or
    sweep.baseline=false): the task at the trial values `params` with the baseline objective,
    without the learning rates and freezes of the groups it lacks (RF has no encoder)."""
    if task_cfg.objective not in BASELINE_OF or not sweep.baseline:
        return None
    objective, absent = BASELINE_OF[task_cfg.objective]
    cfg = trial_config(task_cfg, {**(params or {}), "objective": objective})
    cfg.optim.lr = {k: v for k, v in cfg.optim.lr.items() if k not in absent}
    cfg.train.freeze_after = {k: v for k, v in cfg.train.freeze_after.items() if k not in absent}
    cfg.train.checkpoint_every = cfg.train.iterations  # no scheduler reads its checkpoints: the last one only
    return cfg


def train_baseline(cfg: SweepRun, task_cfg: RunConfig, rows, sweep_dir: Path, meta, parent) -> dict | None:
    """Train (or, already done, read) the RF baseline at the best finished trial's values and
    budget; its metrics.json, or None when the sweep has no baseline or no finished trial."""
    from orchestration.ray.train import fit_on_ray
    from orchestration.reporting import finished_result

    best = next((r for r in rows if r.status == "finished" and r.value is not None), None)
    rf = baseline_config(task_cfg, cfg.sweep, best.params if best else None)
    if rf is None or best is None:
        return None
    run_dir = sweep_dir / "baseline"
    if finished_result(run_dir, cfg.sweep.metric, rf.train.iterations) is None:
        if meta is not None:
            meta = copy.deepcopy(meta)
            meta.run_name = f"{cfg.sweep.name}-baseline-{rf.objective}"
            # the sweep's registered model is the best config trained on its own, never the baseline
            meta.tracking = dataclasses.replace(meta.tracking, register_model=False)
            meta.tags = {**meta.tags, BASELINE_TAG: parent.run_id if parent else "", "lzn.baseline_trial": best.trial,
                         "lzn.run_dir": str(run_dir)}
        print(f"[sweep] training the baseline objective={rf.objective} at trial {best.trial}'s values "
              f"({rf.train.iterations} steps) in {run_dir}", file=sys.stderr, flush=True)
        import ray

        if ray.is_initialized():  # the cluster the trials ran on, which outlives the sweep (RAY_ADDRESS)
            wait_for_released()  # the stopped trials' workers' CPUs, which Ray Train gives 60 s to free
        fit_on_ray(rf, run_dir, meta)
    from orchestration.folder import RunFolder

    return RunFolder(run_dir).read_metrics()


def baseline_line(cfg: SweepRun, rows, metrics: dict | None) -> str:
    """One line for the leaderboard: the baseline's metric beside the best trial's."""
    if metrics is None:
        return ""
    best = next(r for r in rows if r.status == "finished" and r.value is not None)
    key = cfg.sweep.metric
    return (f"\nRF baseline (objective={BASELINE_OF[cfg.objective][0]}, trial {best.trial}'s values and budget): "
            f"{key} = {metrics.get(key, float('nan')):.6g}; RF + LZN (trial {best.trial}): {key} = {best.value:.6g}\n")


def run(cfg: SweepRun, sweep_dir: Path, dcfg: DictConfig) -> tuple[list, dict[str, Path]]:
    """Check, run (or resume) and record the sweep; returns (leaderboard rows, files written)."""
    from lzn.evaluate import metric_for_key

    validate_task(cfg)
    task_cfg = as_run_config(cfg)
    task_cfg.backend = "ray"
    validate_sweep(cfg.sweep, run_params(task_cfg))
    metric_for_key(task_cfg, cfg.sweep.metric)  # one the task's objective has
    check_values(task_cfg, cfg.sweep)
    if (rf := baseline_config(task_cfg, cfg.sweep)) is not None:
        validate_run(rf)  # the baseline too, before anything starts
    for note in smoke_space(cfg):
        print(note, file=sys.stderr)
    check_data(task_cfg.data)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    parent, meta = None, None
    if cfg.tracking.enabled:
        meta = run_meta(task_cfg, training_dcfg(dcfg), sweep_dir / "trials" / "_")
        try:
            parent = RunTracker.open(meta.tracking_uri, meta.experiment, sweep_dir,
                                     run_name=f"sweep-{cfg.sweep.name}", params=run_params(cfg),
                                     config_yaml=OmegaConf.to_yaml(dcfg, resolve=True),
                                     tags={**meta.tags, "lzn.sweep": cfg.sweep.name, "lzn.run_dir": str(sweep_dir)},
                                     refused_changes=refused_changes, system_metrics=False)
        except UserError as e:  # a resumed sweep with other settings
            raise UserError(f"{e} (for a sweep: choose another sweep.name= to start a new one)") from None
        print(f"MLflow parent run {parent.run_id} on {meta.tracking_uri}", file=sys.stderr, flush=True)
    status, rows = "FAILED", None
    try:
        rows = run_sweep(task_cfg, cfg.sweep, sweep_dir, meta=meta, parent_run_id=parent and parent.run_id)
        files = write_results(cfg, rows, sweep_dir)
        baseline = train_baseline(cfg, task_cfg, rows, sweep_dir, meta, parent)
        if baseline is not None:
            with files["leaderboard.md"].open("a") as f:
                f.write(baseline_line(cfg, rows, baseline))
        if parent is not None:
            best = next((r for r in rows if r.status == "finished" and r.value is not None), None)
            counts = {s: sum(r.status == s for r in rows) for s in ("finished", "stopped early", "error")}
            parent.log_metrics({"sweep/trials": float(len(rows)), "sweep/finished": float(counts["finished"]),
                                "sweep/stopped_early": float(counts["stopped early"]),
                                "sweep/errors": float(counts["error"]),
                                **({f"best/{cfg.sweep.metric}": best.value} if best else {}),
                                **({f"baseline/{cfg.sweep.metric}": baseline[cfg.sweep.metric]}
                                   if baseline and cfg.sweep.metric in baseline else {})}, step=len(rows))
            for path in files.values():
                parent.log_artifact(path)
        status = "FINISHED"
        return rows, files
    finally:
        if parent is not None:
            try:
                close_trial_runs(meta.tracking_uri, parent.run_id, rows)
            finally:
                parent.close(status)


@hydra.main(version_base="1.3", config_path="conf", config_name="sweep")
def main(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    sweep_dir = Path(HydraConfig.get().runtime.output_dir)
    cfg = guarded(lambda: to_run_config(dcfg))
    rows, files = guarded(lambda: run(cfg, sweep_dir, dcfg))
    print_header(f"sweep {cfg.sweep.name!r} of {cfg.name}: done")
    print(files["leaderboard.md"].read_text())
    if "best_task.yaml" in files:
        print(f"best config: {files['best_task.yaml']}\n  train it: {sys.executable} -m pipelines.train "
              f"--config-dir {sweep_dir} task=best_{cfg.name}")
    else:
        print("no trial finished: no best config", file=sys.stderr, flush=True)
    if cfg.tracking.enabled:
        print(f"report: make report EXPERIMENT={cfg.tracking.experiment or cfg.name} ARGS='--sweep {cfg.sweep.name}'"
              " (or browse: make ui)")
    print(f"sweep folder: {sweep_dir}", flush=True)


if __name__ == "__main__":
    from pipelines.cli import entry  # an unknown task= is refused with suggestions before Hydra composes

    sys.exit(entry(main))
