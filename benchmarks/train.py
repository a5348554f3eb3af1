"""Training step time of the Ray Train backend vs the local backend at the same total
thread budget, the time per checkpoint, and the share of training time spent logging
(JSON lines + MLflow).

Both sides run `python -m pipelines.train task=gen_digits` (the full digits model, global
batch 128, 200 steps, 2 checkpoints) logging to a local MLflow server this benchmark starts
and stops: local = one process with 2 torch threads; ray = 2 Ray Train workers with 1
thread each (gloo all-gather of the anchors, all-reduce of the gradients, Ray Train's
checkpoint reports); local (torchrun) = the same 2 x 1 processes under torchrun, which
separates what Ray costs from what data parallelism on this machine costs. Step time is
the trainer's own clock without the checkpoints (train/seconds - train/checkpoint_seconds,
per step), so process and Ray start-up are not
counted. Metrics are reported every 50 steps (the task's setting) and at every step (the
worst case for logging); each run is measured twice and the faster kept.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import table
from orchestration.folder import RunFolder

OUT = Path("bench-results")
ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, uri: str, backend: str, iterations: int, name: str, log_every: int) -> dict:
    threads = "2" if backend == "local" else "1"
    launcher = [sys.executable, "-m"]
    if backend == "torchrun":  # the local backend as 2 processes: what data parallelism costs without Ray
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                    "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m"]
    env = {**os.environ, "LZN_DATA_DIR": str(out / "data"), "OMP_NUM_THREADS": threads,
           "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    overrides = ["task=gen_digits", f"backend={'ray' if backend == 'ray' else 'local'}",
                 f"train.iterations={iterations}", f"train.log_every={log_every}",
                 f"train.checkpoint_every={_checkpoint_every(iterations)}", "eval.fid_samples=64",
                 "eval.sampler_steps=2", "train.progress=false", f"output_dir={out}", f"run_name={name}", "tracking.register_model=false"]
    if backend == "ray":
        overrides += ["trainer.num_workers=2", "trainer.cpus_per_worker=1"]
    done = subprocess.run([*launcher, "pipelines.train", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{backend} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return RunFolder(out / "gen_digits" / name).read_metrics()


def _checkpoint_every(iterations: int) -> int:
    return max(1, iterations // 2)


def _checkpoints(steps: int) -> int:
    return math.ceil(steps / _checkpoint_every(steps))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_ms(m: dict) -> float:
    return 1e3 * (m["train/seconds"] - m["train/checkpoint_seconds"]) / m["train/steps"]


def main(quick: bool = False) -> None:
    from orchestration.mlflow.server import local_server, stop_local_server

    iterations = 30 if quick else 200
    runs = [(backend, log_every) for log_every in (50, 1) for backend in ("local", "torchrun", "ray")]
    best: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lzn-bench-train-") as tmp:
        out = Path(tmp)
        uri = local_server(out / "mlflow")
        try:
            for attempt in range(2):
                for backend, log_every in runs:
                    m = _run(out, uri, backend, iterations, f"{backend}-{log_every}-{attempt}", log_every)
                    key = (backend, log_every)
                    if key not in best or _step_ms(m) < _step_ms(best[key]):
                        best[key] = m
        finally:
            stop_local_server(out / "mlflow")
    rows = []
    for (backend, log_every), m in best.items():
        local = _step_ms(best[("local", log_every)])
        rows.append({"backend": "local (torchrun)" if backend == "torchrun" else backend,
                     "workers x threads": "1 x 2" if backend == "local" else "2 x 1",
                     "log every": log_every, "steps": int(m["train/steps"]), "step ms": _step_ms(m),
                     "vs local": f"{_step_ms(m) / local - 1:+.1%}",
                     "checkpoint s": m["train/checkpoint_seconds"] / _checkpoints(int(m["train/steps"])),
                     "logging share": f"{m['train/logging_seconds'] / m['train/seconds']:.2%}"})
    print("\nTraining backends (gen_digits, global batch 128; step time without checkpoints; "
          "checkpoint s: seconds per checkpoint)")
    print(table(rows))
    OUT.mkdir(exist_ok=True)
    (OUT / "train.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
