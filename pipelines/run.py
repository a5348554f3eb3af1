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
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from orchestration.folder import METRICS, RunFolder
from pipelines.config import RunConfig, to_run_config
from pipelines.dag import Pipeline, Stage, StageFailed
from pipelines.evaluate import EvalRun, Target, evaluate_checkpoint, extractor_digest, main_guarded, print_metrics

STAGES = ("prepare", "train", "evaluate", "report")
# Beyond RESUMABLE_PARAMS (how or where a run goes), the length of training is an input of
# the train stage (more iterations train on); where the raw data lies is not.
TRAIN_LENGTH, NOT_TRAINING = "train.iterations", ("data.root", "run_name")
PREPARE_KEYS = ("shard_mb", "shard_rows", "raw_max_side")


@dataclass
class PipelineRun(EvalRun):
    stages: Optional[list[str]] = None  # None: all of STAGES


ConfigStore.instance().store(name="pipeline_schema", node=PipelineRun)


def as_run_config(cfg: RunConfig) -> RunConfig:
    """The plain training config (what pipelines.train would log), without the DAG's keys."""
    return RunConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)})


def _training_inputs(cfg: RunConfig) -> dict:
    from orchestration.mlflow.runs import resumable
    from orchestration.mlflow.tracker import flatten_params

    params = flatten_params(dataclasses.asdict(as_run_config(cfg)))
    return {k: v for k, v in params.items()
            if k == TRAIN_LENGTH or not (resumable(k) or k in NOT_TRAINING)}


def task_pipeline(cfg: PipelineRun, run_dir: Path, dcfg: DictConfig) -> Pipeline:
    from lzn.evaluate import select_metrics
    from lzn.reference_cache import manifest_checksum
    from lzn.data.shards import MANIFEST
    from orchestration.ray.evaluate import eval_settings
    from pipelines.prepare import prepare
    from pipelines.report import write_report
    from pipelines.train import run as train

    d = cfg.data
    train_dcfg = OmegaConf.masked_copy(dcfg, [f.name for f in dataclasses.fields(RunConfig)])
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
            **{k: getattr(d.prepare, k) for k in PREPARE_KEYS}},
            digests={"manifest": lambda p: manifest_checksum(p.parent)}),
        Stage("train", do_train, inputs=lambda: _training_inputs(cfg), needs=("prepare",)),
        Stage("evaluate", do_evaluate, needs=("prepare", "train"),
              inputs=lambda: {**eval_settings(cfg, select_metrics(cfg, cfg.metrics)),
                              "extractor": extractor_digest(cfg, select_metrics(cfg, cfg.metrics))}),
        Stage("report", do_report, inputs=lambda: {"format": 1}, needs=("train", "evaluate")),
    ], RunFolder(run_dir).pipeline)
    return pipeline


def _log_report(cfg, run_dir: Path, report: Path) -> None:
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

    validate_task(cfg)
    return task_pipeline(cfg, run_dir, dcfg).run(cfg.stages)


@hydra.main(version_base="1.3", config_path="conf", config_name="run")
def main(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    cfg = main_guarded(lambda: to_run_config(dcfg))
    try:
        status = main_guarded(lambda: run_pipeline(cfg, run_dir, dcfg))
    except StageFailed as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        done = [s for s in STAGES[:STAGES.index(e.stage)]]
        raise SystemExit(f"error: {e}\nThe outputs of {done or 'no stage'} are kept; run the same command again "
                         f"to resume from stage {e.stage!r} (HYDRA_FULL_ERROR=1 shows the traceback).") from None
    print("stages: " + ", ".join(f"{k} {v}" for k, v in status.items()))
    metrics = RunFolder(run_dir).read_metrics()
    if metrics is not None:
        print_metrics(metrics)
    print(f"run folder: {run_dir}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
