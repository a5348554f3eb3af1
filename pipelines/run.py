"""`python -m pipelines.run task=<name> [stages=[prepare,train,evaluate,report]] [scale=smoke]
[backend=local|ray] [key=value ...]`: a task as the stage DAG prepare -> train -> evaluate -> report.

| stage | reads | writes |
| --- | --- | --- |
| prepare | data.* (source, root, splits, shard settings) | <shards>/<name>/manifest.json |
| train | what it trains (model, objective, optim, train.*) and the prepared data | the final checkpoint |
| evaluate | eval.*, metrics= and the checkpoint | <run>/eval/step-N-<key>/metrics.json |
| report | the evaluation and the training summary | <run>/report.md |

A stage is skipped when its inputs, its upstream outputs and its own outputs are unchanged
(content keys, pipelines.dag): re-running the command does nothing; changing an eval.*
setting re-runs evaluate and report only; more train.iterations resumes training from its
last checkpoint. A failure names the stage and keeps what the stages before it made; the
same command resumes there. backend=ray runs training on Ray Train workers, evaluation on
Ray actors, and preparation as Ray tasks. The run folder is that of pipelines.train
(outputs/<task>/<scale>-seed<seed>), with the DAG's records in its pipeline/ folder.

Under torchrun (or as the tasks of a Slurm job with slurm.launcher=ddp: WORLD_SIZE > 1) every
rank runs this DAG in one process group (pipelines.ranks): every rank decides each stage from
the records before any rank writes; prepare and report run on rank 0 while the others wait;
train runs on every rank (DDP) and evaluate sharded over them; rank 0 alone writes the records
and prints the results, and a failure on any rank ends every rank with its message.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lzn.errors import UserError
from lzn.roles import Role
from orchestration.folder import METRICS, RunFolder
from orchestration.run import RUN_ROLES, RunConfig, as_run_config, run_params
from pipelines.cli import EXIT_BAD_INPUT, EXIT_FAILED, guarded, print_header, print_metrics
from pipelines.config import STAGES, PipelineRun, to_run_config, training_dcfg
from pipelines.dag import Pipeline, Stage, StageFailed
from pipelines.ranks import OtherRankFailed
from pipelines.stages.evaluate import Target, evaluate_checkpoint, extractor_digest

# The train stage's inputs: what is trained and how long (more iterations train on), not
# where or how it runs, nor how it is evaluated.
TRAIN_INPUTS = (Role.TASK, Role.MODEL, Role.TRAINING, Role.LENGTH)
PREPARE_KEYS = ("shard_mb", "shard_rows", "raw_max_side", "resize")


def _training_inputs(cfg: RunConfig) -> dict:
    params = run_params(as_run_config(cfg))
    return {k: params[k] for k in RUN_ROLES.keys(params, TRAIN_INPUTS)}


def task_pipeline(cfg: PipelineRun, run_dir: Path, dcfg: DictConfig, ranks=None) -> Pipeline:
    from lzn.data.shards import MANIFEST, dataset_checksum
    from lzn.evaluate import select_metrics
    from orchestration.ray.evaluate import eval_settings
    from pipelines.stages.prepare import prepare, target as prepare_target
    from pipelines.stages.report import write_report
    from pipelines.stages.train import train

    d = cfg.data
    train_dcfg = training_dcfg(dcfg)
    pipeline: Pipeline

    def record_path(stage: str, output: str) -> Path:
        return Path(pipeline.record(stage)["outputs"][output]["path"])

    def do_prepare() -> dict:
        print(prepare(d).describe(), file=sys.stderr, flush=True)
        return {"manifest": d.dataset_dir / MANIFEST}

    def do_train() -> dict:
        train(as_run_config(cfg), run_dir, train_dcfg, evaluate=False)
        return {"checkpoint": RunFolder(run_dir).latest_checkpoint()}

    def do_evaluate() -> dict:
        target = Target(record_path("train", "checkpoint"), run_dir=run_dir.resolve())
        target.run_id = RunFolder(run_dir).mlflow_run_id()
        metrics, folder = evaluate_checkpoint(cfg, target)
        return {"metrics": folder / METRICS}

    def do_report() -> dict:
        out = write_report(cfg.name, run_dir, record_path("evaluate", "metrics").parent)
        _log_report(cfg, run_dir, out)
        return {"report": out}

    pipeline = Pipeline([
        Stage("prepare", do_prepare, inputs=lambda: {
            "source": d.source_name, "root": d.root, "splits": d.splits, "dataset_dir": str(d.dataset_dir.resolve()),
            "holdout": [d.holdout, d.holdout_seed], "target": str(prepare_target(d) or "as stored"),
            **{k: getattr(d.prepare, k) for k in PREPARE_KEYS}},
            digests={"manifest": lambda p: dataset_checksum(p.parent)}),
        Stage("train", do_train, inputs=lambda: _training_inputs(cfg), needs=("prepare",), everywhere=True),
        Stage("evaluate", do_evaluate, needs=("prepare", "train"), everywhere=True,
              inputs=lambda: {**eval_settings(cfg, select_metrics(cfg, cfg.metrics)),
                              "extractor": extractor_digest(cfg, select_metrics(cfg, cfg.metrics))}),
        Stage("report", do_report, inputs=lambda: {"format": 1}, needs=("train", "evaluate")),
    ], RunFolder(run_dir).pipeline, ranks=ranks)
    return pipeline


def _log_report(cfg: PipelineRun, run_dir: Path, report: Path) -> None:
    run = RunFolder(run_dir).mlflow_run_record()
    if not cfg.tracking.enabled or run is None:
        return
    from mlflow import MlflowClient

    from orchestration.mlflow.pending import fail_fast, warn

    fail_fast()
    try:
        MlflowClient(run["uri"]).log_artifact(run["run_id"], str(report))
    except Exception as e:  # noqa: BLE001 - the report is on disk
        warn(f"could not log {report} to {run['uri']} ({type(e).__name__}: {str(e)[:200]})")


def run_pipeline(cfg: PipelineRun, run_dir: Path, dcfg: DictConfig) -> dict[str, str]:
    from lzn.task import validate_task
    from pipelines.cli import device
    from pipelines.ranks import process_group

    validate_task(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.backend != "local":
        raise UserError(f"backend={cfg.backend} under torchrun (WORLD_SIZE={world}): each rank would start its "
                        "own Ray job; use backend=local (the ranks train and evaluate together) or one process")
    with process_group(device(cfg.device)) as ranks:
        return task_pipeline(cfg, run_dir, dcfg, ranks).run(cfg.stages)


@hydra.main(version_base="1.3", config_path="conf", config_name="run")
def main(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    cfg = guarded(lambda: to_run_config(dcfg))
    try:
        status = guarded(lambda: run_pipeline(cfg, run_dir, dcfg))
    except StageFailed as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        bad_input = isinstance(e.cause, UserError)
        if not bad_input and not isinstance(e.cause, OtherRankFailed):  # a failed run keeps its story
            traceback.print_exception(e.cause)
        done = [s for s in STAGES[:STAGES.index(e.stage)]]
        print(f"error: {e}\nThe outputs of {done or 'no stage'} are kept; run the same command again to resume "
              f"from stage {e.stage!r}" + (" (HYDRA_FULL_ERROR=1 shows the traceback)." if bad_input else "."),
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT if bad_input else EXIT_FAILED) from None
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 prints the results
        return
    print_header("run done")
    print("stages: " + ", ".join(f"{k} {v}" for k, v in status.items()))
    metrics = RunFolder(run_dir).read_metrics()
    if metrics is not None:
        print_metrics(metrics)
    print(f"run folder: {run_dir}", flush=True)


if __name__ == "__main__":
    from pipelines.cli import entry  # an unknown task= is refused with suggestions before Hydra composes

    sys.exit(entry(main))
