"""A sweep's leaderboard: its trials ranked, as Markdown for the console and as the
leaderboard.csv the sweep's MLflow parent run keeps.

Torch-free (no Ray, no lzn): `dashboards.report` joins on `LEADERBOARD_RUN_ID` without
loading the training stack; `orchestration.ray.tune` builds the rows.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Protocol

LEADERBOARD_RUN_ID = "mlflow_run_id"  # the leaderboard.csv column dashboards.report joins on


class SweepRanking(Protocol):
    """What the leaderboard reads of an `orchestration.ray.tune.SweepConfig` (not imported:
    tune.py imports this module, and torch)."""

    metric: str  # the column ranked on
    mode: str  # min or max
    space: Mapping[str, Any]  # the swept keys, in the columns' order


@dataclass
class TrialRow:
    trial: str
    status: str  # finished, stopped early, error
    value: Optional[float]
    steps: int
    params: dict[str, Any]
    run_id: Optional[str]


def leaderboard(sweep: SweepRanking, rows: list[TrialRow]) -> list[TrialRow]:
    """Finished trials by the metric (best first), then stopped ones by their last value, then errors."""
    sign = 1 if sweep.mode == "min" else -1
    rank = {"finished": 0, "stopped early": 1, "error": 2}

    def key(r):
        value = r.value if r.value is not None and math.isfinite(r.value) else math.inf
        return rank[r.status], sign * value if value != math.inf else math.inf

    return sorted(rows, key=key)


def leaderboard_markdown(sweep: SweepRanking, rows: list[TrialRow]) -> str:
    keys = list(sweep.space)
    head = ["rank", "trial", "status", sweep.metric, "steps", *keys, "MLflow run"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, r in enumerate(rows, 1):
        value = "" if r.value is None else f"{r.value:.6g}"
        params = [f"{r.params.get(k):.4g}" if isinstance(r.params.get(k), float) else str(r.params.get(k))
                  for k in keys]
        lines.append("| " + " | ".join([str(i), r.trial, r.status, value, str(r.steps), *params,
                                        r.run_id or ""]) + " |")
    return "\n".join(lines) + "\n"


def leaderboard_csv(sweep: SweepRanking, rows: list[TrialRow]) -> str:
    """The leaderboard as CSV: rank, trial, status, <metric>, steps, <swept keys>, mlflow_run_id."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    keys = list(sweep.space)
    writer.writerow(["rank", "trial", "status", sweep.metric, "steps", *keys, LEADERBOARD_RUN_ID])
    for i, r in enumerate(rows, 1):
        writer.writerow([i, r.trial, r.status, r.value, r.steps, *[r.params.get(k) for k in keys], r.run_id or ""])
    return buffer.getvalue()
