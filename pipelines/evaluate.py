"""`python -m pipelines.evaluate task=<name> checkpoint=<path or MLflow run id> [metrics=[fid,...]]
[backend=local|ray] [trainer.num_workers=N] [eval.key=value ...]`: the evaluation stage alone.

checkpoint: a checkpoint file (checkpoints/ckpt-N.pt, or ray/ckpt-N/ckpt.pt), a run folder
(its latest checkpoint), or the id of an MLflow run that logged one. The model is built from
the run's own training config (`.hydra/config.yaml`, or the run's config.yaml artifact), so
`scale=` or model overrides need not be repeated; the command line sets how it is evaluated
(eval.*, metrics, backend, trainer). backend=ray shards sample generation and feature
extraction over `trainer.num_workers` Ray workers; the result does not depend on their number.

Results: <run folder>/eval/step-<N>-<key>/ (metrics.json, plots, and the parts: a re-run
resumes, an identical one is instant), the run folder's metrics.json when the checkpoint is
its latest, and the training run in MLflow (metrics at the checkpoint's step, plots under
eval/step-<N>/), or a new run in the task's experiment for a checkpoint without one.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pipelines.cli import guarded, print_header, print_metrics
from pipelines.config import to_run_config
from pipelines.stages.evaluate import evaluate_checkpoint, resolve_target, with_training_config


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(dcfg: DictConfig) -> None:
    from lzn.task import validate_task

    def run():
        cli = to_run_config(dcfg)
        target = resolve_target(cli.checkpoint, cli)
        cfg = with_training_config(dcfg, target)
        validate_task(cfg)
        for note in target.notes:
            print(note, file=sys.stderr)
        print(f"evaluating {target.checkpoint}", file=sys.stderr, flush=True)
        return evaluate_checkpoint(cfg, target)

    metrics, folder = guarded(run)
    print_header("evaluation done")
    print_metrics(metrics)
    print(f"evaluation folder: {folder}", flush=True)


if __name__ == "__main__":
    from pipelines.cli import entry  # an unknown task= is refused with suggestions before Hydra composes

    sys.exit(entry(main))
