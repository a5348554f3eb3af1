"""A run's folder on disk: the one place that names its files.

    <run folder>/
      checkpoints/ckpt-<step>.pt        lzn's checkpoint store (local, torchrun, Slurm DDP)
      ray/ckpt-<step>/ckpt.pt           Ray Train's checkpoint store (backend=ray)
      metrics.json                      the run's summary: training, then its evaluation
      train_metrics.jsonl               the step metrics, one JSON line per log step (rank 0)
      checkpoint_metrics.jsonl          a sweep's metric at each checkpoint (rank 0)
      mlflow_run.json                   which MLflow run the folder continues
      mlflow_pending.jsonl              what the MLflow server has not taken yet
      trained_with.json                 the flattened config the checkpoints were trained with
      artifacts/                        the run's plots
      eval/step-<N>-<key>/              one evaluation of the step-N checkpoint (`EvalFolder`)
      eval/step-<N>-train/parts/        the run's own evaluation of its final EMA model: ranks.json, which
                                        rank computed each part (the parts go once it is reduced)
      eval/step-<N>-report/parts/       the same of a sweep's metric at the step-N checkpoint
      workers/rank-<r>.json             where each worker ran (node, IP, pid)
      pipeline/                         the stage DAG's records
      report.md                         the report stage's page
      .hydra/config.yaml                the resolved config Hydra composed
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lzn.atomic import write_atomically

RAY_STORAGE = "ray"  # Ray Train's run folder inside the run folder
RAY_CHECKPOINT_FILE = "ckpt.pt"
METRICS = "metrics.json"
CONFIG_FILE = "config.yaml"  # the training config, in .hydra/ and as the MLflow run's artifact
MLFLOW_RUN = "mlflow_run.json"
MLFLOW_PENDING = "mlflow_pending.jsonl"
PARTS_WORKERS = "workers.json"  # in an evaluation's parts/: where each part was computed (its Ray actor's node, pid)
PARTS_RANKS = "ranks.json"  # in an evaluation's parts/: which rank of a training run computed each part
# The evaluations a training run makes of its own EMA model (`eval/step-<N>-<name>/`; the
# evaluate stage's are named by a hash of 12 hex digits, so they never meet these).
FINAL_EVALUATION = "train"
CHECKPOINT_EVALUATION = "report"


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's name (ckpt-<step>.pt, or ckpt-<step>/ckpt.pt); -1 if none."""
    m = re.search(r"ckpt-(\d+)", f"{Path(path).parent.name}/{Path(path).name}")
    return int(m.group(1)) if m else -1


def write_json(path: Path, value) -> None:
    """`value` as indented, key-sorted JSON, written atomically (a crash leaves the old file)."""
    write_atomically(path, lambda f: f.write(json.dumps(value, indent=2, sort_keys=True).encode() + b"\n"))


@dataclass(frozen=True)
class _Folder:
    """A folder of records with its summary in metrics.json (a run's, an evaluation's)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def read_metrics(self) -> dict | None:
        return json.loads(self.metrics.read_text()) if self.metrics.is_file() else None

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics, metrics)


class EvalFolder(_Folder):
    """One evaluation of one checkpoint, eval/step-<N>-<key>/ in a run folder:

      metrics.json      its numbers
      settings.json     what they were computed with (the checkpoint, its sha256, the settings)
      plots/            its PNGs
      parts/            the metrics' parts (a rerun reuses them); parts/workers.json on Ray,
                        parts/ranks.json in a training run
      .complete         written last: the evaluation is whole (holds its key)
      .logged           it is in MLflow (its run id and server)
    """

    @property
    def settings(self) -> Path:
        return self.path / "settings.json"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def parts(self) -> Path:
        return self.path / "parts"

    @property
    def part_ranks(self) -> Path:
        """{unit name: rank} of the parts a training run's ranks computed (`lzn.evaluate.evaluate_on_ranks`)."""
        return self.parts / PARTS_RANKS

    @property
    def complete(self) -> Path:
        return self.path / ".complete"

    @property
    def logged(self) -> Path:
        return self.path / ".logged"


