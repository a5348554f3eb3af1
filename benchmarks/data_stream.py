"""Step time of a streamed run (data.loader=stream, Ray Data) vs the same run held in memory,
on a small dataset: the digits task, whose 1257 training rows make a pass of 9.8 steps at
global batch 128, so a run of 200 steps makes about 20 passes over its shard.

Both sides run `python -m pipelines.train task=gen_digits backend=ray` with 1 Ray Train
worker (1 CPU; Ray Data's read tasks get the machine's other CPU), logging to a local MLflow
server this benchmark starts and stops. Step time is the trainer's own clock without the
checkpoints ((train/seconds - train/checkpoint_seconds) / steps): a streamed step that
waits for a new Ray Data execution at the start of every pass pays for it here. Each side
is measured twice and the faster kept; the goal is a streamed step within 1.5x an
in-memory step.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from orchestration.folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.5  # a streamed step costs at most this many in-memory steps


def _run(out: Path, uri: str, loader: str, iterations: int, name: str) -> dict:
    env = {**os.environ, "LZN_DATA_DIR": str(out / "data"), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    overrides = ["task=gen_digits", "backend=ray", "trainer.num_workers=1", "trainer.cpus_per_worker=1",
                 f"data.loader={loader}", f"train.iterations={iterations}", "train.log_every=50",
                 f"train.checkpoint_every={iterations}", "eval.fid_samples=64", "eval.sampler_steps=2",
                 "train.progress=false", f"output_dir={out}", f"run_name={name}", "tracking.register_model=false"]
    done = subprocess.run([sys.executable, "-m", "pipelines.train", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"data.loader={loader} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return RunFolder(out / "gen_digits" / name).read_metrics()


def step_ms(metrics: dict) -> float:
    return 1e3 * (metrics["train/seconds"] - metrics["train/checkpoint_seconds"]) / metrics["train/steps"]


def measure(quick: bool = False) -> list[dict]:
    """Rows {loader, steps, passes, step ms, vs memory} of the faster of two runs per loader."""
    from lzn.data.shards import read_manifest
    from orchestration.mlflow.server import local_server, stop_local_server

    iterations = 60 if quick else 200
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lzn-bench-stream-") as tmp:
        out = Path(tmp)
        uri = local_server(out / "mlflow")
        try:
            for attempt in range(2):
                for loader in ("memory", "stream"):
                    m = _run(out, uri, loader, iterations, f"{loader}-{attempt}")
                    if loader not in best or step_ms(m) < step_ms(best[loader]):
                        best[loader] = m
        finally:
            stop_local_server(out / "mlflow")
        rows = read_manifest(out / "data" / "digits")["splits"]["train"]["rows"]
    memory = step_ms(best["memory"])
    return [{"loader": loader, "steps": int(m["train/steps"]), "passes": round(m["train/steps"] * 128 / rows, 1),
             "step ms": step_ms(m), "vs memory": step_ms(m) / memory, "goal": f"<= {GOAL:g}x"}
            for loader, m in best.items()]
