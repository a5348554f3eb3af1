"""Training step time of the Ray Train backend vs the local backend at the same total
thread budget, and the share of step time spent logging (JSON lines + MLflow).

Both sides run `python -m pipelines.train task=gen_digits` (the full digits model, global
batch 128) with metrics reported at every step (the worst case for logging) to a local
MLflow server this benchmark starts and stops: local = one process with 2 torch threads;
ray = 2 Ray Train workers with 1 thread each (gloo all-gather of the anchors and all-reduce
of the gradients). Step time is the trainer's own clock (train/seconds, checkpoints
included) over the steps, so process and Ray start-up are not counted; each side is
measured twice and the faster run is kept.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import table

OUT = Path("bench-results")
ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, uri: str, backend: str, iterations: int, name: str) -> dict:
    threads = "2" if backend == "local" else "1"
    env = {**os.environ, "LZN_DATA_DIR": str(out / "data"), "OMP_NUM_THREADS": threads,
           "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    overrides = ["task=gen_digits", f"backend={backend}", f"train.iterations={iterations}", "train.log_every=1",
                 f"train.checkpoint_every={max(1, iterations // 2)}", "eval.fid_samples=64", "eval.sampler_steps=2",
                 "train.progress=false", f"output_dir={out}", f"run_name={name}", "tracking.register_model=false"]
    if backend == "ray":
        overrides += ["trainer.num_workers=2", "trainer.cpus_per_worker=1"]
    done = subprocess.run([sys.executable, "-m", "pipelines.train", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{backend} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads((out / "gen_digits" / name / "metrics.json").read_text())


def main(quick: bool = False) -> None:
    from orchestration.tracking import local_server, stop_local_server

    iterations = 30 if quick else 200
    rows = []
    with tempfile.TemporaryDirectory(prefix="lzn-bench-train-") as tmp:
        out = Path(tmp)
        uri = local_server(out / "mlflow")
        try:
            best = {}
            for attempt in range(2):
                for backend in ("local", "ray"):
                    m = _run(out, uri, backend, iterations, f"{backend}-{attempt}")
                    step_ms = 1e3 * m["train/seconds"] / m["train/steps"]
                    if backend not in best or step_ms < best[backend][0]:
                        best[backend] = (step_ms, m)
        finally:
            stop_local_server(out / "mlflow")
    local_ms = best["local"][0]
    for backend, (step_ms, m) in best.items():
        rows.append({"backend": backend, "workers x threads": "1 x 2" if backend == "local" else "2 x 1",
                     "steps": int(m["train/steps"]), "step ms": step_ms,
                     "vs local": f"{step_ms / local_ms - 1:+.1%}",
                     "logging share": f"{m['train/logging_seconds'] / m['train/seconds']:.2%}"})
    print("\nTraining backends (gen_digits, global batch 128, metrics logged every step)")
    print(table(rows))
    OUT.mkdir(exist_ok=True)
    (OUT / "train.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
