"""`python -m pipelines.train task=<name> [scale=smoke] [backend=local|ray] [key=value ...]`:
prepare the data if needed, train, evaluate, write metrics.json in the run's folder, log
the run to MLflow, and name the folder on the last line.

backend=local runs in this process, or under torchrun (rank and world size from the
environment); backend=ray runs the same loop on `trainer.num_workers` Ray Train workers
($RAY_ADDRESS, or a local Ray). The run folder is outputs/<task>/<scale>-seed<seed> unless
`run_name=` says otherwise; re-running the same command resumes from its latest checkpoint
and continues the same MLflow run. Tracking: $MLFLOW_TRACKING_URI, or `tracking.uri=`, or a
local MLflow server under <output_dir>/mlflow that the first run starts (`tracking.enabled=false`
turns tracking off).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipelines.cli import guarded, print_header, print_metrics
from pipelines.config import to_run_config
from pipelines.stages.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = guarded(lambda: train(to_run_config(dcfg), run_dir, dcfg))
    if int(os.environ.get("RANK", "0")) == 0:
        print_header("run done")
        print_metrics(metrics)
        print(f"run folder: {run_dir}", flush=True)


if __name__ == "__main__":
    from pipelines.cli import entry  # an unknown task= is refused with suggestions before Hydra composes

    sys.exit(entry(main))
