"""The contract a training run has with the scheduler that watches it (Ray Tune's ASHA):
what it reports at each checkpoint, under which key, with which report index, and its final
result. Ray Train's workers (`orchestration.ray.train`), the run itself
(`orchestration.run`) and the sweep (`orchestration.ray.tune`) all speak it from here.

The report index a scheduler counts time in is the checkpoint's number: 1..n for the n
checkpoints of a run of `train.iterations` steps, n + 1 for the final result (after the
evaluation), so a resumed trial continues the same count.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from orchestration.folder import RunFolder

if TYPE_CHECKING:  # annotations only: lzn.trainer loads torch, which the contract does not need
    from lzn.trainer import TrainConfig

# The keys of a reported result.
REPORT_INDEX = "report"  # the checkpoint's index: the time a scheduler counts in
STEP = "step"  # the training step reached
FINAL = "final"  # 1 on the run's final result only


def tune_key(metric: str) -> str:
    """The name a metrics.json key is reported under to Tune (no '/': Tune nests on it)."""
    return metric.replace("/", "_")


def report_index(step: int, checkpoint_every: int) -> int:
    """The index of the checkpoint saved at `step` (1 for the first)."""
    return math.ceil(step / checkpoint_every)


def checkpoints_of(train: TrainConfig) -> int:
    """How many checkpoints a run of `train.iterations` steps reports."""
    return report_index(train.iterations, train.checkpoint_every)


def checkpoint_report(key: str, value: float, step: int, train: TrainConfig) -> dict:
    """What a run reports with the checkpoint saved at `step`: its metric `key` and index."""
    return {tune_key(key): value, REPORT_INDEX: report_index(step, train.checkpoint_every)}


def final_report(steps: int, train: TrainConfig, key: str, value: float | None) -> dict:
    """The last result of a run: trained `steps`, evaluated (`value` of `key`; None: unknown)."""
    final = {STEP: int(steps), FINAL: 1, REPORT_INDEX: checkpoints_of(train) + 1}
    if value is not None:
        final[tune_key(key)] = float(value)
    return final


def record_checkpoint_metric(folder: RunFolder, step: int, key: str, value: float) -> None:
    """Append a checkpoint's metric to the run's checkpoint log (what `finished_result` reads
    back for a run evaluated only at its checkpoints)."""
    with folder.checkpoint_metrics.open("a") as f:
        f.write(json.dumps({STEP: step, key: value}) + "\n")


def finished_result(run_dir: str | Path, key: str, iterations: int) -> tuple[int, float] | None:
    """(steps, value of `key`) of a run that trained to the end and was recorded: its
    metrics.json, or for a run without in-run evaluation (evaluate=False) its last checkpoint's
    evaluation (the checkpoint log); None otherwise."""
    folder = RunFolder(run_dir)
    result = folder.read_metrics()
    if result is None:
        return None
    steps = int(result.get("train/steps", 0))
    if steps < iterations:
        return None
    if key in result:
        return steps, float(result[key])
    log = folder.checkpoint_metrics
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    last = [r for r in rows if r.get(STEP) == steps and key in r]
    return (steps, float(last[-1][key])) if last else None
