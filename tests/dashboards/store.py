"""A sweep in an MLflow store, written the way the pipelines write it (a parent run tagged
`lzn.sweep` with the sweep's params and `leaderboard.csv`, nested trial runs with their
params, loss curves, metric and plots), plus an RF baseline run: what `make sweep` and
`make train ... objective=rf` leave behind, in seconds instead of minutes."""
from __future__ import annotations

import math
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestration.ray.leaderboard import TrialRow, leaderboard, leaderboard_csv
from orchestration.ray.tune import ParamSpec, SweepConfig

SPACE = {"optim.lr.encoder": ParamSpec(kind="loguniform", low=3e-5, high=1e-3),
         "latent.dim": ParamSpec(kind="choice", values=[8, 16, 32])}
# (trial, status, lr, dim, fid or None, steps)
TRIALS = [("t0", "finished", 1e-4, 16, 35.5, 400), ("t1", "stopped early", 8e-4, 8, 80.0, 200),
          ("t2", "finished", 5e-5, 32, 41.2, 400), ("t3", "error", 3e-4, 16, None, 100)]


@dataclass
class Store:
    uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    runs: dict[str, str] = field(default_factory=dict)  # trial -> run id
    rf_run_id: str = ""


def png(path: Path, seed: int, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3), dpi=60)
    ax.imshow(np.random.default_rng(seed).random((16, 16)), cmap="viridis")
    ax.set_title(title)
    fig.savefig(path)
    plt.close(fig)
    return path


def _run(client, experiment_id: str, name: str, params: dict, tags: dict, loss_seed: int, steps: int,
         metrics: dict, plots: list[str], status: str, tmp: Path) -> str:
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(experiment_id, run_name=name, tags=tags)
    rid = run.info.run_id
    losses = [Metric("loss", 2.0 * math.exp(-s / 150) + 0.1 * loss_seed, 1000 + s, s) for s in range(50, steps + 1, 50)]
    finals = [Metric(k, v, 2000, steps) for k, v in metrics.items()]
    client.log_batch(rid, metrics=losses + finals, params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[RunTag("mlflow.runName", name)])
    for i, plot in enumerate(plots):
        client.log_artifact(rid, str(png(tmp / plot, loss_seed * 10 + i, f"{name} {plot}")), "plots")
    client.set_terminated(rid, status)
    return rid


def make_sweep_store(uri: str, experiment: str | None = None, *, with_rf: bool = True,
                     leaderboard_file: bool = True) -> Store:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = experiment or f"gen_digits-{uuid.uuid4().hex[:8]}"
    eid = client.create_experiment(experiment)
    sweep = SweepConfig(metric="eval/fid", mode="min", space=dict(SPACE), num_samples=len(TRIALS))
    parent = client.create_run(eid, run_name="sweep-smoke", tags={"lzn.sweep": "smoke"})
    pid = parent.info.run_id
    from mlflow.entities import Param

    client.log_batch(pid, params=[Param("sweep.metric", "eval/fid"), Param("sweep.mode", "min"),
                                  Param("objective", "generation"),
                                  *[Param(f"sweep.space.{k}.kind", s.kind) for k, s in SPACE.items()]])
    out = Store(uri, experiment, eid, pid)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, (trial, status, lr, dim, fid, steps) in enumerate(TRIALS):
            finished = status == "finished"
            rid = _run(client, eid, f"trial-{trial}", {"objective": "generation", "optim.lr.encoder": lr,
                                                       "latent.dim": dim},
                       {"mlflow.parentRunId": pid, "lzn.sweep": "smoke", "lzn.trial": trial,
                        "lzn.sweep.status": status}, i, steps,
                       {"eval/fid": fid, "eval/fid_samples": 500.0} if finished else {},
                       ["samples.png", "latent_zones.png", "loss_curves.png"] if finished else [],
                       {"finished": "FINISHED", "error": "FAILED"}.get(status, "KILLED"), tmp)
            out.runs[trial] = rid
            rows.append(TrialRow(trial, status, fid, steps, {"optim.lr.encoder": lr, "latent.dim": dim}, rid))
        if leaderboard_file:  # what the sweep writes at its end
            (tmp / "leaderboard.csv").write_text(leaderboard_csv(sweep, leaderboard(sweep, rows)))
            client.log_artifact(pid, str(tmp / "leaderboard.csv"))
            client.set_terminated(pid, "FINISHED")
        if with_rf:
            out.rf_run_id = _run(client, eid, "rf-seed0", {"objective": "rf"}, {}, 7, 400, {"eval/fid": 52.0, "eval/fid_samples": 500.0},
                                 ["samples.png"], "FINISHED", tmp)
    return out