class RunFolder(_Folder):
    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoints(self) -> Path:
        from lzn.checkpoint import CHECKPOINT_DIR  # here: the dashboards import the folder layout without torch

        return self.path / CHECKPOINT_DIR

    @property
    def ray_storage(self) -> Path:
        return self.path / RAY_STORAGE

    @staticmethod
    def ray_checkpoint_name(step: int) -> str:
        """The folder Ray Train keeps the step's checkpoint in, inside `ray_storage`."""
        return f"ckpt-{step:09d}"

    def ray_checkpoint(self, name: str) -> Path:
        return self.ray_storage / name / RAY_CHECKPOINT_FILE

    def all_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, file) of every checkpoint, in both layouts."""
        from lzn.checkpoint import list_checkpoints  # here: the dashboards import the folder layout without torch

        found = list_checkpoints(self.checkpoints)
        return found + [(checkpoint_step(p), p) for p in self.ray_storage.glob(f"ckpt-*/{RAY_CHECKPOINT_FILE}")]

    def latest_checkpoint(self) -> Path | None:
        found = self.all_checkpoints()
        return max(found)[1] if found else None

    def has_ray_checkpoints(self) -> bool:
        return any(self.ray_storage.glob("ckpt-*"))

    def has_checkpoints(self) -> bool:
        from lzn.checkpoint import list_checkpoints  # here: the dashboards import the folder layout without torch

        return bool(list_checkpoints(self.checkpoints)) or self.has_ray_checkpoints()

    # ------------------------------------------------------------------ records
    @property
    def train_log(self) -> Path:
        return self.path / "train_metrics.jsonl"

    @property
    def checkpoint_metrics(self) -> Path:
        return self.path / "checkpoint_metrics.jsonl"

    @property
    def mlflow_run(self) -> Path:
        return self.path / MLFLOW_RUN

    @property
    def mlflow_pending(self) -> Path:
        return self.path / MLFLOW_PENDING

    @property
    def trained_with(self) -> Path:
        return self.path / "trained_with.json"

    @property
    def hydra_config(self) -> Path:
        return self.path / ".hydra" / CONFIG_FILE

    @property
    def hydra_overrides(self) -> Path:
        return self.path / ".hydra" / "overrides.yaml"

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    @property
    def workers(self) -> Path:
        return self.path / "workers"

    def worker_record(self, rank: int) -> Path:
        """Where the worker of `rank` (Ray Train, torchrun, Slurm) records where it ran:
        `orchestration.network.node_identity()` (hostname, pid, node IP, Ray node id or Slurm
        node name) with its rank and world size."""
        return self.workers / f"rank-{rank}.json"

    @property
    def pipeline(self) -> Path:
        return self.path / "pipeline"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def lock(self) -> Path:
        return self.path / ".lock"

    def evaluation(self, step: int, key: str) -> EvalFolder:
        """The folder of the step-`step` checkpoint's evaluation under `key`."""
        return EvalFolder(self.path / "eval" / f"step-{step}-{key}")

    def final_evaluation(self, step: int) -> EvalFolder:
        """Where the run's ranks evaluate its EMA model at the end of training (step `step`)."""
        return self.evaluation(step, FINAL_EVALUATION)

    def checkpoint_evaluation(self, step: int) -> EvalFolder:
        """Where the run's ranks evaluate a sweep's metric at the step-`step` checkpoint."""
        return self.evaluation(step, CHECKPOINT_EVALUATION)

    def mlflow_run_record(self) -> dict | None:
        """{"run_id", "uri", ...} of the MLflow run this folder continues, if it has one."""
        return json.loads(self.mlflow_run.read_text()) if self.mlflow_run.is_file() else None

    def mlflow_run_id(self) -> str | None:
        record = self.mlflow_run_record()
        return None if record is None else record["run_id"]

    def is_run_folder(self) -> bool:
        return self.hydra_config.is_file() or self.mlflow_run.is_file()

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> "RunFolder | None":
        """The run folder a checkpoint file lies in (either layout), if it is in one."""
        for folder in list(Path(checkpoint).parents)[:3]:
            if cls(folder).is_run_folder():
                return cls(folder)
        return None
